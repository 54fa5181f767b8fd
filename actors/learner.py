"""The Ray Train learner: the SRPO step of pipeline/srpo_step.py inside a TorchTrainer worker.

Per step on every worker (ranks in lockstep; FSDP2/DeepSpeed collectives inside):
    next batch of the dataset shard  (text embeddings [+ x0, eps, policy_version from rollout actors])
    [colocated rollout: x0 = sample_x0(own sharded model, eps from the sample's noise seed)]
    srpo_backward(...) with the engine's backward ; engine.step(clip)          (the unchanged SRPO step)
    [rollout actors: publish the consolidated weights as version step + 1]
    rank 0: MLflow metrics (+ an image grid every log.image_every steps), ray.train.report
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch


def _reduce_mean(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Mean of per-rank scalars over all ranks (the batch-level number MLflow shows)."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))


def lr_at(step: int, lr: float, warmup_steps: int) -> float:
    """The learning rate of a step: linear warmup then constant (constant when warmup_steps = 0)."""
    return lr if warmup_steps <= 0 else lr * min(1.0, (step + 1) / warmup_steps)


def _maybe_inject_fault(step: int, rank: int, fault: dict[str, str]) -> None:
    """Fault injection for the recovery tests (the driver copies these from its environment):
    SRPO_FAULT_KILL_AT_STEP=k kills learner rank SRPO_FAULT_RANK (default 1) with SIGKILL when it
    reaches step k, once: the marker file SRPO_FAULT_MARKER records that it fired, so the
    restarted group runs through."""
    import os
    import signal

    at = fault.get("SRPO_FAULT_KILL_AT_STEP")
    if at is None or int(at) != step:
        return
    marker = fault.get("SRPO_FAULT_MARKER", "")
    if rank != int(fault.get("SRPO_FAULT_RANK", "1")) or (marker and os.path.exists(marker)):
        return
    if marker:
        open(marker, "w").close()
    os.kill(os.getpid(), signal.SIGKILL)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray
    import ray.train

    from actors.rollout import conditioning_from_batch, draw_eps
    from pipeline.checkpoint import load_training_checkpoint
    from pipeline.config import config_from_dict
    from pipeline.device import resolve_device
    from pipeline.gold import GoldReward
    from pipeline.models import load_adapter
    from pipeline.objective import ColocatedReward
    from pipeline.parallel import build_engine
    from pipeline.rollout import sample_x0
    from pipeline.srpo_step import StepBatch, grid_from_config, srpo_backward
    from pipeline.trainer import reward_model_from_config

    cfg = config_from_dict(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if cfg.learner.use_gpu else resolve_device("cpu")
    torch.manual_seed(cfg.seed)

    adapter = load_adapter(cfg.model.family, cfg.model.path, device, cfg.model.max_sequence_length,
                           load_text_encoders=False)
    engine = build_engine(cfg.learner.strategy, adapter.transformer, cfg.optim, device, cfg.train.mixed_precision,
                          cfg.model.activation_checkpointing, cfg.learner.zero_stage)
    if cfg.reward.placement == "remote":
        from actors.reward import RemoteReward

        objective = RemoteReward(config["reward_actors"])
    else:
        objective = ColocatedReward(adapter, reward_model_from_config(cfg, device), cfg.data.resolution)
    grid = grid_from_config(cfg.srpo, cfg.rollout.shift)
    level_generator = torch.Generator().manual_seed(cfg.seed * 7919 + rank)

    # Resume: Ray Train hands back the last registered checkpoint after a worker-group restart
    # (FailureConfig) or when a stopped run is started again under its name (`srpo train --resume`).
    start_step, run_state = 0, {}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            run_state = load_training_checkpoint(ckpt_dir, engine, cfg.learner.strategy, rank, world,
                                                 level_generator)
        start_step = int(run_state["step"])
        _check_phase(cfg, run_state, start_step)
        if rank == 0:
            print(f"[srpo] resumed from {checkpoint.path} at step {start_step}", flush=True)
    gold = GoldReward.create(cfg, adapter, device, rank, world, run_state.get("gold"))

    store = None
    publisher = None
    online_actors = cfg.rollout.mode == "online" and cfg.rollout.placement == "actors"
    if online_actors:
        from actors.weights import make_publisher

        store = config["store"]
        state = engine.full_state_dict()
        if rank == 0:
            # A new version sequence from the checkpoint's step (a crashed group's versions are void).
            ray.get(store.reset.remote())
            # broadcast: opens the group and queues the first version; nothing here waits for the
            # rollout actors, which Ray Data only starts once this worker iterates its shard (below).
            # The last step's samples need version >= max_steps - 1 - max_staleness; newer versions are
            # recorded but not broadcast (the rollout pool may already be gone).
            publisher = make_publisher(cfg.rollout.weight_sync, store, state, cfg.rollout.num_actors, device,
                                       last_version=max(0, cfg.train.max_steps - 1 - cfg.rollout.max_staleness))
            publisher.publish(start_step, state)

    run = None
    if rank == 0 and config.get("mlflow_run_id"):
        import mlflow

        mlflow.set_tracking_uri(config["tracking_uri"])
        run = mlflow.start_run(run_id=config["mlflow_run_id"])

    shard = ray.train.get_dataset_shard("train")
    b = cfg.train.batch_size
    start = time.perf_counter()
    t_wait = time.perf_counter()
    step = start_step
    skipped_rows = 0
    stopped_early = False
    # prefetch_batches=0: prefetching would hold step v until step v+1's rollout exists, which with
    # max_staleness=0 waits for version v+1, which waits for step v: a deadlock.
    batches = shard.iter_batches(batch_size=b, drop_last=True, batch_format="numpy", prefetch_batches=0)
    for batch in batches:
        if step >= cfg.train.max_steps:
            break
        batch_step = int(batch["step"][0])
        if batch_step < step:
            # The stream started before the restored checkpoint (Ray Train restored a checkpoint
            # newer than the one the stream was built for): these samples were trained on already.
            skipped_rows += len(batch["step"])
            continue
        if batch_step != step or int(np.min(batch["step"])) != int(np.max(batch["step"])):
            raise RuntimeError(f"data position: rank {rank} expected the samples of step {step}, got steps "
                               f"{sorted(set(int(x) for x in batch['step']))}")
        _maybe_inject_fault(step, rank, config.get("fault", {}))
        if engine.optimizer is not None:
            for group in engine.optimizer.param_groups:
                group["lr"] = lr_at(step, cfg.optim.lr, cfg.optim.warmup_steps)
        t_got = time.perf_counter()
        timings = {"time/rollout_wait_s": t_got - t_wait}
        captions = [str(c) for c in batch["caption"]]
        cond = conditioning_from_batch(batch, device)
        if "x0" in batch:  # rollout actors, or real images (offline)
            x0 = torch.as_tensor(np.asarray(batch["x0"]), dtype=torch.float32, device=device)
            eps = torch.as_tensor(np.asarray(batch["eps"]), dtype=torch.float32, device=device)
            lag = [step - int(v) for v in batch["policy_version"]] if "policy_version" in batch else [0] * len(captions)
            timings["time/rollout_s"] = float(np.mean(batch["rollout_s"]))
            if "weight_sync_s" in batch:
                timings["time/weight_sync_s"] = float(np.mean(batch["weight_sync_s"]))
        else:
            eps = draw_eps(adapter, [int(s) for s in batch["noise_seed"]], cfg.data.resolution).to(device)
            t0 = time.perf_counter()
            engine.transformer.eval()
            x0 = sample_x0(adapter, engine.transformer, eps, cond, cfg.data.resolution, cfg.rollout.steps,
                           cfg.rollout.shift, cfg.rollout.guidance, cfg.train.mixed_precision)
            engine.transformer.train()
            lag = [0] * len(captions)
            timings["time/rollout_s"] = time.perf_counter() - t0
        if hasattr(objective, "reset_timers"):
            objective.reset_timers()
        t1 = time.perf_counter()
        metrics = srpo_backward(adapter, engine.transformer, objective, grid, cfg.srpo,
                                StepBatch(x0=x0, eps=eps, cond=cond, captions=captions), step, level_generator,
                                cfg.data.resolution, cfg.rollout.shift, cfg.train.mixed_precision,
                                backward=engine.backward)
        metrics.grad_norm = engine.step(cfg.optim.max_grad_norm)
        t2 = time.perf_counter()
        timings["time/learner_s"] = t2 - t1
        timings["time/reward_wait_s"] = float(getattr(objective, "reward_wait_s", 0.0))
        # Anchor quality as the reward sees it (reward actors when remote), at the mid-grid k.
        scored = objective.score_many(x0, captions, metrics.pos_word, metrics.neg_word,
                                      float(grid.d_pos[grid.N // 2]), form=cfg.srpo.srp_form)
        sync: dict[str, float] = {}
        if store is not None:
            state = engine.full_state_dict()  # collective: every rank takes part
            if rank == 0:
                sync = publisher.publish(step + 1, state)
        flat = metrics.flat()
        flat.pop("grad_norm")
        flat.update(timings)
        flat.update({f"rollout/{k}": v for k, v in scored.items()})
        flat["policy_lag/max"] = float(max(lag))
        flat["policy_lag/mean"] = float(np.mean(lag))
        flat = _reduce_mean(flat, device)  # same keys on every rank: one all_reduce
        # The max lag must be the max over ranks, not the mean.
        flat["policy_lag/max"] = _reduce_max(float(max(lag)), device)
        if sync:  # rank 0 alone publishes
            flat["time/weight_publish_s"] = sync["weight_sync/publish_s"]
            flat["weight_sync/bytes"] = sync["weight_sync/bytes"]
            if "weight_sync/broadcast_s" in sync:  # the previous version's broadcast (sender thread)
                flat["time/weight_broadcast_s"] = sync["weight_sync/broadcast_s"]
        flat["grad_norm"] = metrics.grad_norm
        flat["lr"] = float(engine.optimizer.param_groups[0]["lr"]) if engine.optimizer is not None else cfg.optim.lr
        elapsed = time.perf_counter() - start
        flat["samples_per_s"] = (step + 1 - start_step) * b * world / elapsed
        flat["step"] = step
        if skipped_rows:
            flat["data/resume_skipped_rows"] = float(skipped_rows)
        if gold is not None and gold.due(step):
            flat.update(gold.evaluate(adapter, engine, step, cfg))
            stopped_early = gold.should_stop()
        if rank == 0:
            if run is not None and step % cfg.log.every == 0:
                import mlflow

                mlflow.log_metrics({k: v for k, v in flat.items() if k != "step"}, step=step)
                if cfg.log.image_every and step % cfg.log.image_every == 0:
                    _log_image_grid(adapter, x0, captions, cfg.data.resolution, step)
            eta = elapsed / (step + 1 - start_step) * (cfg.train.max_steps - step - 1)
            print(f"[srpo] step {step + 1}/{cfg.train.max_steps} loss {flat['loss']:.4f} "
                  f"reward(denoise) {flat.get('denoise/reward', float('nan')):.4f} "
                  f"lag {flat['policy_lag/max']:.0f} eta {eta:.0f}s", flush=True)
        step += 1
        last = step == cfg.train.max_steps or stopped_early
        every = cfg.train.checkpoint_every
        if last or (every and step % every == 0):
            _report_with_checkpoint(engine, cfg, flat, step, rank, world, level_generator, gold)
        else:
            ray.train.report({k: float(v) for k, v in flat.items()})
        t_wait = time.perf_counter()
        if stopped_early:
            if rank == 0:
                print(f"[srpo] early stop after step {step}: gold reward did not improve for "
                      f"{cfg.eval.patience} evaluations (best {gold.best:.4f} at step {gold.best_step})", flush=True)
                if run is not None:
                    import mlflow

                    mlflow.set_tag("srpo.early_stopped_at_step", str(step))
            break
    if publisher is not None:
        publisher.close()
    if run is not None:
        import mlflow

        mlflow.end_run()
    if step < cfg.train.max_steps and not stopped_early:
        raise RuntimeError(f"the data stream ended at step {step} of {cfg.train.max_steps}")
    state = engine.full_state_dict()
    if rank == 0 and config.get("export_path"):
        from pipeline.export import save_state_dict

        save_state_dict(state, config["export_path"], step=step)


def _check_phase(cfg, run_state: dict[str, Any], step: int) -> None:
    """The control words of the next step must be the ones the checkpoint recorded: a changed word
    list would silently change the SRP objective of a resumed run."""
    from rewards.srp import control_words

    phase = run_state.get("control_word_phase")
    if phase is None:
        return
    pos, neg = control_words(step, tuple(cfg.srpo.positive_words), tuple(cfg.srpo.negative_words))
    if (pos, neg) != (phase["positive"], phase["negative"]):
        raise ValueError(f"srpo.positive_words / srpo.negative_words: the checkpoint's next control words are "
                         f"{phase['positive']!r} / {phase['negative']!r}, the config gives {pos!r} / {neg!r}; "
                         "resume with the word lists the run started with")


def _report_with_checkpoint(engine, cfg, flat: dict[str, float], step: int, rank: int, world: int,
                            level_generator, gold) -> None:
    """Every rank writes its part (shards, generators, manifest) to a local folder and reports it;
    Ray Train merges the folders into one checkpoint in the run's storage, registers it once every
    rank has reported, and prunes old ones (RunConfig.checkpoint_config)."""
    import tempfile

    import ray.train

    from pipeline.checkpoint import save_training_checkpoint
    from rewards.srp import control_words

    state = None
    if rank == 0:
        pos, neg = control_words(step, tuple(cfg.srpo.positive_words), tuple(cfg.srpo.negative_words))
        gb = cfg.train.batch_size * world
        state = {
            "step": step,  # optimizer steps done = the next step to run
            "model_path": cfg.model.path,
            "control_word_phase": {"positive": pos, "negative": neg,
                                   "positive_index": step % len(cfg.srpo.positive_words),
                                   "negative_index": step % len(cfg.srpo.negative_words)},
            "lr_schedule": {"kind": "linear_warmup_constant", "lr": cfg.optim.lr,
                            "warmup_steps": cfg.optim.warmup_steps,
                            "next_lr": lr_at(step, cfg.optim.lr, cfg.optim.warmup_steps)},
            "data": {"next_step": step, "next_sample_index": step * gb, "global_batch": gb,
                     "mode": cfg.rollout.mode},
            "gold": gold.state() if gold is not None else None,
            "seed": cfg.seed,
        }
    with tempfile.TemporaryDirectory(prefix="srpo-ckpt-") as tmp:
        save_training_checkpoint(tmp, engine, cfg.learner.strategy, rank, world, level_generator, state)
        ray.train.report({k: float(v) for k, v in flat.items()},
                         checkpoint=ray.train.Checkpoint.from_directory(tmp))
    # Wait until Ray Train has committed it (every rank's part uploaded and registered): a group that
    # crashes right after reporting would otherwise restart from the checkpoint before, or from scratch.
    from ray.train.v2.api.report_config import CheckpointConsistencyMode

    ray.train.get_all_reported_checkpoints(consistency_mode=CheckpointConsistencyMode.COMMITTED)


def _reduce_max(value: float, device: torch.device) -> float:
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


@torch.no_grad()
def _log_image_grid(adapter, x0: torch.Tensor, captions: list[str], resolution: int, step: int) -> None:
    """Rollout images of this rank's batch as one PNG grid, with the prompts as a text artifact."""
    import mlflow
    from torchvision.utils import make_grid

    images = adapter.decode(x0, resolution)
    grid = make_grid(images.float().cpu(), nrow=min(4, len(captions)), padding=2)
    array = (grid.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    mlflow.log_image(array, f"rollouts/step_{step:05d}.png")
    mlflow.log_text("\n".join(captions), f"rollouts/step_{step:05d}.txt")
