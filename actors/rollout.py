"""Ray Data stages that run models: text embedding and rollout (thin shells over pipeline/).

Both are callable classes for ``Dataset.map_batches(..., compute=ActorPoolStrategy(...))``: each
actor loads its models once in ``__init__``. Batches are dicts of numpy arrays (see
``pipeline/stream.py`` for the row schema and shapes).
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from pipeline.config import Config, config_from_dict
from pipeline.device import resolve_device
from pipeline.models import load_adapter
from pipeline.models.flux import TextConditioning
from pipeline.rollout import sample_x0


def noise_seed(cfg: Config, sample_index: int, global_batch: int, per_device_batch: int) -> int:
    """The seed that regenerates a sample's noise prior eps.

    share_noise_across_ranks (the reference): every rank uses the same noise in a step, so the seed
    depends on the step and the position inside a rank's batch only. Otherwise one seed per sample.
    """
    # Offline mode never shares noise: every rank holds a different real image, and shared noise
    # would give every rank's sample the same structure (SRPO_SPEC section 1).
    if cfg.rollout.share_noise_across_ranks and cfg.rollout.mode == "online":
        step, pos = divmod(sample_index, global_batch)
        key = step * per_device_batch + pos % per_device_batch
    else:
        key = sample_index
    return (cfg.seed * 1_000_003 + key) % (2**63 - 1)


def draw_eps(adapter, seeds: list[int], resolution: int) -> torch.Tensor:
    """One noise draw per seed, on a CPU generator so every device gives the same eps."""
    return torch.cat([adapter.sample_noise(1, resolution, torch.Generator().manual_seed(int(s))) for s in seeds])


def conditioning_from_batch(batch: dict[str, Any], device: torch.device) -> TextConditioning:
    embeds = torch.as_tensor(np.asarray(batch["prompt_embeds"]), dtype=torch.float32, device=device)
    pooled = torch.as_tensor(np.asarray(batch["pooled"]), dtype=torch.float32, device=device)
    return TextConditioning(embeds, pooled, torch.zeros(embeds.shape[1], 3, device=device))


class TextEmbedStage:
    """caption -> prompt_embeds [L, d_t5], pooled [d_clip] (frozen CLIP-L + T5)."""

    def __init__(self, cfg_dict: dict[str, Any]) -> None:
        cfg = config_from_dict(cfg_dict)
        self.device = resolve_device(cfg.train.device)
        self.adapter = load_adapter(cfg.model.family, cfg.model.path, self.device, cfg.model.max_sequence_length,
                                    load_text_encoders=True, load_transformer=False)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cond = self.adapter.encode_prompts([str(c) for c in batch["caption"]])
        batch["prompt_embeds"] = cond.prompt_embeds.cpu().numpy()
        batch["pooled"] = cond.pooled.cpu().numpy()
        return batch


class EmbeddingLookupStage:
    """prompt_index -> prompt_embeds, pooled read from the `srpo preprocess` parquet (no text encoder)."""

    def __init__(self, embeddings_dir: str) -> None:
        self.dir = embeddings_dir

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from pipeline.embeddings import load_embeddings

        embeds, pooled = load_embeddings(self.dir, [int(i) for i in batch["prompt_index"]])
        batch["prompt_embeds"] = embeds.float().numpy()
        batch["pooled"] = pooled.float().numpy()
        return batch


class RolloutStage:
    """(caption, embeddings) -> x0, eps, policy_version: generation with the newest allowed weights.

    Before each batch it waits until the learner has published version >= step - max_staleness
    (the staleness bound, enforced as flow control) and loads the newest weights.
    """

    def __init__(self, cfg_dict: dict[str, Any], store) -> None:
        from actors.weights import make_subscriber

        cfg = config_from_dict(cfg_dict)
        self.cfg = cfg
        self.device = resolve_device(cfg.train.device)
        self.adapter = load_adapter(cfg.model.family, cfg.model.path, self.device, cfg.model.max_sequence_length,
                                    load_text_encoders=False, load_transformer=True)
        self.adapter.transformer.requires_grad_(False).eval()
        # object_store: pull the newest ref; broadcast: a receiver thread in the learner's broadcast group.
        self.weights = make_subscriber(cfg.rollout.weight_sync, store, self.adapter.transformer, self.device)
        self.global_batch = cfg.train.batch_size * max(1, cfg.learner.num_workers)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cfg = self.cfg
        t0 = time.perf_counter()
        oldest_step = int(np.min(batch["step"]))
        version = self.weights.refresh(max(0, oldest_step - cfg.rollout.max_staleness))
        t1 = time.perf_counter()
        cond = conditioning_from_batch(batch, self.device)
        eps = draw_eps(self.adapter, [int(s) for s in batch["noise_seed"]], cfg.data.resolution)
        x0 = sample_x0(self.adapter, self.adapter.transformer, eps, cond, cfg.data.resolution, cfg.rollout.steps,
                       cfg.rollout.shift, cfg.rollout.guidance, cfg.train.mixed_precision)
        n = len(batch["caption"])
        batch["x0"] = x0.cpu().numpy()
        batch["eps"] = eps.cpu().numpy()
        batch["policy_version"] = np.full(n, version, dtype=np.int64)
        batch["weight_sync_s"] = np.full(n, t1 - t0, dtype=np.float64)
        batch["weight_sync_bytes"] = np.full(n, self.weights.last_sync_bytes, dtype=np.int64)
        batch["rollout_s"] = np.full(n, time.perf_counter() - t1, dtype=np.float64)
        return batch


class ImageEncodeStage:
    """(path, noise_seed) -> x0 (VAE latent of the real image, normalised, packed), eps: offline mode.

    x0 is the posterior mean of the frozen FLUX VAE (no sampling: the anchor of a file is the same
    in every epoch); eps is fresh noise per sample, regenerated from its seed.
    """

    def __init__(self, cfg_dict: dict[str, Any]) -> None:
        cfg = config_from_dict(cfg_dict)
        self.cfg = cfg
        self.device = resolve_device(cfg.train.device)
        self.adapter = load_adapter(cfg.model.family, cfg.model.path, self.device, cfg.model.max_sequence_length,
                                    load_text_encoders=False, load_transformer=False)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from pipeline.images import load_image

        cfg = self.cfg
        t0 = time.perf_counter()
        # The pre-flight scan checked every file; one that broke since is an error, not a silent skip.
        pixels = np.stack([load_image(str(p), cfg.data.resolution, cfg.data.min_image_size) for p in batch["path"]])
        x0 = self.adapter.encode_images(torch.from_numpy(pixels))
        eps = draw_eps(self.adapter, [int(s) for s in batch["noise_seed"]], cfg.data.resolution)
        n = len(batch["path"])
        batch["x0"] = x0.cpu().numpy()
        batch["eps"] = eps.cpu().numpy()
        batch["rollout_s"] = np.full(n, time.perf_counter() - t0, dtype=np.float64)
        return batch
