"""``python -m jobs.train --config configs/tiny.yaml [key=value ...]`` (also ``srpo train``).

With ``learner.num_workers >= 1`` it runs the Ray pipeline (pipeline/driver.py): it joins the
cluster named by RAY_ADDRESS (as under ``ray job submit``) or starts a local one. With 0 it runs the
single-process trainer (reward colocated). Either way it logs to MLflow and writes the trained
transformer as ``<output.dir>/transformer/diffusion_pytorch_model.safetensors``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from jobs.common import add_config_args, prepared_config


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="srpo train", description=__doc__)
    add_config_args(p)
    p.add_argument("--resume", metavar="RUN_DIR", default=None,
                   help="continue a stopped or failed run from its latest checkpoint: the run folder "
                        "(its output.dir); its config.yaml is used, overrides (e.g. train.max_steps=40) apply on top")
    args = p.parse_args(argv)
    if args.resume is not None:
        run_dir = Path(args.resume)
        if not (run_dir / "config.yaml").is_file() or not (run_dir / "run.json").is_file():
            print(f"config error: --resume {run_dir}: expected a run folder with config.yaml and run.json "
                  "(the output.dir of an earlier `srpo train`)", file=sys.stderr)
            return 2
        args.config = str(run_dir / "config.yaml")
        args.overrides = list(args.overrides) + [f"output.dir={run_dir.resolve()}"]
    cfg = prepared_config(args)
    if args.resume is not None and cfg.learner.num_workers < 1:
        print("config error: learner.num_workers: --resume needs the Ray pipeline (>= 1 learner worker); "
              "the single-process trainer keeps no checkpoints", file=sys.stderr)
        return 2
    if cfg.learner.num_workers >= 1:
        from pipeline.ray.driver import run_ray

        from pipeline.config import ConfigError

        try:
            result = run_ray(cfg, resume=args.resume)
        except ConfigError as e:  # found by the driver before training (resume state, offline data)
            print(f"config error: {e}", file=sys.stderr)
            return 2
        print(f"saved {result['export']}\nmlflow: {result['tracking_uri']} run {result['run_id']}")
        return 0

    import torch

    from pipeline.tracking import MLflowRun, default_tracking_uri
    from pipeline.trainer import SRPOTrainer

    torch.manual_seed(cfg.seed)
    trainer = SRPOTrainer(cfg)
    run = MLflowRun(cfg)
    start = time.perf_counter()
    status = "FAILED"
    try:
        def on_step(m) -> None:
            flat = m.flat()
            flat["lr"] = trainer.optimizer.param_groups[0]["lr"]
            done = m.step + 1
            eta = (time.perf_counter() - start) / done * (cfg.train.max_steps - done)
            if m.step % cfg.log.every == 0 or done == cfg.train.max_steps:
                run.log_metrics(flat, step=m.step)
            print(f"step {done}/{cfg.train.max_steps}  loss {flat['loss']:.4f}  "
                  f"reward(denoise) {flat.get('denoise/reward', float('nan')):.4f}  "
                  f"grad_norm {flat['grad_norm']:.4f}  eta {eta:.0f}s", file=sys.stderr, flush=True)

        trainer.fit(on_step=on_step)
        out = trainer.save_transformer(Path(cfg.output.dir) / "transformer" / "diffusion_pytorch_model.safetensors")
        run.log_artifact(out, "transformer")
        status = "FINISHED"
        print(f"saved {out}\nmlflow: {default_tracking_uri(cfg)} run {run.run_id}")
    finally:
        run.end(status)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
