"""Where a learner's batches come from: sample rows, the plain stages that fill them, in-process sources.

A *row* is one sample; a *batch* is one device's share of a step, a dict of numpy arrays (Ray Data's
``batch_format="numpy"``), whoever produced it:

    sample_index int64   global order; generation = sample_index // global_batch
    step         int64   the optimizer step the sample is (first) for: generation * rollout.reuse
    caption      str     the plain caption (control words never reach the generator)
    noise_seed   int64   regenerates the noise prior eps (draw_eps)
    level_seed   int64   regenerates the noise levels m of Direct-Align (draw_sample_levels)
    + stage outputs: the family's conditioning columns (adapter.conditioning_to_arrays; FLUX:
      prompt_embeds, pooled), x0/eps [tokens, C]
      (rollout actors or real images), policy_version, rollout_s, weight_sync_s

A row's content is a function of its sample index alone, so a stream can start at any step (the
data position of a checkpoint is its step) and a step's samples do not depend on how many ranks
share it. The stages are plain classes: Ray Data runs them in actor pools (pipeline/ray/stream.py),
:class:`InProcessSource` runs them in the learner's own process (``learner.num_workers=0``).
"""
from __future__ import annotations

import logging
import time
from typing import Any, Iterator, Protocol

import numpy as np
import torch

from pipeline.config import Config, config_from_dict
from pipeline.data import read_prompts
from pipeline.device import resolve_device
from pipeline.embeddings import load_embeddings, read_captions
from pipeline.images import ImageSkip, load_image
from pipeline.models import load_adapter
from pipeline.reuse import generation_count

Batch = dict[str, np.ndarray]
_SEED_MOD = 2**63 - 1


class BatchSource(Protocol):
    """The learner's input: batches of this rank's samples, in step order, from ``start_step`` on
    (a source may start earlier; the learner skips and counts rows it has trained on already)."""

    def batches(self, start_step: int) -> Iterator[Batch]: ...


# ------------------------------------------------------------------------------------------ rows


def global_batch(cfg: Config) -> int:
    return cfg.train.batch_size * max(1, cfg.learner.num_workers)


def noise_seed(cfg: Config, sample_index: int, global_batch: int, per_device_batch: int) -> int:
    """The seed that regenerates a sample's noise prior eps.

    share_noise_across_ranks (the reference): every rank uses the same noise in a step, so the seed
    depends on the step and the position inside a rank's batch only. Otherwise one seed per sample.
    Offline mode never shares noise: every rank holds a different real image, and shared noise
    would give every rank's sample the same structure (SRPO_SPEC section 1).
    """
    if cfg.rollout.share_noise_across_ranks and cfg.rollout.mode == "online":
        step, pos = divmod(sample_index, global_batch)
        key = step * per_device_batch + pos % per_device_batch
    else:
        key = sample_index
    return (cfg.seed * 1_000_003 + key) % _SEED_MOD


def level_seed(cfg: Config, sample_index: int) -> int:
    """The seed of a sample's noise levels m: a function of the sample alone (the reference draws m
    per rank with Python's random; one stream per sample gives the same distribution and makes a
    step independent of how many ranks share it)."""
    return (cfg.seed * 2_000_029 + 7919 * sample_index + 1) % _SEED_MOD


def sample_rows(cfg: Config, items: list[dict[str, Any]], start_step: int = 0) -> list[dict[str, Any]]:
    """Rows of the generations that start at or after step start_step: sample i is items[i % len(items)]
    plus its index, step and seeds. ``items`` are {"caption", ...} (online) or {"caption", "path"} (offline).

    A generation is one step's samples; with rollout.reuse = R it serves steps g*R .. g*R+R-1 and its
    rows carry step = g*R, its first (pipeline/reuse.py). R = 1: generation g is step g.
    """
    gb, b, r = global_batch(cfg), cfg.train.batch_size, cfg.rollout.reuse
    # From the generation holding start_step: a resumed run takes a begun generation's remaining uses
    # from the checkpoint's buffer, skips (and counts) its rows, and never finds the stream empty.
    first = start_step // r
    return [{**items[i % len(items)], "sample_index": i, "step": i // gb * r,
             "noise_seed": noise_seed(cfg, i, gb, b), "level_seed": level_seed(cfg, i)}
            for i in range(first * gb, generation_count(cfg.train.max_steps, r) * gb)]


def training_captions(cfg: Config) -> list[str]:
    """The captions sample i cycles over: the prompts file, or the `srpo preprocess` output."""
    if cfg.data.prompt_embeddings:
        return read_captions(cfg.data.prompt_embeddings)
    return read_prompts(cfg.data.prompts)


def prompt_rows(cfg: Config, start_step: int = 0) -> list[dict[str, Any]]:
    # prompt_index: the row of the caption in the `srpo preprocess` output (read_captions order).
    return sample_rows(cfg, [{"caption": c, "prompt_index": i} for i, c in enumerate(training_captions(cfg))],
                       start_step)


def image_rows(cfg: Config, images: list, start_step: int = 0) -> list[dict[str, Any]]:
    """Offline rows over the usable ImageRecords of the pre-flight scan."""
    if not images:
        raise ValueError("rollout.mode=offline: no usable images were passed to the source")
    return sample_rows(cfg, [{"caption": r.caption, "path": r.path} for r in images], start_step)


def draw_eps(adapter, seeds: list[int], resolution: int) -> torch.Tensor:
    """One noise draw per seed, on a CPU generator so every device gives the same eps."""
    return torch.cat([adapter.sample_noise(1, resolution, torch.Generator().manual_seed(int(s))) for s in seeds])


# ------------------------------------------------------------------------------------------ stages


class TextEmbedStage:
    """caption -> the adapter's conditioning arrays (frozen text encoders)."""

    def __init__(self, cfg_dict: dict[str, Any]) -> None:
        cfg = config_from_dict(cfg_dict)
        self.device = resolve_device(cfg.train.device)
        self.adapter = load_adapter(cfg.model.family, cfg.model.path, self.device, cfg.model.max_sequence_length,
                                    load_text_encoders=True, load_transformer=False)

    def __call__(self, batch: Batch) -> Batch:
        cond = self.adapter.encode_prompts([str(c) for c in batch["caption"]])
        batch.update(self.adapter.conditioning_to_arrays(cond))
        return batch


class EmbeddingLookupStage:
    """prompt_index -> conditioning arrays read from the `srpo preprocess` parquet (no text encoder): the
    columns its meta.json lists, i.e. the model family's ``conditioning_to_arrays`` columns."""

    def __init__(self, embeddings_dir: str) -> None:
        self.dir = embeddings_dir

    def __call__(self, batch: Batch) -> Batch:
        batch.update(load_embeddings(self.dir, [int(i) for i in batch["prompt_index"]]))
        return batch


class ImageEncodeStage:
    """(path, noise_seed) -> x0 (the VAE latent of the real image), eps: offline mode.

    x0 is the posterior mean of the frozen VAE (no sampling: the anchor of a file is the same in
    every epoch); eps is fresh noise per sample, regenerated from its seed.

    A file that passed the pre-flight scan but fails now (changed or removed since) does not stop
    the run: its row takes the image *and caption* of the next row of the batch that decodes (or the
    last good row this stage saw), so image and caption still match; ``image_skipped`` (1 per such row)
    counts it and a warning names the file. Only a batch with nothing decodable, ever, is an error.
    """

    def __init__(self, cfg_dict: dict[str, Any]) -> None:
        cfg = config_from_dict(cfg_dict)
        self.cfg = cfg
        self.device = resolve_device(cfg.train.device)
        self.adapter = load_adapter(cfg.model.family, cfg.model.path, self.device, cfg.model.max_sequence_length,
                                    load_text_encoders=False, load_transformer=False)
        self._last_good: tuple[np.ndarray, str] | None = None  # (pixels, caption): stand-in for a broken file

    def __call__(self, batch: Batch) -> Batch:
        cfg = self.cfg
        t0 = time.perf_counter()
        pixels = self._pixels(batch)
        x0 = self.adapter.encode_images(torch.from_numpy(pixels))
        eps = draw_eps(self.adapter, [int(s) for s in batch["noise_seed"]], cfg.data.resolution)
        n = len(batch["path"])
        batch["x0"] = x0.cpu().numpy()
        batch["eps"] = eps.cpu().numpy()
        batch["rollout_s"] = np.full(n, time.perf_counter() - t0, dtype=np.float64)
        return batch

    def _pixels(self, batch: Batch) -> np.ndarray:
        """[n, 3, R, R] of the batch's files; failed rows replaced as the class docstring says."""
        d = self.cfg.data
        decoded: list[np.ndarray | None] = []
        skips: list[ImageSkip | None] = []
        for p in batch["path"]:
            try:
                decoded.append(load_image(str(p), d.resolution, d.min_image_size, d.max_image_pixels))
                skips.append(None)
            except ImageSkip as e:
                decoded.append(None)
                skips.append(e)
        good = [i for i, x in enumerate(decoded) if x is not None]
        if good:
            self._last_good = (decoded[good[-1]], str(batch["caption"][good[-1]]))
        elif self._last_good is None:
            raise RuntimeError(f"data.images: no image of this batch decodes any more (changed since the scan?): "
                               f"{'; '.join(str(e) for e in skips)}")
        captions = [str(c) for c in batch["caption"]]
        for i, e in enumerate(skips):
            if e is None:
                continue
            j = next((k for k in good if k > i), good[0] if good else None)
            decoded[i], captions[i] = (decoded[j], captions[j]) if j is not None else self._last_good
            logging.getLogger("srpo").warning(f"[srpo] offline image skipped at encode, row replaced by "
                                              f"{'row ' + str(j) if j is not None else 'the last good image'}: {e}")
        if any(skips):
            batch["caption"] = np.asarray(captions)
        batch["image_skipped"] = np.asarray([int(e is not None) for e in skips], dtype=np.int64)
        return np.stack(decoded)


def input_stages(cfg: Config) -> list:
    """The stages that turn rows into learner batches in-process, in the order the stream runs them
    (the colocated rollout itself runs in the learner)."""
    cfg_dict = cfg.to_dict()
    stages: list = []
    if cfg.rollout.mode == "offline":
        stages.append(ImageEncodeStage(cfg_dict))
    if cfg.data.prompt_embeddings and cfg.rollout.mode == "online":
        stages.append(EmbeddingLookupStage(cfg.data.prompt_embeddings))
    else:
        stages.append(TextEmbedStage(cfg_dict))
    return stages


def rows_to_batch(rows: list[dict[str, Any]]) -> Batch:
    return {k: np.asarray([r[k] for r in rows]) for k in rows[0]}


class InProcessSource:
    """The rows of this process (rank ``rank`` of ``world``), passed through the stages here.

    Used by the single-process learner: the same rows, seeds and stages as the Ray Data stream, so a
    single-process run and a Ray run of one worker train on the same samples.
    """

    def __init__(self, cfg: Config, images: list | None = None, rank: int = 0, world: int = 1) -> None:
        self.cfg, self.images, self.rank, self.world = cfg, images, rank, world
        self.stages = input_stages(cfg)

    def _rows(self, start_step: int) -> list[dict[str, Any]]:
        if self.cfg.rollout.mode == "offline":
            return image_rows(self.cfg, self.images or [], start_step)
        return prompt_rows(self.cfg, start_step)

    def batches(self, start_step: int) -> Iterator[Batch]:
        b = self.cfg.train.batch_size
        rows = self._rows(start_step)
        mine = [rows[i:i + b] for i in range(0, len(rows), b)][self.rank::self.world]
        for chunk in mine:
            batch = rows_to_batch(chunk)
            for stage in self.stages:
                batch = stage(batch)
            yield batch
