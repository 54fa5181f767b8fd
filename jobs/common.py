"""Shared argument handling: ``--config PRESET`` plus ``key.sub=value`` overrides."""
from __future__ import annotations

import argparse
import sys

from pipeline.config import Config, ConfigError, absolute_paths, check_paths, load_config
from pipeline.preflight import preflight
from pipeline.tiny import make_tiny_world

DEFAULT_CONFIG = "configs/tiny.yaml"


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=DEFAULT_CONFIG, help=f"YAML preset (default: {DEFAULT_CONFIG})")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. optim.lr=1e-5")


def prepared_config(args: argparse.Namespace, scorers: bool = False) -> Config:
    """Load + validate the config, create the tiny world if the preset asks for it, check paths, then
    the pre-flight checks (pipeline/preflight.py: model layout, reward checkpoints, non-empty data).

    ``scorers``: also check ``eval.scorers`` and the held-out prompts instead of the training data
    (`srpo evaluate`). Errors are printed as one line naming the field and the process exits with
    status 2, before any model or cluster work starts.
    """
    try:
        cfg = load_config(args.config, args.overrides)
        if cfg.tiny.enabled:
            make_tiny_world(cfg.tiny.dir, seed=cfg.tiny.seed, families=(cfg.model.family,))
        check_paths(cfg, scorers=scorers)
        cfg = absolute_paths(cfg)  # workers and actors run elsewhere than this directory
        preflight(cfg, scorers=scorers)
    except ConfigError as e:
        print(f"config error: {' '.join(str(e).split())}", file=sys.stderr)  # one line, whatever the message
        raise SystemExit(2) from e
    return cfg
