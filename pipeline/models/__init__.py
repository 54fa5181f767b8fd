"""Model families. ``load_adapter`` is the single entry point used by trainers and jobs; ``FAMILIES``
maps ``model.family`` to the family class (its class-level methods need no weights: see base.py)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from pipeline.models.base import Conditioning, FlowModelAdapter, ModelFamily
from pipeline.models.flux import FluxAdapter, TextConditioning
from pipeline.models.qwen_image import QwenConditioning, QwenImageAdapter

FAMILIES: dict[str, type] = {"flux": FluxAdapter, "qwen_image": QwenImageAdapter}


def family_class(family: str) -> type:
    """The registered class of ``family``; ValueError naming model.family and the valid values otherwise."""
    if family not in FAMILIES:
        raise ValueError(f"model.family: got {family!r}, expected one of {sorted(FAMILIES)}")
    return FAMILIES[family]


def load_adapter(family: str, path: str, device: torch.device | str = "cpu",
                 max_sequence_length: int = 512, load_text_encoders: bool = True,
                 load_transformer: bool = True) -> FlowModelAdapter:
    return family_class(family).load(path, device=device, max_sequence_length=max_sequence_length,
                                     load_text_encoders=load_text_encoders, load_transformer=load_transformer)


def family_of(model_path: str | Path) -> str:
    """The family of a diffusers folder, from ``transformer/config.json``'s ``_class_name``.

    For tools that get a model folder without a config (``srpo export --model-path``).
    """
    config = Path(model_path) / "transformer" / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{config}: missing; expected the base model's transformer config")
    try:
        name = json.loads(config.read_text())["_class_name"]
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{config}: no readable _class_name ({e}); expected a diffusers transformer config") from e
    for family, cls in FAMILIES.items():
        if cls.transformer_class_name == name:
            return family
    known = {cls.transformer_class_name: f for f, cls in FAMILIES.items()}
    raise ValueError(f"{config}: transformer class {name!r} belongs to no model family; expected one of {known}")


def parameter_template(model_path: str | Path) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of the transformer of ``model_path`` (meta device: no weights read)."""
    return FAMILIES[family_of(model_path)].parameter_template(model_path)


__all__ = ["FAMILIES", "Conditioning", "FlowModelAdapter", "FluxAdapter", "ModelFamily", "QwenConditioning",
           "QwenImageAdapter", "TextConditioning", "family_class", "family_of", "load_adapter", "parameter_template"]
