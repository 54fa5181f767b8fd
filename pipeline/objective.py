"""The reward side of a Direct-Align branch: x0_hat -> image -> SRP -> branch loss.

``branch_loss`` is the one definition of the loss; :class:`ColocatedReward` runs it inside the
learner (as the reference does) and back-propagates into the learner's graph. A remote reward
worker runs the same ``branch_loss`` on a detached copy of x0_hat and returns dLoss/dx0_hat; by the
chain rule (VAE and reward model are frozen) the learner's ``x0_hat.backward(grad)`` then gives the
same parameter gradients.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from pipeline.config import Config
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
    if req.loss_kind == "hinge":
        # ReFL-style hinge; the weight carries the 1/2 of the two branches.
        per_sample = torch.relu(req.hinge_margin - srp.reward)
        reward = srp.reward
    elif req.loss_kind == "relative":
        assert req.discount is not None, "relative loss needs the per-sample discount"
        reward = (srp.pos_score - srp.neg_score) * req.discount.to(images.device, torch.float32)
        per_sample = -reward
    else:
        raise ValueError(f"loss_kind: got {req.loss_kind!r}, expected 'hinge' or 'relative'")
    loss = per_sample.mean() * req.weight
    return loss, BranchResult(
        loss=float(loss.detach()), reward=float(reward.detach().mean()),
        pos_score=float(srp.pos_score.detach().mean()), neg_score=float(srp.neg_score.detach().mean()),
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
    ``reward_wait_s``: seconds the learner waited on the reward since ``reset_timers``.
    """

    overlap: bool
    reward_wait_s: float

    def surrogate(self, x0_hat: Tensor, req: RewardRequest) -> tuple[Tensor, BranchResult]: ...

    def submit(self, x0_hat: Tensor, req: RewardRequest) -> Any: ...

    def collect(self, ticket: Any, x0_hat: Tensor) -> tuple[Tensor, BranchResult]: ...

    def score_many(self, latents: Tensor, captions: list[str], pos_word: str, neg_word: str, k: float,
                   form: str) -> dict[str, float]: ...

    def reset_timers(self) -> None: ...


class ColocatedReward:
    """Decode and score in the learner's process (the reference's placement)."""

    #: Colocated scoring gains nothing from running branches' forwards ahead of their backwards,
    #: and that would keep two graphs alive; remote objectives set this to overlap round trips.
    overlap = False
    reward_wait_s = 0.0  # scoring is part of the learner's own compute

    def __init__(self, adapter, reward_model: RewardModel, resolution: int) -> None:
        self.adapter = adapter
        self.reward_model = reward_model
        self.resolution = resolution

    def reset_timers(self) -> None:
        pass

    def submit(self, x0_hat: Tensor, req: RewardRequest) -> tuple[Tensor, BranchResult]:
        """Nothing to overlap: the loss is computed at once (with the graph) and handed to collect."""
        return self.surrogate(x0_hat, req)

    def collect(self, ticket: tuple[Tensor, BranchResult], x0_hat: Tensor) -> tuple[Tensor, BranchResult]:
        return ticket

    def loss(self, x0_hat: Tensor, req: RewardRequest) -> tuple[Tensor, BranchResult]:
        images = self.adapter.decode(x0_hat, self.resolution)
        return branch_loss(images, self.reward_model, req)

    def surrogate(self, x0_hat: Tensor, req: RewardRequest) -> tuple[Tensor, BranchResult]:
        return self.loss(x0_hat, req)

    @torch.no_grad()
    def score_many(self, latents: Tensor, captions: list[str], pos_word: str, neg_word: str, k: float,
                   form: str) -> dict[str, float]:
        """SRP of decoded latents (no gradient): rollout metrics, same return as RemoteReward.score_many."""
        images = self.adapter.decode(latents, self.resolution)
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


def reward_model_from_config(cfg: Config, device: torch.device) -> RewardModel:
    return load_reward_model(cfg.reward.kind, cfg.reward.path, arch=cfg.reward.arch,
                             tokenizer_path=cfg.reward.tokenizer_path or None, device=device)


def colocated_reward(cfg: Config, adapter, device: torch.device) -> ColocatedReward:
    """The reference placement: the configured reward model inside the learner's process."""
    return ColocatedReward(adapter, reward_model_from_config(cfg, device), cfg.data.resolution)
