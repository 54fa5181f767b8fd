"""`srpo preprocess` on Ray Data: the text encoders in an actor pool write the parts of the embeddings
folder (format, planning and reading: pipeline/embeddings.py), and the folder read back as a Dataset.
The conditioning columns are the model family's (meta.json ``shapes``); nothing here names them.

    prompts file --plan_preprocess--> todo rows --from_items--> EmbedAndWrite actor pool (encode + write
    one part per contiguous prompt_index run) --> one small row per part back to the driver
    --finish_preprocess--> meta.json complete
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from ray.data import ActorPoolStrategy, DataContext
from ray.data.extensions import ArrowTensorArray
from tqdm import tqdm

from actors.priority import work_runtime_env
from pipeline.config import Config, ConfigError
from pipeline.embeddings import (FIELD, TMP_SUFFIX, Plan, PreprocessReport, contiguous_runs, finish_preprocess,
                                 part_files, part_name, plan_preprocess, read_meta, tensor_columns)
from pipeline.sources import TextEmbedStage

ROW_COLUMNS = ("prompt_index", "caption", "clip_truncated", "t5_truncated")  # beside the conditioning columns


def _tensor_array(x: np.ndarray) -> pa.Array:
    """Ray's Arrow tensor extension: ``ray.data.read_parquet`` gives numpy [n, *shape] back."""
    return ArrowTensorArray.from_numpy(np.ascontiguousarray(x, dtype=np.float32))


def write_parts(out_dir: str | Path, batch: dict[str, np.ndarray], shapes: dict[str, list[int]]) -> list[str]:
    """Write an encoded batch as one part per contiguous prompt_index run; returns the part names.
    ``shapes``: the folder's conditioning columns and their per-row shapes (meta.json).

    Splitting at gaps is what keeps sorted part names in prompt_index order whatever rows Ray Data
    puts together in a batch (a resumed run encodes scattered leftovers plus appended prompts).
    """
    for k, shape in shapes.items():  # readers reshape with meta.json's shapes: never write another one
        if k not in batch or tuple(np.shape(batch[k])[1:]) != tuple(shape):
            raise RuntimeError(f"{out_dir}: the encoder gave column {k!r} of per-row shape "
                               f"{np.shape(batch[k])[1:] if k in batch else 'missing'}; meta.json says {shape}")
    order = np.argsort(np.asarray(batch["prompt_index"], dtype=np.int64), kind="stable")
    cols = {k: np.asarray(batch[k])[order] for k in (*ROW_COLUMNS, *shapes)}
    names = []
    for run in contiguous_runs(cols["prompt_index"]):
        table = pa.table({
            "prompt_index": pa.array(cols["prompt_index"][run], pa.int64()),
            "caption": pa.array([str(c) for c in cols["caption"][run]], pa.string()),
            **{k: _tensor_array(cols[k][run]) for k in shapes},
            "clip_truncated": pa.array(cols["clip_truncated"][run].astype(bool), pa.bool_()),
            "t5_truncated": pa.array(cols["t5_truncated"][run].astype(bool), pa.bool_()),
        })
        final = Path(out_dir) / part_name(int(cols["prompt_index"][run][0]))
        tmp = final.with_name(f"{final.name}.{uuid.uuid4().hex[:8]}{TMP_SUFFIX}")
        pq.write_table(table, tmp)
        os.replace(tmp, final)  # atomic: a killed run leaves only complete parts and *.tmp debris
        names.append(final.name)
    return names


class EmbedAndWrite(TextEmbedStage):
    """Encode a batch and write it where it was computed: the embeddings (8 MiB a prompt for
    FLUX.1-dev, 14 MiB for Qwen-Image at 512 tokens) never travel through the driver, which only sees
    one small row per part."""

    def __init__(self, cfg_dict: dict[str, Any], out_dir: str, shapes: dict[str, list[int]]) -> None:
        super().__init__(cfg_dict)
        self.out_dir, self.shapes = out_dir, shapes

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch = super().__call__(batch)
        names = write_parts(self.out_dir, batch, self.shapes)
        rows = np.zeros(len(names), np.int64)
        if len(names):
            rows[0] = len(batch["caption"])  # progress: the batch's rows on its first part
        return {"part": np.asarray(names), "rows": rows}


def encode_missing(cfg: Config, out_dir: Path, todo: Plan, batch_size: int, num_actors: int,
                   progress: bool) -> int:
    """Encode ``todo`` through an actor pool of text encoders into the columns of ``out_dir``'s meta.json;
    returns the number of parts written."""
    shapes = read_meta(out_dir)["shapes"]
    rows = [{"prompt_index": int(i), "caption": c, "clip_truncated": bool(a), "t5_truncated": bool(b)}
            for i, c, a, b in zip(todo.index, todo.caption, todo.clip_truncated, todo.t5_truncated)]
    n_batches = -(-len(rows) // batch_size)
    actors = max(1, min(num_actors, n_batches))
    ctx = DataContext.get_current()
    saved_bars = ctx.enable_progress_bars
    ctx.enable_progress_bars = progress
    parts = 0
    try:
        ds = ray.data.from_items(rows, override_num_blocks=min(n_batches, 256))
        ds = ds.map_batches(EmbedAndWrite, fn_constructor_args=(cfg.to_dict(), str(out_dir), shapes),
                            batch_size=batch_size, compute=ActorPoolStrategy(min_size=actors, max_size=actors),
                            num_cpus=cfg.rollout.num_cpus, num_gpus=cfg.rollout.num_gpus,
                            runtime_env=work_runtime_env())
        bar = tqdm(total=len(rows), desc="encode prompts", unit="prompt", disable=not progress)
        for row in ds.iter_rows():
            parts += 1
            bar.update(int(row["rows"]))
        bar.close()
    finally:
        ctx.enable_progress_bars = saved_bars
    return parts


def preprocess(cfg: Config, out_dir: str | Path, prompts: str | Path | None = None, batch_size: int = 16,
               num_actors: int | None = None, progress: bool = True) -> PreprocessReport:
    """Encode the prompts file into ``out_dir`` (pipeline/embeddings.py's format), resuming what is there.

    Ray must be initialised (``pipeline.ray.driver.connect_ray``) when anything is left to encode.
    One run per folder at a time: a run deletes the ``*.tmp`` files it finds, which would be another
    live run's unfinished parts.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size: got {batch_size}, expected >= 1")
    job = plan_preprocess(cfg, out_dir, prompts)
    if len(job.todo):
        actors = num_actors if num_actors is not None else cfg.rollout.num_actors
        job.report.parts_written = encode_missing(cfg, job.out, job.todo, batch_size, actors, progress)
    return finish_preprocess(job)


def read_embedding_dataset(out_dir: str | Path) -> ray.data.Dataset:
    """A Ray Dataset of (prompt_index, caption, the conditioning columns of meta.json's ``shapes``; FLUX:
    prompt_embeds [L, d], pooled [d]) in prompt_index order.

    The order is the file order (sorted part names), which is kept downstream when the consumer sets
    ``preserve_order`` (Ray Train's ingest options in pipeline/ray/stream.py do); there is no global sort.
    """
    meta = read_meta(out_dir)
    files = part_files(out_dir)
    if not files:
        raise ConfigError(f"{FIELD}: {str(out_dir)!r} has no part files; run `srpo preprocess` first")
    ds = ray.data.read_parquet([str(f) for f in files], partitioning=None)
    return ds.select_columns(["prompt_index", "caption", *tensor_columns(meta)])  # pushed down into the read
