"""Inference sampling: diffusers' ``FluxPipeline.__call__`` for guidance-distilled FLUX, batched.

The SRPO authors evaluate (and release) their weights by loading them into ``FluxPipeline`` and
calling it one prompt at a time with ``generator=torch.Generator("cpu").manual_seed(seed)``. This
module reproduces that loop with our adapter's frozen parts and any transformer (the in-memory
trained one, or one loaded from an export), so that ``srpo sample``, evaluation and the released
weights all see the same images:

- the real ``FlowMatchEulerDiscreteScheduler`` built from the model folder's scheduler config,
  ``sigmas = linspace(1, 1/steps, steps)`` and, with dynamic shifting, ``mu = calculate_shift(L)``
  for the image sequence length L;
- the transformer is called with the scheduler's *untruncated* ``timestep / 1000`` (the training
  rollout truncates to ``floor(1000 sigma) / 1000``, FluxPipeline does not);
- one CPU generator per image, seeded with that image's seed: batching never changes which noise an
  image starts from (the pipeline's own batching with one generator would).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pipeline.device import autocast
from pipeline.models.flux import _unwrap

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


def load_scheduler_config(model_path: str | Path) -> dict[str, Any]:
    """``<model_path>/scheduler/scheduler_config.json`` as a dict (the config FluxPipeline builds from)."""
    f = Path(model_path) / "scheduler" / "scheduler_config.json"
    if not f.is_file():
        raise FileNotFoundError(f"{f}: missing; expected the scheduler config of a diffusers FLUX folder")
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{f}: not valid JSON ({e}); expected a diffusers scheduler config") from e


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
def _generate_batch(adapter, transformer: torch.nn.Module, prompts: list[str], seeds: list[int], steps: int,
                    guidance: float, resolution: int, scheduler_config: dict[str, Any] | None,
                    mixed_precision: str) -> Tensor:
    device = adapter.device
    cond = adapter.encode_prompts(prompts)
    # Per image: FluxPipeline(prompt, generator=Generator("cpu").manual_seed(seed)) draws [1, 16, h, w].
    x = torch.cat([adapter.sample_noise(1, resolution, torch.Generator("cpu").manual_seed(int(s)))
                   for s in seeds]).to(device=device, dtype=cond.prompt_embeds.dtype)
    scheduler = build_scheduler(scheduler_config, steps, x.shape[1], device)
    g = None
    if getattr(_unwrap(transformer).config, "guidance_embeds", True):
        g = torch.full([1], guidance, device=device, dtype=torch.float32).expand(x.shape[0])
    image_ids = adapter.image_ids(resolution)
    for t in scheduler.timesteps:
        with autocast(device, mixed_precision):
            v = pipeline_velocity(transformer, x, t, cond, g, image_ids)
        # fp32 velocity: under bf16 autocast the scheduler would otherwise cast the latent to bf16.
        x = scheduler.step(v.to(x.dtype), t, x, return_dict=False)[0]
    return adapter.decode(x, resolution).float().cpu()


def generate(adapter, transformer: torch.nn.Module, prompts: list[str], seeds: list[int], steps: int,
             guidance: float, resolution: int, batch_size: int = 4, scheduler_config: dict[str, Any] | None = None,
             mixed_precision: str = "fp32") -> Tensor:
    """Images [N, 3, H, W] in [0, 1] (CPU, fp32) for N prompts, image i from ``seeds[i]``.

    Equals ``FluxPipeline(prompt_i, num_inference_steps=steps, guidance_scale=guidance,
    height=width=resolution, generator=torch.Generator("cpu").manual_seed(seeds[i]), output_type="pt")``
    with ``transformer``'s weights (up to float rounding of batched matmuls). ``scheduler_config``:
    the model folder's (:func:`load_scheduler_config`); None = FLUX.1-dev's. ``mixed_precision``
    "bf16" autocasts the transformer calls only (fp32 latents, as the scheduler keeps them).
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"generate: {len(prompts)} prompts but {len(seeds)} seeds; expected one seed per prompt")
    if steps < 1 or batch_size < 1:
        raise ValueError(f"generate: steps={steps}, batch_size={batch_size}; expected both >= 1")
    if resolution % 16:
        raise ValueError(f"generate: resolution {resolution} is not divisible by 16 (VAE /8, then 2x2 patches)")
    if not prompts:
        return torch.empty(0, 3, resolution, resolution)
    was_training = transformer.training
    transformer.eval()
    try:
        images = [_generate_batch(adapter, transformer, prompts[i:i + batch_size], seeds[i:i + batch_size], steps,
                                  guidance, resolution, scheduler_config, mixed_precision)
                  for i in range(0, len(prompts), batch_size)]
    finally:
        transformer.train(was_training)
    return torch.cat(images)


def to_uint8(images: Tensor) -> np.ndarray:
    """[N, 3, H, W] in [0, 1] -> [N, H, W, 3] uint8, rounded as diffusers' ``numpy_to_pil`` does."""
    array = images.detach().float().cpu().permute(0, 2, 3, 1).numpy()
    return (array * 255).round().astype("uint8")

