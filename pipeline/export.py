"""Trained weights in and out: consolidated safetensors and diffusers folders, written atomically.

Reading (:func:`load_weights`) accepts every place trained weights live:

- a ``.safetensors`` file (our exports, or the SRPO authors' released ``diffusion_pytorch_model.safetensors``);
- a diffusers transformer folder or a full diffusers folder (``transformer/``), sharded or not;
- a checkpoint folder (pipeline/checkpoint.py): DCP ``model_optim/`` or DeepSpeed ``deepspeed/``;
- a run folder (``output.dir``): its newest weights, a complete checkpoint or the final export.

Writing keeps the plain diffusers parameter names, so the result loads exactly as the authors load
theirs (FLUX: ``FluxPipeline.from_pretrained(base); pipe.transformer.load_state_dict(load_file(path))``).
Every write goes through a temporary file or folder and a rename: a crash never leaves half a file.
:func:`export_single_file` adds fp8 (e4m3fn with scales) and ComfyUI's original-key layout
(docs/export.md); an fp8 export in the diffusers layout reads back through :func:`load_weights`.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import yaml

from pipeline.checkpoint import (RUN_FILE, STATE_FILE, LocalCheckpoints, latest_checkpoint, ray_snapshot_checkpoint,
                                 read_run, read_state)
from pipeline.config import load_config
from pipeline.lora import LORA_DIR, LORA_WEIGHTS, LoraSpec, merge_lora, save_lora_folder, split_lora_state
from pipeline.models import family_class, family_of, parameter_template
from pipeline.models.original_keys import to_original_keys
from pipeline.parallel import DeepSpeedZeroEngine, read_dcp_model_weights
from pipeline.storage import RunStorage, is_uri

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
RUN_CONFIG = "config.yaml"
FINAL_EXPORT = Path("transformer") / WEIGHTS_NAME  # relative to a run folder (the trainer's final export)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# ------------------------------------------------------------------------------------------ writing


def save_state_dict(state: dict[str, torch.Tensor], path: str | Path, step: int | None = None,
                    extra_metadata: dict[str, str] | None = None) -> Path:
    """``state`` -> safetensors at ``path`` via a temporary file and an atomic rename."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    metadata = {"format": "pt", **(extra_metadata or {})}
    if step is not None:
        metadata["srpo_step"] = str(step)
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)  # a write that died: the previous file stays, no half file beside it
    return path


def cast_state(state: dict[str, torch.Tensor], dtype: str) -> dict[str, torch.Tensor]:
    """Floating tensors to ``dtype`` ("fp32" or "bf16"); integer tensors unchanged."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype: got {dtype!r}, expected one of {list(DTYPES)}")
    target = DTYPES[dtype]
    return {k: v.detach().to(device="cpu", dtype=target) if v.is_floating_point() else v.detach().cpu()
            for k, v in state.items()}


def export_transformer(state: dict[str, torch.Tensor], out_file: str | Path, dtype: str = "fp32",
                       step: int | None = None) -> Path:
    """Write the transformer state as one safetensors file with the plain diffusers keys.

    ``out_file`` is the file (normally ``.../diffusion_pytorch_model.safetensors``) or an existing
    folder to write that name into. bf16 halves the file (the authors release bf16-castable fp32).
    """
    if not state:
        raise ValueError(f"{out_file}: refusing to export an empty state dict")
    out = Path(out_file)
    if out.is_dir():
        out = out / WEIGHTS_NAME
    return save_state_dict(cast_state(state, dtype), out, step=step)


def export_diffusers_folder(state: dict[str, torch.Tensor], base_model_path: str | Path, out_dir: str | Path,
                            dtype: str = "fp32", step: int | None = None) -> Path:
    """A complete diffusers folder: the base's components with ``state`` as the transformer.

    Only ``model_index.json`` and the components it lists are copied (FLUX.1-dev's root also holds
    ``flux1-dev.safetensors``, the *base* transformer in another format, which must not travel with
    the new weights); the transformer gets the base's ``config.json`` and the new weights. The folder
    is built next to ``out_dir`` and renamed into place; an existing ``out_dir`` is replaced only if
    it is a diffusers folder (a previous export), never an arbitrary folder.
    """
    base, out = Path(base_model_path), Path(out_dir)
    components = _pipeline_components(base)
    _check_against_base(state, base)
    if out.exists() and not (out / "model_index.json").is_file():
        raise FileExistsError(f"{out}: exists and is not a diffusers folder; expected a new or previously "
                              "exported path (refusing to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        shutil.copy2(base / "model_index.json", tmp / "model_index.json")
        for name in components:
            if name == "transformer":
                (tmp / name).mkdir()
                shutil.copy2(base / name / "config.json", tmp / name / "config.json")
            else:
                shutil.copytree(base / name, tmp / name)  # follows symlinks (hub cache snapshots)
        export_transformer(state, tmp / "transformer" / WEIGHTS_NAME, dtype, step=step)
        _replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _pipeline_components(base: Path) -> list[str]:
    """Component folders named in ``model_index.json`` (null entries are optional parts left out)."""
    index = base / "model_index.json"
    if not index.is_file():
        raise FileNotFoundError(f"{index}: missing; expected a full diffusers folder (the base model)")
    entries = json.loads(index.read_text())
    names = [k for k, v in entries.items()
             if not k.startswith("_") and isinstance(v, list) and v and v[0] is not None]
    for name in names:
        if not (base / name).is_dir():
            raise FileNotFoundError(f"{base / name}: missing; {index} lists component {name!r}")
    if "transformer" not in names or not (base / "transformer" / "config.json").is_file():
        raise FileNotFoundError(f"{base / 'transformer' / 'config.json'}: missing; expected the base "
                                "transformer's config")
    return names


def _check_against_base(state: dict[str, torch.Tensor], base: Path) -> None:
    """Keys and shapes must be the base transformer's, or the folder would not load."""
    template = transformer_template(base)
    missing = sorted(set(template) - set(state))
    unexpected = sorted(set(state) - set(template))
    wrong = sorted(k for k in set(template) & set(state) if tuple(state[k].shape) != template[k])
    if missing or unexpected or wrong:
        raise KeyError(f"weights do not match the transformer of {base}: missing {missing[:5]}, unexpected "
                       f"{unexpected[:5]}, wrong shape {wrong[:5]} ({len(missing)}/{len(unexpected)}/{len(wrong)}); "
                       "expected the plain diffusers keys of that transformer config")


def _replace_dir(new: Path, dest: Path) -> None:
    """Rename ``new`` to ``dest``; an old ``dest`` is moved aside first and removed after."""
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        dest.rename(old)
    new.rename(dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------------------ fp8 and layouts
# docs/export.md: formats, loaders, ComfyUI status and sizes. Two single-file layouts:
#   diffusers: the plain diffusers keys. fp8 = BFL's "fp8r", what diffusers' BFLQuantizationConfig
#              reads through from_single_file: <module>.weight float8_e4m3fn [out, in] and
#              <module>.weight_scale float32 [out] (one scale per output row); the rest bf16.
#   comfyui:   the family's original key names (pipeline/models/original_keys.py). fp8 = ComfyUI's
#              "scaled fp8": <module>.weight float8_e4m3fn, <module>.scale_weight float32 [] (one scale
#              per tensor, all its loader takes) and the marker tensor "scaled_fp8"; the rest bf16.
# In both, weight ~= weight_fp8.float() * scale with scale = amax / 448 (e4m3fn's largest finite value).

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
FP8_SCALE = "weight_scale"  # diffusers (BFL fp8r): per output row
COMFY_SCALE = "scale_weight"  # ComfyUI scaled fp8: per tensor
COMFY_MARKER = "scaled_fp8"  # ComfyUI: an empty tensor whose dtype names the fp8 format
LAYOUTS = ("diffusers", "comfyui")
FP8_WEIGHTS_NAME = "diffusion_pytorch_model_fp8_e4m3fn.safetensors"
_COMFY_NAMES = {"fp32": "diffusion_model_fp32.safetensors", "bf16": "diffusion_model_bf16.safetensors",
                "fp8": "diffusion_model_fp8_e4m3fn_scaled.safetensors"}  # ComfyUI's models/diffusion_models
# A tensor of a top-level list of repeated blocks: "<blocks>.<index>.…" (the families' shard_blocks).
_BLOCK_KEY = re.compile(r"^[A-Za-z_]\w*\.\d+\.")


def single_file_name(dtype: str, layout: str = "diffusers") -> str:
    """The default file name of an export of ``dtype`` in ``layout``."""
    if layout == "comfyui":
        return _COMFY_NAMES[dtype]
    return FP8_WEIGHTS_NAME if dtype == "fp8" else WEIGHTS_NAME


def is_block_linear(key: str, shape: tuple[int, ...] | torch.Size) -> bool:
    """The tensors fp8 quantizes: 2-D weights inside the repeated transformer blocks (attention,
    MLP and modulation Linears: 99.4% of FLUX.1-dev's parameters in blocks). Norm scales, biases, the
    embedders before the blocks and the output layers after them stay bf16: they are small, and the
    embedders and output layer touch every token unmixed, where rounding is least averaged out."""
    return key.endswith(".weight") and len(shape) == 2 and bool(_BLOCK_KEY.match(key))


def quantize_fp8(weight: torch.Tensor, per_row: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight [out, in]`` -> (e4m3fn weight, fp32 scale) with ``weight ~= q.float() * scale``.

    scale = amax / 448 per output row ([out]) or per tensor ([]): the largest magnitude lands on
    e4m3's largest finite value, so nothing overflows and the row uses the full exponent range.
    Round to nearest keeps 3 mantissa bits: |error| <= 2^-4 |w| (normal range) or 2^-10 scale (subnormals).
    """
    w = weight.detach().to(device="cpu", dtype=torch.float32)
    amax = w.abs().amax(dim=1) if per_row else w.abs().amax()
    scale = (amax / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)  # an all-zero row: q = 0, scale > 0
    q = (w / (scale[:, None] if per_row else scale)).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fp32 weight of an e4m3fn weight and its per-row ([out]) or per-tensor ([]) scale."""
    return q.float() * (scale.float()[:, None] if scale.ndim == 1 else scale.float())


def _quantize_blocks(state: dict[str, torch.Tensor], per_row: bool, scale_suffix: str) -> dict[str, torch.Tensor]:
    """Block Linear weights -> e4m3fn + ``<module>.<scale_suffix>``; every other float tensor -> bf16."""
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if v.is_floating_point() and is_block_linear(k, v.shape):
            out[k], out[k[:-len("weight")] + scale_suffix] = quantize_fp8(v, per_row)
        else:
            out[k] = v.detach().to(device="cpu", dtype=torch.bfloat16) if v.is_floating_point() else v.detach().cpu()
    if not any(v.dtype == FP8 for v in out.values()):
        raise ValueError("fp8 export: no 2-D weight inside a numbered block list (<blocks>.<i>.…weight); expected "
                         "a transformer state dict")
    return out


def export_single_file(state: dict[str, torch.Tensor], out_file: str | Path, dtype: str, layout: str = "diffusers",
                       family: str | None = None, step: int | None = None) -> Path:
    """One safetensors file of ``dtype`` ("fp32", "bf16" or "fp8") in ``layout`` (see above).

    ``family`` (a ``model.family``) names the original key layout; needed for ``layout="comfyui"``.
    ``out_file``: the file, or an existing folder to write :func:`single_file_name` into.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout: got {layout!r}, expected one of {list(LAYOUTS)}")
    if dtype != "fp8" and dtype not in DTYPES:
        raise ValueError(f"dtype: got {dtype!r}, expected one of {[*DTYPES, 'fp8']}")
    if not state:
        raise ValueError(f"{out_file}: refusing to export an empty state dict")
    out = Path(out_file)
    if out.is_dir():
        out = out / single_file_name(dtype, layout)
    if layout == "diffusers" and dtype != "fp8":
        return export_transformer(state, out, dtype, step=step)
    if layout == "comfyui":
        if family is None:
            raise ValueError("layout 'comfyui': the model family is unknown; expected the base model folder")
        state = to_original_keys(family, state)
        if dtype != "fp8":
            return save_state_dict(cast_state(state, dtype), out, step=step)
        tensors = {COMFY_MARKER: torch.empty(0, dtype=FP8), **_quantize_blocks(state, False, COMFY_SCALE)}
        return save_state_dict(tensors, out, step=step)
    return save_state_dict(_quantize_blocks(state, True, FP8_SCALE), out, step=step,
                           extra_metadata={"quantization": "fp8r"})  # as diffusers' own fp8r files say


def dequantize_state(state: dict[str, torch.Tensor], file: Path) -> dict[str, torch.Tensor]:
    """A diffusers-layout fp8 export read back: fp32 block weights (scales applied), other tensors as stored."""
    if COMFY_MARKER in state:
        raise ValueError(f"{file}: a ComfyUI-layout fp8 export (original key names, {COMFY_MARKER!r} marker); "
                         "expected one with the diffusers keys (export without --layout comfyui)")
    for scale_key in [k for k in state if k.endswith("." + FP8_SCALE)]:
        weight_key = scale_key[:-len(FP8_SCALE)] + "weight"
        if state.get(weight_key) is not None and state[weight_key].dtype == FP8:
            state[weight_key] = dequantize_fp8(state[weight_key], state.pop(scale_key))
    return state


# ------------------------------------------------------------------------------------------ reading


@dataclass(frozen=True)
class WeightsSource:
    """Where :func:`load_weights` reads from, after a run folder is resolved to its newest weights.

    kind: "safetensors" (a file), "diffusers" (a transformer folder), "checkpoint" (a complete
    checkpoint folder). run_dir: the run folder the source lies in (None outside one).
    model_path: the base diffusers folder, when known (explicit, srpo_state.json or the run config).
    """

    kind: Literal["safetensors", "diffusers", "checkpoint"]
    path: Path
    run_dir: Path | None
    model_path: str | None


def find_run_dir(path: str | Path) -> Path | None:
    """The run folder (with run.json) that is ``path`` or contains it; None when there is none."""
    p = Path(path).resolve()
    for candidate in [p, *p.parents]:
        if (candidate / RUN_FILE).is_file():
            return candidate
    return None


def is_run_dir(path: Path) -> bool:
    """A run folder (``output.dir``): run.json or config.yaml, and not itself a checkpoint."""
    return path.is_dir() and ((path / RUN_FILE).is_file() or (path / RUN_CONFIG).is_file()) \
        and not (path / STATE_FILE).is_file()


def resolve_weights(source: str | Path, model_path: str | None = None) -> WeightsSource:
    """Classify ``source``; a run folder becomes its newest complete weights.

    Raises FileNotFoundError / ValueError naming the path and what was expected.
    """
    src = fetch_run_folder(str(source)) if is_uri(source) else Path(source)
    if not src.exists():
        raise FileNotFoundError(f"{src}: not found; expected a run folder, a checkpoint folder, a diffusers "
                                "folder or a .safetensors file")
    run_dir = find_run_dir(src)
    if src.is_file():
        if src.suffix != ".safetensors":
            raise ValueError(f"{src}: expected a .safetensors file (weights as the SRPO authors release them)")
        return WeightsSource("safetensors", src, run_dir, model_path or _run_model_path(run_dir))
    if (src / STATE_FILE).is_file():
        return WeightsSource("checkpoint", src, run_dir, model_path or _checkpoint_model_path(src, run_dir))
    if is_run_dir(src):
        return _newest_in_run(src, model_path)
    folder = src / "transformer" if (src / "model_index.json").is_file() else src
    if (folder / WEIGHTS_NAME).is_file() or (folder / INDEX_NAME).is_file():
        base = model_path or (str(src) if folder != src else _run_model_path(run_dir))
        return WeightsSource("diffusers", folder, run_dir, base)
    raise ValueError(f"{src}: not a run folder (run.json/config.yaml), checkpoint folder ({STATE_FILE}), "
                     f"diffusers folder ({WEIGHTS_NAME} or transformer/) or .safetensors file")


def fetch_run_folder(location: str) -> Path:
    """A run folder at a URI (``output.dir`` of a run on s3://, gs://, file://...), staged locally
    with what reading its weights needs: run.json, config.yaml, the final export, ``best/`` and the
    newest complete checkpoint (older ones stay in storage)."""
    info = read_run(location)  # FileNotFoundError naming run.json when it is not a run folder
    storage = RunStorage(location)
    for rel in (RUN_FILE, RUN_CONFIG, str(FINAL_EXPORT), "best", LORA_DIR):
        storage.download(rel)
    if info.get("ray_run_name"):
        name = ray_snapshot_checkpoint(storage.uri("ray"), info["ray_run_name"])
        if name:
            storage.download(f"ray/{info['ray_run_name']}/{name}")
    else:
        LocalCheckpoints.on(storage, keep=1).fetch_latest()
    return storage.local


def _newest_in_run(run_dir: Path, model_path: str | None) -> WeightsSource:
    """The newer of the latest complete checkpoint and the final export (by training step).

    The final export is written after the last step, so it wins ties and exports without a step;
    an older one (a run resumed past it) loses to a newer checkpoint.
    """
    ckpt = latest_checkpoint(run_dir)
    final = run_dir / FINAL_EXPORT
    run_base = model_path or _run_model_path(run_dir)
    if ckpt is not None:
        ckpt_step = int(read_state(ckpt)["step"])
        final_step = _safetensors_step(final) if final.is_file() else -1
        if final_step is None or final_step >= ckpt_step:
            return WeightsSource("safetensors", final, run_dir, run_base)
        return WeightsSource("checkpoint", ckpt, run_dir, model_path or _checkpoint_model_path(ckpt, run_dir))
    if final.is_file():
        return WeightsSource("safetensors", final, run_dir, run_base)
    raise FileNotFoundError(f"{run_dir}: no complete checkpoint (with {STATE_FILE} and every rank's manifest) "
                            f"and no final export {final}; expected a run folder of `srpo train` with weights")


def _safetensors_step(file: Path) -> int | None:
    """The ``srpo_step`` metadata :func:`save_state_dict` writes (None when absent)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            step = (f.metadata() or {}).get("srpo_step")
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{file}: unreadable safetensors ({e}); expected a complete safetensors file") from e
    return int(step) if step is not None else None


def _checkpoint_model_path(ckpt: Path, run_dir: Path | None) -> str | None:
    """srpo_state.json's model_path, else the run config's (read_state raises on an incomplete checkpoint)."""
    return _usable(read_state(ckpt).get("model_path")) or _run_model_path(run_dir)


def _run_model_path(run_dir: Path | None) -> str | None:
    """``model.path`` of the run's resolved config (None outside a run or without config.yaml)."""
    if run_dir is None or not (run_dir / RUN_CONFIG).is_file():
        return None
    try:
        return _usable(load_config(run_dir / RUN_CONFIG).model.path)
    except (OSError, ValueError, yaml.YAMLError):
        # A config from another code version must not block reading the weights; the base path
        # is then simply unknown (``--model-path`` supplies it where it is needed).
        return None


def _usable(model_path: str | None) -> str | None:
    """A recorded base path only if it exists here: a run trained elsewhere records that machine's path,
    and the weights themselves are self-describing (an explicit ``model_path`` is never dropped)."""
    if model_path and (Path(model_path) / "transformer" / "config.json").is_file():
        return model_path
    return None


def load_weights(source: str | Path, model_path: str | None = None) -> dict[str, torch.Tensor]:
    """The transformer state dict (plain diffusers keys, CPU) stored at ``source``.

    ``source``: a .safetensors file, a diffusers (transformer) folder, a complete checkpoint folder or
    a run folder (see :func:`resolve_weights`). ``model_path``: the base diffusers folder, whose
    transformer config gives the expected keys and shapes of a DCP checkpoint; by default it is read
    from the checkpoint's srpo_state.json or the run's config.yaml.
    """
    return read_weights(resolve_weights(source, model_path))


def read_weights(source: WeightsSource) -> dict[str, torch.Tensor]:
    """The state dict of an already resolved source (see :func:`load_weights`)."""
    if source.kind == "safetensors":
        return _read_safetensors(source.path)
    if source.kind == "diffusers":
        return _read_diffusers_transformer(source.path)
    return read_checkpoint_weights(source.path, source.model_path)


def source_step(source: WeightsSource) -> int | None:
    """The training step the weights are from, when recorded (checkpoint state or export metadata)."""
    if source.kind == "checkpoint":
        return int(read_state(source.path)["step"])
    if source.kind == "safetensors":
        return _safetensors_step(source.path)
    return None


def _read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(file), device="cpu")
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{file}: unreadable safetensors ({e}); expected a complete safetensors file") from e
    return dequantize_state(state, file)  # an fp8 export reads back as weights (unchanged otherwise)


def _read_diffusers_transformer(folder: Path) -> dict[str, torch.Tensor]:
    """``diffusion_pytorch_model.safetensors``, or every shard its index names."""
    if (folder / WEIGHTS_NAME).is_file():
        return _read_safetensors(folder / WEIGHTS_NAME)
    index = folder / INDEX_NAME
    try:
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
    except (OSError, json.JSONDecodeError, KeyError) as e:
        raise ValueError(f"{index}: unreadable ({e}); expected a safetensors index with a weight_map") from e
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        state.update(_read_safetensors(folder / shard))
    missing = sorted(set(weight_map) - set(state))
    if missing:
        raise ValueError(f"{index}: keys {missing[:5]} ({len(missing)}) are in the index but in no shard")
    return state


def read_checkpoint_weights(ckpt: str | Path, model_path: str | None = None) -> dict[str, torch.Tensor]:
    """The model weights of a complete checkpoint folder, consolidated on this process (no process group)."""
    ckpt = Path(ckpt)
    state = read_state(ckpt)  # raises ValueError naming the problem when incomplete
    lora = LoraSpec.from_record(state.get("lora"))
    if lora is not None:  # a LoRA run's checkpoint holds the adapters alone: merged into the base here
        base = model_path or _checkpoint_model_path(ckpt, None)
        return merged_lora_weights(read_checkpoint_adapter(ckpt), lora, base, ckpt)
    # The engines' own readers, kept beside the writers that made these folders (pipeline/parallel.py).
    if (ckpt / "model_optim").is_dir():
        expected = transformer_template(model_path) if model_path is not None else None
        return read_dcp_model_weights(ckpt / "model_optim", expected)
    if (ckpt / "deepspeed").is_dir():
        return DeepSpeedZeroEngine.read_model_weights(ckpt / "deepspeed")
    raise ValueError(f"{ckpt}: checkpoint of strategy {state.get('strategy')!r} has neither model_optim/ (DCP) "
                     "nor deepspeed/; expected one of them")


def transformer_template(model_path: str | Path) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of the transformer of ``<model_path>/transformer`` (its family's
    parameter template, built on the meta device: no memory, no weights read)."""
    return parameter_template(model_path)


# ------------------------------------------------------------------------------------------ LoRA
# A LoRA run (lora.rank > 0) checkpoints its adapters alone (peft's module names, no base weights).
# Its final export is the merged model (transformer/, read like any export) plus the adapter as a
# diffusers LoRA folder (lora/, what the family pipeline's load_lora_weights reads).


@dataclass(frozen=True)
class LoraSource:
    """An adapter found by :func:`resolve_lora`, with where it came from (as :class:`WeightsSource`)."""

    adapter: dict[str, torch.Tensor]  # peft keys: <layer>.lora_A.weight [r, in], <layer>.lora_B.weight [out, r]
    spec: LoraSpec
    path: Path
    run_dir: Path | None
    model_path: str | None
    step: int | None
    kind: str = "lora adapter"


def read_checkpoint_adapter(ckpt: Path) -> dict[str, torch.Tensor]:
    """The adapter of a LoRA checkpoint (DCP or DeepSpeed model entries), in peft keys."""
    if (ckpt / "model_optim").is_dir():
        entries = read_dcp_model_weights(ckpt / "model_optim", None)
    elif (ckpt / "deepspeed").is_dir():
        entries = DeepSpeedZeroEngine.read_model_weights(ckpt / "deepspeed")
    else:
        raise ValueError(f"{ckpt}: neither model_optim/ (DCP) nor deepspeed/; expected one of them")
    adapter = split_lora_state(entries)[1]
    if not adapter:
        raise ValueError(f"{ckpt}: srpo_state.json records LoRA but the model entries hold no lora_A/lora_B tensors")
    return adapter


def read_lora_folder(folder: Path) -> tuple[dict[str, torch.Tensor], LoraSpec]:
    """A diffusers LoRA folder (``pytorch_lora_weights.safetensors``, keys ``transformer.<layer>.lora_A.weight``)
    -> (adapter in peft keys, rank and alpha from its peft metadata; without metadata alpha = rank, as
    diffusers assumes)."""
    from safetensors import safe_open

    file, prefix = folder / LORA_WEIGHTS, "transformer."
    with safe_open(str(file), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("lora_adapter_metadata", "{}"))
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    adapter = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix) and ".lora_" in k}
    if not adapter or len(adapter) != len(tensors):
        raise ValueError(f"{file}: expected the transformer's LoRA tensors alone ({prefix}<layer>.lora_A.weight / "
                         f".lora_B.weight), got keys such as {sorted(tensors)[:3]}")
    rank = int(meta.get(f"{prefix}r") or next(v.shape[0] for k, v in adapter.items() if ".lora_A." in k))
    return adapter, LoraSpec(rank, float(meta.get(f"{prefix}lora_alpha") or rank), 0.0, ())


def resolve_lora(source: str | Path, model_path: str | None = None) -> LoraSource:
    """The adapter at ``source``: a diffusers LoRA folder, or a LoRA run's checkpoint or run folder (its
    newest weights: a newer checkpoint's adapter, else the final ``lora/`` folder)."""
    src = fetch_run_folder(str(source)) if is_uri(source) else Path(source)
    if (src / LORA_WEIGHTS).is_file():
        adapter, spec = read_lora_folder(src)
        run_dir = find_run_dir(src)
        return LoraSource(adapter, spec, src, run_dir, model_path or _run_model_path(run_dir), None)
    weights = resolve_weights(src, model_path)
    if weights.kind == "checkpoint":
        spec = LoraSpec.from_record(read_state(weights.path).get("lora"))
        if spec is not None:
            return LoraSource(read_checkpoint_adapter(weights.path), spec, weights.path, weights.run_dir,
                              weights.model_path, source_step(weights))
    elif weights.run_dir is not None and weights.path.resolve() == (weights.run_dir / FINAL_EXPORT).resolve() \
            and (weights.run_dir / LORA_DIR / LORA_WEIGHTS).is_file():
        adapter, spec = read_lora_folder(weights.run_dir / LORA_DIR)
        return LoraSource(adapter, spec, weights.run_dir / LORA_DIR, weights.run_dir, weights.model_path,
                          source_step(weights))
    raise ValueError(f"{source}: no LoRA adapter; expected a run or checkpoint of a run trained with lora.rank > 0, "
                     f"or a diffusers LoRA folder with {LORA_WEIGHTS}")


def merged_lora_weights(adapter: dict[str, torch.Tensor], spec: LoraSpec, model_path: str | None,
                        where: str | Path) -> dict[str, torch.Tensor]:
    """The base transformer of ``model_path`` with ``adapter`` merged (pipeline.lora.merge_lora): plain keys."""
    if not model_path:
        raise ValueError(f"{where}: a LoRA adapter, whose base model is unknown (not recorded in the checkpoint or "
                         "run config); expected --model-path BASE")
    return merge_lora({**load_weights(model_path), **adapter}, spec.scaling)


def export_lora_folder(source: LoraSource, out_dir: str | Path) -> Path:
    """``source``'s adapter as a diffusers LoRA folder of the base model's family (``load_lora_weights``)."""
    if not source.model_path:
        raise ValueError(f"{source.path}: the base model (and so its family) is unknown; expected --model-path BASE")
    return save_lora_folder(family_class(family_of(source.model_path)), source.adapter, source.spec, out_dir)
