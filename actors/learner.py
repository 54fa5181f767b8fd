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


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray
    import ray.train

    from actors.rollout import conditioning_from_batch, draw_eps
    from pipeline.config import config_from_dict
    from pipeline.device import resolve_device
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

    store = None
    publisher = None
    if cfg.rollout.placement == "actors":
        from actors.weights import make_publisher

        store = config["store"]
        state = engine.full_state_dict()
        if rank == 0:
            # broadcast: opens the group and queues version 0; nothing here waits for the rollout
            # actors, which Ray Data only starts once this worker iterates its shard (below).
            # The last step's samples need version >= max_steps - 1 - max_staleness; newer versions are
            # recorded but not broadcast (the rollout pool may already be gone).
            publisher = make_publisher(cfg.rollout.weight_sync, store, state, cfg.rollout.num_actors, device,
                                       last_version=max(0, cfg.train.max_steps - 1 - cfg.rollout.max_staleness))
            publisher.publish(0, state)

    run = None
    if rank == 0 and config.get("mlflow_run_id"):
        import mlflow

        mlflow.set_tracking_uri(config["tracking_uri"])
        run = mlflow.start_run(run_id=config["mlflow_run_id"])

    shard = ray.train.get_dataset_shard("train")
    b = cfg.train.batch_size
    start = time.perf_counter()
    t_wait = time.perf_counter()
    # prefetch_batches=0: prefetching would hold step v until step v+1's rollout exists, which with
    # max_staleness=0 waits for version v+1, which waits for step v: a deadlock.
    batches = shard.iter_batches(batch_size=b, drop_last=True, batch_format="numpy", prefetch_batches=0)
    for step, batch in enumerate(batches):
        if step >= cfg.train.max_steps:
            break
        t_got = time.perf_counter()
        timings = {"time/rollout_wait_s": t_got - t_wait}
        captions = [str(c) for c in batch["caption"]]
        cond = conditioning_from_batch(batch, device)
        if cfg.rollout.placement == "actors":
            x0 = torch.as_tensor(np.asarray(batch["x0"]), dtype=torch.float32, device=device)
            eps = torch.as_tensor(np.asarray(batch["eps"]), dtype=torch.float32, device=device)
            lag = [step - int(v) for v in batch["policy_version"]]
            timings["time/rollout_s"] = float(np.mean(batch["rollout_s"]))
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
        # Rollout quality as the reward sees it (reward actors when remote), at the mid-grid k.
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
        flat["samples_per_s"] = (step + 1) * b * world / elapsed
        flat["step"] = step
        if rank == 0:
            if run is not None and step % cfg.log.every == 0:
                import mlflow

                mlflow.log_metrics({k: v for k, v in flat.items() if k != "step"}, step=step)
                if cfg.log.image_every and step % cfg.log.image_every == 0:
                    _log_image_grid(adapter, x0, captions, cfg.data.resolution, step)
            eta = elapsed / (step + 1) * (cfg.train.max_steps - step - 1)
            print(f"[srpo] step {step + 1}/{cfg.train.max_steps} loss {flat['loss']:.4f} "
                  f"reward(denoise) {flat.get('denoise/reward', float('nan')):.4f} "
                  f"lag {flat['policy_lag/max']:.0f} eta {eta:.0f}s", flush=True)
        last = step + 1 == cfg.train.max_steps
        every = cfg.train.checkpoint_every
        if last or (every and (step + 1) % every == 0):
            _report_with_checkpoint(engine, flat, step)
        else:
            ray.train.report({k: float(v) for k, v in flat.items()})
        t_wait = time.perf_counter()
    if publisher is not None:
        publisher.close()
    if run is not None:
        import mlflow

        mlflow.end_run()
    state = engine.full_state_dict()
    if rank == 0 and config.get("export_path"):
        from pipeline.export import save_state_dict

        save_state_dict(state, config["export_path"], step=cfg.train.max_steps)


def _report_with_checkpoint(engine, flat: dict[str, float], step: int) -> None:
    """Every rank writes its shards to a local folder and reports it; Ray Train merges the folders
    into one checkpoint in the run's storage (and prunes old ones, RunConfig.checkpoint_config)."""
    import json
    import tempfile

    import ray.train

    with tempfile.TemporaryDirectory(prefix="srpo-ckpt-") as tmp:
        engine.save_sharded(tmp)
        if ray.train.get_context().get_world_rank() == 0:
            with open(f"{tmp}/srpo_state.json", "w") as f:
                json.dump({"step": step + 1}, f)
        ray.train.report({k: float(v) for k, v in flat.items()},
                         checkpoint=ray.train.Checkpoint.from_directory(tmp))


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
