"""FLUX inference as diffusers' ``FluxPipeline.__call__`` does it (guidance-distilled FLUX), one batch.

The SRPO authors evaluate (and release) their weights by loading them into ``FluxPipeline`` and
calling it one prompt at a time with ``generator=torch.Generator("cpu").manual_seed(seed)``. This
module reproduces that loop with the adapter's frozen parts and any transformer (the in-memory
trained one, or one loaded from an export); :func:`pipeline.sampling.generate` batches it:

- the real ``FlowMatchEulerDiscreteScheduler`` built from the model folder's scheduler config,
  ``sigmas = linspace(1, 1/steps, steps)`` and, with dynamic shifting, ``mu = calculate_shift(L)``
  for the image sequence length L;
- the transformer is called with the scheduler's *untruncated* ``timestep / 1000`` (the training
  rollout truncates to ``floor(1000 sigma) / 1000``, FluxPipeline does not);
- one CPU generator per image, seeded with that image's seed: batching never changes which noise an
  image starts from (the pipeline's own batching with one generator would).

The adapter is passed in (not imported) so that flux.py can expose this as a method.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from pipeline.device import autocast

# FLUX.1-dev's scheduler/scheduler_config.json, used when a folder has no scheduler of its own.
FLUX_DEV_SCHEDULER: dict[str, Any] = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}


def build_scheduler(scheduler_config: dict[str, Any] | None, steps: int, image_seq_len: int,
                    device: torch.device):
    """A FlowMatchEulerDiscreteScheduler with FluxPipeline's timesteps for ``steps`` and sequence length."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config or FLUX_DEV_SCHEDULER)
    sigmas = np.linspace(1.0, 1 / steps, steps)
    if getattr(scheduler.config, "use_flow_sigmas", False):
        sigmas = None
    mu = calculate_shift(
        image_seq_len,
        scheduler.config.get("base_image_seq_len", 256),
        scheduler.config.get("max_image_seq_len", 4096),
        scheduler.config.get("base_shift", 0.5),
        scheduler.config.get("max_shift", 1.15),
    )
    # retrieve_timesteps(scheduler, steps, device, sigmas=sigmas, mu=mu) in FluxPipeline.
    if sigmas is None:
        scheduler.set_timesteps(steps, device=device, mu=mu)
    else:
        scheduler.set_timesteps(sigmas=sigmas, device=device, mu=mu)
    scheduler.set_begin_index(0)
    return scheduler


def pipeline_velocity(transformer: torch.nn.Module, x: Tensor, t: Tensor, cond, guidance: Tensor | None,
                      image_ids: Tensor) -> Tensor:
    """One transformer call exactly as in FluxPipeline's loop: ``timestep = t.expand(B) / 1000``."""
    timestep = t.expand(x.shape[0]).to(x.dtype)
    return transformer(
        hidden_states=x,
        timestep=timestep / 1000,
        guidance=guidance,
        pooled_projections=cond.pooled,
        encoder_hidden_states=cond.prompt_embeds,
        txt_ids=cond.text_ids,
        img_ids=image_ids,
        return_dict=False,
    )[0]


@torch.no_grad()
def sample_batch(adapter, transformer: torch.nn.Module, prompts: list[str], seeds: list[int], steps: int,
                 guidance: float, resolution: int, scheduler_config: dict[str, Any] | None,
                 mixed_precision: str) -> Tensor:
    """Images [B, 3, H, W] in [0, 1] (CPU fp32): FluxPipeline's loop for one batch, image i from seeds[i]."""
    device = adapter.device
    cond = adapter.encode_prompts(prompts)
    # Per image: FluxPipeline(prompt, generator=Generator("cpu").manual_seed(seed)) draws [1, 16, h, w].
    x = torch.cat([adapter.sample_noise(1, resolution, torch.Generator("cpu").manual_seed(int(s)))
                   for s in seeds]).to(device=device, dtype=cond.prompt_embeds.dtype)
    scheduler = build_scheduler(scheduler_config, steps, x.shape[1], device)
    g = None
    if adapter.uses_guidance(transformer):
        g = torch.full([1], guidance, device=device, dtype=torch.float32).expand(x.shape[0])
    image_ids = adapter.image_ids(resolution)
    for t in scheduler.timesteps:
        with autocast(device, mixed_precision):
            v = pipeline_velocity(transformer, x, t, cond, g, image_ids)
        # fp32 velocity: under bf16 autocast the scheduler would otherwise cast the latent to bf16.
        x = scheduler.step(v.to(x.dtype), t, x, return_dict=False)[0]
    return adapter.decode(x, resolution).float().cpu()
