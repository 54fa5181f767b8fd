"""Reward actors: the gradient relay (DESIGN.md, "The gradient relay").

    learner                                     reward actor i (round-robin)
    x0_hat (graph) --detach, CPU--> submit ---> RewardWorker.loss_grad:
                                                  decode (frozen VAE) -> SRP -> branch loss
    collect <------ (dLoss/dx0_hat, metrics) <--- autograd to the detached latent
    relay_surrogate(x0_hat, grad).backward()  ==  x0_hat.backward(grad)

:class:`RewardWorker` is a plain class (tests build and call it without Ray); :func:`start_reward_actors`
wraps it in restartable Ray actors and :class:`RemoteReward` is the learner-side objective
(``overlap = True``: ``srpo_backward`` puts every branch's round trip in flight before collecting).

Messages (principle 7): the request is :class:`pipeline.objective.RewardRequest` with its tensors on
the CPU; x0_hat travels as a detached CPU float tensor [B, L, C] (packed latent); the reply is a CPU
tensor of the same shape plus a :class:`pipeline.objective.BranchResult`.

Failure handling, as observed with Ray 2.60 on a local cluster: with ``max_restarts=-1`` and
``max_task_retries=-1`` a reward actor whose process is SIGKILLed (mid-task or idle) is restarted
(``__init__`` runs again) and Ray re-runs the lost and queued tasks on it; ``ray.get`` just returns,
a little later. Without task retries (``max_task_retries=0``) the same kill surfaces as
``ActorUnavailableError`` ("may or may not have been executed"), and once restarts are exhausted as
``ActorDiedError``. :meth:`RemoteReward.collect` therefore also resubmits a request itself on any
``RayActorError`` (the parent of both), to the actor after the failed one, at most ``max_resubmits``
times (default 2), then re-raises. Requests are pure functions of their inputs, so running one twice is harmless; the step
counter lives in the learner and is never touched here.
"""
from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from typing import Any

import ray
import torch
from ray.actor import ActorHandle
from ray.exceptions import RayActorError
from torch import Tensor

from actors.priority import work_runtime_env
from pipeline.config import Config, RewardConfig
from pipeline.device import resolve_device
from pipeline.models import load_adapter
from pipeline.objective import BranchResult, ColocatedReward, RewardRequest, relay_surrogate
from rewards.loader import load_reward_model
from rewards.srp import semantic_relative_preference


def _cpu(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach().cpu()


def request_to_cpu(req: RewardRequest) -> RewardRequest:
    """The request with its tensors on the CPU (what crosses the process boundary)."""
    return dataclasses.replace(req, k=_cpu(req.k), discount=_cpu(req.discount))


class RewardWorker:
    """Frozen VAE + reward model: x0_hat -> (dLoss/dx0_hat, metrics), and no-grad scoring."""

    def __init__(self, model_family: str, model_path: str, reward_kind: str, reward_path: str,
                 reward_arch: str | None, tokenizer_path: str | None, resolution: int,
                 device: str = "cpu", image_norm: str = "clamp") -> None:
        # "auto" is resolved here, inside the actor, where Ray has set the visible GPUs.
        self.device = resolve_device(device)
        # Only the VAE: the transformer and the text encoders stay with the learner / rollout.
        self.adapter = load_adapter(model_family, model_path, self.device,
                                    load_text_encoders=False, load_transformer=False)
        self.reward_model = load_reward_model(reward_kind, reward_path, arch=reward_arch or None,
                                              tokenizer_path=tokenizer_path or None, device=self.device)
        self.resolution, self.image_norm = resolution, image_norm
        # The colocated objective itself: relay == colocated holds by construction, image_norm included.
        self.objective = ColocatedReward(self.adapter, self.reward_model, resolution, image_norm)
        self.requests_served = 0

    @classmethod
    def from_config(cls, cfg: Config, device: str | None = None) -> "RewardWorker":
        kw = worker_kwargs(cfg)
        if device is not None:
            kw["device"] = device
        return cls(**kw)

    def loss_grad(self, x0_hat: Tensor, req: RewardRequest) -> tuple[Tensor, BranchResult]:
        """dLoss/dx0_hat [B, L, C] (CPU) and the branch metrics, for a detached x0_hat."""
        self.requests_served += 1
        grad, result = self.objective.loss_grad(x0_hat.to(self.device, torch.float32), req)
        return grad.cpu(), result

    @torch.no_grad()
    def score(self, latents: Tensor, captions: list[str], pos_word: str, neg_word: str,
              k: float, form: str = "reference") -> dict[str, float]:
        """Batch means of the SRP reward (``form`` = srpo.srp_form) and the pos / neg scores of
        decoded packed latents [B, L, C]."""
        self.requests_served += 1
        images = self.adapter.decode(latents.to(self.device, torch.float32), self.resolution, self.image_norm)
        srp = semantic_relative_preference(self.reward_model, images, captions, pos_word, neg_word, float(k),
                                           form=form)
        return {"reward": float(srp.reward.mean()), "pos_score": float(srp.pos_score.mean()),
                "neg_score": float(srp.neg_score.mean())}

    def ping(self) -> int:
        return os.getpid()

    def stats(self) -> dict[str, int]:
        """pid and requests served since this process started (a restart resets the count)."""
        return {"pid": os.getpid(), "requests": self.requests_served}


def worker_kwargs(cfg: Config, entry: RewardConfig | None = None) -> dict[str, Any]:
    """RewardWorker arguments of one training reward (default: the ``reward`` block): one place, for
    actors, Serve replicas and in-process use alike."""
    r = cfg.reward if entry is None else entry
    return dict(model_family=cfg.model.family, model_path=cfg.model.path, reward_kind=r.kind,
                reward_path=r.path, reward_arch=r.arch or None, tokenizer_path=r.tokenizer_path or None,
                resolution=cfg.data.resolution, device="auto" if r.num_gpus > 0 else "cpu", image_norm=r.image_norm)


def start_reward_actors(cfg: Config, entry: RewardConfig | None = None) -> list[ActorHandle]:
    """``num_actors`` restartable RewardWorker actors of one training reward (default: the ``reward``
    block), in its ``runtime_env`` if it has one (Ray must be initialised).

    A restarted actor re-runs ``__init__`` (reloads VAE and reward model); ``max_task_retries=-1``
    makes Ray re-run the requests that were lost with the old process.
    """
    r = cfg.reward if entry is None else entry
    cls = ray.remote(RewardWorker).options(num_cpus=r.num_cpus, num_gpus=r.num_gpus, resources=r.resources or None,
                                           max_restarts=-1, max_task_retries=-1,
                                           runtime_env=work_runtime_env(r.runtime_env))
    kw = worker_kwargs(cfg, r)
    return [cls.remote(**kw) for _ in range(r.num_actors)]


@dataclass
class RewardTicket:
    """A request in flight: its ObjectRef plus what is needed to resubmit it."""

    ref: Any  # a ray.ObjectRef (actor pool) or a Serve DeploymentResponse
    actor: int  # pool index that got it
    method: str
    args: tuple  # CPU payload; kept so a request lost with its actor can be sent again


class RemoteReward:
    """Learner-side reward objective that relays x0_hat to a pool of reward actors."""

    #: srpo_backward runs every branch's forward, submitting each, before collecting any.
    overlap = True

    def __init__(self, handles: list[ActorHandle], max_resubmits: int = 2) -> None:
        if not handles:
            raise ValueError("RemoteReward needs at least one reward actor handle")
        self.handles = list(handles)
        self.max_resubmits = max_resubmits
        self._next = 0
        self.reward_wait_s = 0.0  # seconds blocked in ray.get (logged as time/reward_wait)
        self.resubmits = 0  # requests this class sent again after a RayActorError

    def reset_timers(self) -> None:
        self.reward_wait_s = 0.0

    def step_metrics(self) -> dict[str, float]:
        """Requests sent again after their worker died, since this learner started (a count that grows
        shows workers dying; the results are unaffected)."""
        return {"reward/resubmits": float(self.resubmits)}

    # ---------------------------------------------------------------- plumbing
    @property
    def fanout(self) -> int:
        """Requests a no-grad scoring batch is split into (one per actor of the pool)."""
        return len(self.handles)

    def _result(self, ref: Any) -> Any:
        return ray.get(ref)

    def _send(self, method: str, args: tuple, actor: int | None = None) -> RewardTicket:
        if actor is None:
            actor = self._next
            self._next = (self._next + 1) % len(self.handles)
        ref = getattr(self.handles[actor], method).remote(*args)
        return RewardTicket(ref=ref, actor=actor, method=method, args=args)

    def _wait(self, ticket: RewardTicket) -> Any:
        t0 = time.perf_counter()
        try:
            for attempt in range(self.max_resubmits + 1):
                try:
                    return self._result(ticket.ref)
                except RayActorError:
                    # Ray's own retries (max_task_retries) did not cover this (retries off or
                    # exhausted, or restarts exhausted): send it again, to the actor after the one
                    # that failed (the same one in a pool of one: Ray queues it until the restart).
                    if attempt == self.max_resubmits:
                        raise
                    self.resubmits += 1
                    ticket = self._send(ticket.method, ticket.args, (ticket.actor + 1) % len(self.handles))
        finally:
            self.reward_wait_s += time.perf_counter() - t0

    # ---------------------------------------------------------------- objective protocol
    def submit(self, x0_hat: Tensor, req: RewardRequest) -> RewardTicket:
        """Start the round trip on a detached CPU copy of x0_hat; returns at once."""
        # copy=True: the ticket keeps the payload for a resubmit, so it must not alias the graph tensor.
        payload = x0_hat.detach().to("cpu", torch.float32, copy=True)
        return self._send("loss_grad", (payload, request_to_cpu(req)))

    def collect(self, ticket: RewardTicket, x0_hat: Tensor) -> tuple[Tensor, BranchResult]:
        """Wait for the reply; the surrogate's backward is ``x0_hat.backward(dLoss/dx0_hat)``."""
        grad, result = self._wait(ticket)
        return relay_surrogate(x0_hat, grad), result

    def surrogate(self, x0_hat: Tensor, req: RewardRequest) -> tuple[Tensor, BranchResult]:
        return self.collect(self.submit(x0_hat, req), x0_hat)

    # ---------------------------------------------------------------- metrics
    def score_many(self, latents: Tensor, captions: list[str], pos_word: str, neg_word: str,
                   k: float, form: str = "reference") -> dict[str, float]:
        """No-grad SRP means of packed latents [B, L, C], the batch split over the pool."""
        if latents.shape[0] != len(captions):
            raise ValueError(f"got {len(captions)} captions for {latents.shape[0]} latents")
        x = latents.detach().to("cpu", torch.float32)
        chunks = torch.arange(x.shape[0]).tensor_split(min(self.fanout, x.shape[0]))
        tickets = [(len(idx), self._send("score", (x[idx], [captions[i] for i in idx.tolist()],
                                                   pos_word, neg_word, float(k), form)))
                   for idx in chunks]
        out = {"reward": 0.0, "pos_score": 0.0, "neg_score": 0.0}
        for n, ticket in tickets:
            part = self._wait(ticket)
            for key in out:  # chunk means weighted by chunk size = the batch mean
                out[key] += part[key] * n / x.shape[0]
        return out

    def ping_all(self) -> list[int]:
        """Process ids of the pool (waits for every actor to be up)."""
        return ray.get([h.ping.remote() for h in self.handles])
