"""`preflab collect init | annotator | serve | export | train`: the collection app's commands.

preflab collect init DIR --pairs runs/generate-x/pairs.jsonl --overlap 3
preflab collect annotator DIR ana            # prints ana's personal link
preflab collect serve DIR                    # http://127.0.0.1:8000
preflab collect export DIR --out votes.jsonl # then: preflab reward --data votes.jsonl ...
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from preflab.config import check, opt
from preflab.data.preferences import DataError, _check_text, read_jsonl
from preflab.stages import stage


def parse_pair_row(row, src: str, notes=None) -> list[dict]:
    """A row of pairs.jsonl ({prompt, response_a, response_b}) or responses.jsonl ({prompt, responses: [K]})."""
    from preflab.generate import candidate_pairs

    if not isinstance(row, dict):
        raise DataError(src, f"expected a JSON object, got {type(row).__name__}")
    prompt = _check_text(row, "prompt", src)
    if "responses" in row:
        responses = row["responses"]
        if not isinstance(responses, list) or not all(isinstance(r, str) for r in responses):
            raise DataError(src, "field 'responses': expected a list of strings")
        pairs = candidate_pairs(prompt, responses, random.Random(src))
        if not pairs:
            raise DataError(src, "fewer than two distinct non-empty responses: no pair to compare")
    else:
        for name in ("response_a", "response_b"):
            if not isinstance(row.get(name), str) or not row[name].strip():
                raise DataError(
                    src,
                    f"field '{name}': expected a non-empty string, got {row.get(name)!r:.60}",
                    "rows need response_a and response_b (pairs.jsonl) or responses (responses.jsonl)",
                )
        if row["response_a"] == row["response_b"]:
            raise DataError(src, "response_a and response_b are identical: nothing to compare")
        pairs = [{"prompt": prompt, "response_a": row["response_a"], "response_b": row["response_b"]}]
    for p in pairs:
        p["source"] = src[-200:]
    return pairs


def read_pairs(path: str) -> list[dict]:
    return [p for row in read_jsonl(path, parse_pair_row).rows for p in row]


@dataclass
class InitConfig:
    dir: str = opt("", "the project folder to create", positional=True)
    pairs: str = opt("", "pairs.jsonl from `preflab generate --pairs`, or responses.jsonl (K responses per prompt)")
    model: str = opt("", "instead of --pairs: a policy to generate the responses with (needs --prompts)")
    prompts: str = opt("", "with --model: a JSONL of {\"prompt\": ...} rows, or 'world'")
    k: int = opt(4, "with --model: responses per prompt (every pair of distinct ones is compared)")
    n_prompts: int = opt(0, "with --model: use the first N prompts (0: all; 'world' needs N > 0)")
    overlap: int = opt(1, "how many annotators see each pair")
    db: str = opt("", "database URL (default: SQLite collect.db in DIR), e.g. postgresql://user:pw@127.0.0.1/db")
    base_url: str = opt("http://127.0.0.1:8000", "the address people open (used in personal links)")
    random_share: float = opt(1.0, "share of pairs picked at random; the rest by live reward-ensemble disagreement")
    reward_model: str = opt("", "backbone for the live reward model ('' disables it)")
    live_ensemble: int = opt(1, "live reward model: ensemble members (>= 2 enables active sampling)")
    live_max_steps: int = opt(0, "live reward model: stop after this many steps (0: one epoch)")

    def __post_init__(self):
        check(bool(self.dir), "give the project folder: `preflab collect init DIR --pairs FILE`")
        check(
            bool(self.pairs) != bool(self.model),
            "give exactly one of --pairs FILE or --model M --prompts FILE, "
            f"got pairs={self.pairs!r}, model={self.model!r}",
        )
        check(not self.model or bool(self.prompts), "--model needs --prompts (a JSONL of prompts, or 'world')")
        check(self.k >= 2, f"k must be >= 2 (a pair needs two responses), got {self.k}")
        check(self.overlap >= 1, f"overlap must be >= 1, got {self.overlap}")
        check(0 <= self.random_share <= 1, f"random_share must be in [0, 1], got {self.random_share}")
        check(self.live_ensemble >= 1, f"live_ensemble must be >= 1, got {self.live_ensemble}")


def shown_url(url: str) -> str:
    """A database URL without its password, for printing."""
    return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", url)


def _open(directory: str, db: str = ""):
    from preflab.collect.db import open_database
    from preflab.collect.project import load_project

    project = load_project(directory, db=db)
    return project, open_database(project.db_url)[1]


@stage(InitConfig)
def init(config: InitConfig) -> dict:
    from preflab.collect import store
    from preflab.collect.db import open_database
    from preflab.collect.project import create_project

    check(not (Path(config.dir) / "project.json").exists(), f"{config.dir} is already a collection project")
    if config.model:
        from preflab.generate import GenerateConfig, generate_stage

        summary = generate_stage(
            GenerateConfig(
                model=config.model,
                prompts=config.prompts,
                n=config.k,
                pairs=True,
                n_prompts=config.n_prompts,
                out=str(Path(config.dir) / "generate"),
            )
        )
        pairs_file = str(Path(summary["responses_file"]).parent / "pairs.jsonl")
    else:
        pairs_file = config.pairs
    pairs = read_pairs(pairs_file)
    live = {"ensemble": config.live_ensemble, **({"max_steps": config.live_max_steps} if config.live_max_steps else {})}
    project = create_project(
        config.dir,
        db=config.db,
        overlap=config.overlap,
        base_url=config.base_url.rstrip("/"),
        random_share=config.random_share,
        reward_model=config.reward_model,
        live_options=live,
    )
    _, sessions = open_database(project.db_url)
    with sessions() as session:
        n = store.add_pairs(session, pairs=pairs)
    print(
        f"{config.dir}: {n} pairs from {pairs_file}, each for {config.overlap} annotator(s); "
        f"database {shown_url(project.db_url)}\n"
        f"next: preflab collect annotator {config.dir} NAME",
        flush=True,
    )
    return {"pairs": n, "db": project.db_url}


@dataclass
class AnnotatorConfig:
    dir: str = opt("", "the project folder", positional=True)
    name: str = opt("", "the person's name (unique in the project)", positional=True)
    admin: bool = opt(False, "may open the admin page")
    json: bool = opt(False, 'print {"name", "token", "link"} as JSON')
    db: str = opt("", "database URL (default: the project's)")

    def __post_init__(self):
        check(bool(self.dir) and bool(self.name), "usage: preflab collect annotator DIR NAME [--admin] [--json]")
        check(
            len(self.name) <= 100 and self.name.strip() == self.name,
            f"name must be at most 100 characters without surrounding spaces, got {self.name!r}",
        )


@stage(AnnotatorConfig)
def annotator(config: AnnotatorConfig) -> dict:
    from preflab.collect import store

    project, sessions = _open(config.dir, config.db)
    with sessions() as session:
        try:
            _, token = store.create_annotator(session, name=config.name, is_admin=config.admin)
        except store.VoteError as err:
            raise DataError(config.dir, str(err), "choose another name") from None
    out = {"name": config.name, "token": token, "link": f"{project.base_url}/login/{token}"}
    print(
        json.dumps(out) if config.json else f"{config.name}{' (admin)' if config.admin else ''}: {out['link']}",
        flush=True,
    )
    return out


@dataclass
class ServeConfig:
    dir: str = opt("", "the project folder", positional=True)
    db: str = opt("", "database URL (default: the project's)")
    host: str = opt("127.0.0.1", "address to listen on (0.0.0.0 exposes it to the network)")
    port: int = opt(8000, "port to listen on")

    def __post_init__(self):
        check(bool(self.dir), "usage: preflab collect serve DIR")
        check(0 < self.port < 65536, f"port must be in 1..65535, got {self.port}")


@stage(ServeConfig)
def serve(config: ServeConfig) -> None:
    import uvicorn

    from preflab.collect.app import MAX_CONCURRENT, create_app

    project, sessions = _open(config.dir, config.db)
    app = create_app(project, sessions)
    print(
        f"serving {config.dir} on http://{config.host}:{config.port} (database {shown_url(project.db_url)})", flush=True
    )
    uvicorn.run(
        app,
        host=config.host,
        port=config.port,
        log_level="warning",
        timeout_graceful_shutdown=5,
        limit_concurrency=MAX_CONCURRENT,
    )


@dataclass
class ExportConfig:
    dir: str = opt("", "the project folder", positional=True)
    out: str = opt("", "the comparison JSONL to write")
    include_both_bad: bool = opt(False, "also write 'both bad' votes (as ties flagged both_bad)")
    authored: bool = opt(True, "also write authored comparisons")
    db: str = opt("", "database URL (default: the project's)")

    def __post_init__(self):
        check(bool(self.dir) and bool(self.out), "usage: preflab collect export DIR --out FILE")


@stage(ExportConfig)
def export(config: ExportConfig) -> dict:
    from preflab.collect.export import export_rows, to_jsonl

    _, sessions = _open(config.dir, config.db)
    with sessions() as session:
        rows = export_rows(session, include_both_bad=config.include_both_bad, authored=config.authored)
    Path(config.out).parent.mkdir(parents=True, exist_ok=True)
    Path(config.out).write_text(to_jsonl(rows))
    ties = sum(r["tie"] for r in rows)
    print(
        f"{config.out}: {len(rows)} comparisons ({ties} ties, {sum(bool(r.get('authored')) for r in rows)} authored)",
        flush=True,
    )
    return {"rows": len(rows), "ties": ties}


@dataclass
class TrainConfig:
    dir: str = opt("", "the project folder", positional=True)
    db: str = opt("", "database URL (default: the project's)")
    wait: bool = opt(True, "wait for the background worker and print its result")

    def __post_init__(self):
        check(bool(self.dir), "usage: preflab collect train DIR")


@stage(TrainConfig)
def train(config: TrainConfig) -> dict:
    import time

    from preflab.collect import live
    from preflab.collect.db import TrainJob

    project, sessions = _open(config.dir, config.db)
    with sessions() as session:
        try:
            job = live.start_job(session, project=project)
        except live.TrainBusy as err:
            raise DataError(config.dir, str(err), "wait for it, or watch the admin page") from None
    print(f"training job {job.id} started (log: {project.dir / 'live' / f'job-{job.id}.log'})", flush=True)
    while config.wait and job.status == "running":
        time.sleep(1)
        with sessions() as session:  # a short session per look: on SQLite an open one would block the worker
            job = session.get(TrainJob, job.id)
    result = {
        "job": job.id,
        "status": job.status,
        "accuracy": job.accuracy,
        "held_out": job.held_out,
        "message": job.message,
    }
    if job.status == "done":
        acc = "n/a" if job.accuracy is None else f"{job.accuracy:.3f}"
        print(
            f"done: held-out agreement {acc} on {job.held_out} votes; {job.message}; model in {job.run_dir}", flush=True
        )
    elif job.status == "failed":
        raise DataError(config.dir, f"training job {job.id} failed: {job.message}")
    return result
