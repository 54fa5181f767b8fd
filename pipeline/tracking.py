"""MLflow tracking: the one facade every MLflow call of a training run goes through.

The driver opens the run (params, tags, the resolved config); learners attach to it by id (rank 0
logs, other ranks hold a :class:`NullTracker`). The tracking URI follows MLflow's convention
(:func:`default_tracking_uri`); any MLflow server URI works through ``log.tracking_uri`` or
``MLFLOW_TRACKING_URI``.
"""
from __future__ import annotations

import hashlib
import os
import re
import subprocess
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import mlflow
import numpy as np
import pandas as pd
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from PIL import Image, ImageDraw, ImageFont

from pipeline.config import Config, reward_entries, reward_name
from pipeline.data import read_prompts
from pipeline.device import resolve_device
from pipeline.images import list_images


SQLITE = "sqlite:///"


def default_tracking_uri(cfg: Config) -> str:
    """MLflow's own precedence: ``log.tracking_uri``, then ``MLFLOW_TRACKING_URI``, then ``mlflow.db``
    in the directory the command was started in. Runs with different output folders land in one
    store, so one ``mlflow ui`` compares them. A relative sqlite path is made absolute here, in the
    driver: learners and actors run in other directories, and run.json records the URI for later
    commands (``--resume``, ``evaluate``, ``export``, ``sample``, ``compare``)."""
    uri = cfg.log.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "") or f"{SQLITE}mlflow.db"
    if uri.startswith(SQLITE) and not Path(uri[len(SQLITE):]).is_absolute():
        uri = SQLITE + str(Path.cwd() / uri[len(SQLITE):])
    return uri


def _code_version() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).resolve().parent).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# ------------------------------------------------------------------------- what the MLflow UI shows

# MLflow 3's UI chose an experiment's page layout from this experiment tag ("genai_development": the
# GenAI traces/evaluations view; "custom_model_development", shown as "Machine learning": the runs
# view with metric and image charts). MLflow 3.17's UI reads a switch kept in the browser instead
# (default GenAI; the URL parameter workflowType=machine_learning sets it): docs/tracking.md.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
TRAINING_KIND = "custom_model_development"
SYSTEM_METRICS_TAG = "srpo.system_metrics"  # "true": the process that trains samples CPU/memory/GPU
DIGEST_CHARS = 16  # MLflow stores dataset digests of at most 36 characters


def _log_input(dataset: Any, context: str) -> None:
    """``mlflow.log_input``, once more if another run inserted the same dataset in between: MLflow's SQL
    store looks a dataset up, then inserts it, so two runs of a sweep starting together on one store
    race on the insert (UNIQUE constraint failed: datasets...); the second try finds the row."""
    try:
        mlflow.log_input(dataset, context=context)
    except MlflowException as e:
        if "UNIQUE constraint" not in str(e) and "IntegrityError" not in str(e):
            raise
        mlflow.log_input(dataset, context=context)


def default_run_name(cfg: Config) -> str:
    """``<reward>-<variant>-lr<lr>``, e.g. ``hpsv2-reference-lr1e-05``: what tells runs apart in the UI."""
    rewards = "+".join(reward_name(r) for _, r in reward_entries(cfg))
    return f"{rewards}-{cfg.srpo.variant}-lr{cfg.optim.lr:g}"


def mark_training_experiment(client: Any, experiment_id: str) -> None:
    """Tag the experiment as model training unless someone chose a kind (a tag the UI only inferred
    ends in ``_inferred``; that one we replace)."""
    kind = client.get_experiment(experiment_id).tags.get(EXPERIMENT_KIND_TAG, "")
    if not kind or kind.endswith("_inferred") or kind == "no_inferred_type":
        client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, TRAINING_KIND)


def system_metrics_wanted(cfg: Config) -> bool:
    """``log.system_metrics``, or when unset (null): on when the learners train on GPUs."""
    if cfg.log.system_metrics is not None:
        return cfg.log.system_metrics
    if cfg.learner.num_workers >= 1:
        return cfg.learner.use_gpu
    try:
        return resolve_device(cfg.train.device).type == "cuda"
    except RuntimeError:  # train.device=cuda without a GPU: the run fails on that, not here
        return False


def _samples_here(cfg: Config) -> bool:
    """System metrics sampled by the driver: only when it trains itself (learner.num_workers=0)."""
    return cfg.learner.num_workers == 0 and system_metrics_wanted(cfg)


def content_digest(paths: Sequence[str | os.PathLike], texts: Sequence[str] = ()) -> str:
    """sha256 of the files' bytes in order (then of ``texts``), cut to :data:`DIGEST_CHARS` hex digits.
    For one file and no texts it is ``sha256(file bytes)``. An unreadable file hashes as its error:
    the scan counts it as skipped later, and the digest still changes when it does."""
    h = hashlib.sha256()
    for path in paths:
        try:
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
        except OSError as e:
            h.update(f"unreadable {Path(path).name}: {e.strerror}".encode())
        if len(paths) > 1 or texts:
            h.update(b"\0")  # file boundaries count: "ab"+"c" is not "a"+"bc"
    for text in texts:
        h.update(text.encode() + b"\0")
    return h.hexdigest()[:DIGEST_CHARS]


def _pandas_dataset(df: pd.DataFrame, source: str, name: str, digest: str):
    with warnings.catch_warnings():
        # A local path matches MLflow's two local-artifact source classes (both the same); it warns.
        warnings.simplefilter("ignore", UserWarning)
        return mlflow.data.from_pandas(df, source=source, name=name, digest=digest)


def prompt_dataset(path: str | os.PathLike):
    """A prompts file as an MLflow dataset: one ``prompt`` column, digest = sha256 of the file."""
    p = Path(path).resolve()
    return _pandas_dataset(pd.DataFrame({"prompt": read_prompts(p)}), str(p), p.name, content_digest([p]))


def image_dataset(source: str | os.PathLike):
    """An image folder or manifest as an MLflow dataset: a row per listed image (path, caption);
    digest over the manifest (if any), every listed image's bytes and its caption."""
    src = Path(source).resolve()
    records, _ = list_images(src)  # the skipped entries are counted by the scan, not trained on
    root = src if src.is_dir() else src.parent
    df = pd.DataFrame({"path": [os.path.relpath(r.path, root) for r in records],
                       "caption": [r.caption for r in records]})
    files = ([] if src.is_dir() else [src]) + [r.path for r in records]
    return _pandas_dataset(df, str(src), src.name, content_digest(files, [r.caption for r in records]))


def dataset_inputs(cfg: Config) -> list[tuple[Any, str]]:
    """(dataset, context) of every data file the run reads: training prompts / images, held-out prompts."""
    out = []
    if cfg.data.prompts:
        out.append((prompt_dataset(cfg.data.prompts), "training"))
    if cfg.rollout.mode == "offline" and cfg.data.images:
        out.append((image_dataset(cfg.data.images), "training"))
    for path in dict.fromkeys(p for p in (cfg.data.heldout_prompts, cfg.eval.prompts) if p):
        out.append((prompt_dataset(path), "evaluation"))
    return out


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size
        return ImageFont.load_default()


def _wrap(text: str, font, width: int) -> list[str]:
    """Greedy word wrap to ``width`` pixels (a word longer than a line is cut by characters)."""
    lines: list[str] = []
    for word in text.split():
        while font.getlength(word) > width and len(word) > 1:
            cut = max(1, int(len(word) * width / font.getlength(word)))
            lines.append(word[:cut])
            word = word[cut:]
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines or [""]


def captioned(image: Any, captions: Sequence[str], min_width: int = 384) -> Image.Image:
    """``image`` (HWC uint8 array or PIL) with its prompts printed under it, so they stay visible in
    MLflow's image viewer and step slider. Several prompts are numbered 1, 2, ... in grid order (left
    to right, then top to bottom). An image narrower than ``min_width`` is enlarged by a whole factor
    (nearest neighbour: every pixel becomes an f x f block of the same value), so tiny previews and
    their text stay legible; the image sits at the top left, the text under it."""
    img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    img = img.convert("RGB")
    if not captions:
        return img
    f = -(-min_width // img.width)  # ceil
    if f > 1:
        img = img.resize((img.width * f, img.height * f), Image.Resampling.NEAREST)
    width = img.width
    font, pad = _font(max(14, width // 28)), max(4, width // 100)
    texts = [f"{i + 1}. {c}" for i, c in enumerate(captions)] if len(captions) > 1 else list(captions)
    lines = [line for t in texts for line in _wrap(t, font, width - 2 * pad)]
    ascent, descent = font.getmetrics()
    line_h = ascent + descent + 2
    canvas = Image.new("RGB", (width, img.height + 2 * pad + line_h * len(lines)), "white")
    canvas.paste(img, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for j, line in enumerate(lines):
        draw.text((pad, img.height + pad + j * line_h), line, fill="black", font=font)
    return canvas


class MLflowRun:
    """An MLflow run: a new one, the same one continued (``resume_run_id``: ``srpo train --resume``
    appends to the same history), or one opened elsewhere and attached to (:meth:`attach`)."""

    def __init__(self, cfg: Config | None, run_name: str | None = None, resume_run_id: str | None = None,
                 tracking_uri: str | None = None) -> None:
        self.mlflow = mlflow
        tracking_uri = tracking_uri or default_tracking_uri(cfg)
        if tracking_uri.startswith(SQLITE):  # MLflow creates the database file, not its folder
            Path(tracking_uri[len(SQLITE):]).parent.mkdir(parents=True, exist_ok=True)
        mlflow.set_tracking_uri(tracking_uri)
        if resume_run_id:
            self._continue(cfg, resume_run_id)
            return
        datasets = dataset_inputs(cfg)  # before the run exists: unreadable data leaves no half-made run
        # Created as the client runs create it: artifacts beside a sqlite store, not in ./mlruns
        # of whatever directory the command happens to run in.
        mlflow.set_experiment(experiment_id=_experiment_id(mlflow.MlflowClient(), cfg.log.experiment, tracking_uri))
        self.run = mlflow.start_run(run_name=run_name or cfg.log.run_name or default_run_name(cfg),
                                    log_system_metrics=_samples_here(cfg))
        self.run_id = self.run.info.run_id
        # MLflow caps a param value at 6000 characters; lists are short here.
        mlflow.log_params({k: str(v)[:6000] for k, v in cfg.flat().items()})
        mlflow.set_tags({
            "srpo.code_version": _code_version(),
            "srpo.model_path": cfg.model.path,
            "srpo.reward": ", ".join(f"{r.kind}:{r.path}" for _, r in reward_entries(cfg)),
            SYSTEM_METRICS_TAG: str(system_metrics_wanted(cfg)).lower(),
        })
        for dataset, context in datasets:
            _log_input(dataset, context)
        mlflow.log_text(cfg.to_yaml(), "config.yaml")

    def _continue(self, cfg: Config | None, run_id: str) -> None:
        """``--resume`` (cfg given: the driver) or :meth:`attach` (cfg None: a Ray Train learner, which
        samples system metrics when the driver's tag says so: it is the process on the GPU node)."""
        if cfg is None:
            sample = mlflow.MlflowClient().get_run(run_id).data.tags.get(SYSTEM_METRICS_TAG) == "true"
        else:
            sample = _samples_here(cfg)
        self.run = mlflow.start_run(run_id=run_id, log_system_metrics=sample)
        self.run_id = self.run.info.run_id
        if cfg is not None:
            n = len([k for k in self.run.data.tags if k.startswith("srpo.resumed_")])
            mlflow.set_tags({f"srpo.resumed_{n + 1}": _code_version(),
                             SYSTEM_METRICS_TAG: str(system_metrics_wanted(cfg)).lower()})

    @classmethod
    def attach(cls, tracking_uri: str, run_id: str) -> "MLflowRun":
        """The driver's run, from a learner process: logs into it, changes no params or tags."""
        return cls(None, resume_run_id=run_id, tracking_uri=tracking_uri)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def log_image(self, image: Any, name: str) -> None:
        self.mlflow.log_image(image, name)

    def log_step_image(self, image: Any, key: str, step: int, captions: Sequence[str] = ()) -> None:
        """A step-indexed image (MLflow's image charts and step slider), its prompts printed under it.
        Synchronous: a Ray Train worker may exit right after its last step."""
        self.mlflow.log_image(captioned(image, captions), key=key, step=step, synchronous=True)

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

    def log_step_image(self, image: Any, key: str, step: int, captions: Sequence[str] = ()) -> None: ...

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

    def log_step_image(self, image: Any, key: str, step: int, captions: Sequence[str] = ()) -> None:
        self.client.log_image(self.run_id, captioned(image, captions), key=key, step=step, synchronous=True)

    def log_input(self, dataset: Any, context: str) -> None:
        from mlflow.entities import DatasetInput, InputTag

        # MlflowClient takes entities; a Dataset has no public conversion (mlflow.log_input uses this one).
        self.client.log_inputs(self.run_id, [DatasetInput(dataset._to_mlflow_entity(),
                                                          [InputTag("mlflow.data.context", context)])])

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
        experiment_id = exp.experiment_id
    else:
        location = None
        if tracking_uri.startswith("sqlite:///"):
            location = (Path(tracking_uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri()
        experiment_id = client.create_experiment(name, artifact_location=location)
    mark_training_experiment(client, experiment_id)
    return experiment_id


# ------------------------------------------------------------------------------------- reading runs

# mlflow.log_image(key=, step=) writes images/<key, "/" as "~">+step+<step>+timestamp+<ms>+<uuid>.png
# (plus a +compressed.webp preview); MLflow < 3 wrote "#" for "/" and "%" between the fields.
_STEP_IMAGE = re.compile(r"^(?P<key>.+?)[+%]step[+%](?P<step>\d+)[+%]timestamp[+%](?P<ts>\d+)[+%][^+%]+\.png$")


class RunReader:
    """Reads runs of one store without opening or changing them (``srpo compare``)."""

    def __init__(self, tracking_uri: str) -> None:
        self.tracking_uri = tracking_uri
        self.client = mlflow.MlflowClient(tracking_uri=tracking_uri)

    def summary(self, run_id: str) -> dict[str, Any]:
        """name, experiment (name and id), status and the keys of the run's metrics; LookupError when
        the store has no such run."""
        try:
            run = self.client.get_run(run_id)
        except MlflowException as e:
            raise LookupError(f"no MLflow run {run_id!r} in {self.tracking_uri}") from e
        experiment = self.client.get_experiment(run.info.experiment_id)
        return {"run_id": run_id, "name": run.info.run_name or run_id[:8], "experiment": experiment.name,
                "experiment_id": experiment.experiment_id, "status": run.info.status,
                "metric_keys": sorted(run.data.metrics)}

    def history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        """(step, value) sorted by step; a step logged twice (a resumed run) keeps its last value."""
        by_step: dict[int, tuple[int, float]] = {}
        for m in self.client.get_metric_history(run_id, key):
            if m.step not in by_step or m.timestamp >= by_step[m.step][0]:
                by_step[m.step] = (m.timestamp, m.value)
        return [(step, by_step[step][1]) for step in sorted(by_step)]

    def step_images(self, run_id: str, key: str) -> dict[int, str]:
        """step -> artifact path of the image logged under ``key`` at that step (the newest one)."""
        found: dict[int, tuple[int, str]] = {}
        for f in self.client.list_artifacts(run_id, "images"):
            m = _STEP_IMAGE.match(Path(f.path).name)
            if m is None or m["key"].replace("~", "/").replace("#", "/") != key:
                continue
            step, ts = int(m["step"]), int(m["ts"])
            if step not in found or ts >= found[step][0]:
                found[step] = (ts, f.path)
        return {step: path for step, (_, path) in sorted(found.items())}

    def image_keys(self, run_id: str) -> list[str]:
        """Every key of the run's step-indexed images."""
        keys = {m["key"].replace("~", "/").replace("#", "/")
                for f in self.client.list_artifacts(run_id, "images")
                if (m := _STEP_IMAGE.match(Path(f.path).name)) is not None}
        return sorted(keys)

    def download(self, run_id: str, artifact_path: str, dst: str | os.PathLike) -> Path:
        Path(dst).mkdir(parents=True, exist_ok=True)
        return Path(self.client.download_artifacts(run_id, artifact_path, str(dst)))
