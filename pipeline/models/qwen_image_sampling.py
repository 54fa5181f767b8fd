"""Qwen-Image inference as diffusers' ``QwenImagePipeline.__call__`` does it, one batch.

The counterpart of :mod:`pipeline.models.flux_sampling` for this family; the differences are the
family's, each as the pipeline has it:

- guidance is *true* classifier-free guidance (Qwen-Image has no distilled guidance embedding): with
  ``true_cfg_scale > 1`` every step calls the transformer twice, on the prompt and on the negative
  prompt, and combines ``v = v_u + s (v_c - v_u)``, then rescales each token's velocity to the norm
  of the conditional one (``v *= ||v_c|| / ||v||``, norms over the packed channel axis);
- the real ``FlowMatchEulerDiscreteScheduler`` from the folder's scheduler config (Qwen-Image's:
  dynamic *exponential* shifting, ``shift_terminal`` 0.02), ``sigmas = linspace(1, 1/steps, steps)``,
  ``mu = calculate_shift(L)`` for the image sequence length L;
- the transformer gets the scheduler's *untruncated* ``timestep / 1000``, the text mask (None when
  every token of the batch is real, as the pipeline passes it) and ``img_shapes`` [(1, h/2, w/2)].

Noise comes from one CPU generator per image, seeded with that image's seed, so batching never
changes which noise an image starts from (as in flux_sampling.py).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from pipeline.device import autocast

# Qwen/Qwen-Image's scheduler/scheduler_config.json, used when a folder has no scheduler of its own.
QWEN_IMAGE_SCHEDULER: dict[str, Any] = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 0.9,
    "base_image_seq_len": 256,
    "max_image_seq_len": 8192,
    "shift_terminal": 0.02,
    "time_shift_type": "exponential",
    "invert_sigmas": False,
    "stochastic_sampling": False,
    "use_beta_sigmas": False,
    "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}


def build_scheduler(scheduler_config: dict[str, Any] | None, steps: int, image_seq_len: int, device: torch.device):
    """A FlowMatchEulerDiscreteScheduler with QwenImagePipeline's timesteps for ``steps`` and sequence length."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config or QWEN_IMAGE_SCHEDULER)
    sigmas = np.linspace(1.0, 1 / steps, steps)
    mu = calculate_shift(
        image_seq_len,
        scheduler.config.get("base_image_seq_len", 256),
        scheduler.config.get("max_image_seq_len", 4096),
        scheduler.config.get("base_shift", 0.5),
        scheduler.config.get("max_shift", 1.15),
    )
    scheduler.set_timesteps(sigmas=sigmas, device=device, mu=mu)  # retrieve_timesteps(..., sigmas, mu=mu)
    scheduler.set_begin_index(0)
    return scheduler


def true_cfg(v_cond: Tensor, v_uncond: Tensor, scale: float) -> Tensor:
    """QwenImagePipeline's guidance: ``v_u + s (v_c - v_u)``, rescaled per token to ``||v_c||``."""
    combined = v_uncond + scale * (v_cond - v_uncond)
    cond_norm = torch.norm(v_cond, dim=-1, keepdim=True)
    noise_norm = torch.norm(combined, dim=-1, keepdim=True)
    return combined * (cond_norm / noise_norm)


def transformer_call(transformer: torch.nn.Module, x: Tensor, timestep: Tensor, embeds: Tensor, mask: Tensor | None,
                     img_shapes: list) -> Tensor:
    """The transformer as QwenImagePipeline calls it; ``timestep`` [B] in [0, 1] (the model scales it by 1000)."""
    return transformer(
        hidden_states=x,
        timestep=timestep,
        guidance=None,
        encoder_hidden_states_mask=mask,
        encoder_hidden_states=embeds,
        img_shapes=img_shapes,
        return_dict=False,
    )[0]


def pipeline_velocity(transformer: torch.nn.Module, x: Tensor, t: Tensor, embeds: Tensor, mask: Tensor | None,
                      img_shapes: list) -> Tensor:
    """One call exactly as in QwenImagePipeline's loop: ``timestep = t.expand(B) / 1000`` (t a scheduler timestep)."""
    timestep = t.expand(x.shape[0]).to(x.dtype)
    return transformer_call(transformer, x, timestep / 1000, embeds, mask, img_shapes)


@torch.no_grad()
def sample_batch(adapter, transformer: torch.nn.Module, prompts: list[str], seeds: list[int], steps: int,
                 guidance: float, resolution: int, scheduler_config: dict[str, Any] | None,
                 mixed_precision: str) -> Tensor:
    """Images [B, 3, H, W] in [0, 1] (CPU fp32): QwenImagePipeline's loop for one batch, image i from seeds[i],
    ``true_cfg_scale = guidance`` with the adapter's negative prompt."""
    device = adapter.device
    cond = adapter.encode_prompts(prompts)
    x = torch.cat([adapter.sample_noise(1, resolution, torch.Generator("cpu").manual_seed(int(s)))
                   for s in seeds]).to(device=device, dtype=cond.prompt_embeds.dtype)
    scheduler = build_scheduler(scheduler_config, steps, x.shape[1], device)
    img_shapes = adapter.img_shapes(len(prompts), resolution)
    pos, neg = cond.text(negative=False), cond.text(negative=True)
    for t in scheduler.timesteps:
        with autocast(device, mixed_precision):
            v = pipeline_velocity(transformer, x, t, *pos, img_shapes)
            if guidance > 1:
                v_neg = pipeline_velocity(transformer, x, t, *neg, img_shapes)
                v = true_cfg(v.float(), v_neg.float(), guidance)
        # fp32 velocity: under bf16 autocast the scheduler would otherwise cast the latent to bf16.
        x = scheduler.step(v.to(x.dtype), t, x, return_dict=False)[0]
    return adapter.decode(x, resolution).float().cpu()
