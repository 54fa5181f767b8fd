"""``srpo make-tiny DIR``: write the tiny world (random tiny FLUX + reward models, real formats).

``--family qwen_image`` also writes DIR/qwen_image/, a tiny Qwen-Image folder (configs/tiny_qwen_image.yaml).
"""
from __future__ import annotations

import argparse
import json

from pipeline.tiny import SIZES, TINY_FAMILY_BUILDERS, make_tiny_world


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="srpo make-tiny", description=__doc__)
    p.add_argument("dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", choices=sorted(SIZES), default="tiny")
    p.add_argument("--family", action="append", choices=sorted(TINY_FAMILY_BUILDERS), default=[],
                   help="also write this model family's tiny folder (repeatable); FLUX is always written")
    args = p.parse_args(argv)
    world = make_tiny_world(args.dir, seed=args.seed, size=args.size, families=("flux", *args.family))
    print(json.dumps(world, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
