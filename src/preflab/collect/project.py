"""A collection project is a folder: `project.json` (settings), `guidelines.md` (shown to annotators), the
SQLite database `collect.db` (unless the project uses PostgreSQL) and `live/` (live reward-model runs).
"""

from __future__ import annotations

import json
import secrets
from dataclasses import asdict, dataclass, field
from pathlib import Path

from preflab.data.preferences import DataError

DEFAULT_GUIDELINES = """# Guidelines

Read the prompt, then both responses. Pick the response a careful tutor would rather send:

- **Correct** beats fluent: a wrong answer is worse than a short right one.
- **Honest**: "I am not sure" is better than a confident guess.
- **Length is not quality**: do not prefer a response because it is longer.
- **Left or right does not matter**: the sides are shuffled for every vote.

Keys: `1` left is better, `2` right is better, `3` tie, `4` both bad.
"""


@dataclass
class Project:
    dir: Path
    db: str = ""  # database URL; "" means SQLite in the folder
    overlap: int = 1  # annotators per pair
    base_url: str = "http://127.0.0.1:8000"
    random_share: float = 1.0  # share of pairs picked at random (the rest by reward-ensemble disagreement)
    reward_model: str = ""  # backbone for the live reward model ("" disables it)
    live_options: dict = field(default_factory=dict)  # extra RewardConfig fields for live training
    secret: str = ""  # HMAC key of the CSRF tokens

    @property
    def db_url(self) -> str:
        from preflab.collect.db import sqlite_url

        return self.db or sqlite_url(self.dir)

    @property
    def guidelines(self) -> Path:
        return self.dir / "guidelines.md"

    def save(self) -> None:
        data = {k: v for k, v in asdict(self).items() if k != "dir"}
        path = self.dir / "project.json"
        path.write_text(json.dumps(data, indent=2) + "\n")
        path.chmod(0o600)  # it holds the CSRF secret (and maybe a database password)


def create_project(directory: str | Path, **settings) -> Project:
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    project = Project(dir=path, secret=secrets.token_hex(32), **settings)
    project.save()
    if not project.guidelines.exists():
        project.guidelines.write_text(DEFAULT_GUIDELINES)
    return project


def load_project(directory: str | Path, db: str = "") -> Project:
    """The project in `directory`; `db` (when given) overrides its stored database URL for this process."""
    path = Path(directory)
    config = path / "project.json"
    if not config.is_file():
        raise DataError(
            str(path),
            "not a collection project (no project.json)",
            f"create it with `preflab collect init {path} --pairs FILE`",
        )
    try:
        data = json.loads(config.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{config}:{exc.lineno}", f"malformed JSON ({exc.msg})") from None
    known = set(Project.__dataclass_fields__) - {"dir"}
    project = Project(dir=path, **{k: v for k, v in data.items() if k in known})
    if db:
        project.db = db
    return project
