"""Model families. ``load_adapter`` is the single entry point used by trainers and jobs."""
from __future__ import annotations

import torch

from pipeline.models.base import FlowModelAdapter
from pipeline.models.flux import FluxAdapter, TextConditioning

FAMILIES = {"flux": FluxAdapter}


def load_adapter(family: str, path: str, device: torch.device | str = "cpu",
                 max_sequence_length: int = 512, load_text_encoders: bool = True,
                 load_transformer: bool = True) -> FlowModelAdapter:
    if family not in FAMILIES:
        raise ValueError(f"model.family: got {family!r}, expected one of {sorted(FAMILIES)}")
    return FAMILIES[family].load(path, device=device, max_sequence_length=max_sequence_length,
                                 load_text_encoders=load_text_encoders, load_transformer=load_transformer)


__all__ = ["FAMILIES", "FlowModelAdapter", "FluxAdapter", "TextConditioning", "load_adapter"]
