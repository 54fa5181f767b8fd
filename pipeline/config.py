"""One typed config tree for srpo-ray.

YAML presets live in ``configs/``; ``key.sub=value`` overrides come from the command line.
Loading validates everything it can before any model or cluster work starts: unknown keys,
wrong types and impossible values raise :class:`ConfigError` naming the dotted field and what is
allowed. Paths are checked separately by :func:`check_paths` because the tiny preset creates its
model folder on first use (see :mod:`pipeline.tiny`).

There is no second source of truth: every default below is the reference recipe of
SRPO_SPEC.md section 5 (FLUX.1-dev + HPSv2.1) unless the field says otherwise.
"""
from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A config value is missing, unknown, of the wrong type or out of range."""


# --------------------------------------------------------------------------------------------
# The tree. Field names follow the reference code's flags where one exists.
# --------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    family: Literal["flux", "qwen_image"] = "flux"  # docs/models.md: what each family implements
    # A local diffusers folder with the family's layout: FLUX.1-dev's (model_index.json, transformer/, vae/,
    # text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/, scheduler/) or Qwen-Image's (one text_encoder/).
    path: str = ""
    max_sequence_length: int = 512  # text tokens: T5 for FLUX (512 for FLUX.1-dev), Qwen2.5-VL for Qwen-Image
    # Weights are kept in fp32 (master copy); compute may autocast to bf16 (train.mixed_precision).
    activation_checkpointing: bool = False


@dataclass
class DataConfig:
    prompts: str = ""  # text file (one prompt per line) or parquet with a `caption` column
    heldout_prompts: str = ""  # optional, for evaluation of the learning signal
    resolution: int = 720  # square images; must be divisible by 16 (VAE /8, then 2x2 patches)
    # rollout.mode=offline: real images with captions. A folder of images with same-named .txt
    # captions, or a manifest (.parquet or .jsonl) with `path` (relative to the manifest) and `caption`.
    images: str = ""
    # Images whose shorter side is below this are skipped (0 = data.resolution: never upsample).
    min_image_size: int = 0
    # Images with more pixels (width x height, read from the header) are skipped as too_large and
    # never decoded: PIL's decompression-bomb guard. Default: PIL's own limit (~89.5 Mpx).
    max_image_pixels: int = 89_478_485
    # The output folder of `srpo preprocess` (parquet of text embeddings). When set, training reads
    # the captions and embeddings from it and runs no text encoder.
    prompt_embeddings: str = ""


@dataclass
class RolloutConfig:
    # online: x0 from rollouts of the current policy; offline: x0 = VAE latent of a real image
    # (data.images), fresh noise per sample (never shared across ranks, SRPO_SPEC section 1).
    mode: Literal["online", "offline"] = "online"
    # actors: a separate Ray Data actor pool pulling versioned weights; colocated: the learner's own
    # workers generate with their sharded model (the reference; no weight sync).
    placement: Literal["actors", "colocated"] = "colocated"
    num_actors: int = 2  # actor-pool size (min = max) for placement=actors
    num_cpus: float = 1.0  # per rollout actor
    num_gpus: float = 0.0  # per rollout actor
    max_staleness: int = 1  # policy versions a sample may lag the learner (placement=actors)
    weight_sync: Literal["object_store", "broadcast"] = "object_store"
    steps: int = 25  # S, Euler steps from sigma=1 to 0
    # The rollout's guidance, as the family takes it (FLUX: its distilled guidance embedding, HPS 1.0 and
    # PickScore 2.0 in the FLUX recipes; Qwen-Image: the true-CFG scale, 4 in the authors' recipe).
    guidance: float = 1.0
    shift: float = 3.0  # s of shift(t) = s t / (1 + (s - 1) t)
    # The reference draws one noise per step and broadcasts it to all ranks.
    share_noise_across_ranks: bool = True
    # Reused rollouts: each generated x0 trains `reuse` consecutive optimizer steps, each with fresh
    # levels m and fresh noise eps (pipeline/reuse.py). 1 = the reference, a rollout every step.
    reuse: int = 1
    # torch.compile the rollout's transformer forward (its shapes never change: it compiles once).
    compile: bool = False
    # The rollout's compute precision (colocated and rollout actors); auto = train.mixed_precision. The
    # learner's master weights stay fp32 whatever this says.
    dtype: Literal["auto", "fp32", "bf16"] = "auto"


@dataclass
class SRPOConfig:
    # Training grid: g = linspace(b[A], b[B], N), b_j = shift(1 - j / base_steps).
    base_steps: int = 50
    train_timestep: list[int] = field(default_factory=lambda: [5, 25])  # [A, B]
    timestep_length: int = 1000  # N
    groundtruth_ratio: float = 0.9  # K = int((1 - ratio) * N) + 1
    m_margin: int = 5  # m ~ U{margin, ..., N - margin}
    train_guidance: float = 3.5  # the family's guidance in the Direct-Align branches (FLUX: distilled; Qwen: CFG)
    d_pos: list[float] = field(default_factory=lambda: [0.1, 0.25])  # k for the denoise branch
    d_inv: list[float] = field(default_factory=lambda: [0.3, 0.01])  # k for the inversion branch
    hinge_margin: float = 0.7  # loss = relu(margin - R) / num_branches
    # reference: denoise + inversion branches (the default, as released by the authors)
    # denoise_only: the denoise branch alone (the paper's sanity check: reward hacking appears)
    # relative_discount: the authors' later recipe: reward (r_pos - r_neg) * shift(linspace(0,1,N+1))[m],
    #                    loss -reward, denoise branch only
    variant: Literal["reference", "denoise_only", "relative_discount"] = "reference"
    # relative_discount: the time shift of its discount table shift(linspace(0,1,N+1)); the authors fix
    # it at 3 whatever the rollout's shift (their Qwen-Image rollout is unshifted).
    discount_shift: float = 3.0
    # Reward aggregation (paper option): several noise levels m per x0, weighted lambda_j ∝ discount^j,
    # j = 0 for the noisiest draw. 1 injection = the reference.
    num_injections: int = 1
    injection_discount: float = 1.0
    srp_form: Literal["reference", "cfg", "plain"] = "reference"
    positive_words: list[str] = field(
        default_factory=lambda: ["Natural-lighting", "Detail", "Detailed", "Real"]
    )
    negative_words: list[str] = field(
        default_factory=lambda: ["Concept art", "Painting", "Anime", "Flat", "Oil"]
    )


@dataclass
class AutoscalingConfig:
    """reward.placement=serve: Ray Serve's ``autoscaling_config`` of this reward's deployment
    (docs/rewards.md). Serve keeps ``target_ongoing_requests`` requests (running plus queued) per
    replica between ``min_replicas`` and ``max_replicas``; min = max is a fixed number of replicas."""

    min_replicas: int = 1
    max_replicas: int = 1
    # A reward replica computes one request at a time, so 1 asks for a replica per request in flight
    # (running or queued): every learner rank keeps two in flight (both branches).
    target_ongoing_requests: float = 1.0
    upscale_delay_s: float = 30.0  # Serve's defaults: scale up after 30 s of load, down after 10 min idle
    downscale_delay_s: float = 600.0
    metrics_interval_s: float = 10.0  # how often handles and replicas report their queues
    look_back_period_s: float = 30.0  # the window those reports are averaged over


@dataclass
class RewardConfig:
    """One training reward. ``reward:`` is a run with one reward; ``rewards:`` a list of them, each
    entry starting from the ``reward:`` block's values (docs/rewards.md)."""

    kind: Literal["hpsv2", "pickscore", "clip"] = "hpsv2"
    # hpsv2: the HPS_v2.1_compressed.pt file; pickscore/clip: a transformers CLIPModel folder.
    path: str = ""
    # hpsv2 only: an open_clip model name or a path to an open_clip model-config JSON.
    arch: str = "ViT-H-14"
    # pickscore: the CLIP-ViT-H-14 processor folder whose tokenizer PickScore uses (default: path).
    tokenizer_path: str = ""
    name: str = ""  # metric names reward/<name>/... with several rewards ("" = kind)
    weight: float = 1.0  # the branch loss is the weighted sum of every reward's loss
    scale: float = 1.0  # multiplies this reward's SRP (reward, pos/neg scores) before the hinge
    srp_form: Literal["", "reference", "cfg", "plain"] = ""  # "" = srpo.srp_form
    # The decoded image this reward scores (training loss and rollout metrics; evaluation always sees
    # the pipeline's image): clamp = x / 2 + 0.5 clamped to [0, 1] (diffusers' pipelines, the FLUX
    # recipe); minmax = (x - min) / (max - min) per image (the authors' Qwen-Image script).
    image_norm: Literal["clamp", "minmax"] = "clamp"
    # colocated: the reward model lives in the learner (the reference); remote: a fixed pool of
    # num_actors reward actors decodes x0_hat and returns dLoss/dx0_hat (the gradient relay); serve:
    # the same relay as a Ray Serve deployment that autoscales (reward.autoscaling).
    placement: Literal["colocated", "remote", "serve"] = "colocated"
    num_actors: int = 2  # placement=remote
    num_cpus: float = 1.0  # per reward actor or Serve replica
    num_gpus: float = 0.0  # per reward actor or Serve replica; fractions share a GPU (0.25 = 4 per GPU)
    # Custom Ray resources per actor or replica, e.g. {reward_node: 1} to place them on a node type
    # that offers that resource (docs/rewards.md, "Pending replicas bring nodes").
    resources: dict[str, float] = field(default_factory=dict)
    # placement=serve: requests a replica accepts at once; it computes one at a time, the others wait in
    # it. 1 keeps the queue in the callers, where Serve's autoscaler counts it (with 2, Ray 2.60 did not
    # scale up under 8 clients: docs/rewards.md).
    max_ongoing_requests: int = 1
    autoscaling: AutoscalingConfig = field(default_factory=AutoscalingConfig)
    # placement=serve: the name of a Serve application shared by several runs on one cluster; the
    # first run deploys it, later runs attach ("" = a deployment of this run alone, deleted at its end).
    service: str = ""
    # placement=remote or serve: the Ray runtime_env of the reward workers (pip, uv, conda, env_vars,
    # py_modules, ...): their own Python packages beside the learner's (docs/rewards.md).
    runtime_env: dict[str, Any] = field(default_factory=dict)


@dataclass
class OptimConfig:
    lr: float = 5e-6
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 1e-4
    max_grad_norm: float = 0.1
    # lr(step) = lr * min(1, (step + 1) / warmup_steps); 0 = constant (the reference). A pure function
    # of the step, so a resumed run continues the schedule exactly.
    warmup_steps: int = 0


@dataclass
class LoRAConfig:
    # 0 = full fine-tuning (every transformer weight trains). r > 0: peft LoRA adapters of rank r on
    # the target layers; the base is frozen and only the adapters train, sync and checkpoint.
    rank: int = 0
    alpha: float | None = None  # scaling = alpha / rank; null = rank (scaling 1)
    dropout: float = 0.0  # on the adapters' input, while training
    # Layer names inside a transformer block, matched in every block (a name, or the end of one after
    # a "."); [] = the model family's default: every block's attention projections and feed-forward
    # layers (README, "LoRA").
    target_modules: list[str] = field(default_factory=list)


@dataclass
class TrainConfig:
    max_steps: int = 20  # the authors' best result; longer training drifts
    batch_size: int = 1  # prompts per device per optimizer step
    mixed_precision: Literal["fp32", "bf16"] = "bf16"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    checkpoint_every: int = 0  # sharded model + optimizer checkpoint every N steps (0 = only at the end)
    keep_checkpoints: int = 2  # older checkpoints are pruned
    # Ray Train FailureConfig: a crashed learner worker group restarts from the last checkpoint this
    # many times (-1 = without limit, 0 = fail the run).
    max_failures: int = 0


@dataclass
class LearnerConfig:
    # 0 = the single-process trainer (no Ray); N >= 1 = Ray Train TorchTrainer with N workers.
    num_workers: int = 0
    # single: one unsharded worker (num_workers=1: the single-process engine under Ray Train)
    strategy: Literal["fsdp2", "deepspeed", "single"] = "fsdp2"
    zero_stage: int = 2  # deepspeed only: 2 or 3
    # fsdp2 only: keep the blocks gathered from the colocated rollout through the step's forwards and
    # backwards, and reduce-scatter the branches' gradients once (one all-gather per step; a whole
    # model + gradient per rank during the step).
    fsdp_keep_gathered: bool = False
    num_cpus: float = 1.0  # per learner worker
    use_gpu: bool = False


@dataclass
class ScorerConfig:
    """One reward model used to judge images (evaluation, gold reward): plain scores, not SRP.

    hpsv2: path = HPS_v2.1_compressed.pt, arch = open_clip name or config JSON.
    pickscore / clip: path = a transformers CLIPModel folder (tokenizer_path optional).
    aesthetic: path = the LAION aesthetic predictor MLP (.pth state dict), clip_path = the
    transformers CLIPModel folder of the CLIP ViT-L/14 whose image embeddings it reads.
    """

    kind: Literal["hpsv2", "pickscore", "clip", "aesthetic"] = "hpsv2"
    path: str = ""
    arch: str = "ViT-H-14"
    tokenizer_path: str = ""
    clip_path: str = ""
    name: str = ""  # metric name prefix (default: kind)


@dataclass
class EvalConfig:
    prompts: str = ""  # held-out prompts ("" = data.heldout_prompts)
    seed: int = 1234  # generation seeds: seed + prompt index (the same for base and checkpoint)
    # Sampling as the family's diffusers pipeline / the authors' inference script (FLUX: 50 steps, guidance 3.5).
    steps: int = 50
    guidance: float = 3.5
    resolution: int = 0  # 0 = data.resolution
    batch_size: int = 4
    scorers: list[ScorerConfig] = field(default_factory=list)  # `srpo evaluate`
    # During training: a held-out "gold" reward, different from the training reward, scored on full
    # rollouts of the held-out prompts every `every` steps (0 = never). The best weights by gold score
    # are exported to <output.dir>/best/; training stops early after `patience` evaluations without
    # improvement (0 = never stop early).
    gold: list[ScorerConfig] = field(default_factory=list)
    every: int = 0
    patience: int = 0
    num_prompts: int = 0  # held-out prompts scored during training (0 = all)


@dataclass
class LogConfig:
    # "" = MLFLOW_TRACKING_URI if set, else sqlite:///mlflow.db in the directory the command runs in
    # (MLflow's own default): runs with different output folders share one store.
    tracking_uri: str = ""
    experiment: str = "srpo"
    run_name: str = ""
    every: int = 1
    image_every: int = 5  # steps between rollout image grids (0 = never)
    # CPU, memory, disk, network and (with nvidia-ml-py) GPU samples as system/* metrics, every 10 s
    # (MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL), from the process that trains (Ray: learner rank 0).
    # null = on when the learners train on GPUs (train.device / learner.use_gpu).
    system_metrics: bool | None = None


@dataclass
class OutputConfig:
    dir: str = "runs/srpo"


@dataclass
class TinyConfig:
    # When enabled, the tiny world (random tiny models of the real classes: FLUX, model.family's, rewards) is
    # written to `dir` on first use; the model/reward paths of the preset point into it.
    enabled: bool = False
    dir: str = ".cache/srpo-tiny"
    seed: int = 0


@dataclass
class Config:
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    srpo: SRPOConfig = field(default_factory=SRPOConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    # Several training rewards at once; each entry starts from the reward block ([] = reward alone).
    rewards: list[RewardConfig] = field(default_factory=list)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    tiny: TinyConfig = field(default_factory=TinyConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """Dotted keys -> values (for MLflow params)."""
        out: dict[str, Any] = {}

        def walk(prefix: str, d: dict[str, Any]) -> None:
            for k, v in d.items():
                key = f"{prefix}{k}"
                if isinstance(v, dict):
                    walk(key + ".", v)
                else:
                    out[key] = v

        walk("", self.to_dict())
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# --------------------------------------------------------------------------------------------
# Building from plain data, with type checks that name the field.
# --------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list[{_type_name(typing.get_args(tp)[0])}]"
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    if tp is Any:  # free-form values (a runtime_env's pip list or env_vars), checked by their user
        return value
    origin = typing.get_origin(tp)
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{where}: got {value!r}, expected a mapping with string keys")
        return {k: _coerce(v, typing.get_args(tp)[1], f"{where}.{k}") for k, v in value.items()}
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{where}: got {value!r}, expected one of {list(allowed)}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: got {value!r}, expected {_type_name(tp)}")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: got {value!r}, expected {_type_name(tp)}")
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: got {value!r}, expected true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: got {value!r}, expected an integer")
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads "1e-5" (no dot) as a string; accept what float() accepts.
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: got {value!r}, expected a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: got {value!r}, expected a string")
        return value
    raise TypeError(f"unsupported config type {tp} at {where}")


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"unknown config key {where}{unknown[0]!s}; valid keys here: {sorted(names)}"
        )
    kwargs = {}
    for name, value in data.items():
        where = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(value, hints[name], where)
    return cls(**kwargs)


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_override(text: str) -> dict[str, Any]:
    """``a.b.c=value`` -> ``{"a": {"b": {"c": value}}}``; the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key.path=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: empty key")
    value = yaml.safe_load(raw) if raw.strip() != "" else ""
    node: Any = value
    for part in reversed(key.split(".")):
        node = {part: node}
    return node


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML preset (or the built-in defaults), apply overrides, validate."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        loaded = yaml.safe_load(p.read_text())
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(p)!r}: expected a mapping at the top level")
        data = loaded
    for o in overrides:
        data = _deep_merge(data, parse_override(o))
    return config_from_dict(data)


def config_from_dict(data: dict[str, Any]) -> Config:
    cfg = _build(Config, _rewards_from_reward_block(data))
    validate(cfg)
    return cfg


def _rewards_from_reward_block(data: dict[str, Any]) -> dict[str, Any]:
    """Each ``rewards`` entry starts from the ``reward`` block: a preset's reward settings (placement,
    resources, runtime_env) apply to every entry that does not set its own."""
    entries, base = data.get("rewards"), data.get("reward")
    if not entries or not isinstance(entries, list) or not isinstance(base, dict):
        return data
    merged = [_deep_merge(base, e) if isinstance(e, dict) else e for e in entries]
    return {**data, "rewards": merged}


def reward_entries(cfg: Config) -> list[tuple[str, RewardConfig]]:
    """(config field, entry) of every training reward: ``rewards[i]``, or ``reward`` alone."""
    if cfg.rewards:
        return [(f"rewards[{i}]", r) for i, r in enumerate(cfg.rewards)]
    return [("reward", cfg.reward)]


def reward_name(r: RewardConfig) -> str:
    """The name of a reward in metrics (reward/<name>/...) and in its Serve application."""
    return r.name or r.kind


def _require(cond: bool, field_name: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"{field_name}: {message}")


def validate(cfg: Config) -> None:
    """Range checks that types alone cannot express."""
    _validate_srpo(cfg)
    _validate_run(cfg)
    _validate_lora(cfg)
    _validate_rewards(cfg)
    _validate_eval(cfg)


def _validate_srpo(cfg: Config) -> None:
    s = cfg.srpo
    _require(cfg.data.resolution > 0 and cfg.data.resolution % 16 == 0, "data.resolution",
             f"got {cfg.data.resolution}, expected a positive multiple of 16 (VAE /8 then 2x2 patches)")
    _require(cfg.model.max_sequence_length > 0, "model.max_sequence_length",
             f"got {cfg.model.max_sequence_length}, expected > 0 (512 for FLUX.1-dev and Qwen-Image)")
    _require(cfg.rollout.steps >= 1, "rollout.steps", f"got {cfg.rollout.steps}, expected >= 1")
    _require(cfg.rollout.shift > 0, "rollout.shift", f"got {cfg.rollout.shift}, expected > 0")
    _require(s.base_steps >= 2, "srpo.base_steps", f"got {s.base_steps}, expected >= 2")
    _require(len(s.train_timestep) == 2, "srpo.train_timestep",
             f"got {s.train_timestep}, expected two indices [A, B]")
    a, b = s.train_timestep
    # A = 0 would put sigma = 1 (pure noise) in the grid, where the recovery divides by 1 - sigma = 0;
    # B = base_steps is sigma = 0, where there is nothing to recover.
    _require(0 < a < b < s.base_steps, "srpo.train_timestep",
             f"got {s.train_timestep}, expected 0 < A < B < srpo.base_steps ({s.base_steps})")
    _require(s.timestep_length >= 2 * s.m_margin + 1 and s.timestep_length >= 3, "srpo.timestep_length",
             f"got {s.timestep_length}, expected >= 2 * srpo.m_margin + 1")
    _require(s.m_margin >= 1, "srpo.m_margin", f"got {s.m_margin}, expected >= 1")
    _require(0.0 < s.groundtruth_ratio < 1.0, "srpo.groundtruth_ratio",
             f"got {s.groundtruth_ratio}, expected a number strictly between 0 and 1")
    _require(len(s.d_pos) == 2, "srpo.d_pos", f"got {s.d_pos}, expected [start, end]")
    _require(len(s.d_inv) == 2, "srpo.d_inv", f"got {s.d_inv}, expected [start, end]")
    _require(s.num_injections >= 1, "srpo.num_injections", f"got {s.num_injections}, expected >= 1")
    _require(0.0 < s.injection_discount <= 1.0, "srpo.injection_discount",
             f"got {s.injection_discount}, expected 0 < discount <= 1")
    _require(s.discount_shift > 0, "srpo.discount_shift", f"got {s.discount_shift}, expected > 0")
    _require(len(s.positive_words) >= 1, "srpo.positive_words", "expected at least one word")
    _require(len(s.negative_words) >= 1, "srpo.negative_words", "expected at least one word")


def _validate_run(cfg: Config) -> None:
    o = cfg.optim
    _require(o.lr >= 0, "optim.lr", f"got {o.lr}, expected >= 0")
    _require(len(o.betas) == 2 and all(0 <= x < 1 for x in o.betas), "optim.betas",
             f"got {o.betas}, expected two numbers in [0, 1)")
    _require(o.eps > 0, "optim.eps", f"got {o.eps}, expected > 0")
    _require(o.weight_decay >= 0, "optim.weight_decay", f"got {o.weight_decay}, expected >= 0")
    _require(o.max_grad_norm > 0, "optim.max_grad_norm", f"got {o.max_grad_norm}, expected > 0")
    _require(cfg.train.max_steps >= 1, "train.max_steps", f"got {cfg.train.max_steps}, expected >= 1")
    _require(cfg.train.batch_size >= 1, "train.batch_size", f"got {cfg.train.batch_size}, expected >= 1")
    _require(cfg.train.checkpoint_every >= 0, "train.checkpoint_every",
             f"got {cfg.train.checkpoint_every}, expected >= 0")
    _require(cfg.train.keep_checkpoints >= 1, "train.keep_checkpoints",
             f"got {cfg.train.keep_checkpoints}, expected >= 1")
    _require(cfg.log.every >= 1, "log.every", f"got {cfg.log.every}, expected >= 1")
    _require(cfg.log.image_every >= 0, "log.image_every", f"got {cfg.log.image_every}, expected >= 0")
    _require(cfg.learner.num_workers >= 0, "learner.num_workers", f"got {cfg.learner.num_workers}, expected >= 0")
    _require(cfg.learner.strategy != "single" or cfg.learner.num_workers <= 1, "learner.strategy",
             f"got single with learner.num_workers={cfg.learner.num_workers}, expected fsdp2 or deepspeed "
             "for more than one learner worker")
    _require(cfg.learner.zero_stage in (2, 3), "learner.zero_stage", f"got {cfg.learner.zero_stage}, expected 2 or 3")
    _require(cfg.rollout.num_actors >= 1, "rollout.num_actors", f"got {cfg.rollout.num_actors}, expected >= 1")
    _require(cfg.rollout.max_staleness >= 0, "rollout.max_staleness",
             f"got {cfg.rollout.max_staleness}, expected >= 0")
    _require(cfg.rollout.reuse >= 1, "rollout.reuse",
             f"got {cfg.rollout.reuse}, expected >= 1 (optimizer steps per generated x0; 1 = the reference)")
    _require(cfg.data.min_image_size >= 0, "data.min_image_size",
             f"got {cfg.data.min_image_size}, expected >= 0")
    smallest = (cfg.data.min_image_size or cfg.data.resolution) ** 2
    _require(cfg.data.max_image_pixels >= smallest, "data.max_image_pixels",
             f"got {cfg.data.max_image_pixels}, expected >= {smallest} (the smallest usable image: "
             "data.min_image_size, or data.resolution, squared)")
    _require(cfg.optim.warmup_steps >= 0, "optim.warmup_steps", f"got {cfg.optim.warmup_steps}, expected >= 0")
    _require(cfg.train.max_failures >= -1, "train.max_failures",
             f"got {cfg.train.max_failures}, expected -1 (no limit) or >= 0")


def _validate_lora(cfg: Config) -> None:
    lo = cfg.lora
    _require(lo.rank >= 0, "lora.rank", f"got {lo.rank}, expected 0 (full fine-tuning) or a positive rank")
    _require(lo.alpha is None or lo.alpha > 0, "lora.alpha",
             f"got {lo.alpha}, expected a positive number or null (= lora.rank)")
    _require(0.0 <= lo.dropout < 1.0, "lora.dropout", f"got {lo.dropout}, expected 0 <= dropout < 1")
    _require(all(t.strip() and t == t.strip() and not t.startswith(".") for t in lo.target_modules),
             "lora.target_modules", f"got {lo.target_modules}, expected non-empty layer names such as 'attn.to_q'")
    _require(len(set(lo.target_modules)) == len(lo.target_modules), "lora.target_modules",
             f"got {lo.target_modules}, expected each name once")


# Ray's runtime_env keys that make sense for a reward worker (https://docs.ray.io/en/latest/ray-core/api/runtime-env.html).
RUNTIME_ENV_KEYS = ("pip", "uv", "conda", "env_vars", "py_modules", "working_dir", "excludes", "py_executable",
                    "image_uri", "config")
_SERVICE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def _validate_rewards(cfg: Config) -> None:
    names: dict[str, str] = {}
    services: dict[str, str] = {}
    for where, r in reward_entries(cfg):
        _validate_reward(r, where)
        name = reward_name(r)
        _require(name not in names, f"{where}.name",
                 f"{name!r} is also the name of {names.get(name)}; expected a distinct name per reward "
                 "(it names the reward/<name>/... metrics)")
        names[name] = where
        if r.service:
            _require(r.service not in services, f"{where}.service",
                     f"{r.service!r} is also {services.get(r.service)}.service; expected one service per reward")
            services[r.service] = where


def _validate_reward(r: RewardConfig, where: str) -> None:
    _require(r.num_actors >= 1, f"{where}.num_actors", f"got {r.num_actors}, expected >= 1")
    _require(r.num_cpus >= 0, f"{where}.num_cpus", f"got {r.num_cpus}, expected >= 0")
    _require(r.num_gpus >= 0, f"{where}.num_gpus", f"got {r.num_gpus}, expected >= 0 (fractions share a GPU)")
    _require(all(v >= 0 for v in r.resources.values()), f"{where}.resources",
             f"got {r.resources}, expected non-negative amounts")
    _require(r.weight > 0, f"{where}.weight", f"got {r.weight}, expected > 0")
    _require(r.scale > 0, f"{where}.scale", f"got {r.scale}, expected > 0")
    _require(r.name == "" or _SERVICE_NAME.fullmatch(r.name) is not None, f"{where}.name",
             f"got {r.name!r}, expected letters, digits, '_', '.' or '-'")
    _require(r.max_ongoing_requests >= 1, f"{where}.max_ongoing_requests", f"got {r.max_ongoing_requests}, expected >= 1")
    a = r.autoscaling
    _require(a.min_replicas >= 0, f"{where}.autoscaling.min_replicas", f"got {a.min_replicas}, expected >= 0")
    _require(a.max_replicas >= max(1, a.min_replicas), f"{where}.autoscaling.max_replicas",
             f"got {a.max_replicas}, expected >= 1 and >= autoscaling.min_replicas ({a.min_replicas})")
    _require(a.target_ongoing_requests > 0, f"{where}.autoscaling.target_ongoing_requests",
             f"got {a.target_ongoing_requests}, expected > 0")
    for key in ("upscale_delay_s", "downscale_delay_s"):
        _require(getattr(a, key) >= 0, f"{where}.autoscaling.{key}", f"got {getattr(a, key)}, expected >= 0")
    for key in ("metrics_interval_s", "look_back_period_s"):
        _require(getattr(a, key) > 0, f"{where}.autoscaling.{key}", f"got {getattr(a, key)}, expected > 0")
    _require(not r.service or r.placement == "serve", f"{where}.service",
             f"got {r.service!r} with placement={r.placement}; a shared service needs {where}.placement=serve")
    _require(not r.service or _SERVICE_NAME.fullmatch(r.service) is not None, f"{where}.service",
             f"got {r.service!r}, expected letters, digits, '_', '.' or '-' (a Serve application name)")
    unknown = sorted(set(r.runtime_env) - set(RUNTIME_ENV_KEYS))
    _require(not unknown, f"{where}.runtime_env", f"unknown key {unknown[0] if unknown else ''!r}; "
             f"expected Ray runtime_env keys: {', '.join(RUNTIME_ENV_KEYS)}")
    _require(not r.runtime_env or r.placement != "colocated", f"{where}.runtime_env",
             "a colocated reward runs in the learner's environment; a runtime_env needs placement=remote or serve")


def _validate_eval(cfg: Config) -> None:
    e = cfg.eval
    _require(e.steps >= 1, "eval.steps", f"got {e.steps}, expected >= 1")
    _require(e.resolution == 0 or (e.resolution > 0 and e.resolution % 16 == 0), "eval.resolution",
             f"got {e.resolution}, expected 0 (= data.resolution) or a positive multiple of 16")
    _require(e.batch_size >= 1, "eval.batch_size", f"got {e.batch_size}, expected >= 1")
    _require(e.every >= 0, "eval.every", f"got {e.every}, expected >= 0")
    _require(e.patience >= 0, "eval.patience", f"got {e.patience}, expected >= 0")
    _require(e.num_prompts >= 0, "eval.num_prompts", f"got {e.num_prompts}, expected >= 0")
    _require(not e.every or len(e.gold) >= 1, "eval.gold",
             "eval.every > 0 needs at least one gold scorer (a reward model other than the training reward)")
    for i, sc in enumerate(e.gold):
        for where, r in reward_entries(cfg):
            _require(not (sc.kind == r.kind and sc.path == r.path), f"eval.gold[{i}]",
                     f"the gold reward must differ from the training reward {where} ({r.kind}:{r.path}); "
                     "a reward the policy optimises cannot detect reward hacking")
    if cfg.rollout.mode == "offline":
        _require(bool(cfg.data.images), "data.images",
                 "rollout.mode=offline needs data.images: an image folder with same-named .txt captions, "
                 "or a .parquet / .jsonl manifest with path and caption")


def check_paths(cfg: Config, scorers: bool = False) -> None:
    """Every model and data path must exist locally: nothing is downloaded at run time.

    ``scorers``: also check ``eval.scorers`` (what `srpo evaluate` loads; training does not). The gold
    scorers are checked whenever ``eval.every > 0``.
    """
    def need(value: str, field_name: str, what: str, is_dir: bool) -> None:
        if not value:
            raise ConfigError(f"{field_name}: missing; expected {what}")
        p = Path(value)
        ok = p.is_dir() if is_dir else p.is_file()
        if not ok:
            raise ConfigError(f"{field_name}: {value!r} does not exist; expected {what}")

    layout = f"the layout of model.family={cfg.model.family!r}"  # docs/models.md
    need(cfg.model.path, "model.path",
         f"a local diffusers folder with {layout} (model_index.json, transformer/, vae/, ...)", True)
    if not (Path(cfg.model.path) / "model_index.json").is_file():
        raise ConfigError(f"model.path: {cfg.model.path!r} has no model_index.json; "
                          f"expected a diffusers folder with {layout}")
    need(cfg.data.prompts, "data.prompts", "a text file with one prompt per line, or a parquet file", False)
    if cfg.data.heldout_prompts:
        need(cfg.data.heldout_prompts, "data.heldout_prompts", "a prompts file", False)
    for where, r in reward_entries(cfg):
        if r.kind == "hpsv2":
            need(r.path, f"{where}.path", "the HPSv2.1 checkpoint file (HPS_v2.1_compressed.pt)", False)
            if r.arch.endswith(".json"):
                need(r.arch, f"{where}.arch", "an open_clip model-config JSON file", False)
        else:
            need(r.path, f"{where}.path", f"a transformers CLIPModel folder for {r.kind}", True)
        if r.tokenizer_path:
            need(r.tokenizer_path, f"{where}.tokenizer_path", "a tokenizer folder", True)
    if cfg.rollout.mode == "offline":
        p = Path(cfg.data.images)
        if not (p.is_dir() or (p.is_file() and p.suffix in (".parquet", ".jsonl"))):
            raise ConfigError(f"data.images: {cfg.data.images!r} is neither a folder nor a .parquet/.jsonl "
                              "manifest; expected images with same-named .txt captions or a manifest")
    if cfg.data.prompt_embeddings:
        need(cfg.data.prompt_embeddings, "data.prompt_embeddings", "the output folder of `srpo preprocess`", True)
    if cfg.eval.prompts:
        need(cfg.eval.prompts, "eval.prompts", "a prompts file", False)
    groups = (["scorers"] if scorers else []) + (["gold"] if cfg.eval.every else [])
    for group in groups:
        for i, sc in enumerate(getattr(cfg.eval, group)):
            where = f"eval.{group}[{i}]"
            if sc.kind == "hpsv2":
                need(sc.path, f"{where}.path", "an HPSv2.1 checkpoint file", False)
            elif sc.kind == "aesthetic":
                need(sc.path, f"{where}.path", "the LAION aesthetic predictor MLP state dict (.pth)", False)
                need(sc.clip_path, f"{where}.clip_path", "a transformers CLIPModel folder (CLIP ViT-L/14)", True)
            else:
                need(sc.path, f"{where}.path", f"a transformers CLIPModel folder for {sc.kind}", True)


def absolute_paths(cfg: Config, base: str | Path | None = None) -> Config:
    """A copy with every local path made absolute against ``base`` (default: the current directory).

    Ray workers and actors do not run in the driver's directory, so a relative path in a preset
    (``.cache/srpo-tiny/flux``) must be resolved once, where the user typed it.
    """
    root = Path(base) if base is not None else Path.cwd()

    def fix(value: str) -> str:
        if not value or Path(value).is_absolute() or "://" in value:  # URIs (s3://, gs://, file://) as typed
            return value
        return str((root / value).resolve())

    out = config_from_dict(cfg.to_dict())
    out.model.path = fix(out.model.path)
    out.data.prompts = fix(out.data.prompts)
    out.data.heldout_prompts = fix(out.data.heldout_prompts)
    for r in [out.reward, *out.rewards]:
        r.path, r.tokenizer_path = fix(r.path), fix(r.tokenizer_path)
        if r.arch.endswith(".json"):  # a config file, not an open_clip model name
            r.arch = fix(r.arch)
    out.data.images = fix(out.data.images)
    out.data.prompt_embeddings = fix(out.data.prompt_embeddings)
    out.eval.prompts = fix(out.eval.prompts)
    for sc in out.eval.scorers + out.eval.gold:
        sc.path, sc.tokenizer_path, sc.clip_path = fix(sc.path), fix(sc.tokenizer_path), fix(sc.clip_path)
        if sc.arch.endswith(".json"):
            sc.arch = fix(sc.arch)
    out.output.dir = fix(out.output.dir)
    out.tiny.dir = fix(out.tiny.dir)
    return out


def dump_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(cfg.to_yaml())


def config_json(cfg: Config) -> str:
    return json.dumps(cfg.to_dict(), sort_keys=True)
