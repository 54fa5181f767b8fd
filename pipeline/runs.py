"""Run folders: what every training run writes at start, whichever process layout trains it.

    <output.dir>/run.json     run_id, tracking_uri, experiment, ray_run_name (None: single process),
                              storage_path: what --resume, export and evaluate read
    <output.dir>/config.yaml  the resolved config

``open_run`` starts the MLflow run (or continues the recorded one for ``--resume``) and writes both
files; ``close_run`` logs the exports as artifacts and ends the MLflow run.
"""
from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.checkpoint import (RUN_FILE, LocalCheckpoints, latest_checkpoint, read_run, run_done_steps,
                                 write_json_atomic)
from pipeline.config import Config, ConfigError, absolute_paths
from pipeline.device import resolve_device
from pipeline.images import scan_images
from pipeline.learner import EXPORT_NAME, build_learner
from pipeline.sources import InProcessSource
from pipeline.tracking import MLflowRun, default_tracking_uri


@dataclass
class OpenRun:
    out: Path
    tracker: MLflowRun
    info: dict[str, Any]


def check_resumable(cfg: Config, resume: str | Path | None, ray_run: bool) -> dict[str, Any] | None:
    """The earlier run to continue (``--resume``), refused when it has trained max_steps already or
    was trained in the other process layout (its checkpoints are where that layout keeps them)."""
    if resume is None:
        return None
    previous = read_run(resume)
    if bool(previous.get("ray_run_name")) != ray_run:
        trained = "on Ray (learner.num_workers >= 1)" if previous.get("ray_run_name") else \
            "in a single process (learner.num_workers=0)"
        raise ConfigError(f"learner.num_workers: the run in {Path(resume).resolve()} was trained {trained}; "
                          "resume it with the learner count it started with")
    done = run_done_steps(resume, previous)
    if done >= cfg.train.max_steps:
        raise ConfigError(f"train.max_steps: the run in {Path(resume).resolve()} has already trained {done} steps; "
                          f"resume with train.max_steps > {done} to train longer")
    return previous


def open_run(cfg: Config, previous: dict[str, Any] | None, ray_run: bool) -> OpenRun:
    out = Path(cfg.output.dir).resolve()
    if previous is None and (out / RUN_FILE).is_file():
        # A new run in the folder of an old one: both stay in MLflow, but run.json (what --resume,
        # export and evaluate read) now names the new run.
        print(f"[srpo] {out} held run {read_run(out).get('run_id')}; starting a new run there", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    tracker = MLflowRun(cfg, resume_run_id=previous["run_id"] if previous else None)
    ray_run_name = None
    if ray_run:
        ray_run_name = (previous or {}).get("ray_run_name") or f"srpo-{tracker.run_id[:8]}"
    info = {"run_id": tracker.run_id, "tracking_uri": default_tracking_uri(cfg), "experiment": cfg.log.experiment,
            "ray_run_name": ray_run_name, "storage_path": str(out / ("ray" if ray_run else "checkpoints"))}
    write_json_atomic(out / RUN_FILE, info)
    (out / "config.yaml").write_text(cfg.to_yaml())
    return OpenRun(out, tracker, info)


def close_run(run: OpenRun, status: str) -> None:
    """Log the final and best weights (when written) and end the MLflow run with ``status``."""
    try:
        if status == "FINISHED":
            export = run.out / "transformer" / "diffusion_pytorch_model.safetensors"
            if export.is_file():
                run.tracker.log_artifact(export, "transformer")
            best = run.out / "best" / "diffusion_pytorch_model.safetensors"
            if best.is_file():
                run.tracker.log_artifact(best, "best")
                run.tracker.log_artifact(run.out / "best" / "best.json", "best")
    finally:
        run.tracker.end(status)


def console_logging() -> None:
    """The Learner's step lines on this process's stdout (Ray Train workers have their own handler)."""
    logger = logging.getLogger("srpo")
    if not any(getattr(h, "_srpo_console", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler._srpo_console = True
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def log_image_scan(scan, tracker) -> list:
    """Offline data: log what the pre-flight scan skipped and why; returns the usable images."""
    tracker.log_metrics(scan.metrics(), step=0)
    tracker.log_dict(scan.report(), "data/skipped_images.json")
    counts = {k: v for k, v in scan.counts.items() if v}
    print(f"[srpo] offline data: {len(scan.usable)} usable images, {len(scan.skipped)} skipped {counts}", flush=True)
    return scan.usable


def run_local(cfg: Config, resume: str | Path | None = None) -> dict[str, Any]:
    """``learner.num_workers=0``: the Learner in this process with the single engine, the in-process
    source (the same rows, seeds and stages as the Ray stream) and checkpoints in
    ``<output.dir>/checkpoints``; the same run folder and MLflow run as a Ray run."""
    cfg = absolute_paths(cfg)
    console_logging()
    if cfg.rollout.placement != "colocated" or cfg.reward.placement != "colocated":
        logging.getLogger("srpo").info(
            f"[srpo] learner.num_workers=0: rollout and reward run in this process (rollout.placement="
            f"{cfg.rollout.placement}, reward.placement={cfg.reward.placement} apply to Ray runs)")
    previous = check_resumable(cfg, resume, ray_run=False)
    run = open_run(cfg, previous, ray_run=False)
    status = "FAILED"
    try:
        images = None
        if cfg.rollout.mode == "offline":
            images = log_image_scan(scan_images(cfg.data.images, cfg.data.resolution, cfg.data.min_image_size),
                                    run.tracker)
        device = resolve_device(cfg.train.device)
        learner = build_learner(cfg, InProcessSource(cfg, images), LocalCheckpoints(run.out / "checkpoints",
                                                                                      cfg.train.keep_checkpoints),
                                device=device, tracker=run.tracker)
        learner.run()
        status = "FINISHED"
    finally:
        close_run(run, status)
    return {"run_id": run.tracker.run_id, "tracking_uri": run.info["tracking_uri"], "run_dir": str(run.out),
            "export": str(run.out / EXPORT_NAME), "checkpoint": str(latest_checkpoint(run.out / "checkpoints"))}
