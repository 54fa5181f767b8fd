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
                                  data position, gold-reward state, LoRA settings (see ``TrainingState``)
    model_optim/                  torch.distributed.checkpoint of {"model": ..., "optim": ...}
                                  (strategies single and fsdp2; plain diffusers parameter names; a LoRA
                                  run: the adapters and their AdamW state alone, peft's module names)
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
from typing import Any, Callable, Iterator

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from pipeline.config import Config, ConfigError
from pipeline.lora import record_of
from pipeline.schedules import lr_at
from pipeline.storage import RunStorage, read_text
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
    """``run.json`` of a run folder (a path or a URI); raises FileNotFoundError naming what was expected."""
    location = f"{str(run_dir).rstrip('/')}/{RUN_FILE}"
    try:
        return json.loads(read_text(location))
    except FileNotFoundError:
        raise FileNotFoundError(f"{location}: missing; expected a run folder written by `srpo train` "
                                "(its output.dir, with run.json and config.yaml)") from None


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
                             level_generator, state: dict[str, Any] | None,
                             extra: Callable[[Path], None] | None = None) -> None:
    """Collective: this rank's part of a checkpoint into ``folder`` (see the module docstring).

    ``state`` is the run state rank 0 writes as srpo_state.json (other ranks pass None); ``extra``
    writes this rank's other files (the rollout buffer). The manifest is written last, after every
    other file of this rank is complete on disk.
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
    if extra is not None:
        extra(folder)
    write_manifest(folder, rank)


def load_training_checkpoint(folder: str | Path, engine, strategy: str, rank: int, world_size: int,
                             level_generator, lora: dict[str, Any] | None = None) -> dict[str, Any]:
    """Collective: restore model, optimizer and this rank's generators; returns srpo_state.json.

    The world size and strategy must match the checkpoint's: the per-rank generator streams (the
    levels m each rank draws) are only defined for the same ranks. So must the LoRA settings
    (``lora``: :func:`pipeline.lora.record_of` the config, None for full fine-tuning): the model
    entries are the adapters of those settings, or the whole model.
    """
    state = read_state(folder)
    check_lora_record(state.get("lora"), lora, folder)
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


def _describe_lora(record: dict[str, Any] | None) -> str:
    if not record:
        return "full fine-tuning (lora.rank=0)"
    targets = record["target_modules"] or "the model family's default"
    return (f"LoRA lora.rank={record['rank']} lora.alpha={record['alpha']} lora.dropout={record['dropout']} "
            f"lora.target_modules={targets}")


def check_lora_record(recorded: dict[str, Any] | None, expected: dict[str, Any] | None, where: str | Path) -> None:
    """ConfigError when a checkpoint's LoRA settings (srpo_state.json) differ from the config's."""
    if (recorded or None) != (expected or None):
        raise ConfigError(f"lora: the checkpoint in {where} was trained with {_describe_lora(recorded)}, the config "
                          f"gives {_describe_lora(expected)}; resume with the settings the run started with")


def run_checkpoint_state(run_dir: str | Path, run: dict[str, Any]) -> dict[str, Any] | None:
    """srpo_state.json of the checkpoint a ``--resume`` of ``run_dir`` restores (None when there is
    none), read without downloading the checkpoint: Ray Train's snapshot names it for a Ray run; a
    single-process run's newest checkpoint whose state file exists (written, and uploaded, last)."""
    root = str(run_dir).rstrip("/")
    if run.get("ray_run_name"):
        name = ray_snapshot_checkpoint(f"{root}/ray", run["ray_run_name"])
        names = [f"ray/{run['ray_run_name']}/{name}"] if name else []
    else:
        storage, sub = RunStorage(run_dir), LocalCheckpoints.SUB
        if storage.remote:
            names = [f"{sub}/{n}" for n in reversed(storage.listdir(sub)) if n.startswith("checkpoint_")]
        else:
            found = latest_checkpoint(storage.path(sub)) if storage.path(sub).is_dir() else None
            names = [f"{sub}/{found.name}"] if found is not None else []
    for rel in names:
        try:
            return json.loads(read_text(f"{root}/{rel}/{STATE_FILE}"))
        except (OSError, ValueError):
            continue
    return None


def check_resume_settings(cfg: Config, run_dir: str | Path, run: dict[str, Any]) -> None:
    """``--resume``: refuse other LoRA settings or another rollout.reuse than the checkpoint's, before
    any training work (another R would shift which rows serve which steps)."""
    state = run_checkpoint_state(run_dir, run)
    if state is None:
        return
    check_lora_record(state.get("lora"), record_of(cfg), run_dir)
    reuse = int(state.get("data", {}).get("rollout_reuse", 1))
    if reuse != cfg.rollout.reuse:
        raise ConfigError(f"rollout.reuse: the checkpoint in {run_dir} was written with reuse={reuse}, the config "
                          f"gives {cfg.rollout.reuse}; resume with the value the run started with")


def ray_snapshot_step(storage_path: str | Path, run_name: str) -> int:
    """The step of the checkpoint Ray Train will restore for ``run_name`` (0 when none).

    Read from Ray Train's checkpoint-manager snapshot (written when a checkpoint is registered),
    which is what ``ray.train.get_checkpoint()`` returns after a restart; ``storage_path`` is a
    folder or a URI. The snapshot's format is Ray's: if it cannot be read, 0 is returned and the
    learner skips the rows it has already trained on instead (correct, only slower).
    """
    run_root = f"{str(storage_path).rstrip('/')}/{run_name}"
    try:
        name = ray_snapshot_checkpoint(storage_path, run_name)
        return int(json.loads(read_text(f"{run_root}/{name}/{STATE_FILE}"))["step"]) if name else 0
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def ray_snapshot_checkpoint(storage_path: str | Path, run_name: str) -> str | None:
    """The folder name (``checkpoint_...``) of the checkpoint Ray Train will restore, None when none."""
    try:
        data = json.loads(read_text(f"{str(storage_path).rstrip('/')}/{run_name}/checkpoint_manager_snapshot.json"))
        if isinstance(data, str):  # pydantic .json() nested as a string
            data = json.loads(data)
        return str(data["latest_checkpoint_result"]["checkpoint_dir_name"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


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
    reuse: int = field(default=1, compare=False)  # rollout.reuse the checkpoint was written with

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
            # rollout.reuse = R: samples come in generations of one step's rows, each serving R steps;
            # the next sample is the first of the next generation (a begun one is in rollout_buffer/).
            "data": {"next_step": self.step, "next_sample_index": -(-self.step // cfg.rollout.reuse) * gb,
                     "global_batch": gb, "mode": cfg.rollout.mode, "rollout_reuse": cfg.rollout.reuse},
            "gold": self.gold,
            "seed": cfg.seed,
            "lora": record_of(cfg),  # None: full fine-tuning
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "TrainingState":
        return cls(step=int(data["step"]), gold=data.get("gold"), control_word_phase=data.get("control_word_phase"),
                   reuse=int(data.get("data", {}).get("rollout_reuse", 1)))

    def check_phase(self, cfg: Config) -> None:
        """The control words of the next step must be the ones the checkpoint recorded: a changed word
        list would silently change the SRP objective of a resumed run."""
        if self.reuse != cfg.rollout.reuse:  # the generations (which rows serve which steps) would shift
            raise ValueError(f"rollout.reuse: the checkpoint was written with reuse={self.reuse}, resumed with "
                             f"{cfg.rollout.reuse}; resume with the value the run started with")
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
    ``keep`` complete checkpoints are kept. With a remote ``output.dir`` (:meth:`on` a URI's
    storage) each checkpoint is then uploaded, its state file last, and ``latest`` downloads the
    newest complete one.
    """

    SUB = "checkpoints"

    def __init__(self, root: str | Path, keep: int, storage: RunStorage | None = None) -> None:
        self.root, self.keep, self.storage = Path(root), keep, storage

    @classmethod
    def on(cls, storage: RunStorage, keep: int) -> "LocalCheckpoints":
        return cls(storage.path(cls.SUB), keep, storage if storage.remote else None)

    @contextmanager
    def latest(self) -> Iterator[Path | None]:
        if self.storage is not None:
            yield self.fetch_latest()
        else:
            yield latest_checkpoint(self.root) if self.root.is_dir() else None

    def fetch_latest(self) -> Path | None:
        """The newest checkpoint in storage whose state file is there (uploaded last), downloaded."""
        for name in reversed(self.storage.listdir(self.SUB)):
            if name.startswith("checkpoint_"):
                local = self.storage.download(f"{self.SUB}/{name}")
                if local is not None and checkpoint_problem(local) is None:
                    return local
        return None

    def save(self, step: int, write, metrics: dict[str, float]) -> None:
        """``write(folder)`` writes this rank's part; ``metrics`` are not needed here (MLflow has them)."""
        final = self.root / f"checkpoint_{step:06d}"
        tmp = self.root / f".tmp-checkpoint_{step:06d}"
        if self.storage is not None:  # a step trained again after a resume: no stale files of the old copy
            self.storage.delete(f"{self.SUB}/{final.name}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        write(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        if self.storage is not None:
            self.storage.upload(f"{self.SUB}/{final.name}", last=STATE_FILE)
            kept = [n for n in self.storage.listdir(self.SUB) if n.startswith("checkpoint_")][-self.keep:]
            for name in self.storage.listdir(self.SUB):
                if name.startswith("checkpoint_") and name not in kept:
                    self.storage.delete(f"{self.SUB}/{name}")
        for old in find_checkpoints(self.root)[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)

    def report(self, metrics: dict[str, float]) -> None:
        pass

    def done_steps(self) -> int:
        with self.latest() as ckpt:
            return int(read_state(ckpt)["step"]) if ckpt is not None else 0


def run_done_steps(run_dir: str | Path, run: dict[str, Any]) -> int:
    """Steps an earlier run in ``run_dir`` (a folder or a URI) has checkpointed (0 when none): Ray
    Train's snapshot for a Ray run, the newest checkpoint for a single-process run."""
    if run.get("ray_run_name"):
        return ray_snapshot_step(f"{str(run_dir).rstrip('/')}/ray", run["ray_run_name"])
    return LocalCheckpoints.on(RunStorage(run_dir), keep=1).done_steps()
