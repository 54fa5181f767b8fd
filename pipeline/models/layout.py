"""The diffusers folder layout, checked before anything is loaded (the driver's pre-flight).

What diffusers' pipeline loader (``DiffusionPipeline.from_pretrained``) and the component loaders
read from a local folder: ``model_index.json`` naming each component, and per component folder its
config and weights. A family lists its components and their kinds (:data:`COMPONENT_KINDS`); this
module knows the files of each kind. Weights are checked from their headers only: a safetensors file
opens (``safe_open`` reads the header and checks the file covers every tensor, so a truncated download
fails here) and every shard an index names exists. Nothing is unpickled and no tensor is read.

Errors are :class:`pipeline.config.ConfigError` with one line naming the config field.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from safetensors import SafetensorError, safe_open

from pipeline.config import ConfigError

_DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json",
                      "diffusion_pytorch_model.bin", "diffusion_pytorch_model.bin.index.json")
_TRANSFORMERS_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                         "pytorch_model.bin.index.json")
# kind -> (files that must all be there, files of which one must be there)
COMPONENT_KINDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "diffusers_model": (("config.json",), _DIFFUSERS_WEIGHTS),
    "transformers_model": (("config.json",), _TRANSFORMERS_WEIGHTS),
    # a fast tokenizer.json, a BPE vocab.json (+ merges.txt) or a sentencepiece model
    "tokenizer": (("tokenizer_config.json",), ("tokenizer.json", "vocab.json", "spiece.model")),
    "scheduler": (("scheduler_config.json",), ()),
}


def read_json(path: Path, field: str, what: str) -> Any:
    """The JSON of ``path``; ConfigError naming ``field`` when it is missing or not JSON."""
    if not path.is_file():
        raise ConfigError(f"{field}: {path} is missing; expected {what}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{field}: {path} is not readable JSON ({type(e).__name__}: {e}); expected {what}") from None


def _check_safetensors(path: Path, field: str) -> None:
    try:
        with safe_open(str(path), "pt"):
            pass
    except (SafetensorError, OSError) as e:
        raise ConfigError(f"{field}: {path} is not a complete safetensors file ({str(e).splitlines()[0]}); "
                          "expected the component's weights (a partial download?)") from None


def check_weights(folder: Path, name: str, field: str) -> None:
    """``folder/name`` and, for an index, every shard it names: present, safetensors headers complete."""
    path = folder / name
    shards = [path]
    if name.endswith(".index.json"):
        index = read_json(path, field, "a weights index with a 'weight_map'")
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ConfigError(f"{field}: {path} has no 'weight_map'; expected a weights index naming its shards")
        shards = [folder / str(s) for s in sorted(set(weight_map.values()))]
    for shard in shards:
        if not shard.is_file():
            raise ConfigError(f"{field}: {shard} is missing but {name} names it; expected every shard of the index")
        if shard.suffix == ".safetensors":
            _check_safetensors(shard, field)


def check_component(root: Path, sub: str, kind: str, field: str) -> None:
    """The folder ``root/sub`` of a component of ``kind`` (a key of COMPONENT_KINDS) has its files."""
    folder = root / sub
    required, one_of = COMPONENT_KINDS[kind]
    if not folder.is_dir():
        raise ConfigError(f"{field}: {folder} is missing; expected the component folder '{sub}' ({kind})")
    for name in required:
        if not (folder / name).is_file():
            raise ConfigError(f"{field}: {folder / name} is missing; expected the config of component '{sub}'")
    if one_of:
        present = [name for name in one_of if (folder / name).is_file()]
        if not present:
            raise ConfigError(f"{field}: {folder} has none of {', '.join(one_of)}; expected the files of "
                              f"component '{sub}' ({kind})")
        if kind.endswith("_model"):
            check_weights(folder, present[0], field)  # the file from_pretrained prefers, as it would load it


def check_diffusers_folder(path: str | Path, components: Mapping[str, str], field: str,
                           class_names: Mapping[str, str] | None = None) -> None:
    """``path`` is a diffusers folder with ``components`` (sub-folder -> kind), each listed in
    model_index.json; ``class_names``: sub-folder -> the ``_class_name`` its config must have."""
    root = Path(path)
    if not root.is_dir():
        raise ConfigError(f"{field}: {path!r} is not a folder; expected a local diffusers model folder")
    index = read_json(root / "model_index.json", field, "the diffusers model_index.json")
    if not isinstance(index, dict):
        raise ConfigError(f"{field}: {root / 'model_index.json'} holds {type(index).__name__}; expected a mapping")
    for sub, kind in components.items():
        entry = index.get(sub)
        if not (isinstance(entry, list) and len(entry) == 2 and all(entry)):
            raise ConfigError(f"{field}: {root / 'model_index.json'} does not list component '{sub}' (got "
                              f"{entry!r}); expected [library, class] as diffusers writes it")
        check_component(root, sub, kind, field)
    for sub, expected in (class_names or {}).items():
        config = read_json(root / sub / "config.json", field, f"the config of component '{sub}'")
        got = config.get("_class_name") if isinstance(config, dict) else None
        if got != expected:
            raise ConfigError(f"{field}: {root / sub / 'config.json'} has _class_name {got!r}; expected {expected!r} "
                              "for this model family")
