"""The Ray Data stream feeding the learner.

    prompts (txt / parquet), cycled to max_steps x global_batch rows
      --map_batches(TextEmbedStage, ActorPool)-->  + prompt_embeds [L, d_t5], pooled [d_clip]
      --map_batches(RolloutStage, ActorPool)-->    + x0, eps [tokens, 64], policy_version   (placement=actors)
      --> Ray Train: get_dataset_shard("train"), per_device_batch rows per step

Row schema (one sample): sample_index int64 (global order), step int64 (the learner step it is for:
sample_index // global_batch), caption str, noise_seed int64 (regenerates eps), then the stage outputs.
Ray Data cannot read an unbounded stream, so the row count is bounded by the run length; order is
preserved so that a sample meets the learner at the step it was generated for (which is what the
staleness bound is computed against). Memory stays bounded by Ray Data's streaming backpressure
plus the rollout stage's flow control (it waits for the learner; see actors/weights.py).
"""
from __future__ import annotations

from typing import Any

from pipeline.config import Config
from pipeline.data import read_prompts


def global_batch(cfg: Config) -> int:
    return cfg.train.batch_size * max(1, cfg.learner.num_workers)


def prompt_rows(cfg: Config) -> list[dict[str, Any]]:
    from actors.rollout import noise_seed

    prompts = read_prompts(cfg.data.prompts)
    gb = global_batch(cfg)
    rows = []
    for i in range(cfg.train.max_steps * gb):
        rows.append({"sample_index": i, "step": i // gb, "caption": prompts[i % len(prompts)],
                     "noise_seed": noise_seed(cfg, i, gb, cfg.train.batch_size)})
    return rows


def build_dataset(cfg: Config, store=None):
    """The learner's input dataset for the configured rollout placement."""
    import ray
    from ray.data import ActorPoolStrategy

    from actors.rollout import RolloutStage, TextEmbedStage

    cfg_dict = cfg.to_dict()
    b = cfg.train.batch_size
    rows = prompt_rows(cfg)
    # One block per device batch: a rollout task then serves exactly one learner worker's share of a step.
    ds = ray.data.from_items(rows, override_num_blocks=len(rows) // b)
    ds = ds.map_batches(TextEmbedStage, fn_constructor_args=(cfg_dict,), batch_size=b,
                        compute=ActorPoolStrategy(min_size=1, max_size=1), num_cpus=cfg.rollout.num_cpus,
                        num_gpus=cfg.rollout.num_gpus)
    if cfg.rollout.placement == "actors":
        if store is None:
            raise ValueError("rollout.placement=actors needs a weight store")
        n = cfg.rollout.num_actors
        ds = ds.map_batches(RolloutStage, fn_constructor_args=(cfg_dict, store), batch_size=b,
                            # One task at a time per actor: tasks then start in step order, so an actor
                            # waiting for a future version never holds an earlier step's batch behind it.
                            compute=ActorPoolStrategy(min_size=n, max_size=n, max_tasks_in_flight_per_actor=1),
                            num_cpus=cfg.rollout.num_cpus,
                            num_gpus=cfg.rollout.num_gpus, max_restarts=-1, max_task_retries=-1)
    return ds


def ingest_options():
    """Execution options for the learner's shards: ordered, so steps line up with policy versions."""
    from ray.train import DataConfig

    opts = DataConfig.default_ingest_options()
    opts.preserve_order = True
    return opts
