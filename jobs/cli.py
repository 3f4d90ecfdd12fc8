"""The ``ciea`` console script: ``ciea <command> [options]`` dispatches to ``jobs.<command>``."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "demo": ("jobs.demo", "train CIEA and its baselines on the synthetic corpus and compare them"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: ciea <command> [options]\n\ncommands:")
        for name, (_, help_) in COMMANDS.items():
            print(f"  {name:<10} {help_}")
        print("\n`ciea <command> --help` lists each command's options.")
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"ciea: unknown command {name!r}; choose one of {sorted(COMMANDS)}", file=sys.stderr)
        return 2
    return importlib.import_module(COMMANDS[name][0]).main(rest)


if __name__ == "__main__":
    raise SystemExit(main())
