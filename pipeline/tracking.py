"""MLflow tracking: the one facade every MLflow call of a training run goes through.

The driver opens the run (params, tags, the resolved config); learners attach to it by id (rank 0
logs, other ranks hold a :class:`NullTracker`). The default tracking URI is a sqlite file in the
run's output folder: embedded, nothing to start. Any MLflow server URI works through
``log.tracking_uri``.
"""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, Param

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


class ClientRun:
    """A run logged through ``MlflowClient``, without making it the process's active run: a finished
    training run gets artifacts without being reopened (``start_run(run_id=...)`` would mark it
    RUNNING and rewrite its end time), and an evaluation run is created and closed in one go."""

    def __init__(self, tracking_uri: str, run_id: str) -> None:
        self.client = mlflow.MlflowClient(tracking_uri=tracking_uri)
        self.tracking_uri, self.run_id = tracking_uri, run_id

    @classmethod
    def create(cls, tracking_uri: str, experiment: str, tags: dict[str, str], run_name: str | None) -> "ClientRun":
        client = mlflow.MlflowClient(tracking_uri=tracking_uri)
        run = client.create_run(_experiment_id(client, experiment, tracking_uri), tags=tags, run_name=run_name)
        return cls(tracking_uri, run.info.run_id)

    def log_batch(self, metrics: dict[str, float], params: dict[str, str], step: int = 0) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()],
                              params=[Param(k, v) for k, v in params.items()])

    def log_table(self, data: dict, name: str) -> None:
        self.client.log_table(self.run_id, data=data, artifact_file=name)

    def log_image(self, image: Any, name: str) -> None:
        self.client.log_image(self.run_id, image, artifact_file=name)

    def log_text(self, text: str, name: str) -> None:
        self.client.log_text(self.run_id, text, name)

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        if Path(path).is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def end(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status)


def _experiment_id(client: Any, name: str, tracking_uri: str) -> str:
    """The experiment's id, creating it with its artifacts next to a sqlite database.

    MLflow's default artifact root is ``./mlruns`` of whatever directory the process runs in; next to
    the database the run's images stay with its metrics.
    """
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if tracking_uri.startswith("sqlite:///"):
        location = (Path(tracking_uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri()
    return client.create_experiment(name, artifact_location=location)
