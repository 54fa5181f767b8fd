"""The learner: one SRPO training loop for every placement, engine and process layout.

    source.batches(step) --inputs--> x0, eps, cond, levels m    (rollout actors / real images give x0;
           |                                                    otherwise the colocated rollout here)
           --train_step--> SRPOStep.run: both branches, reward objective, engine backward, clip, AdamW
           --publish-----> newest weights to the rollout actors (version = step + 1), when there are any
           --log---------> metrics reduced over ranks; rank 0: MLflow + one progress line
           --checkpoint--> every train.checkpoint_every steps and at the end, through the checkpoint sink
           --evaluate----> gold reward every eval.every steps (best weights, patience)
           --stop--------> max_steps, or early stop by the gold reward

Everything process-specific is passed in: the source (in-process rows or a Ray Data shard), the
engine (single / FSDP2 / DeepSpeed), the checkpoint sink (a local folder or Ray Train), the
tracker (MLflow on rank 0), the weight sync (rollout actors only) and the reward objective
(colocated or remote). ``learner.num_workers=0`` runs this class in the driver process; a Ray Train
worker (actors/learner.py) builds the same class with a Ray Data source. No Ray import here.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Protocol

import numpy as np
import torch
import torch.distributed as dist

from pipeline.checkpoint import TrainingState, load_training_checkpoint, save_training_checkpoint
from pipeline.config import Config
from pipeline.export import save_state_dict
from pipeline.gold import GoldReward
from pipeline.lora import LORA_DIR, LoraSpec, add_lora, adapter_state_dict, record_of, save_lora_folder
from pipeline.models import load_adapter
from pipeline.objective import RewardObjective, colocated_reward
from pipeline.parallel import build_engine
from pipeline.reuse import RolloutBuffer, reuse_seed
from pipeline.rollout import rollout_model, rollout_precision, sample_x0
from pipeline.schedules import lr_at
from pipeline.sources import Batch, BatchSource, draw_eps
from pipeline.srpo_step import SRPOStep, StepBatch
from pipeline.storage import RunStorage
from pipeline.tracking import NullTracker

EXPORT_NAME = "transformer/diffusion_pytorch_model.safetensors"
# One line per step. Inside a Ray Train worker it goes through Train's own console handler (Train
# redirects print() to its logger as well, and prints twice when another library wraps stdout);
# the entry points give it a console handler in the driver process (pipeline.runs.console_logging).
log = logging.getLogger("srpo")


class CheckpointSink(Protocol):
    """Where checkpoints go: a local folder (single process) or Ray Train (``ray.train.report``)."""

    def latest(self): ...  # context manager -> folder of the checkpoint to restore, or None

    def save(self, step: int, write: Callable[[Path], None], metrics: dict[str, float]) -> None: ...

    def report(self, metrics: dict[str, float]) -> None: ...


class WeightSync(Protocol):
    """Publishes the learner's weights to rollout actors (rank 0 acts; other ranks' calls do nothing)."""

    def open(self, state: dict[str, torch.Tensor], version: int) -> None: ...

    def publish(self, version: int, state: dict[str, torch.Tensor]) -> dict[str, float]: ...

    def close(self) -> None: ...


@dataclass
class StepInputs:
    batch: StepBatch
    levels: list[list[int]]
    lag: list[int]
    timings: dict[str, float]


class Learner:
    def __init__(self, cfg: Config, adapter, engine, objective: RewardObjective, source: BatchSource,
                 checkpoints: CheckpointSink, *, rank: int = 0, world: int = 1, device: torch.device,
                 tracker=None, weight_sync: WeightSync | None = None,
                 before_step: Callable[[int], None] | None = None) -> None:
        self.cfg, self.adapter, self.engine, self.objective = cfg, adapter, engine, objective
        self.source, self.checkpoints = source, checkpoints
        self.rank, self.world, self.device = rank, world, device
        self.tracker = tracker if tracker is not None else NullTracker()
        self.weight_sync, self.before_step = weight_sync, before_step
        self.srpo = SRPOStep.from_config(cfg, adapter, engine, objective)
        self.lora = LoraSpec.from_config(cfg)  # None: full fine-tuning
        self.gold: GoldReward | None = None
        self.skipped_rows = 0
        self.provenance: dict[int, set[int]] = {}  # step -> pids of the rollout actors that made its samples
        self.buffer = RolloutBuffer(cfg.rollout.reuse)  # rollout.reuse > 1: the generation being reused
        self._rollout_model: torch.nn.Module | None = None  # the colocated rollout's (rollout.compile)

    # ------------------------------------------------------------------ the loop
    def run(self) -> TrainingState:
        state = self.restore()
        self.gold = GoldReward.create(self.cfg, self.adapter, self.device, self.rank, self.world, state.gold)
        if self.weight_sync is not None:
            self.weight_sync.open(self.policy_state(), state.step)
        start, t_ready = time.perf_counter(), time.perf_counter()
        first = state.step
        stopped = False
        for batch in self.step_batches(state):
            metrics = self.one_step(batch, state, time.perf_counter() - t_ready)
            metrics["samples_per_s"] = (state.step - first) * self.cfg.train.batch_size * self.world / \
                (time.perf_counter() - start)
            stopped = self.stop()
            self.log(metrics, state.step - 1, start, first)
            self.checkpoint(state, metrics, last=stopped or state.step == self.cfg.train.max_steps)
            t_ready = time.perf_counter()
            if stopped:
                break
        return self.finish(state, stopped)

    def step_batches(self, state: TrainingState) -> Iterator[Batch | None]:
        """One item per optimizer step: a new generation's batch, or None while the rollout buffer's
        generation has uses left (rollout.reuse; a restored checkpoint may start inside one)."""
        while state.step < self.cfg.train.max_steps and self.buffer.use_at(state.step) is not None:
            yield None
        # Pull one batch at a time: a source that reads ahead would hold step v until step v+1's
        # rollout exists, which under max_staleness=0 waits for version v+1, i.e. for step v.
        for batch in self.source.batches(state.step):
            if state.step >= self.cfg.train.max_steps:
                return
            if not self._is_current(batch, state.step):
                continue
            yield batch
            while state.step < self.cfg.train.max_steps and self.buffer.use_at(state.step) is not None:
                yield None

    def one_step(self, batch: Batch | None, state: TrainingState, wait_s: float) -> dict[str, float]:
        t0 = time.perf_counter()
        step = state.step
        if self.before_step is not None:
            self.before_step(step)
        inputs = self.inputs(batch, step) if batch is not None else self.reused_inputs(step)
        inputs.timings["time/rollout_wait_s"] = wait_s
        metrics = self.train_step(inputs, step)
        sync = self.publish(step)
        metrics = self.reduce(metrics, inputs.lag)
        metrics.update(sync)
        metrics.update(self.evaluate(step))
        state.step = step + 1
        state.gold = self.gold.state() if self.gold is not None else None
        metrics["time/step_wall_s"] = time.perf_counter() - t0
        if self.skipped_rows:
            metrics["data/resume_skipped_rows"] = float(self.skipped_rows)
        self._last_inputs = inputs
        return metrics

    # ------------------------------------------------------------------ stages
    def restore(self) -> TrainingState:
        """The checkpoint the sink hands back (a restart, or ``srpo train --resume``), or a fresh state."""
        with self.checkpoints.latest() as folder:
            if folder is None:
                return TrainingState()
            data = load_training_checkpoint(folder, self.engine, self.engine.name, self.rank, self.world, None,
                                            lora=record_of(self.cfg))
            self.buffer.load(folder, self.rank, self.device)
        state = TrainingState.from_json(data)
        state.check_phase(self.cfg)
        if self.rank == 0:
            log.info(f"[srpo] resumed from {folder} at step {state.step}")
        return state

    def inputs(self, batch: Batch, step: int) -> StepInputs:
        """x0 and eps from the batch (rollout actors, real images) or the colocated rollout here."""
        cfg, device = self.cfg, self.device
        captions = [str(c) for c in batch["caption"]]
        cond = self.adapter.conditioning_from_arrays(batch, device)
        levels = self.srpo.sample_levels([int(s) for s in batch["level_seed"]])
        if "x0" in batch:
            # Copies, not views: aligned like every tensor the learner makes (see conditioning_from_arrays).
            x0 = torch.tensor(np.asarray(batch["x0"]), dtype=torch.float32, device=device)
            eps = torch.tensor(np.asarray(batch["eps"]), dtype=torch.float32, device=device)
            if "rollout_pid" in batch:
                self.provenance.setdefault(step, set()).update(int(p) for p in batch["rollout_pid"])
            versions = batch.get("policy_version")
            lag = [step - int(v) for v in versions] if versions is not None else [0] * len(captions)
            timings = {"time/rollout_s": float(np.mean(batch["rollout_s"]))}
            if "image_skipped" in batch:  # files that broke after the scan, replaced in the encode stage
                timings["data/skipped_at_encode"] = float(np.sum(batch["image_skipped"]))
            if "weight_sync_s" in batch:
                timings["time/weight_sync_s"] = float(np.mean(batch["weight_sync_s"]))
        else:
            eps = draw_eps(self.adapter, [int(s) for s in batch["noise_seed"]], cfg.data.resolution).to(device)
            t0 = time.perf_counter()
            x0 = self.rollout(eps, cond)
            lag, timings = [0] * len(captions), {"time/rollout_s": time.perf_counter() - t0}
        self.buffer.fill(step, batch, x0, eps, lag)
        timings["rollout/use"] = 1.0
        return StepInputs(StepBatch(x0=x0, eps=eps, cond=cond, captions=captions), levels, lag, timings)

    def reused_inputs(self, step: int) -> StepInputs:
        """Use u > 0 of the buffer's generation: its x0, conditioning and captions, fresh noise eps and
        fresh levels m (pipeline/reuse.py); its age grows by one policy version per use."""
        g, u = self.buffer.current, self.buffer.use_at(step)
        seeds = [int(s) for s in g.batch["noise_seed"]]
        eps = draw_eps(self.adapter, [reuse_seed(s, u) for s in seeds], self.cfg.data.resolution).to(self.device)
        levels = self.srpo.sample_levels([reuse_seed(int(s), u) for s in g.batch["level_seed"]])
        cond = self.adapter.conditioning_from_arrays(g.batch, self.device)
        captions = [str(c) for c in g.batch["caption"]]
        timings = {"time/rollout_s": 0.0, "rollout/use": float(u + 1)}
        return StepInputs(StepBatch(x0=g.x0, eps=eps, cond=cond, captions=captions), levels,
                          [lag + u for lag in g.lag], timings)

    @torch.no_grad()
    def rollout(self, eps: torch.Tensor, cond) -> torch.Tensor:
        """The colocated rollout with the learner's own (possibly sharded) model; a sharded engine
        gathers its parameters once for the whole rollout, not once per denoising step."""
        cfg, model = self.cfg, self.engine.transformer
        if self._rollout_model is None:
            self._rollout_model = rollout_model(cfg, model)
        model.eval()
        with self.engine.gathered_for_inference():
            x0 = sample_x0(self.adapter, self._rollout_model, eps, cond, cfg.data.resolution, cfg.rollout.steps,
                           cfg.rollout.shift, cfg.rollout.guidance, rollout_precision(cfg))
        model.train()
        return x0

    def train_step(self, inputs: StepInputs, step: int) -> dict[str, float]:
        cfg = self.cfg
        lr = lr_at(step, cfg.optim.lr, cfg.optim.warmup_steps)
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        self.objective.reset_timers()
        t1 = time.perf_counter()
        m = self.srpo.run(inputs.batch, step, inputs.levels)
        t2 = time.perf_counter()
        flat = m.flat()
        flat.update(inputs.timings)
        flat.update({"time/learner_s": t2 - t1, "time/reward_wait_s": float(self.objective.reward_wait_s),
                     "lr": lr})
        # Anchor quality as the reward sees it (reward actors when remote), at the mid-grid k.
        grid, b = self.srpo.grid, inputs.batch
        scored = self.objective.score_many(b.x0, b.captions, m.pos_word, m.neg_word,
                                           float(grid.d_pos[grid.N // 2]), form=cfg.srpo.srp_form)
        flat.update({f"rollout/{k}": v for k, v in scored.items()})
        flat.update(self.objective.step_metrics())  # several rewards: reward/<name>/...
        return flat

    def publish(self, step: int) -> dict[str, float]:
        """Rollout actors only: the new weights as version step + 1 (a collective on sharded engines)."""
        if self.weight_sync is None:
            return {}
        sync = self.weight_sync.publish(step + 1, self.policy_state())
        out = {}
        if sync:  # rank 0 alone publishes
            out["time/weight_publish_s"] = sync["weight_sync/publish_s"]
            out["weight_sync/bytes"] = sync["weight_sync/bytes"]
            if "weight_sync/broadcast_s" in sync:  # the previous version's broadcast (sender thread)
                out["time/weight_broadcast_s"] = sync["weight_sync/broadcast_s"]
        return out

    def policy_state(self) -> dict[str, torch.Tensor]:
        """Collective: what rollout actors receive (rank 0's copy; {} elsewhere). Full fine-tuning: the
        whole model; LoRA: the adapters alone, in peft's keys (the actors hold the same base)."""
        if self.lora is None:
            return self.engine.full_state_dict()
        return adapter_state_dict(self.engine.module, self.engine.trainable_state_dict())

    def reduce(self, flat: dict[str, float], lag: list[int]) -> dict[str, float]:
        """Batch-level numbers: the mean over ranks (one all_reduce), the max for the policy lag;
        grad_norm and lr are the same on every rank already."""
        per_rank = {k: v for k, v in flat.items() if k not in ("grad_norm", "lr")}
        per_rank["policy_lag/mean"] = float(np.mean(lag))
        out = _all_reduce(per_rank, self.device, dist.ReduceOp.SUM if _distributed() else None, self.world)
        out["policy_lag/max"] = _all_reduce({"x": float(max(lag))}, self.device, dist.ReduceOp.MAX, 1)["x"] \
            if _distributed() else float(max(lag))
        out["grad_norm"], out["lr"] = flat["grad_norm"], flat["lr"]
        return out

    def evaluate(self, step: int) -> dict[str, float]:
        if self.gold is None or not self.gold.due(step):
            return {}
        metrics = self.gold.evaluate(self.adapter, self.engine, step, self.cfg)
        if self.rank == 0 and self.cfg.log.image_every:
            self.log_heldout_images(step)
        return metrics

    def stop(self) -> bool:
        """Early stop: the gold reward did not improve for eval.patience evaluations."""
        return self.gold is not None and self.gold.should_stop()

    def log(self, flat: dict[str, float], step: int, start: float, first: int) -> None:
        cfg = self.cfg
        if self.rank != 0:
            return
        if step % cfg.log.every == 0 or step + 1 == cfg.train.max_steps:
            self.tracker.log_metrics(flat, step=step)
            if cfg.log.image_every and step % cfg.log.image_every == 0:
                self.log_image_grid(self._last_inputs.batch, step)
        done = step + 1 - first
        eta = (time.perf_counter() - start) / done * (cfg.train.max_steps - step - 1)
        log.info(f"[srpo] step {step + 1}/{cfg.train.max_steps} loss {flat['loss']:.4f} "
                 f"reward(denoise) {flat.get('denoise/reward', float('nan')):.4f} "
                 f"lag {flat['policy_lag/max']:.0f} {flat['time/step_wall_s']:.1f}s/step eta {eta:.0f}s")

    def checkpoint(self, state: TrainingState, flat: dict[str, float], last: bool) -> None:
        every = self.cfg.train.checkpoint_every
        if not (last or (every and state.step % every == 0)):
            self.checkpoints.report(flat)
            return
        payload = state.to_json(self.cfg, self.world) if self.rank == 0 else None

        def write(folder: Path) -> None:
            save_training_checkpoint(folder, self.engine, self.engine.name, self.rank, self.world, None, payload,
                                     extra=lambda f: self.buffer.save(f, self.rank, state.step))

        self.checkpoints.save(state.step, write, flat)

    def finish(self, state: TrainingState, stopped: bool) -> TrainingState:
        cfg = self.cfg
        if self.weight_sync is not None:
            self.weight_sync.close()
        if stopped and self.rank == 0:
            log.info(f"[srpo] early stop after step {state.step}: gold reward did not improve for "
                     f"{cfg.eval.patience} evaluations (best {self.gold.best:.4f} at step {self.gold.best_step})")
            self.tracker.set_tag("srpo.early_stopped_at_step", str(state.step))
        if state.step < cfg.train.max_steps and not stopped:
            raise RuntimeError(f"the data stream ended at step {state.step} of {cfg.train.max_steps}")
        weights = self.engine.full_state_dict()  # collective; LoRA: merged into the base
        adapter = self.policy_state() if self.lora is not None else None  # collective
        provenance = self._gathered_provenance()  # collective
        if self.rank == 0:
            storage = RunStorage(cfg.output.dir)  # a folder, or a URI: written locally, then uploaded
            save_state_dict(weights, storage.path(EXPORT_NAME), step=state.step)
            storage.upload(EXPORT_NAME)
            if adapter is not None:
                save_lora_folder(self.adapter, adapter, self.lora, storage.path(LORA_DIR))
                storage.upload(LORA_DIR)
            if provenance:
                self.tracker.log_dict(provenance, "rollouts/provenance.json")
        return state

    def _gathered_provenance(self) -> dict[str, list[int]]:
        """Which rollout-actor processes made each step's samples, over every rank (since this
        learner process started): for following a restarted actor's work."""
        parts = [self.provenance]
        if _distributed():
            parts = [None] * self.world
            dist.all_gather_object(parts, self.provenance)
        merged: dict[int, set[int]] = {}
        for part in parts:
            for step, pids in part.items():
                merged.setdefault(step, set()).update(pids)
        return {str(step): sorted(pids) for step, pids in sorted(merged.items())}

    # ------------------------------------------------------------------ helpers
    def _is_current(self, batch: Batch, step: int) -> bool:
        """Rows of earlier steps (a stream started before the restored checkpoint) are skipped and
        counted; any other mismatch is a data-position error."""
        steps = [int(x) for x in batch["step"]]
        if steps[0] < step:
            self.skipped_rows += len(steps)
            return False
        if min(steps) != step or max(steps) != step:
            raise RuntimeError(f"data position: rank {self.rank} expected the samples of step {step}, got steps "
                               f"{sorted(set(steps))}")
        return True

    @torch.no_grad()
    def log_image_grid(self, batch: StepBatch, step: int) -> None:
        """Rollout images of this rank's batch as one grid under the key ``rollouts`` at ``step``
        (MLflow's step slider), prompts printed under it and kept as ``rollouts/step_<step>.txt``."""
        from torchvision.utils import make_grid  # torchvision imports torch._dynamo: seconds per Ray worker, here only

        images = self.adapter.decode(batch.x0, self.cfg.data.resolution)
        grid = make_grid(images.float().cpu(), nrow=min(4, len(batch.captions)), padding=2)
        self.tracker.log_step_image(_to_uint8(grid), "rollouts", step, batch.captions)
        self.tracker.log_text("\n".join(batch.captions), f"rollouts/step_{step:05d}.txt")

    def log_heldout_images(self, step: int) -> None:
        """The gold evaluation's first held-out images (fixed prompts and seeds: the same picture at
        every evaluation and in every run) under ``heldout/<prompt index>``: what ``srpo compare`` lines up."""
        for i, image in enumerate(self.gold.first_images):
            self.tracker.log_step_image(_to_uint8(image), f"heldout/{i:04d}", step, [self.gold.captions[i]])


def _to_uint8(image: torch.Tensor) -> np.ndarray:
    """[3, H, W] in [0, 1] -> HWC uint8."""
    return (image.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype("uint8")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce(values: dict[str, float], device: torch.device, op, divide_by: int) -> dict[str, float]:
    """One all_reduce of a dict of scalars (the same keys on every rank), divided by ``divide_by``."""
    if op is None:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=op)
    return dict(zip(keys, (t / divide_by).tolist()))


def build_learner(cfg: Config, source: BatchSource, checkpoints: CheckpointSink, *, device: torch.device,
                  rank: int = 0, world: int = 1, strategy: str = "single", tracker=None,
                  objective: RewardObjective | None = None, weight_sync: WeightSync | None = None,
                  before_step: Callable[[int], None] | None = None) -> Learner:
    """The components of a learner, built once from the config (the same for every process layout)."""
    torch.manual_seed(cfg.seed)
    adapter = load_adapter(cfg.model.family, cfg.model.path, device, cfg.model.max_sequence_length,
                           load_text_encoders=False)
    lora = LoraSpec.from_config(cfg)
    if lora is not None:  # peft adapters on the base, which freezes; the engine trains what is left trainable
        add_lora(adapter.transformer, lora, adapter, seed=cfg.seed)
    engine = build_engine(strategy, adapter.transformer, cfg.optim, device, cfg.train.mixed_precision,
                          cfg.model.activation_checkpointing, cfg.learner.zero_stage,
                          shard_blocks=adapter.shard_blocks(adapter.transformer),
                          keep_gathered=cfg.learner.fsdp_keep_gathered)
    if objective is None:
        objective = colocated_reward(cfg, adapter, device)
    return Learner(cfg, adapter, engine, objective, source, checkpoints, rank=rank, world=world, device=device,
                   tracker=tracker, weight_sync=weight_sync, before_step=before_step)

