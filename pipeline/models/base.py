"""What the SRPO core needs from a flow-matching model family.

A second family (SD3, Qwen-Image, ...) implements this protocol beside ``flux.py`` and registers
itself in ``pipeline.models.FAMILIES``; the schedules, Direct-Align, SRP and the trainers do not
change.
"""
from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import Tensor


class FlowModelAdapter(Protocol):
    family: str
    transformer: torch.nn.Module  # the trainable velocity model
    device: torch.device

    def encode_prompts(self, prompts: list[str]) -> Any: ...  # frozen text conditioning, batch-first

    def sample_noise(self, batch: int, resolution: int, generator: torch.Generator) -> Tensor: ...

    def velocity(self, transformer: torch.nn.Module, x: Tensor, sigma: float | Tensor, cond: Any,
                 guidance: float, resolution: int) -> Tensor: ...  # v ~ eps - x0, same shape as x

    def decode(self, x: Tensor, resolution: int) -> Tensor: ...  # image in [0, 1], differentiable

    def encode_images(self, images: Tensor) -> Tensor: ...  # [0, 1] images -> model latents
