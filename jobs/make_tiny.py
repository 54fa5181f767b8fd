"""``srpo make-tiny DIR``: write the tiny world (random tiny FLUX + reward models, real formats)."""
from __future__ import annotations

import argparse
import json

from pipeline.tiny import SIZES, make_tiny_world


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="srpo make-tiny", description=__doc__)
    p.add_argument("dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", choices=sorted(SIZES), default="tiny")
    args = p.parse_args(argv)
    print(json.dumps(make_tiny_world(args.dir, seed=args.seed, size=args.size), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
