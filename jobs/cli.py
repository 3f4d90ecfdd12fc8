"""The ``ciea`` console script: ``ciea <command> [options]`` dispatches to ``jobs.<command>``."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

COMMANDS = {
    "demo": ("jobs.demo", "the whole pipeline on the synthetic corpus: ingest, Ray Train, embed, evaluate"),
    "compare": ("jobs.compare", "train CIEA and its baselines in-process and compare them (ablations, seeds)"),
    "ingest": ("jobs.ingest", "read a corpus source, validate it on Ray Data, merge it into Delta Lake"),
    "embed": ("jobs.embed", "embed a Delta corpus version with a checkpoint into an indexed LanceDB table"),
    "pretrain-vision": ("jobs.pretrain_vision", "MARVEL's visual pretraining (stage 0): images aligned with captions, LM frozen"),
    "train": ("jobs.train", "train CIEA with Ray Train (DDP) on the Delta tables; resumable by run name"),
    "mine-negatives": ("jobs.mine_negatives", "mine stage-2 hard negatives with a stage-1 checkpoint into Delta"),
    "search": ("jobs.search", "search a published LanceDB table: vector, full-text or hybrid, with filters"),
    "sql": ("jobs.sql", "run read-only DuckDB SQL over the LanceDB tables (for analysts)"),
    "evaluate": ("jobs.evaluate", "score tables or checkpoints on a query split: MRR, NDCG, Recall, plots"),
    "serve": ("jobs.serve", "serve the read-only search page on 127.0.0.1"),
    "reindex": ("jobs.reindex", "re-embed what changed in Delta since the table's version; publish gate"),
}


#: The packages ciea ships beside ``jobs``: a folder or an installed package of the same name
#: earlier on ``sys.path`` (a Dagster, Kedro or Django project's own ``pipelines``, the
#: ``pipelines`` package on PyPI, ``PYTHONPATH=.``) would silently run someone else's code.
OWN_PACKAGES = ("pipelines", "ciea_model")


def foreign_packages() -> list[str]:
    """One line per package of :data:`OWN_PACKAGES` that resolves outside this installation."""
    home = Path(__file__).resolve().parent.parent  # the folder that holds jobs/
    out = []
    for name in OWN_PACKAGES:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            spec = None
        where = Path(spec.origin).resolve().parent.parent if spec is not None and spec.origin else None
        if where != home:
            found = spec.origin if spec is not None and spec.origin else "nowhere"
            out.append(f"ciea: the module {name!r} resolves to {found}, not to ciea's own {home / name}: a folder "
                       f"or package named {name!r} earlier on sys.path shadows it — rename it, drop its folder "
                       "from PYTHONPATH, or run ciea from another directory")
    return out


#: Modules of the ``pipelines`` extra that every command needs (``pip install ciea`` alone
#: brings the model library only).
PIPELINE_MODULES = ("ray", "pyarrow", "deltalake", "lancedb")


def missing_extras() -> list[str]:
    """The modules of :data:`PIPELINE_MODULES` that are not installed."""
    return [m for m in PIPELINE_MODULES if importlib.util.find_spec(m) is None]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    foreign = foreign_packages()
    if foreign:
        print(foreign[0], file=sys.stderr)
        return 2
    missing = missing_extras()
    if missing and argv and argv[0] in COMMANDS:
        print(f"ciea {argv[0]}: {', '.join(missing)} not installed — the commands need the pipeline extras: "
              'pip install "ciea[pipelines]" (the model library alone, ciea_model, needs none of them)', file=sys.stderr)
        return 2
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: ciea <command> [options]\n\ncommands:")
        for name, (_, help_) in COMMANDS.items():
            print(f"  {name:<15} {help_}")
        print("\n`ciea <command> --help` lists each command's options.")
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"ciea: unknown command {name!r}; choose one of {sorted(COMMANDS)}", file=sys.stderr)
        return 2
    return importlib.import_module(COMMANDS[name][0]).main(rest)


if __name__ == "__main__":
    raise SystemExit(main())
