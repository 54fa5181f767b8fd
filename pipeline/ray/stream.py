"""The Ray Data stream feeding the learner.

    online:  prompts (txt / parquet), cycled to max_steps x global_batch rows
               --map_batches(TextEmbedStage, ActorPool)-->  + prompt_embeds [L, d_t5], pooled [d_clip]
                  (or, with data.prompt_embeddings: the `srpo preprocess` parquet, no text encoder)
               --map_batches(RolloutStage, ActorPool)-->    + x0, eps [tokens, 64], policy_version
                                                              (placement=actors; colocated: the learner rolls out)
    offline: usable images (pipeline/images.py pre-flight scan), cycled the same way
               --map_batches(ImageEncodeStage, ActorPool)--> + x0 (VAE latent), eps (fresh per sample)
               --map_batches(TextEmbedStage, ActorPool)-->   + prompt_embeds, pooled
    --> Ray Train: get_dataset_shard("train"), per_device_batch rows per step

Rows start at ``start_step`` (a resumed run): the rows of a step never depend on earlier rows, so
the data position of a checkpoint is its step.

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


def training_captions(cfg: Config) -> list[str]:
    """The captions sample i cycles over: the prompts file, or the `srpo preprocess` output."""
    if cfg.data.prompt_embeddings:
        from pipeline.embeddings import read_captions

        return read_captions(cfg.data.prompt_embeddings)
    return read_prompts(cfg.data.prompts)


def sample_rows(cfg: Config, items: list[dict[str, Any]], start_step: int = 0) -> list[dict[str, Any]]:
    """Rows for steps start_step..max_steps-1: sample i is items[i % len(items)] plus its index,
    step and noise seed. ``items`` are {"caption": ...} (online) or {"caption", "path"} (offline)."""
    from actors.rollout import noise_seed

    gb = global_batch(cfg)
    rows = []
    for i in range(start_step * gb, cfg.train.max_steps * gb):
        rows.append({**items[i % len(items)], "sample_index": i, "step": i // gb,
                     "noise_seed": noise_seed(cfg, i, gb, cfg.train.batch_size)})
    return rows


def prompt_rows(cfg: Config, start_step: int = 0) -> list[dict[str, Any]]:
    # prompt_index: the row of the caption in the `srpo preprocess` output (read_captions order).
    return sample_rows(cfg, [{"caption": c, "prompt_index": i} for i, c in enumerate(training_captions(cfg))],
                       start_step)


def build_dataset(cfg: Config, store=None, start_step: int = 0, images: list | None = None):
    """The learner's input dataset for the configured mode and rollout placement.

    ``images``: the usable ImageRecords of the offline pre-flight scan (rollout.mode=offline).
    """
    import ray
    from ray.data import ActorPoolStrategy

    from actors.rollout import EmbeddingLookupStage, ImageEncodeStage, RolloutStage, TextEmbedStage

    cfg_dict = cfg.to_dict()
    b = cfg.train.batch_size
    offline = cfg.rollout.mode == "offline"
    if offline:
        if not images:
            raise ValueError("rollout.mode=offline: no usable images were passed to the stream")
        rows = sample_rows(cfg, [{"caption": r.caption, "path": r.path} for r in images], start_step)
    else:
        rows = prompt_rows(cfg, start_step)
    if not rows:
        raise ValueError(f"nothing left to train: start step {start_step} >= train.max_steps {cfg.train.max_steps}")
    # One block per device batch: a rollout task then serves exactly one learner worker's share of a step.
    ds = ray.data.from_items(rows, override_num_blocks=len(rows) // b)
    if offline:
        ds = ds.map_batches(ImageEncodeStage, fn_constructor_args=(cfg_dict,), batch_size=b,
                            compute=ActorPoolStrategy(min_size=1, max_size=cfg.rollout.num_actors),
                            num_cpus=cfg.rollout.num_cpus, num_gpus=cfg.rollout.num_gpus)
    if cfg.data.prompt_embeddings and not offline:
        ds = ds.map_batches(EmbeddingLookupStage, fn_constructor_args=(cfg.data.prompt_embeddings,), batch_size=b,
                            compute=ActorPoolStrategy(min_size=1, max_size=1), num_cpus=0)
    else:
        ds = ds.map_batches(TextEmbedStage, fn_constructor_args=(cfg_dict,), batch_size=b,
                            compute=ActorPoolStrategy(min_size=1, max_size=1), num_cpus=cfg.rollout.num_cpus,
                            num_gpus=cfg.rollout.num_gpus)
    if offline:
        return ds
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
