"""``srpo preprocess --config PRESET [key=value ...] [--out DIR] [--prompts FILE] [--batch-size N]``.

Encodes a prompts file once with the frozen text encoders (pipeline/embeddings.py, run on Ray Data
by pipeline/ray/preprocess.py) so that training
can run without them: ``srpo train ... data.prompt_embeddings=DIR``. Rerunning into the same folder
encodes only the prompts it does not hold yet. It joins the cluster named by RAY_ADDRESS or starts
a local one; the encoders run in a Ray Data actor pool of ``rollout.num_actors`` actors with
``rollout.num_cpus`` / ``rollout.num_gpus`` each.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import ray

from jobs.common import add_config_args
from pipeline.config import Config, ConfigError, absolute_paths, load_config
from pipeline.embeddings import report_dict
from pipeline.preflight import check_model_folder, check_prompts
from pipeline.ray.driver import connect_ray
from pipeline.ray.preprocess import preprocess
from pipeline.tiny import make_tiny_world


def load_preprocess_config(args: argparse.Namespace) -> Config:
    """Load + validate the config, checking only what preprocessing reads (model.path, the prompts).

    jobs.common.prepared_config would also demand the reward checkpoint and an existing
    data.prompt_embeddings folder, which preprocessing neither needs nor has yet.
    """
    try:
        cfg = load_config(args.config, args.overrides)
        if cfg.tiny.enabled:
            make_tiny_world(cfg.tiny.dir, seed=cfg.tiny.seed)
        if not cfg.model.path or not Path(cfg.model.path).is_dir():
            raise ConfigError(f"model.path: {cfg.model.path!r} does not exist; expected a local diffusers folder")
        check_model_folder(cfg)  # the family's layout, as every other command checks it (pipeline/preflight.py)
        prompts = args.prompts or cfg.data.prompts
        if not prompts or not Path(prompts).is_file():
            raise ConfigError(f"{'--prompts' if args.prompts else 'data.prompts'}: {prompts!r} does not exist; "
                              "expected a text file with one prompt per line, or a parquet with 'caption'")
        check_prompts(prompts, "--prompts" if args.prompts else "data.prompts")
        return absolute_paths(cfg)  # the encoding actors do not run in this directory
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        raise SystemExit(2) from e


def default_out_dir(cfg: Config) -> Path:
    return Path(cfg.data.prompt_embeddings or Path(cfg.output.dir) / "prompt_embeddings")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="srpo preprocess", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    p.add_argument("--out", help="output folder (default: data.prompt_embeddings, else <output.dir>/prompt_embeddings)")
    p.add_argument("--prompts", help="prompts file (default: data.prompts)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per encoder call and at most per part file")
    p.add_argument("--num-actors", type=int, default=None, help="encoder actors (default: rollout.num_actors)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error(f"--batch-size: got {args.batch_size}, expected >= 1")
    cfg = load_preprocess_config(args)
    out = Path(args.out).resolve() if args.out else default_out_dir(cfg).resolve()

    connect_ray()
    try:
        report = preprocess(cfg, out, prompts=args.prompts, batch_size=args.batch_size,
                            num_actors=args.num_actors, progress=not args.no_progress)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    finally:
        ray.shutdown()
    for key, value in report_dict(report).items():
        print(f"{key:>18}: {value}")
    print(f"embeddings: {out}\ntrain from it with: data.prompt_embeddings={out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
