"""The rollout actor: a Ray Data stage that generates x0 with versioned policy weights.

A callable class for ``Dataset.map_batches(..., compute=ActorPoolStrategy(...))`` (pipeline/ray/stream.py):
each actor loads the transformer once and keeps it at the newest allowed version through the
weight store (actors/weights.py). Batches are dicts of numpy arrays (row schema: pipeline/sources.py).
"""
from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from actors.weights import make_subscriber
from pipeline.config import config_from_dict
from pipeline.device import resolve_device
from pipeline.lora import LoraSpec, add_lora
from pipeline.models import load_adapter
from pipeline.rollout import rollout_model, rollout_precision, sample_x0
from pipeline.sources import Batch, draw_eps


class RolloutStage:
    """(caption, conditioning) -> x0, eps, policy_version: generation with the newest allowed weights.

    Before each batch it waits until the learner has published version >= step - max_staleness
    (the staleness bound, enforced as flow control) and loads the newest weights.
    """

    def __init__(self, cfg_dict: dict[str, Any], store) -> None:
        cfg = config_from_dict(cfg_dict)
        self.cfg = cfg
        self.device = resolve_device(cfg.train.device)
        self.adapter = load_adapter(cfg.model.family, cfg.model.path, self.device, cfg.model.max_sequence_length,
                                    load_text_encoders=False, load_transformer=True)
        lora = LoraSpec.from_config(cfg)
        if lora is not None:  # the learner's LoRA layers on the same base: the weight sync moves adapters only
            add_lora(self.adapter.transformer, lora, self.adapter, seed=cfg.seed)
        self.adapter.transformer.requires_grad_(False).eval()
        self.model = rollout_model(cfg, self.adapter.transformer)  # rollout.compile: compiled once, here
        # object_store: pull the newest ref; broadcast: a receiver thread in the learner's broadcast group.
        self.weights = make_subscriber(cfg.rollout.weight_sync, store, self.adapter.transformer, self.device)

    def __call__(self, batch: Batch) -> Batch:
        cfg = self.cfg
        t0 = time.perf_counter()
        version = self.weights.refresh(max(0, int(np.min(batch["step"])) - cfg.rollout.max_staleness))
        t1 = time.perf_counter()
        cond = self.adapter.conditioning_from_arrays(batch, self.device)
        eps = draw_eps(self.adapter, [int(s) for s in batch["noise_seed"]], cfg.data.resolution)
        x0 = sample_x0(self.adapter, self.model, eps, cond, cfg.data.resolution, cfg.rollout.steps,
                       cfg.rollout.shift, cfg.rollout.guidance, rollout_precision(cfg))
        n = len(batch["caption"])
        batch["x0"] = x0.cpu().numpy()
        batch["eps"] = eps.cpu().numpy()
        batch["policy_version"] = np.full(n, version, dtype=np.int64)
        batch["weight_sync_s"] = np.full(n, t1 - t0, dtype=np.float64)
        batch["weight_sync_bytes"] = np.full(n, self.weights.last_sync_bytes, dtype=np.int64)
        batch["rollout_s"] = np.full(n, time.perf_counter() - t1, dtype=np.float64)
        batch["rollout_pid"] = np.full(n, os.getpid(), dtype=np.int64)  # provenance across actor restarts
        return batch
