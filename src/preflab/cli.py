"""The `preflab` command: one subcommand per pipeline stage. Thin on purpose: parse, build config, call.

Each stage is a function taking its config dataclass (the table is in `preflab.stages`; only the stage asked
for is imported); options come from the dataclass fields, and `--config FILE.yaml` and `--preset NAME` (a YAML
file shipped in `preflab/presets/`) supply values beneath explicit flags. Known user errors (bad data, bad
config, a missing model) print one clear message and exit 2.
"""

from __future__ import annotations

import argparse
import os
import sys

# Before torch loads: OpenMP threads that sleep instead of spinning while they wait. On a quiet 2-core machine
# this costs ~15% of training speed; when anything else runs beside it, spinning threads made training 10-25x
# slower here (measured: pretrain 16k -> 0.7k tokens/s). Set OMP_WAIT_POLICY yourself to choose otherwise.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from preflab.stages import GROUPS, STAGES, load_stage  # noqa: E402


def _add_stage(subparsers, name: str, spec: tuple[str, str, str], argv_name: str | None) -> None:
    module, function, help_text = spec
    loaded = load_stage(module, function) if argv_name == name else None
    p = subparsers.add_parser(name, help=help_text, description=help_text)
    p.set_defaults(_spec=spec, _name=name)
    if loaded is not None and loaded[1] is not None:
        from preflab.config import add_config_arguments

        p.add_argument("--config", help="a YAML file of option: value (command-line flags override it)")
        p.add_argument("--preset", help="a preset shipped with preflab (tiny, small, demo, fast)")
        p.add_argument(
            "--fast",
            dest="preset",
            action="store_const",
            const="fast",
            help="shorthand for --preset fast (the demo loop in about 2 minutes, as the tests run it)",
        )
        add_config_arguments(p, loaded[1])


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="preflab",
        description="The RLHF loop in one tool: pretrain -> sft -> generate/collect -> reward -> "
        "ppo/rloo/grpo/dpo/bon -> eval -> report. `preflab demo` runs it all on a built-in world.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="STAGE")
    first = next((a for a in argv if not a.startswith("-")), None)
    second = None
    if first in GROUPS:
        rest = argv[argv.index(first) + 1 :]
        second = next((a for a in rest if not a.startswith("-")), None)
    for name, spec in STAGES.items():
        _add_stage(subparsers, name, spec, first)
    for group, subs in GROUPS.items():
        gp = subparsers.add_parser(group, help=f"{group}: " + ", ".join(subs), description=f"preflab {group} commands")
        gsub = gp.add_subparsers(dest="subcommand", metavar="COMMAND")
        for sub, spec in subs.items():
            _add_stage(gsub, sub, spec, second if first == group else None)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "_spec", None):
        parser.print_help()
        return 0 if not argv else 2
    module, function, _ = args._spec
    loaded = load_stage(module, function)
    if loaded is None:
        print(
            f"preflab {' '.join(a for a in argv if not a.startswith('-'))[:40]}: this stage is not built yet "
            f"(see the open issues)",
            file=sys.stderr,
        )
        return 2
    fn, config_class = loaded
    from preflab.config import ConfigError, resolve_config
    from preflab.data.preferences import DataError
    from preflab.models import ModelError
    from preflab.training import TrainingStopped

    try:
        config = resolve_config(config_class, args, stage=args._name) if config_class else args
        fn(config)
    except (DataError, ConfigError, ModelError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # a stage's own verdict, e.g. `data check` exits 1 when rows were skipped
        return exc.code if isinstance(exc.code, int) else 1
    except TrainingStopped as exc:
        print(f"stopped: {exc}; the last good checkpoint is kept in the run folder's checkpoints/", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            "\ninterrupted: the last good checkpoint (if any) is in the run folder's checkpoints/; continue with "
            "--resume true",
            file=sys.stderr,
        )
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
