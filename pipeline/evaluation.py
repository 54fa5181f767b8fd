"""``srpo evaluate``: held-out prompts, base vs trained, plain scores, one MLflow evaluation run.

Why this shape:
- The same prompts and the same seeds (``eval.seed + i``) for the base and the trained transformer,
  so each prompt's score difference is the effect of the weights alone, not of the noise.
- Sampling as the family's diffusers pipeline (:func:`pipeline.sampling.generate`), because that is how the
  published numbers (SRPO_SPEC section 6) were produced; training rollouts use SRPO's own sampler.
- Plain scores (:mod:`rewards.scorers`), never SRP: they are what papers report, and a reward the
  policy did not optimise (a "gold" scorer) is the one that shows reward hacking.
- All images are generated first and the image model is dropped before any scorer is loaded, so a
  12B transformer and a ViT-H reward never have to fit on one device together.

The run records: metrics ``eval/<name>/mean`` (trained), ``eval/<name>/base_mean``,
``eval/<name>/delta`` and ``eval/<name>/win_rate``, the per-prompt table ``eval/per_prompt.json``,
one side-by-side image per prompt (base | trained) under ``eval/images/``, the params of the
sampling and the resolved config.
"""
from __future__ import annotations

import gc
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from pipeline.checkpoint import read_run
from pipeline.config import Config, ConfigError, ScorerConfig, reward_entries, reward_name
from pipeline.data import read_prompts
from pipeline.device import resolve_device
from pipeline.export import WeightsSource, find_run_dir, read_weights, resolve_weights, source_step
from pipeline.models import load_adapter
from pipeline.sampling import generate, load_scheduler_config, to_uint8
from pipeline.storage import is_uri
from pipeline.tracking import ClientRun, default_tracking_uri, prompt_dataset
from rewards.scorers import Scorer, load_scorers

GRID_GAP = 4  # white pixels between the base and the trained image of a prompt


# ------------------------------------------------------------------------------------ the report


@dataclass
class EvalReport:
    """What one evaluation measured; ``scores`` are the evaluated weights' per-prompt scores.

    ``base_scores`` is empty when the base model was not sampled (``base=False``, or no weights:
    then ``scores`` are the base model's own).
    """

    run_id: str
    tracking_uri: str
    experiment: str
    weights: str | None
    prompts: list[str]
    seeds: list[int]
    scores: dict[str, list[float]]
    base_scores: dict[str, list[float]] = field(default_factory=dict)
    train_run_id: str | None = None
    out_dir: str | None = None
    weights_file: str | None = None  # what ``weights`` resolved to (a run folder -> its newest weights)
    weights_step: int | None = None  # the training step of those weights, when recorded

    @property
    def means(self) -> dict[str, float]:
        return {k: float(np.mean(v)) for k, v in self.scores.items()}

    @property
    def base_means(self) -> dict[str, float]:
        return {k: float(np.mean(v)) for k, v in self.base_scores.items()}

    @property
    def deltas(self) -> dict[str, float]:
        base = self.base_means
        return {k: m - base[k] for k, m in self.means.items() if k in base}

    @property
    def win_rates(self) -> dict[str, float]:
        """Fraction of prompts where the evaluated weights beat the base (same seed)."""
        return {k: float(np.mean(np.asarray(v) > np.asarray(self.base_scores[k])))
                for k, v in self.scores.items() if k in self.base_scores}

    def metrics(self) -> dict[str, float]:
        out = {f"eval/{k}/mean": v for k, v in self.means.items()}
        out.update({f"eval/{k}/base_mean": v for k, v in self.base_means.items()})
        out.update({f"eval/{k}/delta": v for k, v in self.deltas.items()})
        out.update({f"eval/{k}/win_rate": v for k, v in self.win_rates.items()})
        return out

    def table(self) -> dict[str, list[Any]]:
        """The per-prompt table: prompt, seed, then ``<name>/base`` and ``<name>/trained`` columns."""
        cols: dict[str, list[Any]] = {"prompt": list(self.prompts), "seed": list(self.seeds)}
        for name, values in self.scores.items():
            if name in self.base_scores:
                cols[f"{name}/base"] = list(self.base_scores[name])
            cols[f"{name}/trained" if self.weights is not None else f"{name}/base"] = list(values)
        return cols

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["metrics"] = self.metrics()
        return d


# ------------------------------------------------------------------------------- config helpers


def eval_prompts(cfg: Config) -> list[str]:
    """Held-out prompts: ``eval.prompts``, else ``data.heldout_prompts``."""
    source = cfg.eval.prompts or cfg.data.heldout_prompts
    if not source:
        raise ConfigError("eval.prompts: missing (and data.heldout_prompts is empty); expected a prompts file "
                          "of held-out prompts, one a line")
    return read_prompts(source)


def eval_seeds(cfg: Config, n: int) -> list[int]:
    """Seed of prompt i: ``eval.seed + i`` (the same for base and trained weights)."""
    return [cfg.eval.seed + i for i in range(n)]


def eval_resolution(cfg: Config) -> int:
    return cfg.eval.resolution or cfg.data.resolution


def scorer_configs(cfg: Config) -> list[ScorerConfig]:
    """``eval.scorers``, or the training rewards as the scorers when none is configured."""
    if cfg.eval.scorers:
        return list(cfg.eval.scorers)
    return [ScorerConfig(kind=r.kind, path=r.path, arch=r.arch, tokenizer_path=r.tokenizer_path, name=reward_name(r))
            for _, r in reward_entries(cfg)]


def _scheduler_config(model_path: str | Path) -> dict[str, Any] | None:
    """The model folder's scheduler config (the pipeline's dynamic shifting reads it); None = the family's default."""
    has_own = (Path(model_path) / "scheduler" / "scheduler_config.json").is_file()
    return load_scheduler_config(model_path) if has_own else None


# ------------------------------------------------------------------------------------- scoring


@torch.no_grad()
def score_images(scorers: Sequence[Scorer], images: Tensor, captions: list[str],
                 batch_size: int | None = None) -> dict[str, Tensor]:
    """Every scorer's scores [B] (CPU fp32) of images [B, 3, H, W] in [0, 1] and their captions.

    ``batch_size`` bounds the images a scorer sees at once (memory); None = all at once. The
    training loop reuses this for its gold reward.
    """
    if images.shape[0] != len(captions):
        raise ValueError(f"score_images: {images.shape[0]} images but {len(captions)} captions")
    step = batch_size or max(1, images.shape[0])
    out: dict[str, Tensor] = {}
    for s in scorers:
        parts = [s.score(images[i:i + step], list(captions[i:i + step])) for i in range(0, images.shape[0], step)]
        out[s.name] = torch.cat(parts) if parts else torch.empty(0)
    return out


# ------------------------------------------------------------------------------------ sampling


def _load_trained(transformer: torch.nn.Module, source: WeightsSource, model_path: str) -> None:
    """Copy the weights of ``source`` into ``transformer``; every parameter must be covered."""
    state = read_weights(source)
    result = transformer.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"--weights {source.path}: does not match the transformer of model.path {model_path}: "
            f"missing {result.missing_keys[:5]}{'...' if len(result.missing_keys) > 5 else ''}, "
            f"unexpected {result.unexpected_keys[:5]}{'...' if len(result.unexpected_keys) > 5 else ''}")


def generate_eval_images(cfg: Config, source: WeightsSource | None, base: bool, prompts: list[str],
                         seeds: list[int], device: torch.device) -> tuple[Tensor | None, Tensor]:
    """(base images or None, evaluated images), CPU [N, 3, R, R] in [0, 1]; the model is freed after.

    ``source`` None: the base model is the evaluated one (no base images).
    """
    adapter = load_adapter(cfg.model.family, cfg.model.path, device, cfg.model.max_sequence_length)
    transformer = adapter.transformer.eval()
    sched = _scheduler_config(cfg.model.path)

    def sample() -> Tensor:
        return generate(adapter, transformer, prompts, seeds, steps=cfg.eval.steps, guidance=cfg.eval.guidance,
                        resolution=eval_resolution(cfg), batch_size=cfg.eval.batch_size,
                        scheduler_config=sched,
                        mixed_precision=cfg.train.mixed_precision).float().cpu()

    base_images = sample() if (base or source is None) else None
    if source is None:
        images = base_images
        base_images = None  # the base model is what is evaluated; nothing to compare against
    else:
        _load_trained(transformer, source, cfg.model.path)
        images = sample()
    del adapter, transformer
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return base_images, images


# ------------------------------------------------------------------------------------- logging


def side_by_side(base: Tensor | None, trained: Tensor) -> np.ndarray:
    """base | gap | trained as one HWC uint8 image (just the trained image without a base)."""
    right = to_uint8(trained[None])[0]
    if base is None:
        return right
    gap = np.full((right.shape[0], GRID_GAP, 3), 255, dtype=np.uint8)
    return np.concatenate([to_uint8(base[None])[0], gap, right], axis=1)


def _params(cfg: Config, report: EvalReport, scorers: list[ScorerConfig]) -> dict[str, str]:
    return {
        "steps": str(cfg.eval.steps), "guidance": str(cfg.eval.guidance), "resolution": str(eval_resolution(cfg)),
        "seed": str(cfg.eval.seed), "weights": report.weights or "base",
        "weights_file": report.weights_file or "", "weights_step": str(report.weights_step),
        "num_prompts": str(len(report.prompts)), "prompts": cfg.eval.prompts or cfg.data.heldout_prompts,
        "model_path": cfg.model.path, "mixed_precision": cfg.train.mixed_precision,
        "batch_size": str(cfg.eval.batch_size),
        "scorers": ", ".join(f"{s.name or s.kind}={s.kind}:{s.path}" for s in scorers)[:6000],
    }


def log_eval_images(run: ClientRun, report: EvalReport, base_images: Tensor | None, images: Tensor) -> None:
    """Per prompt: ``eval/images/<i>.png`` (a plain file), and the same picture step-indexed under the
    key ``eval/<i>`` at the evaluated weights' training step, its prompt printed under it: MLflow's
    image view lines up the evaluations of one run's checkpoints by step."""
    step = report.weights_step or 0
    label = "base | trained: " if base_images is not None else ""
    for i in range(images.shape[0]):
        pair = side_by_side(None if base_images is None else base_images[i], images[i])
        run.log_image(pair, f"eval/images/{i:04d}.png")
        run.log_step_image(pair, f"eval/{i:04d}", step, [label + report.prompts[i]])


def log_evaluation(report: EvalReport, cfg: Config, scorers: list[ScorerConfig], base_images: Tensor | None,
                   images: Tensor, run_name: str | None) -> str:
    """Create and fill the MLflow evaluation run; returns its id."""
    tags = {"srpo.kind": "evaluation", "srpo.weights": report.weights or "base", "srpo.model_path": cfg.model.path}
    if report.weights_file:
        tags["srpo.weights_file"] = report.weights_file
    if report.weights_step is not None:
        tags["srpo.step"] = str(report.weights_step)
    if report.train_run_id:
        # MLflow's own nesting tag (what start_run(parent_run_id=...) sets): the UI shows the
        # evaluation under the training run it scored.
        tags["srpo.train_run_id"] = tags["mlflow.parentRunId"] = report.train_run_id
    default_name = f"eval-{cfg.log.run_name}" if cfg.log.run_name else None  # never the training run's name
    run = ClientRun.create(report.tracking_uri, report.experiment, tags, run_name or default_name)
    status = "FAILED"
    try:
        run.log_batch(report.metrics(), _params(cfg, report, scorers))
        run.log_table(report.table(), "eval/per_prompt.json")
        log_eval_images(run, report, base_images, images)
        run.log_input(prompt_dataset(cfg.eval.prompts or cfg.data.heldout_prompts), "evaluation")
        run.log_text(cfg.to_yaml(), "config.yaml")
        status = "FINISHED"
    finally:
        run.end(status)
    return run.run_id


def _write_local(report: EvalReport, base_images: Tensor | None, images: Tensor, out_dir: Path) -> None:
    """report.json + the side-by-side PNGs, for readers without MLflow."""
    from PIL import Image

    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    for i in range(images.shape[0]):
        Image.fromarray(side_by_side(None if base_images is None else base_images[i], images[i])).save(
            out_dir / "images" / f"{i:04d}.png")
    (out_dir / "report.json").write_text(json.dumps(report.to_dict(), indent=2))


# ---------------------------------------------------------------------------------- entry point


def evaluate(cfg: Config, weights: str | None, base: bool = True, out_dir: str | Path | None = None,
             run_name: str | None = None, *, tracking_uri: str | None = None,
             device: torch.device | str | None = None) -> EvalReport:
    """Sample the held-out prompts with the base and the given weights, score, log one MLflow run.

    ``weights``: anything :func:`pipeline.export.load_weights` reads (a safetensors export, a
    diffusers folder, a checkpoint or a run folder); None evaluates the base model alone.
    ``base=False`` skips the base images (no base_mean / delta). ``out_dir``: where to also write
    report.json and the images (None = MLflow only). ``tracking_uri`` defaults to the training run's
    (run.json) when the weights come from one, else to the config's (:func:`default_tracking_uri`).
    """
    dev = torch.device(device) if device is not None else resolve_device(cfg.train.device)
    prompts = eval_prompts(cfg)
    seeds = eval_seeds(cfg, len(prompts))
    if weights is not None and not is_uri(weights):  # a URI: a run folder in remote storage
        weights = str(Path(weights).resolve())
    # Resolved before any model work, so a wrong --weights fails in a second, not after sampling.
    source = resolve_weights(weights, model_path=cfg.model.path) if weights is not None else None
    sc_cfgs = scorer_configs(cfg)
    base_images, images = generate_eval_images(cfg, source, base, prompts, seeds, dev)
    scorers = load_scorers(sc_cfgs, dev)
    scores = score_images(scorers, images, prompts, cfg.eval.batch_size)
    base_scores = score_images(scorers, base_images, prompts, cfg.eval.batch_size) if base_images is not None else {}
    # An evaluation of a training run's weights goes into that run's store and experiment, nested
    # under it; other weights go where this command's tracking URI points.
    train = read_run(source.run_dir) if source is not None and find_run_dir(source.path) is not None else None
    report = EvalReport(
        run_id="", tracking_uri=tracking_uri or (train or {}).get("tracking_uri") or default_tracking_uri(cfg),
        experiment=(train or {}).get("experiment") or cfg.log.experiment,
        weights=weights, prompts=prompts, seeds=seeds,
        scores={k: v.tolist() for k, v in scores.items()},
        base_scores={k: v.tolist() for k, v in base_scores.items()},
        train_run_id=str(train["run_id"]) if train else None,
        out_dir=str(out_dir) if out_dir is not None else None,
        weights_file=str(source.path) if source is not None else None,
        weights_step=source_step(source) if source is not None else None,
    )
    if report.tracking_uri.startswith("sqlite:///"):
        Path(report.tracking_uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    report.run_id = log_evaluation(report, cfg, sc_cfgs, base_images, images, run_name)
    if out_dir is not None:
        _write_local(report, base_images, images, Path(out_dir))
    return report
