"""`preflab data world`: write the tutoring world's data to a folder, as files every other stage reads.

corpus.txt      pretraining documents separated by blank lines  (`preflab pretrain --corpus DIR/corpus.txt`)
demos.jsonl     {"prompt": [chat messages], "completion": text}  (`preflab sft --data DIR/demos.jsonl`)
prompts.jsonl   {"prompt": [chat messages]} from the held-out split (`preflab generate --prompts ...`)
"""

from __future__ import annotations

from dataclasses import dataclass

from preflab.config import check, opt
from preflab.data.preferences import write_jsonl
from preflab.runs import Run
from preflab.stages import stage


@dataclass
class WorldExportConfig:
    out: str = opt("", "folder to write (default runs/world-<time>)")
    corpus_docs: int = opt(20000, "pretraining documents to write to corpus.txt")
    demos: int = opt(2000, "demonstrations to write to demos.jsonl")
    prompts: int = opt(500, "prompts to write to prompts.jsonl")
    split: str = opt("eval", "which question split prompts.jsonl draws from: 'train' or the held-out 'eval'")
    seed: int = opt(0, "random seed (the same seed writes the same files)")

    def __post_init__(self):
        for name in ("corpus_docs", "demos", "prompts"):
            check(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        check(self.split in ("train", "eval"), f"split must be 'train' or 'eval', got {self.split!r}")


@stage(WorldExportConfig)
def export_world(config: WorldExportConfig) -> dict:
    from preflab.world import corpus, demonstrations, prompts

    run = Run(config.out or None, "world", config, tensorboard=False)
    docs = corpus(config.corpus_docs, seed=config.seed)
    (run.dir / "corpus.txt").write_text("\n\n".join(d.strip() for d in docs) + "\n", encoding="utf-8")
    write_jsonl(run.dir / "demos.jsonl", demonstrations(config.demos, seed=config.seed))
    write_jsonl(
        run.dir / "prompts.jsonl",
        [{"prompt": p} for p in prompts(config.prompts, seed=config.seed, split=config.split)],
    )
    return run.finish(
        {"corpus_docs": len(docs), "demos": config.demos, "prompts": config.prompts, "folder": str(run.dir)}
    )
