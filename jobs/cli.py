"""The ``srpo`` console script: ``srpo <command> ...`` dispatches to ``jobs.<command>``."""
from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "train": "jobs.train",
    "preprocess": "jobs.preprocess",
    "export": "jobs.export",
    "evaluate": "jobs.evaluate",
    "sample": "jobs.sample",
    "make-tiny": "jobs.make_tiny",
    "compare": "jobs.compare",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        if argv and argv[0] not in ("-h", "--help"):
            print(f"srpo: unknown command {argv[0]!r}", file=sys.stderr)
        print("usage: srpo {" + ",".join(COMMANDS) + "} [args]", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return int(importlib.import_module(COMMANDS[argv[0]]).main(argv[1:]) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
