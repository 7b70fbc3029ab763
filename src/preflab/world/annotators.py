"""Simulated annotators: noisy, optionally biased people voting on pairs of responses.

Each annotator prefers the response shown first (A) over the second (B) with probability

    P(A preferred) = sigmoid((u_A - u_B) / temperature + length_bias * (len_A - len_B) + position_bias)

where u is the world's true utility (`preflab.world.true_utility`), `temperature` is the annotator's own
noise (larger: noisier), `len` is the response length in WORDS (`preflab.data.n_words`: whitespace-separated,
so the bias does not depend on any tokenizer) and `position_bias > 0` favours the left/first response. A pool of
annotators is drawn from one seed; each vote is drawn from another.

The votes are written as the same comparison JSONL that people's votes are (`preflab.data.load_preferences`
reads both), one row per vote:

    {"prompt": [...], "chosen": "...", "rejected": "...", "annotator": "sim-03", "tie": false,
     "chosen_position": "A", "chosen_length": 9, "rejected_length": 4, "length_unit": "words"}

`chosen_position` says where the chosen response was shown, which the bias audit
(`preflab eval bias FILE`) needs. A tie (an annotator with `tie_rate > 0` facing two responses of equal
true utility) keeps the shown order, with `"tie": true`.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from preflab.data.text import n_words
from preflab.world.tutor import CORPUS_STYLE, DEMO_STYLE, Style, prompts, question_of, respond, task_for, true_utility

# Writers for candidate pairs straight from the world: a careful one and a sloppy, wordy one.
SLOPPY_STYLE = Style(p_right=0.5, p_hedge=0.15, p_polite=0.3, p_rude=0.3, mean_padding=1.5)
WORLD_STYLES = (DEMO_STYLE, CORPUS_STYLE, SLOPPY_STYLE)


@dataclass(frozen=True)
class Annotator:
    name: str
    temperature: float = 0.5  # noise: the utility difference is divided by it
    length_bias: float = 0.0  # logit per word of length difference (A minus B)
    position_bias: float = 0.0  # logit added in favour of the first-shown response
    tie_rate: float = 0.0  # probability of calling a tie when the true utilities are equal

    def p_first(self, u_a: float, u_b: float, len_a: int, len_b: int) -> float:
        """P(A preferred): the module docstring's formula."""
        z = (u_a - u_b) / self.temperature + self.length_bias * (len_a - len_b) + self.position_bias
        return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))  # no overflow


def annotator_pool(
    n: int = 8,
    seed: int = 0,
    temperature: tuple[float, float] = (0.3, 1.0),
    length_bias: float = 0.0,
    position_bias: float = 0.0,
    bias_spread: float = 0.0,
    tie_rate: float = 0.0,
) -> list[Annotator]:
    """n annotators, each with its own temperature drawn uniformly from `temperature`.

    Planted biases are shared by the pool; `bias_spread` (a share, e.g. 0.5) lets each annotator's biases
    vary by up to that share around the planted values.
    """
    if n < 1:
        raise ValueError(f"a pool needs at least one annotator, got n={n}")
    lo, hi = temperature
    if not 0 < lo <= hi:
        raise ValueError(f"temperature range must satisfy 0 < low <= high, got {temperature}")
    rng = random.Random(seed)
    pool = []
    for i in range(n):
        spread = lambda: 1.0 + bias_spread * rng.uniform(-1, 1)  # noqa: E731
        pool.append(
            Annotator(f"sim-{i:02d}", rng.uniform(lo, hi), length_bias * spread(), position_bias * spread(), tie_rate)
        )
    return pool


def world_pairs(
    n: int, seed: int = 0, split: str = "train", styles: tuple[Style, ...] = WORLD_STYLES, max_tries: int = 20
) -> list[tuple]:
    """n candidate pairs (prompt, response_a, response_b) straight from the world, two different writers each.

    Each pair draws two distinct styles from `styles` and two responses from `tutor.respond`; the order in the
    pair is random, so no style sits in one position. Identical responses are redrawn (a vote on two equal
    texts carries no preference).
    """
    rng = random.Random(seed)
    out = []
    for prompt in prompts(n, seed=seed, split=split):
        task = task_for(question_of(prompt))
        style_a, style_b = rng.sample(list(styles), 2)
        a = respond(task, rng, style_a)
        for _ in range(max_tries):
            b = respond(task, rng, style_b)
            if b != a:
                break
        else:
            continue
        out.append((prompt, a, b))
    return out


def simulate_votes(
    pairs: list[tuple],
    annotators: list[Annotator],
    seed: int = 0,
    votes_per_pair: int = 1,
    swap: bool = True,
    utility=None,
) -> list[dict]:
    """Votes on candidate pairs as comparison rows (see the module docstring).

    pairs: (prompt, response_a, response_b) with prompts from the world (chat messages or the question).
    Each pair is shown to `votes_per_pair` distinct annotators drawn from the pool (with replacement when the
    pool is smaller); with `swap` each showing puts the two responses in a random order, as a collection app
    would. `utility(prompt, response) -> float` defaults to the world's true utility.
    """
    if votes_per_pair < 1:
        raise ValueError(f"votes_per_pair must be >= 1, got {votes_per_pair}")
    utility = utility or (lambda p, r: true_utility(p, r).total)
    rng = random.Random(seed)
    rows = []
    for prompt, x, y in pairs:
        u = {x: utility(prompt, x), y: utility(prompt, y)}
        if votes_per_pair <= len(annotators):
            voters = rng.sample(annotators, votes_per_pair)
        else:
            voters = [rng.choice(annotators) for _ in range(votes_per_pair)]
        for who in voters:
            a, b = (y, x) if swap and rng.random() < 0.5 else (x, y)
            if who.tie_rate and u[a] == u[b] and rng.random() < who.tie_rate:
                chosen, rejected, position, tie = a, b, "A", True
            elif rng.random() < who.p_first(u[a], u[b], n_words(a), n_words(b)):
                chosen, rejected, position, tie = a, b, "A", False
            else:
                chosen, rejected, position, tie = b, a, "B", False
            rows.append(
                {
                    "prompt": prompt,
                    "chosen": chosen,
                    "rejected": rejected,
                    "annotator": who.name,
                    "tie": tie,
                    "chosen_position": position,
                    "chosen_length": n_words(chosen),
                    "rejected_length": n_words(rejected),
                    "length_unit": "words",
                }
            )
    return rows


def ceiling_accuracy(pairs: list[tuple], annotators: list[Annotator], utility=None) -> float:
    """Expected agreement of the best possible reward model with these annotators' (non-tie) votes.

    A reward model scores each response alone, so it cannot see where a response was shown: the best it can do
    on a pair is to order it the way most votes go, averaging each annotator's P(x preferred) over the two
    display orders and over the pool. Its expected accuracy is the mean over pairs of max(q, 1 - q). Position
    bias and annotator noise both lower this ceiling; ties are left out, as RM accuracy leaves them out.
    """
    utility = utility or (lambda p, r: true_utility(p, r).total)
    total = 0.0
    for prompt, x, y in pairs:
        ux, uy, lx, ly = utility(prompt, x), utility(prompt, y), n_words(x), n_words(y)
        q = sum(0.5 * (a.p_first(ux, uy, lx, ly) + 1.0 - a.p_first(uy, ux, ly, lx)) for a in annotators) / len(
            annotators
        )
        total += max(q, 1.0 - q)
    return total / max(len(pairs), 1)


def write_votes(path: str | Path, rows: list[dict]) -> Path:
    from preflab.data import write_jsonl

    return write_jsonl(path, rows)


def describe_pool(annotators: list[Annotator]) -> list[dict]:
    return [asdict(a) for a in annotators]
