"""Training checkpoints and run folders: layout, completeness, discovery.

A run folder (``output.dir``)::

    run.json                      run_id, tracking_uri, experiment, ray_run_name (written at start)
    config.yaml                   the resolved config of the run
    ray/<ray_run_name>/checkpoint_*/   Ray Train checkpoints (pruned to train.keep_checkpoints)
    checkpoints/checkpoint_<step>/     the single-process learner's checkpoints (same layout, same pruning)
    transformer/diffusion_pytorch_model.safetensors   the final export
    best/diffusion_pytorch_model.safetensors + best.json   best weights by gold reward (eval.every > 0)

A checkpoint folder (every rank writes its part into a local folder and reports it; Ray Train
merges the folders of one step into one)::

    srpo_state.json               rank 0: step, world size, strategy, control-word phase, lr schedule,
                                  data position, gold-reward state (see ``TrainingState``)
    model_optim/                  torch.distributed.checkpoint of {"model": ..., "optim": ...}
                                  (strategies single and fsdp2; plain diffusers parameter names)
    deepspeed/                    DeepSpeed's own checkpoint (strategy deepspeed)
    rng/rank_<r>.safetensors      rank r's generators (torch CPU, accelerator; levels m in format 1's
                                  checkpoints: levels are now drawn from per-sample seeds)
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
import random
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from pipeline.config import Config
from pipeline.schedules import lr_at
from rewards.srp import control_words

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


# ------------------------------------------------------------------------------------------ writing


def strategy_subdir(strategy: str) -> str:
    return "deepspeed" if strategy == "deepspeed" else "model_optim"


def _rng_tensors(level_generator) -> dict[str, Any]:
    out = {"torch_cpu": torch.get_rng_state()}
    if level_generator is not None:
        out["level_generator"] = level_generator.get_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["torch_cuda"] = torch.cuda.get_rng_state()
    return out


def _host_rng_state() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": [version, list(internal), gauss],
            "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]}


def _restore_host_rng(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def write_manifest(folder: str | Path, rank: int) -> Path:
    """Record every file this rank wrote into ``folder`` (called last: its presence means done)."""
    folder = Path(folder)
    files = {}
    for f in sorted(folder.rglob("*")):
        rel = f.relative_to(folder).as_posix()
        if f.is_file() and not rel.startswith("manifest/"):
            files[rel] = f.stat().st_size
    return write_json_atomic(folder / "manifest" / f"rank_{rank}.json", {"files": files})


def save_training_checkpoint(folder: str | Path, engine, strategy: str, rank: int, world_size: int,
                             level_generator, state: dict[str, Any] | None) -> None:
    """Collective: this rank's part of a checkpoint into ``folder`` (see the module docstring).

    ``state`` is the run state rank 0 writes as srpo_state.json (other ranks pass None). The
    manifest is written last, after every other file of this rank is complete on disk.
    """
    folder = Path(folder)
    engine.save_sharded(str(folder / strategy_subdir(strategy)))
    (folder / "rng").mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in _rng_tensors(level_generator).items()},
              str(folder / "rng" / f"rank_{rank}.safetensors"))
    write_json_atomic(folder / "rng" / f"rank_{rank}.json", _host_rng_state())
    if rank == 0:
        if state is None:
            raise ValueError("rank 0 must pass the run state (srpo_state.json)")
        write_json_atomic(folder / STATE_FILE, {**state, "format": FORMAT, "world_size": world_size,
                                                "strategy": strategy})
    write_manifest(folder, rank)


def load_training_checkpoint(folder: str | Path, engine, strategy: str, rank: int, world_size: int,
                             level_generator) -> dict[str, Any]:
    """Collective: restore model, optimizer and this rank's generators; returns srpo_state.json.

    The world size and strategy must match the checkpoint's: the per-rank generator streams (the
    levels m each rank draws) are only defined for the same ranks.
    """
    state = read_state(folder)
    if int(state["world_size"]) != world_size:
        raise ValueError(f"{folder}: written by {state['world_size']} learner workers, resumed with {world_size}; "
                         "set learner.num_workers to the checkpoint's value")
    if state["strategy"] != strategy:
        raise ValueError(f"{folder}: written with learner.strategy={state['strategy']}, resumed with {strategy}")
    engine.load_sharded(str(Path(folder) / strategy_subdir(strategy)))
    rng = load_file(str(Path(folder) / "rng" / f"rank_{rank}.safetensors"))
    if level_generator is not None and "level_generator" in rng:
        level_generator.set_state(rng["level_generator"])
    torch.set_rng_state(rng["torch_cpu"])
    if "torch_cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["torch_cuda"])
    _restore_host_rng(json.loads((Path(folder) / "rng" / f"rank_{rank}.json").read_text()))
    return state


def ray_snapshot_step(storage_path: str | Path, run_name: str) -> int:
    """The step of the checkpoint Ray Train will restore for ``run_name`` (0 when none).

    Read from Ray Train's checkpoint-manager snapshot (written when a checkpoint is registered),
    which is what ``ray.train.get_checkpoint()`` returns after a restart. The snapshot's format is
    Ray's: if it cannot be read, 0 is returned and the learner skips the rows it has already
    trained on instead (correct, only slower).
    """
    run_root = Path(storage_path) / run_name
    snap = run_root / "checkpoint_manager_snapshot.json"
    try:
        data = json.loads(snap.read_text())
        if isinstance(data, str):  # pydantic .json() nested as a string
            data = json.loads(data)
        name = data["latest_checkpoint_result"]["checkpoint_dir_name"]
        return int(read_state(run_root / name)["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


# ------------------------------------------------------------------------------------------ run state


@dataclass
class TrainingState:
    """What a checkpoint restores besides the engine's shards and the generators (srpo_state.json).

    ``step`` is the number of optimizer steps done, which is also the data position (a row's
    content is a function of its sample index) and the lr schedule's position; ``gold`` is the
    gold reward's best / patience / history.
    """

    step: int = 0
    gold: dict[str, Any] | None = None
    control_word_phase: dict[str, Any] | None = field(default=None, compare=False)

    def to_json(self, cfg: Config, world_size: int) -> dict[str, Any]:
        pos, neg = control_words(self.step, tuple(cfg.srpo.positive_words), tuple(cfg.srpo.negative_words))
        gb = cfg.train.batch_size * world_size
        return {
            "step": self.step,  # optimizer steps done = the next step to run
            "model_path": cfg.model.path,
            "control_word_phase": {"positive": pos, "negative": neg,
                                   "positive_index": self.step % len(cfg.srpo.positive_words),
                                   "negative_index": self.step % len(cfg.srpo.negative_words)},
            "lr_schedule": {"kind": "linear_warmup_constant", "lr": cfg.optim.lr,
                            "warmup_steps": cfg.optim.warmup_steps,
                            "next_lr": lr_at(self.step, cfg.optim.lr, cfg.optim.warmup_steps)},
            "data": {"next_step": self.step, "next_sample_index": self.step * gb, "global_batch": gb,
                     "mode": cfg.rollout.mode},
            "gold": self.gold,
            "seed": cfg.seed,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "TrainingState":
        return cls(step=int(data["step"]), gold=data.get("gold"), control_word_phase=data.get("control_word_phase"))

    def check_phase(self, cfg: Config) -> None:
        """The control words of the next step must be the ones the checkpoint recorded: a changed word
        list would silently change the SRP objective of a resumed run."""
        phase = self.control_word_phase
        if phase is None:
            return
        pos, neg = control_words(self.step, tuple(cfg.srpo.positive_words), tuple(cfg.srpo.negative_words))
        if (pos, neg) != (phase["positive"], phase["negative"]):
            raise ValueError(f"srpo.positive_words / srpo.negative_words: the checkpoint's next control words are "
                             f"{phase['positive']!r} / {phase['negative']!r}, the config gives {pos!r} / {neg!r}; "
                             "resume with the word lists the run started with")


# ------------------------------------------------------------------------------------------ local sink


class LocalCheckpoints:
    """Checkpoints of a single-process learner in ``<output.dir>/checkpoints``.

    The same folder layout as a Ray Train checkpoint. A checkpoint is written into a hidden
    temporary folder and renamed into place, so a crash leaves the previous one intact; the newest
    ``keep`` complete checkpoints are kept.
    """

    def __init__(self, root: str | Path, keep: int) -> None:
        self.root, self.keep = Path(root), keep

    @contextmanager
    def latest(self) -> Iterator[Path | None]:
        yield latest_checkpoint(self.root) if self.root.is_dir() else None

    def save(self, step: int, write, metrics: dict[str, float]) -> None:
        """``write(folder)`` writes this rank's part; ``metrics`` are not needed here (MLflow has them)."""
        final = self.root / f"checkpoint_{step:06d}"
        tmp = self.root / f".tmp-checkpoint_{step:06d}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        write(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in find_checkpoints(self.root)[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)

    def report(self, metrics: dict[str, float]) -> None:
        pass


def run_done_steps(run_dir: str | Path, run: dict[str, Any]) -> int:
    """Steps an earlier run in ``run_dir`` has checkpointed (0 when none): Ray Train's snapshot for a
    Ray run, the newest local checkpoint for a single-process run."""
    if run.get("ray_run_name"):
        return ray_snapshot_step(Path(run_dir) / "ray", run["ray_run_name"])
    ckpt = latest_checkpoint(Path(run_dir) / "checkpoints") if (Path(run_dir) / "checkpoints").is_dir() else None
    return int(read_state(ckpt)["step"]) if ckpt is not None else 0
