"""MLflow tracking from one process (rank 0): params, per-step metrics, images, the resolved config.

The default tracking URI is a sqlite file in the run's output folder: embedded, nothing to start.
Any MLflow server URI works through ``log.tracking_uri``.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

from pipeline.config import Config


def default_tracking_uri(cfg: Config) -> str:
    return cfg.log.tracking_uri or f"sqlite:///{Path(cfg.output.dir).resolve() / 'mlflow.db'}"


def _code_version() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).resolve().parent).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class MLflowRun:
    """A thin wrapper so trainers log the same way and tests can read the run back."""

    def __init__(self, cfg: Config, run_name: str | None = None, resume_run_id: str | None = None) -> None:
        """A new run, or with ``resume_run_id`` the same run continued (``srpo train --resume``):
        metrics of the resumed steps append to the same history."""
        import mlflow

        self.mlflow = mlflow
        Path(cfg.output.dir).mkdir(parents=True, exist_ok=True)
        mlflow.set_tracking_uri(default_tracking_uri(cfg))
        mlflow.set_experiment(cfg.log.experiment)
        if resume_run_id:
            self.run = mlflow.start_run(run_id=resume_run_id)
            self.run_id = self.run.info.run_id
            n = len([k for k in self.run.data.tags if k.startswith("srpo.resumed_")])
            mlflow.set_tag(f"srpo.resumed_{n + 1}", _code_version())
            return
        self.run = mlflow.start_run(run_name=run_name or cfg.log.run_name or None)
        self.run_id = self.run.info.run_id
        # MLflow caps a param value at 6000 characters; lists are short here.
        mlflow.log_params({k: str(v)[:6000] for k, v in cfg.flat().items()})
        mlflow.set_tags({
            "srpo.code_version": _code_version(),
            "srpo.model_path": cfg.model.path,
            "srpo.reward": f"{cfg.reward.kind}:{cfg.reward.path}",
        })
        mlflow.log_text(cfg.to_yaml(), "config.yaml")

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        clean = {k: float(v) for k, v in metrics.items()}
        self.mlflow.log_metrics(clean, step=step)

    def log_image(self, image: Any, name: str) -> None:
        self.mlflow.log_image(image, name)

    def log_dict(self, data: dict, name: str) -> None:
        self.mlflow.log_dict(data, name)

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self.mlflow.log_artifact(str(path), artifact_path)

    def end(self, status: str = "FINISHED") -> None:
        self.mlflow.end_run(status=status)
