"""MLflow tracking: the one facade every MLflow call of a training run goes through.

The driver opens the run (params, tags, the resolved config); learners attach to it by id (rank 0
logs, other ranks hold a :class:`NullTracker`). The default tracking URI is a sqlite file in the
run's output folder: embedded, nothing to start. Any MLflow server URI works through
``log.tracking_uri``.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import mlflow

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
    """An MLflow run: a new one, the same one continued (``resume_run_id``: ``srpo train --resume``
    appends to the same history), or one opened elsewhere and attached to (:meth:`attach`)."""

    def __init__(self, cfg: Config | None, run_name: str | None = None, resume_run_id: str | None = None,
                 tracking_uri: str | None = None) -> None:
        self.mlflow = mlflow
        if cfg is not None:
            Path(cfg.output.dir).mkdir(parents=True, exist_ok=True)
        mlflow.set_tracking_uri(tracking_uri or default_tracking_uri(cfg))
        if resume_run_id:
            self.run = mlflow.start_run(run_id=resume_run_id)
            self.run_id = self.run.info.run_id
            if cfg is not None:
                n = len([k for k in self.run.data.tags if k.startswith("srpo.resumed_")])
                mlflow.set_tag(f"srpo.resumed_{n + 1}", _code_version())
            return
        mlflow.set_experiment(cfg.log.experiment)
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

    @classmethod
    def attach(cls, tracking_uri: str, run_id: str) -> "MLflowRun":
        """The driver's run, from a learner process: logs into it, changes no params or tags."""
        return cls(None, resume_run_id=run_id, tracking_uri=tracking_uri)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def log_image(self, image: Any, name: str) -> None:
        self.mlflow.log_image(image, name)

    def log_text(self, text: str, name: str) -> None:
        self.mlflow.log_text(text, name)

    def log_dict(self, data: dict, name: str) -> None:
        self.mlflow.log_dict(data, name)

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self.mlflow.log_artifact(str(path), artifact_path)

    def set_tag(self, key: str, value: str) -> None:
        self.mlflow.set_tag(key, value)

    def end(self, status: str = "FINISHED") -> None:
        self.mlflow.end_run(status=status)


class NullTracker:
    """What ranks other than 0 log to: nothing (rank 0 logs the values reduced over every rank)."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def log_image(self, image: Any, name: str) -> None: ...

    def log_text(self, text: str, name: str) -> None: ...

    def log_dict(self, data: dict, name: str) -> None: ...

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None: ...

    def set_tag(self, key: str, value: str) -> None: ...

    def end(self, status: str = "FINISHED") -> None: ...
