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

from pipeline.checkpoint import (RUN_FILE, LocalCheckpoints, check_resume_settings, latest_checkpoint, read_run,
                                 run_done_steps, write_json_atomic)
from pipeline.config import Config, ConfigError, absolute_paths
from pipeline.device import resolve_device
from pipeline.export import RUN_CONFIG, WEIGHTS_NAME
from pipeline.images import scan_images
from pipeline.learner import EXPORT_NAME, build_learner
from pipeline.lora import LORA_DIR, LORA_WEIGHTS
from pipeline.sources import InProcessSource
from pipeline.storage import RunStorage, is_uri
from pipeline.tracking import SQLITE, MLflowRun, default_tracking_uri


@dataclass
class OpenRun:
    storage: RunStorage  # output.dir: a folder, or a URI staged locally in storage.local
    tracker: MLflowRun
    info: dict[str, Any]

    @property
    def out(self) -> Path:
        return self.storage.local


RAY_PACKAGE_PREFIX = "_ray_pkg_"  # the folders Ray unpacks a job's --working-dir into (runtime_env packaging)


def check_persistent_outputs(cfg: Config, cwd: Path | None = None) -> None:
    """Under ``ray job submit --working-dir``, the job runs inside a package folder that Ray deletes
    afterwards; a relative ``output.dir`` or the default ``mlflow.db`` would be written there and
    lost. Refused at start, naming what to set."""
    cwd = (cwd or Path.cwd()).resolve()
    package = next((p for p in (cwd, *cwd.parents) if p.name.startswith(RAY_PACKAGE_PREFIX)), None)
    if package is None:
        return
    if not is_uri(cfg.output.dir) and Path(cfg.output.dir).resolve().is_relative_to(package):
        raise ConfigError(f"output.dir: {cfg.output.dir} is inside Ray's temporary working-dir package {package}, "
                          "which Ray deletes after the job; set output.dir to an absolute path on persistent or "
                          "shared storage, or a URI (s3://..., gs://...)")
    uri = default_tracking_uri(cfg)
    if uri.startswith(SQLITE) and Path(uri[len(SQLITE):]).resolve().is_relative_to(package):
        raise ConfigError(f"log.tracking_uri: the MLflow store {uri} is inside Ray's temporary working-dir package "
                          f"{package}, which Ray deletes after the job; set log.tracking_uri (or MLFLOW_TRACKING_URI "
                          "in the job's runtime_env) to an MLflow server or an absolute sqlite:////path")


def stage_resume(location: str) -> tuple[Path, str]:
    """``--resume RUN_DIR`` (a folder or a URI): the run's config.yaml, staged locally, and the
    ``output.dir`` to continue in. FileNotFoundError names what is missing."""
    storage = RunStorage(location)
    for rel in (RUN_FILE, RUN_CONFIG):
        if storage.download(rel) is None:
            raise FileNotFoundError(f"expected a run folder with {RUN_CONFIG} and {RUN_FILE} "
                                    "(the output.dir of an earlier `srpo train`)")
    return storage.path(RUN_CONFIG), storage.uri()


def check_resumable(cfg: Config, resume: str | Path | None, ray_run: bool) -> dict[str, Any] | None:
    """The earlier run to continue (``--resume``), refused when it has trained max_steps already or
    was trained in the other process layout (its checkpoints are where that layout keeps them)."""
    if resume is None:
        return None
    previous = read_run(resume)
    if bool(previous.get("ray_run_name")) != ray_run:
        trained = "on Ray (learner.num_workers >= 1)" if previous.get("ray_run_name") else \
            "in a single process (learner.num_workers=0)"
        raise ConfigError(f"learner.num_workers: the run in {resume} was trained {trained}; "
                          "resume it with the learner count it started with")
    done = run_done_steps(resume, previous)
    if done >= cfg.train.max_steps:
        raise ConfigError(f"train.max_steps: the run in {resume} has already trained {done} steps; "
                          f"resume with train.max_steps > {done} to train longer")
    check_resume_settings(cfg, resume, previous)  # its adapters (or the whole model), its rollout.reuse
    return previous


def recorded_tracking_uri(cfg: Config, previous: dict[str, Any]) -> str:
    """``--resume`` continues the MLflow run in the store run.json names, whatever this shell's
    MLFLOW_TRACKING_URI, working directory or ``log.tracking_uri``: one run's history stays in one store."""
    recorded, current = previous["tracking_uri"], default_tracking_uri(cfg)
    if current != recorded:
        print(f"[srpo] --resume: continuing MLflow run {previous['run_id']} in {recorded} (where run.json "
              f"records it), not {current}", flush=True)
    return recorded


def open_run(cfg: Config, previous: dict[str, Any] | None, ray_run: bool) -> OpenRun:
    """Start (or continue) the MLflow run and write run.json + config.yaml into ``output.dir``."""
    storage = RunStorage(cfg.output.dir)
    if previous is None and storage.download(RUN_FILE) is not None:
        # A new run in the folder of an old one: both stay in MLflow, but run.json (what --resume,
        # export and evaluate read) now names the new run.
        print(f"[srpo] {storage.uri()} held run {read_run(storage.local).get('run_id')}; starting a new run there",
              flush=True)
    tracking_uri = recorded_tracking_uri(cfg, previous) if previous else default_tracking_uri(cfg)
    tracker = MLflowRun(cfg, resume_run_id=previous["run_id"] if previous else None, tracking_uri=tracking_uri)
    ray_run_name = None
    if ray_run:
        ray_run_name = (previous or {}).get("ray_run_name") or f"srpo-{tracker.run_id[:8]}"
    info = {"run_id": tracker.run_id, "tracking_uri": tracking_uri, "experiment": cfg.log.experiment,
            "ray_run_name": ray_run_name, "output_dir": storage.uri(),
            "storage_path": storage.uri("ray" if ray_run else LocalCheckpoints.SUB)}
    write_json_atomic(storage.path(RUN_FILE), info)
    storage.path(RUN_CONFIG).write_text(cfg.to_yaml())
    storage.upload(RUN_FILE)
    storage.upload(RUN_CONFIG)
    return OpenRun(storage, tracker, info)


def close_run(run: OpenRun, status: str) -> None:
    """Log the final and best weights (when written) and end the MLflow run with ``status``."""
    try:
        if status == "FINISHED":
            export = run.storage.download(EXPORT_NAME)  # written by the rank-0 learner, maybe on another node
            if export is not None:
                run.tracker.log_artifact(export, "transformer")
            best = run.storage.download("best")
            if best is not None and (best / WEIGHTS_NAME).is_file():
                run.tracker.log_artifact(best / WEIGHTS_NAME, "best")
                run.tracker.log_artifact(best / "best.json", "best")
            adapter = run.storage.download(LORA_DIR)  # a LoRA run's adapter (diffusers LoRA folder)
            if adapter is not None and (adapter / LORA_WEIGHTS).is_file():
                run.tracker.log_artifact(adapter / LORA_WEIGHTS, LORA_DIR)
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
            images = log_image_scan(scan_images(cfg.data.images, cfg.data.resolution, cfg.data.min_image_size,
                                                max_pixels=cfg.data.max_image_pixels),
                                    run.tracker)
        device = resolve_device(cfg.train.device)
        checkpoints = LocalCheckpoints.on(run.storage, cfg.train.keep_checkpoints)
        learner = build_learner(cfg, InProcessSource(cfg, images), checkpoints, device=device, tracker=run.tracker)
        learner.run()
        status = "FINISHED"
    finally:
        close_run(run, status)
    return {"run_id": run.tracker.run_id, "tracking_uri": run.info["tracking_uri"], "run_dir": run.storage.uri(),
            "export": run.storage.uri(EXPORT_NAME),
            "checkpoint": str(latest_checkpoint(run.storage.path(LocalCheckpoints.SUB)))}
