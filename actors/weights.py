"""Versioned policy weights: the learner publishes, rollout actors pull (object store or broadcast).

``WeightStore`` is a small async Ray actor holding the newest ``(version, ObjectRef)`` pair. The
learner's rank 0 puts the consolidated state dict in the object store once per step and publishes
the ref; rollout actors call ``wait_for(min_version)`` between batches, which also is the flow
control that bounds staleness: a sample meant for learner step s is only generated once the learner
has published version >= s - max_staleness, so Ray Data's read-ahead cannot run away from the learner.

Cost: one full fp32 copy of the transformer per published version goes through the object store
(FLUX.1-dev: 12B params = 48 GB fp32 / 24 GB bf16 per step). That is fine for the tiny/small presets
and CPU runs, and is why the colocated rollout placement (no sync at all) is the default for
FLUX.1-dev. A LoRA run (lora.rank > 0) moves only its adapters, on both paths: the rollout actors
build the same peft layers on the same base (pipeline/lora.py: policy_state / load_policy_state),
about 0.52 GB fp32 per version for FLUX.1-dev at rank 32 (docs/sizing.md).

``rollout.weight_sync=broadcast`` moves the full weights through a standalone torch.distributed group
(gloo on the CPU, NCCL on GPUs; the default process group, which Ray Train set up for FSDP, is never
touched) between learner rank 0 (group rank 0) and the rollout actors (ranks 1..n):

    learner rank 0: WeightBroadcaster                 rollout actor i: BroadcastSubscriber
      TCPStore master (free port) ---rendezvous via WeightStore (host, port, world, layout)--->
      sender thread: [version] + flat fp32 buffer ==broadcast==> receiver thread: staging buffer
      WeightStore.publish_version(v) after delivery    refresh(min_version): waits for the local
                                                       received version, copies it into the module

The WeightStore still carries the versions and the rendezvous, but the staleness gate is the
receiver's own condition variable. Group creation is collective and the rollout actors only exist
once the learner iterates its shard (Ray Data starts the pool then), so both sides form the group in
their background threads: nothing blocks before the learner's first batch. The learner's publish
only waits for the previous broadcast to finish (one buffer), so a broadcast overlaps the next step.
Limitation: a gloo/NCCL group cannot admit a new member, so a restarted rollout actor cannot rejoin;
broadcast mode fails loudly then (object_store mode keeps rollout actors restartable).
"""
from __future__ import annotations

import asyncio
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import ray
import torch
import torch.distributed as dist

from pipeline.device import distributed_backend, synchronize
from pipeline.lora import load_policy_state, policy_state


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
        self._rendezvous: dict[str, Any] | None = None
        self._next_rank = 1

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

    async def reset(self) -> None:
        """A (re)started learner group begins a new version sequence at its checkpoint's step: the
        versions a crashed group published are gone with its weights."""
        cond = self._condition()
        async with cond:
            self._latest = None
            self._learner_version = 0
            self._rendezvous = None
            self._next_rank = 1

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

    async def publish_version(self, version: int, nbytes: int) -> None:
        """Broadcast mode: record a delivered version (the weights went through the group)."""
        await self.publish(version, [], nbytes)

    async def open_broadcast(self, rendezvous: dict[str, Any]) -> None:
        """Learner rank 0: where the broadcast group meets (host, port, world, prefix, backend, layout)."""
        cond = self._condition()
        async with cond:
            self._rendezvous = dict(rendezvous)
            self._next_rank = 1
            cond.notify_all()

    async def join_broadcast(self, timeout_s: float = 600.0) -> dict[str, Any]:
        """Rollout actor: claim a group rank 1..world-1 once the learner has opened the group."""
        cond = self._condition()
        async with cond:
            await asyncio.wait_for(cond.wait_for(lambda: self._rendezvous is not None), timeout_s)
            assert self._rendezvous is not None
            world = int(self._rendezvous["world_size"])
            if self._next_rank >= world:
                raise RuntimeError(
                    f"rollout.weight_sync=broadcast: all {world - 1} rollout ranks of the weight broadcast "
                    "group are taken; a restarted rollout actor cannot rejoin a live gloo/NCCL group. "
                    "Use rollout.weight_sync=object_store for restartable rollout actors.")
            rank = self._next_rank
            self._next_rank += 1
            return {**self._rendezvous, "rank": rank}


def state_nbytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def publish_state(store, version: int, state: dict[str, torch.Tensor]) -> dict[str, float]:
    """Put a state dict in the object store and publish it; returns bytes and seconds for metrics."""

    t0 = time.perf_counter()
    cpu_state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    ref = ray.put(cpu_state)
    nbytes = state_nbytes(cpu_state)
    ray.get(store.publish.remote(version, [ref], nbytes))
    return {"weight_sync/bytes": float(nbytes), "weight_sync/publish_s": time.perf_counter() - t0}


class WeightSubscriber:
    """Rollout side: keeps a module at the newest published version, waiting when the bound says so
    (its whole state, or a LoRA model's adapters)."""

    def __init__(self, store, module: torch.nn.Module) -> None:
        self.store = store
        self.module = module
        self.version = -1
        self.last_sync_s = 0.0
        self.last_sync_bytes = 0

    def refresh(self, min_version: int, timeout_s: float = 600.0) -> int:

        t0 = time.perf_counter()
        latest: PublishedWeights = ray.get(self.store.wait_for.remote(min_version, timeout_s))
        if latest.version != self.version:
            state = ray.get(latest.refs[0])
            load_policy_state(self.module, state)
            self.version = latest.version
            self.last_sync_bytes = latest.nbytes
        else:
            self.last_sync_bytes = 0
        self.last_sync_s = time.perf_counter() - t0
        return self.version


# ----------------------------------------------------------------------------------------------
# Broadcast path
# ----------------------------------------------------------------------------------------------

BROADCAST_TIMEOUT_S = 600.0
IDLE_TIMEOUT_S = 24 * 3600.0  # a receiver waiting for the next version (the learner may be slow)


def _new_group(backend: str, store, rank: int, world: int, device: torch.device, timeout_s: float):
    """A standalone process group (not registered as, nor touching, the default group)."""

    timeout = timedelta(seconds=timeout_s)
    if backend == "gloo":
        return dist.ProcessGroupGloo(store, rank, world, timeout)
    if backend == "nccl":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        pg = dist.ProcessGroupNCCL(store, rank, world, opts)
        # Bind the communicator to our device eagerly (NCCL is lazy otherwise).
        pg.broadcast([torch.zeros(1, device=device)], _bcast_opts()).wait()
        return pg
    raise ValueError(f"weight broadcast: unsupported backend {backend!r}")


def _bcast_opts(timeout_s: float | None = None):

    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    opts.rootTensor = 0
    if timeout_s is not None:
        opts.timeout = timedelta(seconds=timeout_s)
    return opts


def _layout(state: dict[str, torch.Tensor]) -> list[tuple[str, tuple[int, ...]]]:
    return [(k, tuple(int(d) for d in v.shape)) for k, v in state.items()]


def _views(flat: torch.Tensor, layout) -> dict[str, torch.Tensor]:
    out, offset = {}, 0
    for key, shape in layout:
        n = 1
        for d in shape:
            n *= d
        out[key] = flat[offset:offset + n].view(shape)
        offset += n
    return out


class WeightBroadcaster:
    """Learner rank 0: opens the group, then broadcasts each published version from a sender thread.

    ``publish`` flattens the state dict into one contiguous fp32 buffer (the state dict's key order,
    shipped once as the layout) and hands it to the sender thread; it only waits for the previous
    broadcast to finish. The first broadcast waits (in the thread) until every rollout actor joined.
    """

    def __init__(self, store, state: dict[str, torch.Tensor], num_receivers: int, device: torch.device,
                 timeout_s: float = BROADCAST_TIMEOUT_S, host: str | None = None,
                 last_version: int | None = None) -> None:
        self.store = store
        self.device = device
        self.timeout_s = timeout_s
        self.backend = distributed_backend(device)
        self.layout = _layout(state)
        self.numel = sum(v.numel() for v in state.values())
        self.nbytes = self.numel * 4
        self.buffer = torch.empty(self.numel, dtype=torch.float32, device=device)
        self.world = 1 + num_receivers
        # Versions above last_version are recorded in the WeightStore but not broadcast: no rollout
        # needs them, and Ray Data shuts the rollout pool down once its last batch is made, so a
        # broadcast then would hit dead peers.
        self.last_version = last_version
        host = host or ray.util.get_node_ip_address()
        self._tcp = dist.TCPStore(host, 0, self.world, True, timedelta(seconds=timeout_s), wait_for_workers=False)
        prefix = f"srpo-weights/{uuid.uuid4().hex}"
        ray.get(store.open_broadcast.remote({
            "host": host, "port": int(self._tcp.port), "world_size": self.world, "prefix": prefix,
            "backend": self.backend, "layout": self.layout, "last_version": last_version}))
        self._cond = threading.Condition()
        self._pending: int | None = None  # version waiting in self.buffer for the sender
        self._sending = False
        self._closed = False
        self._error: BaseException | None = None
        self.last_broadcast_s = 0.0
        self.last_broadcast_version = -1
        self.group_ready_s: float | None = None
        self._thread = threading.Thread(target=self._run, args=(prefix,), name="weight-broadcast", daemon=True)
        self._thread.start()

    def _busy(self) -> bool:
        return self._pending is not None or self._sending

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise RuntimeError(
                "rollout.weight_sync=broadcast: the weight broadcast failed (did a rollout actor die? a "
                "restarted actor cannot rejoin the group; use weight_sync=object_store for restartable "
                f"rollouts): {self._error!r}") from self._error

    def publish(self, version: int, state: dict[str, torch.Tensor]) -> dict[str, float]:
        t0 = time.perf_counter()
        with self._cond:
            if not self._cond.wait_for(lambda: not self._busy() or self._error is not None, self.timeout_s):
                raise TimeoutError(f"weight broadcast of version {self.last_broadcast_version + 1} did not "
                                   f"finish within {self.timeout_s}s (are all rollout actors alive?)")
            self._raise_if_failed()
            if _layout(state) != self.layout:
                raise ValueError("weight broadcast: the state dict's keys/shapes changed since the group opened")
            t_wait = time.perf_counter() - t0
            for view, v in zip(_views(self.buffer, self.layout).values(), state.values()):
                view.copy_(v.detach())
            self._pending = version
            self._cond.notify_all()
        skip = self.last_version is not None and version > self.last_version
        return {"weight_sync/bytes": 0.0 if skip else float(self.nbytes), "weight_sync/publish_s": time.perf_counter() - t0,
                "weight_sync/wait_prev_s": t_wait,
                # The previous version's broadcast, measured in the sender thread.
                "weight_sync/broadcast_s": self.last_broadcast_s}

    def flush(self, timeout_s: float | None = None) -> dict[str, float]:
        """Wait until the newest published version was delivered (tests, end of training)."""
        with self._cond:
            if not self._cond.wait_for(lambda: not self._busy() or self._error is not None,
                                       timeout_s or self.timeout_s):
                raise TimeoutError("weight broadcast: flush timed out")
            self._raise_if_failed()
        return {"weight_sync/bytes": float(self.nbytes), "weight_sync/broadcast_s": self.last_broadcast_s}

    def close(self) -> None:
        """Best effort: stop the sender (pending broadcasts are dropped)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _run(self, prefix: str) -> None:
        try:
            t0 = time.perf_counter()
            pg = _new_group(self.backend, dist.PrefixStore(prefix, self._tcp), 0, self.world, self.device,
                            self.timeout_s)
            self.group_ready_s = time.perf_counter() - t0
            header = torch.empty(1, dtype=torch.int64, device=self.device)
            while True:
                with self._cond:
                    self._cond.wait_for(lambda: self._pending is not None or self._closed)
                    if self._closed:
                        return
                    version, self._pending, self._sending = self._pending, None, True
                if self.last_version is not None and version > self.last_version:
                    ray.get(self.store.publish_version.remote(version, 0))  # no rollout needs it
                    with self._cond:
                        self._sending = False
                        self._cond.notify_all()
                    continue
                t0 = time.perf_counter()
                header.fill_(version)
                pg.broadcast([header], _bcast_opts()).wait()
                pg.broadcast([self.buffer], _bcast_opts()).wait()
                synchronize(self.device)
                dt = time.perf_counter() - t0
                ray.get(self.store.publish_version.remote(version, self.nbytes))
                with self._cond:
                    self._sending = False
                    self.last_broadcast_s = dt
                    self.last_broadcast_version = version
                    self._cond.notify_all()
        except BaseException as e:  # noqa: BLE001 - surfaced on the next publish
            with self._cond:
                self._error = e
                self._sending = False
                self._cond.notify_all()


class BroadcastSubscriber:
    """Rollout side of the broadcast path; same interface as ``WeightSubscriber``.

    The constructor claims a group rank from the WeightStore; a receiver thread forms the group and
    then loops: receive [version], receive the flat buffer into a staging buffer, swap it with the
    ready buffer (double buffering: ``refresh`` may copy from the ready one meanwhile).
    """

    def __init__(self, store, module: torch.nn.Module, device: torch.device | None = None,
                 timeout_s: float = BROADCAST_TIMEOUT_S) -> None:

        self.store = store
        self.module = module
        self.device = device or torch.device("cpu")
        self.version = -1
        self.last_sync_s = 0.0
        self.last_sync_bytes = 0
        self.last_recv_s = 0.0  # receive time of the newest staged version (receiver thread)
        self.last_load_s = 0.0  # copy from the staging buffer into the module
        info = ray.get(store.join_broadcast.remote(timeout_s))
        self.rank = int(info["rank"])

        if info["backend"] != distributed_backend(self.device):
            raise RuntimeError(f"weight broadcast: the learner uses {info['backend']} but this rollout actor's "
                               f"device {self.device} needs {distributed_backend(self.device)}")
        self.layout = [(k, tuple(s)) for k, s in info["layout"]]
        own = policy_state(module)  # the whole state, or a LoRA model's adapters
        if sorted(_layout(own)) != sorted(self.layout):
            raise RuntimeError("weight broadcast: the learner's state dict layout differs from the rollout model's "
                               "(the same lora.* settings on both sides?)")
        self.numel = sum(v.numel() for v in own.values())
        self._bufs = [torch.empty(self.numel, dtype=torch.float32, device=self.device) for _ in range(2)]
        self._ready = 0  # index of the buffer holding the newest received version
        self._received = -1
        self._cond = threading.Condition()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(info, timeout_s), name="weight-receive",
                                        daemon=True)
        self._thread.start()

    @property
    def received_version(self) -> int:
        return self._received

    def _run(self, info: dict[str, Any], timeout_s: float) -> None:
        try:
            tcp = dist.TCPStore(info["host"], int(info["port"]), int(info["world_size"]), False,
                                timedelta(seconds=timeout_s))
            pg = _new_group(info["backend"], dist.PrefixStore(info["prefix"], tcp), self.rank,
                            int(info["world_size"]), self.device, timeout_s)
            header = torch.empty(1, dtype=torch.int64, device=self.device)
            last = info.get("last_version")
            while last is None or self._received < last:
                # No timeout on the header: the learner may legitimately be slow between versions.
                pg.broadcast([header], _bcast_opts(IDLE_TIMEOUT_S)).wait()
                version = int(header.item())
                t0 = time.perf_counter()
                incoming = 1 - self._ready
                pg.broadcast([self._bufs[incoming]], _bcast_opts()).wait()
                synchronize(self.device)
                dt = time.perf_counter() - t0
                with self._cond:
                    self._ready, self._received, self.last_recv_s = incoming, version, dt
                    self._cond.notify_all()
            # The learner broadcasts no version above `last` (no rollout needs one). Leaving now, rather
            # than blocking in the next receive, lets the actor exit cleanly when Ray Data stops the pool:
            # a thread blocked in a collective during interpreter shutdown aborts the process (SIGABRT).
            raise EOFError(f"no version above {last} is broadcast in this run")
        except BaseException as e:  # noqa: BLE001 - surfaced by refresh
            with self._cond:
                self._error = e
                self._cond.notify_all()

    def refresh(self, min_version: int, timeout_s: float = BROADCAST_TIMEOUT_S) -> int:
        t0 = time.perf_counter()
        with self._cond:
            ok = self._cond.wait_for(lambda: self._received >= min_version or self._error is not None, timeout_s)
            if self._received < min_version:
                if self._error is not None:
                    raise RuntimeError(f"weight broadcast receiver failed: {self._error!r}") from self._error
                if not ok:
                    raise TimeoutError(f"weight version {min_version} not received within {timeout_s}s "
                                       f"(have {self._received})")
            if self._received != self.version:
                t1 = time.perf_counter()
                load_policy_state(self.module, _views(self._bufs[self._ready], self.layout))
                self.last_load_s = time.perf_counter() - t1
                self.version = self._received
                self.last_sync_bytes = self.numel * 4
            else:
                self.last_sync_bytes = 0
        self.last_sync_s = time.perf_counter() - t0
        return self.version


class ObjectStorePublisher:
    """Learner rank 0, object-store path: same interface as ``WeightBroadcaster``."""

    def __init__(self, store) -> None:
        self.store = store

    def publish(self, version: int, state: dict[str, torch.Tensor]) -> dict[str, float]:
        return publish_state(self.store, version, state)

    def close(self) -> None:
        pass


def make_publisher(weight_sync: str, store, state: dict[str, torch.Tensor], num_receivers: int,
                   device: torch.device, last_version: int | None = None):
    """``last_version``: the newest version a rollout can still need (max_steps - 1 - max_staleness)."""
    if weight_sync == "broadcast":
        return WeightBroadcaster(store, state, num_receivers, device, last_version=last_version)
    return ObjectStorePublisher(store)


def make_subscriber(weight_sync: str, store, module: torch.nn.Module, device: torch.device):
    if weight_sync == "broadcast":
        return BroadcastSubscriber(store, module, device)
    return WeightSubscriber(store, module)


class LearnerWeightSync:
    """The learner's side of weight sync (the Learner's ``WeightSync``): rank 0 owns the publisher;
    the other ranks only take part in gathering the full state (a collective on sharded engines)."""

    def __init__(self, cfg, store, rank: int, device: torch.device) -> None:
        self.cfg, self.store, self.rank, self.device = cfg, store, rank, device
        self.publisher = None

    def open(self, state: dict[str, torch.Tensor], version: int) -> None:
        """A new version sequence from the restored step (a crashed group's versions are void), then
        the current weights as ``version``. broadcast: opens the group and queues the first version;
        nothing here waits for the rollout actors, which Ray Data only starts once the learner
        iterates its shard. The last step's samples need version >= max_steps - 1 - max_staleness;
        newer versions are recorded but not broadcast (the rollout pool may already be gone)."""
        if self.rank != 0:
            return
        cfg = self.cfg
        ray.get(self.store.reset.remote())
        self.publisher = make_publisher(cfg.rollout.weight_sync, self.store, state, cfg.rollout.num_actors,
                                        self.device,
                                        last_version=max(0, cfg.train.max_steps - 1 - cfg.rollout.max_staleness))
        self.publisher.publish(version, state)

    def publish(self, version: int, state: dict[str, torch.Tensor]) -> dict[str, float]:
        return self.publisher.publish(version, state) if self.publisher is not None else {}

    def close(self) -> None:
        if self.publisher is not None:
            self.publisher.close()
