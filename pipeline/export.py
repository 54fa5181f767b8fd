"""Trained weights in and out: consolidated safetensors and diffusers folders, written atomically.

Reading (:func:`load_weights`) accepts every place trained weights live:

- a ``.safetensors`` file (our exports, or the SRPO authors' released ``diffusion_pytorch_model.safetensors``);
- a diffusers transformer folder or a full diffusers folder (``transformer/``), sharded or not;
- a checkpoint folder (pipeline/checkpoint.py): DCP ``model_optim/`` or DeepSpeed ``deepspeed/``;
- a run folder (``output.dir``): its newest weights, a complete checkpoint or the final export.

Writing keeps the plain diffusers parameter names, so the result loads exactly as the authors load
theirs (FLUX: ``FluxPipeline.from_pretrained(base); pipe.transformer.load_state_dict(load_file(path))``).
Every write goes through a temporary file or folder and a rename: a crash never leaves half a file.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import yaml

from pipeline.checkpoint import RUN_FILE, STATE_FILE, latest_checkpoint, read_state
from pipeline.config import load_config
from pipeline.models import parameter_template
from pipeline.parallel import DeepSpeedZeroEngine, read_dcp_model_weights

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
RUN_CONFIG = "config.yaml"
FINAL_EXPORT = Path("transformer") / WEIGHTS_NAME  # relative to a run folder (the trainer's final export)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# ------------------------------------------------------------------------------------------ writing


def save_state_dict(state: dict[str, torch.Tensor], path: str | Path, step: int | None = None) -> Path:
    """``state`` -> safetensors at ``path`` via a temporary file and an atomic rename."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    metadata = {"format": "pt"}
    if step is not None:
        metadata["srpo_step"] = str(step)
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(path)
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
    src = Path(source)
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
        return load_file(str(file), device="cpu")
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{file}: unreadable safetensors ({e}); expected a complete safetensors file") from e


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
