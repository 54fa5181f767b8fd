"""Each family's original single-file key layout: the names its authors' reference code (and ComfyUI)
reads, where diffusers renamed and split modules.

``to_original_keys(family, state)`` turns a transformer state dict with diffusers keys into that
layout: modules diffusers split (FLUX's fused q/k/v projections) are concatenated again along the
output dimension, so a per-tensor scale computed afterwards covers the fused matrix, as ComfyUI's
loader expects. Tensors are reused, not copied, where no concatenation is needed.

FLUX (Black Forest Labs' ``flux`` package, ``flux1-dev.safetensors``): the inverse of diffusers'
``convert_flux_transformer_checkpoint_to_diffusers`` (diffusers.loaders.single_file_utils).
"""
from __future__ import annotations

import re
from typing import Callable

import torch

# BFL module <- the diffusers modules concatenated (in this order) along the output dimension.
_FLUX_TOP = {
    "img_in": ["x_embedder"], "txt_in": ["context_embedder"],
    "time_in.in_layer": ["time_text_embed.timestep_embedder.linear_1"],
    "time_in.out_layer": ["time_text_embed.timestep_embedder.linear_2"],
    "vector_in.in_layer": ["time_text_embed.text_embedder.linear_1"],
    "vector_in.out_layer": ["time_text_embed.text_embedder.linear_2"],
    "guidance_in.in_layer": ["time_text_embed.guidance_embedder.linear_1"],  # FLUX.1-dev only (not schnell)
    "guidance_in.out_layer": ["time_text_embed.guidance_embedder.linear_2"],
    "final_layer.linear": ["proj_out"],
}
_FLUX_DOUBLE = {
    "img_mod.lin": ["norm1.linear"], "txt_mod.lin": ["norm1_context.linear"],
    "img_attn.qkv": ["attn.to_q", "attn.to_k", "attn.to_v"],
    "txt_attn.qkv": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
    "img_attn.proj": ["attn.to_out.0"], "txt_attn.proj": ["attn.to_add_out"],
    "img_mlp.0": ["ff.net.0.proj"], "img_mlp.2": ["ff.net.2"],
    "txt_mlp.0": ["ff_context.net.0.proj"], "txt_mlp.2": ["ff_context.net.2"],
}
_FLUX_DOUBLE_NORMS = {
    "img_attn.norm.query_norm.scale": "attn.norm_q.weight", "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
    "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
    "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight",
}
_FLUX_SINGLE = {"modulation.lin": ["norm.linear"], "linear1": ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"],
                "linear2": ["proj_out"]}
_FLUX_SINGLE_NORMS = {"norm.query_norm.scale": "attn.norm_q.weight", "norm.key_norm.scale": "attn.norm_k.weight"}


def _block_count(state: dict[str, torch.Tensor], prefix: str) -> int:
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    indices = {int(m.group(1)) for k in state if (m := pattern.match(k))}
    return max(indices) + 1 if indices else 0


def _flux_modules(state: dict[str, torch.Tensor]) -> tuple[dict[str, list[str]], dict[str, str]]:
    """(BFL module -> diffusers modules, BFL tensor -> diffusers tensor) for this state's block counts."""
    modules, tensors = dict(_FLUX_TOP), {}
    for i in range(_block_count(state, "transformer_blocks")):
        modules.update({f"double_blocks.{i}.{b}": [f"transformer_blocks.{i}.{d}" for d in ds]
                        for b, ds in _FLUX_DOUBLE.items()})
        tensors.update({f"double_blocks.{i}.{b}": f"transformer_blocks.{i}.{d}" for b, d in _FLUX_DOUBLE_NORMS.items()})
    for i in range(_block_count(state, "single_transformer_blocks")):
        modules.update({f"single_blocks.{i}.{b}": [f"single_transformer_blocks.{i}.{d}" for d in ds]
                        for b, ds in _FLUX_SINGLE.items()})
        tensors.update({f"single_blocks.{i}.{b}": f"single_transformer_blocks.{i}.{d}"
                        for b, d in _FLUX_SINGLE_NORMS.items()})
    return modules, tensors


def flux_to_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """FLUX diffusers keys -> BFL keys (``double_blocks.*``, ``single_blocks.*``, ``final_layer.*``)."""
    modules, tensors = _flux_modules(state)
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for dst, srcs in modules.items():
        for suffix in ("weight", "bias"):
            keys = [f"{s}.{suffix}" for s in srcs]
            if all(k in state for k in keys):
                out[f"{dst}.{suffix}"] = state[keys[0]] if len(keys) == 1 else torch.cat([state[k] for k in keys])
                used.update(keys)
    for dst, src in tensors.items():
        if src in state:
            out[dst] = state[src]
            used.add(src)
    for suffix in ("weight", "bias"):  # diffusers' AdaLayerNormContinuous is (scale, shift); BFL's is (shift, scale)
        src = f"norm_out.linear.{suffix}"
        if src in state:
            scale, shift = state[src].chunk(2, dim=0)
            out[f"final_layer.adaLN_modulation.1.{suffix}"] = torch.cat([shift, scale])
            used.add(src)
    unmapped = sorted(set(state) - used)
    if unmapped:
        raise KeyError(f"FLUX original layout: no BFL name for {unmapped[:5]} ({len(unmapped)} keys); expected "
                       "the keys of a diffusers FLUX transformer")
    return out


ORIGINAL_LAYOUTS: dict[str, Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]] = {
    "flux": flux_to_original,
}


def to_original_keys(family: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` (diffusers keys) in ``family``'s original single-file layout."""
    if family not in ORIGINAL_LAYOUTS:
        raise ValueError(f"model family {family!r} has no original single-file key layout here; expected one of "
                         f"{sorted(ORIGINAL_LAYOUTS)}")
    return ORIGINAL_LAYOUTS[family](state)
