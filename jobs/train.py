"""``python -m jobs.train --config configs/tiny.yaml [key=value ...]`` (also ``srpo train``).

With ``learner.num_workers >= 1`` it runs the Ray pipeline (pipeline/ray/driver.py): it joins the
cluster named by RAY_ADDRESS (as under ``ray job submit``) or starts a local one. With 0 it runs the
same Learner in this process (pipeline/runs.py: run_local). Either way it writes the run folder,
logs to MLflow and writes the trained transformer as
``<output.dir>/transformer/diffusion_pytorch_model.safetensors``.
"""
from __future__ import annotations

import argparse
import sys

from jobs.common import add_config_args, prepared_config
from pipeline.config import ConfigError
from pipeline.ray.driver import run_ray
from pipeline.runs import check_persistent_outputs, run_local, stage_resume


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="srpo train", description=__doc__)
    add_config_args(p)
    p.add_argument("--resume", metavar="RUN_DIR", default=None,
                   help="continue a stopped or failed run from its latest checkpoint: the run folder "
                        "(its output.dir); its config.yaml is used, overrides (e.g. train.max_steps=40) apply on top")
    args = p.parse_args(argv)
    if args.resume is not None:
        try:
            config_file, output_dir = stage_resume(args.resume)
        except FileNotFoundError as e:
            print(f"config error: --resume {args.resume}: {e}", file=sys.stderr)
            return 2
        args.config = str(config_file)
        args.overrides = list(args.overrides) + [f"output.dir={output_dir}"]
    cfg = prepared_config(args)
    try:
        check_persistent_outputs(cfg)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    run = run_ray if cfg.learner.num_workers >= 1 else run_local
    try:
        result = run(cfg, resume=args.resume)
    except ConfigError as e:  # found before training (resume state, offline data)
        print(f"config error: {e}", file=sys.stderr)
        return 2
    print(f"saved {result['export']}\nmlflow: {result['tracking_uri']} run {result['run_id']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
