"""The reward side of a Direct-Align branch: x0_hat -> image -> SRP -> branch loss.

``branch_loss`` is the one definition of the loss; :class:`ColocatedReward` runs it inside the
learner (as the reference does) and back-propagates into the learner's graph. A remote reward
worker runs the same ``branch_loss`` on a detached copy of x0_hat and returns dLoss/dx0_hat; by the
chain rule (VAE and reward model are frozen) the learner's ``x0_hat.backward(grad)`` then gives the
same parameter gradients.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from pipeline.config import Config, RewardConfig, reward_entries, reward_name
from rewards.base import RewardModel
from rewards.loader import load_reward_model
from rewards.srp import semantic_relative_preference


@dataclass(frozen=True)
class RewardRequest:
    """What the reward side needs for one branch of a batch (crosses process boundaries later).

    k: [B] SRP interpolation weight per sample; discount: [B] or None (relative_discount variant).
    """

    captions: list[str]
    pos_word: str
    neg_word: str
    k: Tensor
    weight: float
    hinge_margin: float = 0.7
    loss_kind: str = "hinge"  # "hinge": relu(margin - R); "relative": -(r_pos - r_neg) * discount
    discount: Tensor | None = None
    srp_form: str = "reference"
    scale: float = 1.0  # multiplies the SRP (reward, pos / neg scores) before the loss: a reward's own scale
    branch: str = ""  # "denoise" or "inversion": names the per-reward metrics of several rewards


@dataclass(frozen=True)
class BranchResult:
    """Per-branch metrics (batch means) and the weighted loss value that was back-propagated."""

    loss: float
    reward: float
    pos_score: float
    neg_score: float


def branch_loss(images: Tensor, reward_model: RewardModel, req: RewardRequest) -> tuple[Tensor, BranchResult]:
    """images [B,3,H,W] in [0,1] (with graph) -> (weighted scalar loss with graph, metrics)."""
    k = req.k.to(device=images.device, dtype=torch.float32)
    srp = semantic_relative_preference(reward_model, images, req.captions, req.pos_word, req.neg_word, k,
                                       form=req.srp_form)
    pos_score, neg_score = srp.pos_score * req.scale, srp.neg_score * req.scale
    if req.loss_kind == "hinge":
        # ReFL-style hinge; the weight carries the 1/2 of the two branches.
        reward = srp.reward * req.scale
        per_sample = torch.relu(req.hinge_margin - reward)
    elif req.loss_kind == "relative":
        assert req.discount is not None, "relative loss needs the per-sample discount"
        reward = (pos_score - neg_score) * req.discount.to(images.device, torch.float32)
        per_sample = -reward
    else:
        raise ValueError(f"loss_kind: got {req.loss_kind!r}, expected 'hinge' or 'relative'")
    loss = per_sample.mean() * req.weight
    return loss, BranchResult(
        loss=float(loss.detach()), reward=float(reward.detach().mean()),
        pos_score=float(pos_score.detach().mean()), neg_score=float(neg_score.detach().mean()),
    )


class RewardObjective(Protocol):
    """The reward side of the learner: everything the learner calls.

    ``surrogate`` returns a scalar whose gradient w.r.t. the learner's parameters equals the branch
    loss's, plus the branch metrics. Colocated, the surrogate is the loss itself. Remote (gradient
    relay), it is ``(x0_hat * dLoss/dx0_hat).sum()`` with the gradient computed by a reward worker:
    the same parameter gradients by the chain rule, and it goes through any engine's ``backward``
    (plain autograd, FSDP2, DeepSpeed) unchanged.

    ``overlap``: True when ``submit`` starts a round trip that runs while the learner computes (the
    step then runs every branch's forward before collecting); ``collect(ticket, x0_hat)`` finishes it.
    ``reward_wait_s``: seconds the learner waited on the reward since ``reset_timers``;
    ``step_metrics``: what else it measured since then (per-reward metrics of several rewards).
    """

    overlap: bool
    reward_wait_s: float

    def surrogate(self, x0_hat: Tensor, req: RewardRequest) -> tuple[Tensor, BranchResult]: ...

    def submit(self, x0_hat: Tensor, req: RewardRequest) -> Any: ...

    def collect(self, ticket: Any, x0_hat: Tensor) -> tuple[Tensor, BranchResult]: ...

    def score_many(self, latents: Tensor, captions: list[str], pos_word: str, neg_word: str, k: float,
                   form: str) -> dict[str, float]: ...

    def reset_timers(self) -> None: ...

    def step_metrics(self) -> dict[str, float]: ...


class ColocatedReward:
    """Decode and score in the learner's process (the reference's placement)."""

    #: Colocated scoring gains nothing from running branches' forwards ahead of their backwards,
    #: and that would keep two graphs alive; remote objectives set this to overlap round trips.
    overlap = False
    reward_wait_s = 0.0  # scoring is part of the learner's own compute

    def __init__(self, adapter, reward_model: RewardModel, resolution: int, image_norm: str = "clamp") -> None:
        self.adapter = adapter
        self.reward_model = reward_model
        self.resolution = resolution
        self.image_norm = image_norm  # reward.image_norm: how the decoded image reaches [0, 1]

    def reset_timers(self) -> None:
        pass

    def step_metrics(self) -> dict[str, float]:
        return {}

    def submit(self, x0_hat: Tensor, req: RewardRequest) -> tuple[Tensor, BranchResult]:
        """Nothing to overlap: the loss is computed at once (with the graph) and handed to collect."""
        return self.surrogate(x0_hat, req)

    def collect(self, ticket: tuple[Tensor, BranchResult], x0_hat: Tensor) -> tuple[Tensor, BranchResult]:
        return ticket

    def loss(self, x0_hat: Tensor, req: RewardRequest) -> tuple[Tensor, BranchResult]:
        images = self.adapter.decode(x0_hat, self.resolution, self.image_norm)
        return branch_loss(images, self.reward_model, req)

    def surrogate(self, x0_hat: Tensor, req: RewardRequest) -> tuple[Tensor, BranchResult]:
        return self.loss(x0_hat, req)

    @torch.no_grad()
    def score_many(self, latents: Tensor, captions: list[str], pos_word: str, neg_word: str, k: float,
                   form: str) -> dict[str, float]:
        """SRP of decoded latents (no gradient): rollout metrics, same return as RemoteReward.score_many."""
        images = self.adapter.decode(latents, self.resolution, self.image_norm)
        k_t = torch.full((len(captions),), float(k), device=images.device)
        srp = semantic_relative_preference(self.reward_model, images, captions, pos_word, neg_word, k_t, form=form)
        return {"reward": float(srp.reward.mean()), "pos_score": float(srp.pos_score.mean()),
                "neg_score": float(srp.neg_score.mean())}

    def loss_grad(self, x0_hat: Tensor, req: RewardRequest) -> tuple[Tensor, BranchResult]:
        """dLoss/dx0_hat for a detached x0_hat: what a remote reward worker returns."""
        leaf = x0_hat.detach().requires_grad_(True)
        loss, result = self.loss(leaf, req)
        (grad,) = torch.autograd.grad(loss, leaf)
        return grad, result


def relay_surrogate(x0_hat: Tensor, grad: Tensor) -> Tensor:
    """A scalar whose backward is ``x0_hat.backward(grad)``."""
    return (x0_hat * grad.to(device=x0_hat.device, dtype=x0_hat.dtype).detach()).sum()


@dataclass(frozen=True)
class RewardPart:
    """One training reward of several: its objective (colocated, actor pool or Serve deployment), its
    weight in the branch loss, its SRP scale and form ("" = the step's ``srpo.srp_form``)."""

    name: str
    objective: Any  # a RewardObjective
    weight: float = 1.0
    scale: float = 1.0
    srp_form: str = ""


class WeightedRewards:
    """Several rewards at once: branch loss = sum_i weight_i * loss_i (each loss with its own SRP scale
    and form). Every part's request is sent before any is collected, so remote parts score in parallel;
    the surrogate is the sum of the parts' surrogates, whose parameter gradient is the weighted sum.

    Metrics: the branch's ``reward``, ``pos_score``, ``neg_score`` are the weighted sums; each part
    also reports ``reward/<name>/<branch>/{loss,reward,pos_score,neg_score}`` (first injection, as
    the branch metrics), ``reward/<name>/rollout/*`` and ``reward/<name>/wait_s`` via ``step_metrics``.
    """

    def __init__(self, parts: list[RewardPart]) -> None:
        if not parts:
            raise ValueError("WeightedRewards needs at least one reward")
        # Round trips first: a colocated part computes its loss at submit, while remote parts score.
        self.parts = sorted(parts, key=lambda p: not p.objective.overlap)
        self.overlap = any(p.objective.overlap for p in parts)
        self._metrics: dict[str, float] = {}

    @property
    def reward_wait_s(self) -> float:  # parts are collected one after the other: their waits add up
        return sum(float(p.objective.reward_wait_s) for p in self.parts)

    def reset_timers(self) -> None:
        for p in self.parts:
            p.objective.reset_timers()
        self._metrics = {}

    def step_metrics(self) -> dict[str, float]:
        out = dict(self._metrics)
        for p in self.parts:
            out[f"reward/{p.name}/wait_s"] = float(p.objective.reward_wait_s)
            out.update({f"reward/{p.name}/{k.removeprefix('reward/')}": v for k, v in p.objective.step_metrics().items()})
        return out

    def _request(self, part: RewardPart, req: RewardRequest) -> RewardRequest:
        return dataclasses.replace(req, weight=req.weight * part.weight, scale=req.scale * part.scale,
                                   srp_form=part.srp_form or req.srp_form)

    def submit(self, x0_hat: Tensor, req: RewardRequest) -> tuple[str, list[Any]]:
        return req.branch, [p.objective.submit(x0_hat, self._request(p, req)) for p in self.parts]

    def collect(self, ticket: tuple[str, list[Any]], x0_hat: Tensor) -> tuple[Tensor, BranchResult]:
        branch, tickets = ticket
        surrogate, results = None, []
        for part, t in zip(self.parts, tickets):
            s, result = part.objective.collect(t, x0_hat)
            surrogate = s if surrogate is None else surrogate + s
            results.append(result)
            for key, val in dataclasses.asdict(result).items():
                self._metrics.setdefault(f"reward/{part.name}/{branch or 'branch'}/{key}", float(val))
        total = BranchResult(
            loss=sum(r.loss for r in results),
            **{k: sum(p.weight * getattr(r, k) for p, r in zip(self.parts, results))
               for k in ("reward", "pos_score", "neg_score")})
        return surrogate, total

    def surrogate(self, x0_hat: Tensor, req: RewardRequest) -> tuple[Tensor, BranchResult]:
        return self.collect(self.submit(x0_hat, req), x0_hat)

    def score_many(self, latents: Tensor, captions: list[str], pos_word: str, neg_word: str, k: float,
                   form: str) -> dict[str, float]:
        """Every part's scaled SRP means (``reward/<name>/rollout/*``); returns their weighted sums."""
        out = {"reward": 0.0, "pos_score": 0.0, "neg_score": 0.0}
        for p in self.parts:
            part = p.objective.score_many(latents, captions, pos_word, neg_word, k, p.srp_form or form)
            for key in out:
                self._metrics[f"reward/{p.name}/rollout/{key}"] = part[key] * p.scale
                out[key] += p.weight * part[key] * p.scale
        return out


def needs_weighting(entries: list[RewardConfig]) -> bool:
    """One reward of weight 1, scale 1 and the step's SRP form is its own objective (the metrics of a
    single-reward run stay as they were); anything else goes through :class:`WeightedRewards`."""
    (r, *more) = entries
    return bool(more) or (r.weight, r.scale, r.srp_form) != (1.0, 1.0, "")


def combine(entries: list[RewardConfig], objectives: list[Any]) -> Any:
    """The learner's objective from one objective per training reward (same order as the entries)."""
    if not needs_weighting(entries):
        return objectives[0]
    return WeightedRewards([RewardPart(reward_name(r), o, r.weight, r.scale, r.srp_form)
                            for r, o in zip(entries, objectives)])


def reward_model_from_config(cfg: Config | RewardConfig, device: torch.device) -> RewardModel:
    """The reward model of one training reward (a Config: its ``reward`` block)."""
    r = cfg.reward if isinstance(cfg, Config) else cfg
    return load_reward_model(r.kind, r.path, arch=r.arch, tokenizer_path=r.tokenizer_path or None, device=device)


def colocated_reward(cfg: Config, adapter, device: torch.device) -> Any:
    """The reference placement: every configured reward model inside the learner's process."""
    entries = [r for _, r in reward_entries(cfg)]
    return combine(entries, [ColocatedReward(adapter, reward_model_from_config(r, device), cfg.data.resolution,
                                             r.image_norm) for r in entries])
