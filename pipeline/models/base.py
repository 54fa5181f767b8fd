"""What the SRPO core needs from a flow-matching model family.

A family (``flux.py``, ``qwen_image.py``; docs/models.md says how to add one) implements these
protocols and registers itself in ``pipeline.models.FAMILIES``; the schedules, Direct-Align, SRP, the
engines, export and the trainers do not change. Two levels:

- :class:`ModelFamily`: what is known from a model folder before (or without) loading weights: whether
  the folder has the family's layout (the driver's pre-flight), the parameter template export checks
  against, the conditioning shapes and tokenizers preprocessing needs, how to turn conditioning into
  arrays and back (a Ray Data batch, a parquet row) and which blocks FSDP2 shards. These are
  class-level, so ``FAMILIES[family].shard_blocks(t)`` works without an adapter instance; an instance
  answers them too.
- :class:`FlowModelAdapter`: a loaded family (frozen VAE and text encoders) that encodes prompts,
  draws noise, calls a transformer for a velocity, decodes, and samples as the family's reference
  inference pipeline does.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence

import numpy as np
import torch
from torch import Tensor


#: How a decoded image becomes the reward's [0, 1] input (``reward.image_norm``); see :func:`unit_image`.
IMAGE_NORMS = ("clamp", "minmax")
#: minmax's floor on max - min: below one 8-bit level of the VAE's [-1, 1] range (2/255 = 0.008).
MINMAX_EPS = 1e-3


def unit_image(decoded: Tensor, norm: str = "clamp") -> Tensor:
    """The VAE's output [B, 3, H, W] (nominally in [-1, 1]) as an image in [0, 1], differentiable, same dtype.

    clamp: ``x / 2 + 0.5`` clamped to [0, 1], as diffusers' image processor denormalises (what every
    pipeline returns); no gradient where the VAE overshoots [-1, 1].
    minmax: ``(x - min) / (max - min)`` per image (over channels and pixels), as the SRPO authors'
    Qwen-Image script feeds its reward: every pixel keeps a gradient, and min and max get one too.
    """
    x = decoded
    if norm == "clamp":
        return (x / 2 + 0.5).clamp(0, 1)
    if norm != "minmax":
        raise ValueError(f"image norm: got {norm!r}, expected one of {list(IMAGE_NORMS)}")
    lo = x.amin(dim=(1, 2, 3), keepdim=True)
    hi = x.amax(dim=(1, 2, 3), keepdim=True)
    # A flat image (max == min) would be 0 / 0 (NaN in the loss and every gradient). Flooring the range
    # at MINMAX_EPS maps it to 0 instead, and an image flatter than the floor (flat to the eye) to
    # [0, range / eps) inside [0, 1], with a gradient bounded by 1 / eps rather than 1 / range.
    return (x - lo) / (hi - lo).clamp_min(MINMAX_EPS)


def token_lengths(tokenizer: Any, texts: Sequence[str], chunk: int = 4096) -> np.ndarray:
    """Untruncated token counts including special tokens (what an encoder would see without a limit):
    what the families' ``truncation_flags`` compare with their limits."""
    import transformers

    out: list[int] = []
    # Tokenizing past model_max_length on purpose: silence the "sequence too long" warning.
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        for i in range(0, len(texts), chunk):
            ids = tokenizer(list(texts[i:i + chunk]), truncation=False, add_special_tokens=True)["input_ids"]
            out.extend(len(x) for x in ids)
    finally:
        transformers.logging.set_verbosity(verbosity)
    return np.asarray(out, dtype=np.int64)


class Conditioning(Protocol):
    """Frozen text conditioning of a batch of prompts (family-specific fields, batch-first)."""

    def __len__(self) -> int: ...

    def to(self, device: torch.device) -> "Conditioning": ...

    def select(self, index: slice | list[int]) -> "Conditioning": ...  # a sub-batch


class ModelFamily(Protocol):
    family: str
    transformer_class_name: str  # ``_class_name`` of <model>/transformer/config.json (pipeline.models.family_of)

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu", max_sequence_length: int = 512,
             load_text_encoders: bool = True, load_transformer: bool = True) -> "FlowModelAdapter": ...

    @classmethod
    def check_model_folder(cls, path: str | Path, field: str = "model.path") -> None: ...  # ConfigError naming field

    @classmethod
    def parameter_template(cls, model_path: str | Path) -> dict[str, tuple[int, ...]]: ...  # name -> shape

    @classmethod
    def conditioning_shapes(cls, model_path: str | Path, max_sequence_length: int) -> dict[str, list[int]]: ...

    @classmethod
    def load_tokenizers(cls, model_path: str | Path) -> tuple[Any, ...]: ...

    # Per caption, as encode_prompts cuts it: (cut by a text encoder's own token limit, longer than
    # max_sequence_length tokens): `srpo preprocess`'s clip_truncated / t5_truncated columns.
    @classmethod
    def truncation_flags(cls, tokenizers: tuple[Any, ...], captions: Sequence[str],
                         max_sequence_length: int) -> tuple[np.ndarray, np.ndarray]: ...

    @staticmethod
    def shard_blocks(transformer: torch.nn.Module) -> list[torch.nn.Module]: ...  # FSDP2 units, in order

    @staticmethod
    def lora_target_modules() -> tuple[str, ...]: ...  # LoRA's default layers, names inside one shard block

    @staticmethod
    def save_lora_weights(folder: str | Path, transformer_lora_layers: dict[str, Tensor],
                          metadata: dict[str, Any]) -> None: ...  # the family pipeline's diffusers LoRA folder

    @staticmethod
    def conditioning_to_arrays(cond: Any) -> dict[str, np.ndarray]: ...  # float32, batch-first, CPU

    @staticmethod
    def conditioning_from_arrays(batch: Mapping[str, Any], device: torch.device | str) -> Any: ...


class FlowModelAdapter(ModelFamily, Protocol):
    transformer: torch.nn.Module  # the trainable velocity model
    device: torch.device
    resolution_multiple: int  # image sides must be multiples of this (latent downsampling x patch size)

    def encode_prompts(self, prompts: list[str]) -> Any: ...  # frozen text conditioning, batch-first

    def sample_noise(self, batch: int, resolution: int, generator: torch.Generator) -> Tensor: ...

    # v ~ eps - x0, same shape as x. ``guidance`` is the family's own (rollout.guidance, srpo.train_guidance,
    # eval.guidance): FLUX's distilled guidance embedding; Qwen-Image's true-CFG scale (> 1: two calls).
    def velocity(self, transformer: torch.nn.Module, x: Tensor, sigma: float | Tensor, cond: Any,
                 guidance: float, resolution: int) -> Tensor: ...

    # Image in [0, 1], differentiable; ``norm``: how the VAE's output gets there (unit_image, reward.image_norm).
    def decode(self, x: Tensor, resolution: int, norm: str = "clamp") -> Tensor: ...

    def encode_images(self, images: Tensor) -> Tensor: ...  # [0, 1] images -> model latents

    def sample_images(self, transformer: torch.nn.Module, prompts: list[str], seeds: list[int], steps: int,
                      guidance: float, resolution: int, scheduler_config: dict[str, Any] | None,
                      mixed_precision: str) -> Tensor: ...  # the reference inference pipeline, [B, 3, H, W]
