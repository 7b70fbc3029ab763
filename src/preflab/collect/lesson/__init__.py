"""The lesson's demo, live: a person votes in the browser and watches a reward model and a policy learn from them.

A lesson project is an ordinary collection project (`preflab.collect.project`) whose pairs are candidates
from a tutoring-world SFT policy, plus `lesson.json` (the settings below). Because every prompt is a world
question, everything the person does can be measured against the world's known true utility:

    setup.py     `preflab collect demo`: build (or reuse) the SFT policy, sample candidates, create the project
    biases.py    the person's own biases (length, position, confidence) beyond what the true utility explains
    policy.py    "train the policy on my preferences": DPO (or PPO on the live reward model) in a background
                 process, then held-out prompts before / after with the change in true utility and KL
    simulate.py  "add simulated annotators": votes from `preflab.world.annotators` with a planted bias

The reward model is the collection app's own live reward model (`preflab.collect.live`), retrained every
`every` votes. Nothing here changes how votes are stored: the export stays the one bridge to training data.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

SETTINGS = "lesson.json"


@dataclass
class Lesson:
    """What a lesson project adds to a collection project (stored in DIR/lesson.json, mode 0600: it holds a link)."""

    sft: str  # the SFT policy (a model directory): candidates, reference, DPO/PPO start
    person: str = "you"  # the annotator whose biases the page shows
    link: str = ""  # the person's sign-in link (printed again when the demo restarts)
    every: int = 10  # retrain the reward model after every N new votes (0: only on the button)
    eval_prompts: int = 48  # held-out world prompts for the before / after panel
    max_new_tokens: int = 32  # longest sampled answer (before / after and PPO rollouts)
    dpo: dict = field(default_factory=lambda: {"max_steps": 24, "batch_size": 8, "lr": 2e-4, "beta": 0.1})
    ppo: dict = field(
        default_factory=lambda: {
            "max_steps": 6,
            "batch_size": 16,
            "mini_batch_size": 16,
            "micro_batch_size": 16,
            "lr": 1e-4,
            "beta": 0.05,
        }
    )
    seed: int = 0

    def save(self, directory: str | Path) -> None:
        path = Path(directory) / SETTINGS
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")
        path.chmod(0o600)


def load_lesson(directory: str | Path) -> Lesson | None:
    """The lesson settings of a project folder, or None when it is a plain collection project."""
    path = Path(directory) / SETTINGS
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return Lesson(**{k: v for k, v in data.items() if k in Lesson.__dataclass_fields__})
