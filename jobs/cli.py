"""The ``ciea`` console script: ``ciea <command> [options]`` dispatches to ``jobs.<command>``."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "demo": ("jobs.demo", "the whole pipeline on the synthetic corpus: ingest, Ray Train, embed, evaluate"),
    "compare": ("jobs.compare", "train CIEA and its baselines in-process and compare them (ablations, seeds)"),
    "ingest": ("jobs.ingest", "read a corpus source, validate it on Ray Data, merge it into Delta Lake"),
    "embed": ("jobs.embed", "embed a Delta corpus version with a checkpoint into an indexed LanceDB table"),
    "train": ("jobs.train", "train CIEA with Ray Train (DDP) on the Delta tables; resumable by run name"),
    "mine-negatives": ("jobs.mine_negatives", "mine stage-2 hard negatives with a stage-1 checkpoint into Delta"),
    "search": ("jobs.search", "search a published LanceDB table: vector, full-text or hybrid, with filters"),
    "sql": ("jobs.sql", "run read-only DuckDB SQL over the LanceDB tables (for analysts)"),
    "evaluate": ("jobs.evaluate", "score tables or checkpoints on a query split: MRR, NDCG, Recall, plots"),
    "serve": ("jobs.serve", "serve the read-only search page on 127.0.0.1"),
    "reindex": ("jobs.reindex", "re-embed what changed in Delta since the table's version; publish gate"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
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
