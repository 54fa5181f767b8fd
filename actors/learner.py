"""The Ray Train worker function: the core Learner (pipeline/learner.py) with Ray's pieces plugged in.

    source       this worker's Ray Data shard (get_dataset_shard("train"))
    engine       learner.strategy (FSDP2 / DeepSpeed) on Ray Train's process group
    checkpoints  ray.train.report (+ a checkpoint every train.checkpoint_every steps), restore by get_checkpoint
    objective    per training reward: its actor pool (remote), Serve deployment (serve) or model (colocated)
    weight sync  the WeightStore + object-store or broadcast publisher (rollout.placement=actors)
"""
from __future__ import annotations

import logging
import os
import signal
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import ray.train
import torch
from ray.train.v2.api.report_config import CheckpointConsistencyMode

from actors.reward import RemoteReward
from actors.reward_serve import ServeReward
from actors.weights import LearnerWeightSync
from pipeline.config import Config, config_from_dict, reward_entries
from pipeline.device import resolve_device
from pipeline.learner import build_learner
from pipeline.models import load_adapter
from pipeline.objective import ColocatedReward, RewardObjective, combine, reward_model_from_config
from pipeline.tracking import MLflowRun


class RayShardSource:
    """This worker's shard of the Ray Data stream (built from the restored step by the driver)."""

    def __init__(self, batch_size: int) -> None:
        self.shard, self.batch_size = ray.train.get_dataset_shard("train"), batch_size

    def batches(self, start_step: int) -> Iterator[dict]:
        # prefetch_batches=0: prefetching would hold step v until step v+1's rollout exists, which with
        # max_staleness=0 waits for version v+1, which waits for step v: a deadlock.
        return self.shard.iter_batches(batch_size=self.batch_size, drop_last=True, batch_format="numpy",
                                       prefetch_batches=0)


class RayTrainCheckpoints:
    """Checkpoints through Ray Train: each rank reports its part; Ray Train merges the parts into one
    checkpoint in the run's storage, registers it once every rank has reported, prunes old ones
    (RunConfig.checkpoint_config), and hands it back after a restart (``get_checkpoint``)."""

    @contextmanager
    def latest(self) -> Iterator[Path | None]:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as folder:
            yield Path(folder)

    def save(self, step: int, write: Callable[[Path], None], metrics: dict[str, float]) -> None:
        with tempfile.TemporaryDirectory(prefix="srpo-ckpt-") as tmp:
            write(Path(tmp))
            # Ray Train logs every report's metrics; MLflow holds them all, the report needs only the step.
            ray.train.report({"step": float(step), "loss": float(metrics.get("loss", float("nan")))},
                             checkpoint=ray.train.Checkpoint.from_directory(tmp))
        # Wait until Ray Train has committed it (every rank's part uploaded and registered): a group that
        # crashes right after reporting would otherwise restart from the checkpoint before, or from scratch.
        ray.train.get_all_reported_checkpoints(consistency_mode=CheckpointConsistencyMode.COMMITTED)

    def report(self, metrics: dict[str, float]) -> None:
        # Metrics live in MLflow; a report without a checkpoint only costs a round trip to the controller.
        pass


def fault_hook(fault: dict[str, str], rank: int) -> Callable[[int], None] | None:
    """Fault injection for the recovery tests (the driver copies SRPO_FAULT_* from its environment):

    - SRPO_FAULT_KILL_AT_STEP=k kills learner rank SRPO_FAULT_RANK (default 1) with SIGKILL when it
      reaches step k, once: the marker file SRPO_FAULT_MARKER records that it fired, so the restarted
      group runs through;
    - SRPO_FAULT_HOLD_AT_STEPS=k1,k2 with SRPO_FAULT_HOLD_FILE=path holds rank 0 before each of those
      steps: it writes ``path.<k>.waiting.<pid>`` and waits (at most 10 minutes) until ``path.<k>``
      exists. A test uses the pause to change the reward deployment (scale down, kill a replica)
      between two steps of a run."""
    kill, hold = _kill_hook(fault, rank), _hold_hook(fault, rank)
    if kill is None or hold is None:
        return kill or hold

    def both(step: int) -> None:
        hold(step)
        kill(step)

    return both


def _kill_hook(fault: dict[str, str], rank: int) -> Callable[[int], None] | None:
    at = fault.get("SRPO_FAULT_KILL_AT_STEP")
    if at is None or rank != int(fault.get("SRPO_FAULT_RANK", "1")):
        return None
    marker = fault.get("SRPO_FAULT_MARKER", "")

    def maybe_kill(step: int) -> None:
        if step != int(at) or (marker and os.path.exists(marker)):
            return
        if marker:
            open(marker, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)

    return maybe_kill


def _hold_hook(fault: dict[str, str], rank: int) -> Callable[[int], None] | None:
    steps, path = fault.get("SRPO_FAULT_HOLD_AT_STEPS", ""), fault.get("SRPO_FAULT_HOLD_FILE", "")
    if not steps or not path or rank != 0:
        return None
    at = {int(s) for s in steps.split(",")}

    def maybe_hold(step: int) -> None:
        if step not in at:
            return
        open(f"{path}.{step}.waiting.{os.getpid()}", "w").close()
        deadline = time.monotonic() + 600
        while not os.path.exists(f"{path}.{step}") and time.monotonic() < deadline:
            time.sleep(0.05)

    return maybe_hold


def reward_objective(cfg: Config, workers: list[Any], device: torch.device) -> RewardObjective | None:
    """The learner's reward objective from the driver's reward workers (one per training reward: None,
    actor handles or a Serve application name). None when every reward is colocated: build_learner
    then scores with the learner's own VAE. A colocated reward beside remote ones gets a VAE of its own."""
    entries = [r for _, r in reward_entries(cfg)]
    if all(r.placement == "colocated" for r in entries):
        return None
    vae = None
    objectives: list[Any] = []
    for r, w in zip(entries, workers):
        if r.placement == "remote":
            objectives.append(RemoteReward(w))
        elif r.placement == "serve":
            objectives.append(ServeReward.for_app(w, r))
        else:
            vae = vae or load_adapter(cfg.model.family, cfg.model.path, device, load_text_encoders=False,
                                      load_transformer=False)
            objectives.append(ColocatedReward(vae, reward_model_from_config(r, device), cfg.data.resolution,
                                              r.image_norm))
    return combine(entries, objectives)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    cfg = config_from_dict(config["cfg"])
    # Ray Train logs two INFO lines per checkpoint and rank; the step lines already say what happened.
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if cfg.learner.use_gpu else resolve_device("cpu")
    torch.set_num_threads(max(1, int(cfg.learner.num_cpus)))  # Ray caps workers at 1 thread otherwise
    tracker = None
    if rank == 0 and config.get("mlflow_run_id"):
        tracker = MLflowRun.attach(config["tracking_uri"], config["mlflow_run_id"])
    objective = reward_objective(cfg, config["reward_workers"], device)
    sync = LearnerWeightSync(cfg, config["store"], rank, device) if config.get("store") is not None else None
    learner = build_learner(cfg, RayShardSource(cfg.train.batch_size), RayTrainCheckpoints(), device=device,
                            rank=rank, world=world, strategy=cfg.learner.strategy, tracker=tracker,
                            objective=objective, weight_sync=sync,
                            before_step=fault_hook(config.get("fault", {}), rank))
    try:
        learner.run()
    finally:
        if tracker is not None:
            tracker.end()
