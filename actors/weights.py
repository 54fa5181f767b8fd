"""Versioned policy weights: the learner publishes, rollout actors pull (object-store path).

``WeightStore`` is a small async Ray actor holding the newest ``(version, ObjectRef)`` pair. The
learner's rank 0 puts the consolidated state dict in the object store once per step and publishes
the ref; rollout actors call ``wait_for(min_version)`` between batches, which also is the flow
control that bounds staleness: a sample meant for learner step s is only generated once the learner
has published version >= s - max_staleness, so Ray Data's read-ahead cannot run away from the learner.

Cost: one full fp32 copy of the transformer per published version goes through the object store
(FLUX.1-dev: 12B params = 48 GB fp32 / 24 GB bf16 per step). That is fine for the tiny/small presets,
LoRA adapters and CPU runs, and is why the colocated rollout placement (no sync at all) is the
default for FLUX.1-dev.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class PublishedWeights:
    version: int
    refs: list[Any]  # [ObjectRef of dict[str, Tensor]]; wrapped in a list so Ray does not resolve it
    nbytes: int


class WeightStore:
    """Plain class; ``ray.remote(WeightStore)`` makes it the named store actor."""

    def __init__(self) -> None:
        self._latest: PublishedWeights | None = None
        self._learner_version = 0
        self._cond: asyncio.Condition | None = None

    def _condition(self) -> asyncio.Condition:
        if self._cond is None:  # created inside the actor's event loop
            self._cond = asyncio.Condition()
        return self._cond

    async def publish(self, version: int, refs: list[Any], nbytes: int) -> None:
        if self._latest is not None and version <= self._latest.version:
            raise ValueError(f"weight version must increase: got {version} after {self._latest.version}")
        cond = self._condition()
        async with cond:
            self._latest = PublishedWeights(version, refs, nbytes)
            self._learner_version = max(self._learner_version, version)
            cond.notify_all()

    async def wait_for(self, min_version: int, timeout_s: float = 600.0) -> PublishedWeights:
        """The newest weights once their version is >= min_version (raises TimeoutError otherwise)."""
        cond = self._condition()
        async with cond:
            await asyncio.wait_for(
                cond.wait_for(lambda: self._latest is not None and self._latest.version >= min_version),
                timeout_s)
            assert self._latest is not None
            return self._latest

    async def version(self) -> int:
        return -1 if self._latest is None else self._latest.version


def state_nbytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def publish_state(store, version: int, state: dict[str, torch.Tensor]) -> dict[str, float]:
    """Put a state dict in the object store and publish it; returns bytes and seconds for metrics."""
    import ray

    t0 = time.perf_counter()
    cpu_state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    ref = ray.put(cpu_state)
    nbytes = state_nbytes(cpu_state)
    ray.get(store.publish.remote(version, [ref], nbytes))
    return {"weight_sync/bytes": float(nbytes), "weight_sync/publish_s": time.perf_counter() - t0}


class WeightSubscriber:
    """Rollout side: keeps a module at the newest published version, waiting when the bound says so."""

    def __init__(self, store, module: torch.nn.Module) -> None:
        self.store = store
        self.module = module
        self.version = -1
        self.last_sync_s = 0.0
        self.last_sync_bytes = 0

    def refresh(self, min_version: int, timeout_s: float = 600.0) -> int:
        import ray

        t0 = time.perf_counter()
        latest: PublishedWeights = ray.get(self.store.wait_for.remote(min_version, timeout_s))
        if latest.version != self.version:
            state = ray.get(latest.refs[0])
            self.module.load_state_dict(state, strict=True)
            self.version = latest.version
            self.last_sync_bytes = latest.nbytes
        else:
            self.last_sync_bytes = 0
        self.last_sync_s = time.perf_counter() - t0
        return self.version
