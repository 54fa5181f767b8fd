"""Training checkpoints and run folders: layout, completeness, discovery.

A run folder (``output.dir``)::

    run.json                      run_id, tracking_uri, experiment, ray_run_name (written at start)
    config.yaml                   the resolved config of the run
    ray/<ray_run_name>/checkpoint_*/   Ray Train checkpoints (pruned to train.keep_checkpoints)
    transformer/diffusion_pytorch_model.safetensors   the final export
    best/diffusion_pytorch_model.safetensors + best.json   best weights by gold reward (eval.every > 0)

A checkpoint folder (every rank writes its part into a local folder and reports it; Ray Train
merges the folders of one step into one)::

    srpo_state.json               rank 0: step, world size, strategy, control-word phase, lr schedule,
                                  data position, gold-reward state (see ``TrainingState``)
    model_optim/                  torch.distributed.checkpoint of {"model": ..., "optim": ...}
                                  (strategies single and fsdp2; plain diffusers parameter names)
    deepspeed/                    DeepSpeed's own checkpoint (strategy deepspeed)
    rng/rank_<r>.safetensors      rank r's generators (levels m, torch CPU, accelerator)
    rng/rank_<r>.json             rank r's Python and NumPy generator states
    manifest/rank_<r>.json        {"files": {relative path: size}} of every file rank r wrote,
                                  written last

A checkpoint is *complete* when ``srpo_state.json`` and every rank's manifest exist and every file
listed there has the listed size. A write interrupted anywhere (a killed worker, a full disk, an
upload cut short) leaves an incomplete folder that discovery skips, so the previous checkpoint
stays the one that is used.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

STATE_FILE = "srpo_state.json"
FORMAT = "srpo-checkpoint/1"
RUN_FILE = "run.json"


def write_json_atomic(path: str | Path, data: Any) -> Path:
    """Write JSON through a temporary file and a rename: readers see the old or the new file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    return path


def checkpoint_problem(ckpt: str | Path) -> str | None:
    """None when ``ckpt`` is a complete checkpoint, else why it is not (for logs and errors)."""
    ckpt = Path(ckpt)
    state_file = ckpt / STATE_FILE
    if not state_file.is_file():
        return f"{state_file} is missing"
    try:
        state = json.loads(state_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        return f"{state_file} is unreadable ({e})"
    if state.get("format") != FORMAT:
        return f"{state_file}: format {state.get('format')!r}, expected {FORMAT!r}"
    world = int(state.get("world_size", 0))
    if world < 1:
        return f"{state_file}: world_size {world}, expected >= 1"
    for r in range(world):
        manifest = ckpt / "manifest" / f"rank_{r}.json"
        if not manifest.is_file():
            return f"{manifest} is missing (rank {r} did not finish writing)"
        try:
            files = json.loads(manifest.read_text())["files"]
        except (OSError, json.JSONDecodeError, KeyError) as e:
            return f"{manifest} is unreadable ({e})"
        for rel, size in files.items():
            f = ckpt / rel
            if not f.is_file():
                return f"{f} is missing"
            if f.stat().st_size != int(size):
                return f"{f} has {f.stat().st_size} bytes, expected {size} (an interrupted write)"
    return None


def read_state(ckpt: str | Path) -> dict[str, Any]:
    """``srpo_state.json`` of a complete checkpoint; raises ValueError naming the problem otherwise."""
    problem = checkpoint_problem(ckpt)
    if problem is not None:
        raise ValueError(f"{ckpt}: not a complete srpo-ray checkpoint: {problem}")
    return json.loads((Path(ckpt) / STATE_FILE).read_text())


def find_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root`` (a run folder or a Ray run folder), oldest step first."""
    root = Path(root)
    found = []
    for state_file in root.rglob(STATE_FILE):
        ckpt = state_file.parent
        if checkpoint_problem(ckpt) is None:
            step = int(json.loads(state_file.read_text())["step"])
            found.append((step, ckpt.stat().st_mtime, ckpt))
    return [c for _, _, c in sorted(found)]


def latest_checkpoint(root: str | Path) -> Path | None:
    """The complete checkpoint with the highest step under ``root`` (None when there is none)."""
    found = find_checkpoints(root)
    return found[-1] if found else None


def read_run(run_dir: str | Path) -> dict[str, Any]:
    """``run.json`` of a run folder; raises FileNotFoundError naming what was expected."""
    f = Path(run_dir) / RUN_FILE
    if not f.is_file():
        raise FileNotFoundError(f"{f}: missing; expected a run folder written by `srpo train` "
                                "(its output.dir, with run.json and config.yaml)")
    return json.loads(f.read_text())
