"""Inference sampling as each family's reference pipeline does it, batched, for any transformer.

The SRPO authors evaluate (and release) their weights by loading them into the family's diffusers
pipeline (``FluxPipeline`` for FLUX) and calling it one prompt at a time with a CPU generator seeded
per image. :func:`generate` reproduces that with the adapter's frozen parts and any transformer (the
in-memory trained one, or one loaded from an export), so that ``srpo sample``, evaluation and the
released weights all see the same images. The family's loop (scheduler, timesteps, transformer call)
is the adapter's ``sample_images`` (FLUX: pipeline/models/flux_sampling.py); this module batches it,
checks the arguments and reads the scheduler config of a model folder.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor


def load_scheduler_config(model_path: str | Path) -> dict[str, Any]:
    """``<model_path>/scheduler/scheduler_config.json`` as a dict (the config the diffusers pipeline builds from)."""
    f = Path(model_path) / "scheduler" / "scheduler_config.json"
    if not f.is_file():
        raise FileNotFoundError(f"{f}: missing; expected the scheduler config of a diffusers model folder")
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{f}: not valid JSON ({e}); expected a diffusers scheduler config") from e


def generate(adapter, transformer: torch.nn.Module, prompts: list[str], seeds: list[int], steps: int,
             guidance: float, resolution: int, batch_size: int = 4, scheduler_config: dict[str, Any] | None = None,
             mixed_precision: str = "fp32") -> Tensor:
    """Images [N, 3, H, W] in [0, 1] (CPU, fp32) for N prompts, image i from ``seeds[i]``.

    Equals the family's pipeline (FLUX: ``FluxPipeline(prompt_i, num_inference_steps=steps,
    guidance_scale=guidance, height=width=resolution, generator=torch.Generator("cpu").manual_seed(seeds[i]),
    output_type="pt")``) with ``transformer``'s weights (up to float rounding of batched matmuls).
    ``scheduler_config``: the model folder's (:func:`load_scheduler_config`); None = the family's
    default. ``mixed_precision`` "bf16" autocasts the transformer calls only (fp32 latents).
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"generate: {len(prompts)} prompts but {len(seeds)} seeds; expected one seed per prompt")
    if steps < 1 or batch_size < 1:
        raise ValueError(f"generate: steps={steps}, batch_size={batch_size}; expected both >= 1")
    multiple = adapter.resolution_multiple
    if resolution % multiple:
        raise ValueError(f"generate: resolution {resolution} is not divisible by {multiple} (the latent "
                         "downsampling times the patch size)")
    if not prompts:
        return torch.empty(0, 3, resolution, resolution)
    was_training = transformer.training
    transformer.eval()
    try:
        images = [adapter.sample_images(transformer, prompts[i:i + batch_size], seeds[i:i + batch_size], steps,
                                        guidance, resolution, scheduler_config, mixed_precision)
                  for i in range(0, len(prompts), batch_size)]
    finally:
        transformer.train(was_training)
    return torch.cat(images)


def to_uint8(images: Tensor) -> np.ndarray:
    """[N, 3, H, W] in [0, 1] -> [N, H, W, 3] uint8, rounded as diffusers' ``numpy_to_pil`` does."""
    array = images.detach().float().cpu().permute(0, 2, 3, 1).numpy()
    return (array * 255).round().astype("uint8")
