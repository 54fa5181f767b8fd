"""LoRA through peft: the adapter layers, their state and the merge, for any model family.

    spec = LoraSpec.from_config(cfg)              # None when lora.rank = 0 (full fine-tuning)
    add_lora(transformer, spec, family, seed)     # peft LoRA layers via diffusers' add_adapter; base frozen
    adapter_state_dict(module)                    # peft keys "<module>.lora_A.weight" / ".lora_B.weight"
    load_adapter_state(module, state)             # the inverse (peft's set_peft_model_state_dict)
    merge_lora(state, scaling)                    # module state (base_layer + lora_A/B) -> plain keys, merged

The layers are peft's (``diffusers.loaders.PeftAdapterMixin.add_adapter`` injects them); nothing here
re-implements a LoRA layer. The merge works on consolidated state dicts rather than on a module,
because a learner's module is sharded (FSDP2, ZeRO-3): the engines gather one tensor at a time and
merge on the CPU. It is peft's own merge, ``W + (B @ A) * scaling`` with ``scaling = alpha / rank``
(``peft.tuners.lora.Linear.get_delta_weight``), and a test checks it against diffusers' ``fuse_lora``.

The default target list belongs to the model family (``family.lora_target_modules()``: names of
layers inside one transformer block, matched in every block that ``family.shard_blocks`` names);
``lora.target_modules`` replaces it with names matched the same way.
"""
from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from pipeline.config import Config, ConfigError

if TYPE_CHECKING:
    from peft import LoraConfig

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' file name in a LoRA folder
LORA_DIR = "lora"  # a LoRA run's adapter in its output.dir, beside the merged transformer/ export
ADAPTER = "default"  # peft's adapter name; the module keys carry it (".lora_A.default.weight")
LORA_PARTS = ("lora_A", "lora_B")


def _peft():
    """peft, imported on first use: it imports transformers (seconds of CPU per process), which the
    processes that only unpickle a config or a Ray Data stage (Train's controller, Data's coordinators)
    never need. A process that loads a diffusers model has imported it already (diffusers does)."""
    import peft.tuners.tuners_utils
    import peft.utils

    return peft


@dataclass(frozen=True)
class LoraSpec:
    """``lora.*`` of the config, resolved: alpha None is the rank (scaling 1)."""

    rank: int
    alpha: float
    dropout: float
    target_modules: tuple[str, ...]  # as configured; () = the model family's default list

    @classmethod
    def from_config(cls, cfg: Config) -> "LoraSpec | None":
        lo = cfg.lora
        if lo.rank == 0:
            return None
        alpha = float(lo.rank if lo.alpha is None else lo.alpha)
        return cls(lo.rank, alpha, float(lo.dropout), tuple(lo.target_modules))

    @classmethod
    def from_record(cls, record: dict[str, Any] | None) -> "LoraSpec | None":
        """The inverse of :meth:`record` (a checkpoint's ``srpo_state.json``)."""
        if not record:
            return None
        return cls(int(record["rank"]), float(record["alpha"]), float(record["dropout"]),
                   tuple(record["target_modules"]))

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank  # peft's LoraLayer.update_layer without rslora

    def record(self) -> dict[str, Any]:
        """What a checkpoint records, so that a resume with another LoRA config is refused."""
        return {"rank": self.rank, "alpha": self.alpha, "dropout": self.dropout,
                "target_modules": list(self.target_modules)}

    def peft_config(self, module_names: list[str]) -> LoraConfig:
        # init_lora_weights=True: A kaiming-uniform, B zero, so the adapted model starts as the base.
        return _peft().LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout,
                                  target_modules=list(module_names), init_lora_weights=True)


def record_of(cfg: Config) -> dict[str, Any] | None:
    spec = LoraSpec.from_config(cfg)
    return spec.record() if spec is not None else None


# ------------------------------------------------------------------------------------------ building


def target_module_names(transformer: nn.Module, blocks: list[nn.Module], patterns: tuple[str, ...]) -> list[str]:
    """Full names of the linear layers inside ``blocks`` whose name (relative to the block) is a
    pattern or ends with ``"." + pattern`` (peft's matching rule, applied per block).

    Raises ConfigError naming ``lora.target_modules`` for a pattern that matches nothing or a layer
    that is not linear."""
    where = {id(m): n for n, m in transformer.named_modules()}
    found, used = [], set()
    for block in blocks:
        for sub, module in block.named_modules():
            hits = [p for p in patterns if sub and (sub == p or sub.endswith("." + p))]
            if not hits:
                continue
            name = f"{where[id(block)]}.{sub}"
            if not isinstance(module, nn.Linear):
                raise ConfigError(f"lora.target_modules: {hits[0]!r} names {name}, a {type(module).__name__}; "
                                  "expected linear layers")
            found.append(name)
            used.update(hits)
    unmatched = [p for p in patterns if p not in used]
    if unmatched:
        examples = sorted(n for n, m in blocks[0].named_modules() if isinstance(m, nn.Linear))[:6] if blocks else []
        raise ConfigError(f"lora.target_modules: {unmatched} match no linear layer inside the transformer blocks; "
                          f"expected layer names relative to a block, such as {examples}")
    return found


def add_lora(transformer: nn.Module, spec: LoraSpec, family, seed: int) -> list[str]:
    """peft LoRA layers on every target of ``spec`` (the family's default list when it names none);
    the base weights are frozen, only the adapters train. The adapters' initial values come from
    ``seed`` alone (every learner rank and rollout actor builds the same ones) and leave the global
    generator untouched. Returns the adapted layers' names."""
    blocks = family.shard_blocks(transformer)
    names = target_module_names(transformer, blocks, spec.target_modules or tuple(family.lora_target_modules()))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer.add_adapter(spec.peft_config(names), adapter_name=ADAPTER)
    for name, p in transformer.named_parameters():  # what the optimizer gets: the adapters alone
        p.requires_grad_(_is_lora_key(name))
    return names


def is_lora(module: nn.Module) -> bool:
    if "peft" not in sys.modules:  # no peft layer can exist before peft is imported
        return False
    return any(isinstance(m, _peft().tuners.tuners_utils.BaseTunerLayer) for m in module.modules())


def peft_scaling(module: nn.Module) -> float:
    """The ``scaling`` peft gave the LoRA layers of ``module`` (one value: every layer has the same
    rank and alpha here)."""
    layer = _peft().tuners.tuners_utils.BaseTunerLayer
    values = {float(m.scaling[ADAPTER]) for m in module.modules() if isinstance(m, layer)}
    if len(values) != 1:
        raise ValueError(f"expected one LoRA scaling for every adapted layer, found {sorted(values)}")
    return values.pop()


def cast_frozen(module: nn.Module, dtype: torch.dtype) -> None:
    """Frozen parameters (a LoRA run's base) stored in ``dtype``: bf16 on accelerators halves the
    base's memory; the trainable ones keep their fp32 master copy. Nothing to do for full fine-tuning."""
    for p in module.parameters():
        if not p.requires_grad and p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)


# ------------------------------------------------------------------------------------------ state


def adapter_state_dict(module: nn.Module, state: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """The adapter in peft's keys (``<layer>.lora_A.weight``, ``<layer>.lora_B.weight``), as
    ``get_peft_model_state_dict`` gives them; ``state``: the module's (gathered) state to take them
    from instead of the module's own tensors (a sharded engine's consolidated copy)."""
    return _peft().utils.get_peft_model_state_dict(module, state_dict=state, adapter_name=ADAPTER)


def load_adapter_state(module: nn.Module, state: dict[str, Tensor]) -> None:
    """Strict: exactly the adapter keys of ``module`` (KeyError otherwise); base weights untouched."""
    expected = set(adapter_state_dict(module))
    if set(state) != expected:
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        raise KeyError(f"LoRA adapter state: missing {missing[:5]}, unexpected {unexpected[:5]}; expected the "
                       "adapter of the same lora.rank and lora.target_modules")
    result = _peft().utils.set_peft_model_state_dict(module, state, adapter_name=ADAPTER)
    if result.unexpected_keys:
        raise KeyError(f"LoRA adapter state: peft did not place {sorted(result.unexpected_keys)[:5]}")


def policy_state(module: nn.Module) -> dict[str, Tensor]:
    """What a weight sync moves for ``module``: the adapter of a LoRA model, else the whole state."""
    return adapter_state_dict(module) if is_lora(module) else module.state_dict()


def load_policy_state(module: nn.Module, state: dict[str, Tensor]) -> None:
    if is_lora(module):
        load_adapter_state(module, state)
    else:
        module.load_state_dict(state, strict=True)


# ------------------------------------------------------------------------------------------ merge


def _is_lora_key(key: str) -> bool:
    return any(f".{part}." in key for part in LORA_PARTS)


def split_lora_state(state: dict[str, Tensor], consume: bool = False) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """A LoRA module's state (``x.base_layer.weight``, ``x.lora_A.default.weight``) -> (base with plain
    keys ``x.weight``, adapter with peft keys ``x.lora_A.weight``): peft's key scheme, undone.
    ``consume``: move the tensors out of ``state`` (which ends empty)."""
    base, adapter = {}, {}
    for key in list(state):
        value = state.pop(key) if consume else state[key]
        if _is_lora_key(key):
            for part in LORA_PARTS:
                key = key.replace(f".{part}.{ADAPTER}.", f".{part}.")
            adapter[key] = value
        else:
            base[key.replace(".base_layer.", ".")] = value
    return base, adapter


def merge_lora(state: dict[str, Tensor], scaling: float) -> dict[str, Tensor]:
    """Plain keys with every adapter merged: ``W = W_base + (B @ A) * scaling`` (peft's merge).

    ``state``: a LoRA module's state (base_layer + lora_A/B keys), or plain base weights plus an
    adapter in peft keys. It is consumed: its tensors move into the result and each merged weight
    replaces its base one, so host memory holds one layer beyond the inputs (FLUX.1-dev: the adapted
    layers are most of the 48 GB)."""
    base, adapter = split_lora_state(state, consume=True)
    for layer in adapted_layers(adapter):
        a, b = adapter.get(f"{layer}.lora_A.weight"), adapter.get(f"{layer}.lora_B.weight")
        w = base.get(f"{layer}.weight")
        if a is None or b is None or w is None:
            raise KeyError(f"LoRA merge: layer {layer!r} lacks its base weight, lora_A or lora_B")
        base[f"{layer}.weight"] = w + (b.to(w.dtype) @ a.to(w.dtype)) * scaling
    return base


# ------------------------------------------------------------------------------------------ export


def adapted_layers(adapter: dict[str, Tensor]) -> list[str]:
    """The layer names of an adapter in peft keys (``x.lora_A.weight`` -> ``x``)."""
    return sorted({k.rsplit(".lora_", 1)[0] for k in adapter})


def save_lora_folder(family, adapter: dict[str, Tensor], spec: LoraSpec, folder: str | Path) -> Path:
    """A diffusers LoRA folder (``pytorch_lora_weights.safetensors``, the peft config with rank and
    alpha in its metadata) written by the family's pipeline (``save_lora_weights``), which its
    ``load_lora_weights`` reads back. Written beside ``folder`` and renamed into place."""
    folder = Path(folder)
    if not adapter:
        raise ValueError(f"{folder}: refusing to write an empty LoRA adapter")
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        family.save_lora_weights(tmp, {k: v.detach().cpu().contiguous() for k, v in adapter.items()},
                                 spec.peft_config(adapted_layers(adapter)).to_dict())
        old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
        if folder.exists():
            folder.rename(old)
        tmp.rename(folder)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
