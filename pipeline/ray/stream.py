"""The Ray Data stream feeding the learner.

    online:  prompts (txt / parquet), cycled to max_steps x global_batch rows
               --map_batches(TextEmbedStage, ActorPool)-->  + the family's conditioning columns
                                                              (FLUX: prompt_embeds [L, d_t5], pooled [d_clip])
                  (or, with data.prompt_embeddings: the `srpo preprocess` parquet, no text encoder)
               --map_batches(RolloutStage, ActorPool)-->    + x0, eps [tokens, 64], policy_version
                                                              (placement=actors; colocated: the learner rolls out)
    offline: usable images (pipeline/images.py pre-flight scan), cycled the same way
               --map_batches(ImageEncodeStage, ActorPool)--> + x0 (VAE latent), eps (fresh per sample)
               --map_batches(TextEmbedStage, ActorPool)-->   + the conditioning columns
    --> Ray Train: get_dataset_shard("train"), per_device_batch rows per step

Rows start at ``start_step`` (a resumed run): the rows of a step never depend on earlier rows, so
the data position of a checkpoint is its step.

Row schema (one sample): see pipeline/sources.py (sample_index, step, caption, noise_seed, level_seed,
then the stage outputs); the stages are the same plain classes the single-process source runs.
Ray Data cannot read an unbounded stream, so the row count is bounded by the run length; order is
preserved so that a sample meets the learner at the step it was generated for (which is what the
staleness bound is computed against). Memory stays bounded by Ray Data's streaming backpressure
plus the rollout stage's flow control (it waits for the learner; see actors/weights.py).
"""
from __future__ import annotations

import ray
from ray.data import ActorPoolStrategy
from ray.train import DataConfig

from actors.priority import work_runtime_env
from actors.rollout import RolloutStage
from pipeline.config import Config
from pipeline.sources import EmbeddingLookupStage, ImageEncodeStage, TextEmbedStage, image_rows, prompt_rows


def build_dataset(cfg: Config, store=None, start_step: int = 0, images: list | None = None):
    """The learner's input dataset for the configured mode and rollout placement.

    ``images``: the usable ImageRecords of the offline pre-flight scan (rollout.mode=offline).
    """
    cfg_dict = cfg.to_dict()
    b = cfg.train.batch_size
    offline = cfg.rollout.mode == "offline"
    if offline:
        rows = image_rows(cfg, images or [], start_step)
    else:
        rows = prompt_rows(cfg, start_step)
    if not rows:
        raise ValueError(f"nothing left to train: start step {start_step} >= train.max_steps {cfg.train.max_steps}")
    # One block per device batch: a rollout task then serves exactly one learner worker's share of a step.
    ds = ray.data.from_items(rows, override_num_blocks=len(rows) // b)
    if offline:
        ds = ds.map_batches(ImageEncodeStage, fn_constructor_args=(cfg_dict,), batch_size=b,
                            compute=ActorPoolStrategy(min_size=1, max_size=cfg.rollout.num_actors),
                            num_cpus=cfg.rollout.num_cpus, num_gpus=cfg.rollout.num_gpus,
                            runtime_env=work_runtime_env())
    if cfg.data.prompt_embeddings and not offline:
        ds = ds.map_batches(EmbeddingLookupStage, fn_constructor_args=(cfg.data.prompt_embeddings,), batch_size=b,
                            compute=ActorPoolStrategy(min_size=1, max_size=1), num_cpus=0,
                            runtime_env=work_runtime_env())
    else:
        ds = ds.map_batches(TextEmbedStage, fn_constructor_args=(cfg_dict,), batch_size=b,
                            compute=ActorPoolStrategy(min_size=1, max_size=1), num_cpus=cfg.rollout.num_cpus,
                            num_gpus=cfg.rollout.num_gpus, runtime_env=work_runtime_env())
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
                            # Restarts: Ray Data's actor pools restart a dead actor and retry its task
                            # without limit by default (max_restarts=-1, max_task_retries=-1), which the
                            # rollout-actor kill test relies on.
                            num_cpus=cfg.rollout.num_cpus, num_gpus=cfg.rollout.num_gpus,
                            runtime_env=work_runtime_env())
    return ds


def ingest_options():
    """Execution options for the learner's shards: ordered, so steps line up with policy versions."""
    opts = DataConfig.default_ingest_options()
    opts.preserve_order = True
    return opts
