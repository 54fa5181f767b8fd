"""Rollout (SRPO_SPEC.md section 1): sample x0 from the current policy, no gradient.

    sigma_i = shift(1 - i/S), i = 0..S ;  x = eps ;  x <- x + (sigma_{i+1} - sigma_i) v(x, t(sigma_i))

The noise prior eps is returned with x0: Direct-Align re-injects exactly this noise.
"""
from __future__ import annotations

import torch
from torch import Tensor

from pipeline.config import Config
from pipeline.device import autocast
from pipeline.direct_align import euler_step
from pipeline.schedules import rollout_sigmas


@torch.no_grad()
def sample_x0(adapter, transformer: torch.nn.Module, eps: Tensor, cond, resolution: int, steps: int,
              shift: float, guidance: float, mixed_precision: str = "fp32") -> Tensor:
    """Euler-integrate from eps (sigma = 1) to sigma = 0; returns the packed latent x0 (fp32)."""
    sigmas = rollout_sigmas(steps, shift)
    x = eps.float()
    for i in range(steps):
        with autocast(x.device, mixed_precision):
            v = adapter.velocity(transformer, x, float(sigmas[i]), cond, guidance, resolution)
        x = euler_step(x, v.float(), float(sigmas[i]), float(sigmas[i + 1]))
    return x


def rollout_precision(cfg: Config) -> str:
    """The rollout's compute precision: rollout.dtype, or train.mixed_precision when it says auto."""
    return cfg.train.mixed_precision if cfg.rollout.dtype == "auto" else cfg.rollout.dtype


def rollout_model(cfg: Config, transformer: torch.nn.Module) -> torch.nn.Module:
    """The module the rollout calls: ``transformer`` itself, or with rollout.compile a torch.compile
    wrapper sharing its parameters (new weights need no recompile; the rollout's shapes never change,
    so it compiles once per process). Build it once and keep it: each wrapper compiles anew."""
    if not cfg.rollout.compile:
        return transformer
    return torch.compile(transformer, dynamic=False)
