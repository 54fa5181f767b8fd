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
from typing import Any, Mapping, Protocol

import numpy as np
import torch
from torch import Tensor


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

    def decode(self, x: Tensor, resolution: int) -> Tensor: ...  # image in [0, 1], differentiable

    def encode_images(self, images: Tensor) -> Tensor: ...  # [0, 1] images -> model latents

    def sample_images(self, transformer: torch.nn.Module, prompts: list[str], seeds: list[int], steps: int,
                      guidance: float, resolution: int, scheduler_config: dict[str, Any] | None,
                      mixed_precision: str) -> Tensor: ...  # the reference inference pipeline, [B, 3, H, W]
