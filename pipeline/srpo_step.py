"""One SRPO optimizer step (SRPO_SPEC.md sections 2-4), as the reference runs it.

    levels m (explicit generator) --> plan: injections x [denoise, inversion]
    for each branch:  x0_hat = direct_align(model, x0, eps, plan)        (learner)
                      loss   = relu(0.7 - SRP(decode(x0_hat))) / 2       (reward objective)
                      loss.backward()                                    (gradients accumulate)
    clip global grad norm (0.1) ; AdamW step ; zero grad

All randomness is an input: the anchor x0 and noise prior eps (from the rollout or real images),
the global step (control words), and a ``torch.Generator`` for the levels m. Replaying a step with
the same inputs and parameters reproduces it bit for bit on the same device.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

from pipeline.config import SRPOConfig
from pipeline.device import autocast
from pipeline.direct_align import BranchPlan, direct_align, draw_levels, plan_step
from pipeline.objective import RewardObjective, RewardRequest
from pipeline.schedules import TrainingGrid
from rewards.srp import control_words


def grid_from_config(cfg: SRPOConfig, shift: float) -> TrainingGrid:
    return TrainingGrid.build(
        train_timestep=cfg.train_timestep, timestep_length=cfg.timestep_length,
        groundtruth_ratio=cfg.groundtruth_ratio, shift=shift, base_steps=cfg.base_steps,
        d_pos=cfg.d_pos, d_inv=cfg.d_inv, margin=cfg.m_margin,
    )


@dataclass
class StepBatch:
    """One device's share of a step. x0, eps: [B, L, C] packed latents (no grad)."""

    x0: Tensor
    eps: Tensor
    cond: Any  # the adapter's text conditioning for the plain captions
    captions: list[str]


@dataclass
class StepMetrics:
    step: int
    pos_word: str
    neg_word: str
    levels: list[list[int]]
    branches: list[dict[str, float]] = field(default_factory=list)
    grad_norm: float = float("nan")
    timings: dict[str, float] = field(default_factory=dict)

    def flat(self) -> dict[str, float]:
        """MLflow-ready scalars: ``<branch>/<metric>`` (first injection) plus totals."""
        out: dict[str, float] = {"grad_norm": self.grad_norm, "loss": sum(b["loss"] for b in self.branches)}
        seen: set[str] = set()
        for b in self.branches:
            name = b["branch"]
            if name in seen:
                continue
            seen.add(name)
            for key, val in b.items():
                if key != "branch":
                    out[f"{name}/{key}"] = float(val)
        out.update(self.timings)
        return out


def request_for(plan: BranchPlan, captions: list[str], cfg: SRPOConfig) -> RewardRequest:
    relative = cfg.variant == "relative_discount"
    return RewardRequest(
        captions=captions, pos_word=plan.pos_word, neg_word=plan.neg_word, k=plan.k, weight=plan.weight,
        hinge_margin=cfg.hinge_margin, loss_kind="relative" if relative else "hinge",
        discount=plan.discount, srp_form=cfg.srp_form,
    )


def srpo_backward(adapter, transformer: torch.nn.Module, objective: RewardObjective, grid: TrainingGrid,
                  cfg: SRPOConfig, batch: StepBatch, step: int, generator: torch.Generator,
                  resolution: int, shift: float, mixed_precision: str = "fp32",
                  levels: list[list[int]] | None = None,
                  backward: Callable[[Tensor], None] = torch.Tensor.backward) -> StepMetrics:
    """Both branches' forward + backward for one batch; gradients accumulate in ``transformer``.

    ``levels`` (m per injection and sample) overrides the generator, for replay and tests.
    ``backward`` runs a branch's backward (an engine's, e.g. DeepSpeed's, instead of autograd's).
    When the objective overlaps (remote reward), every branch's forward runs first and its reward
    round trip is in flight while the next forward computes; backwards then run in branch order.
    """
    if levels is None:
        levels = draw_levels(grid, generator, len(batch.captions), cfg.num_injections)
    pos_word, neg_word = control_words(step, tuple(cfg.positive_words), tuple(cfg.negative_words))
    plans = plan_step(grid, levels, pos_word, neg_word, cfg.variant, cfg.injection_discount, shift)
    metrics = StepMetrics(step=step, pos_word=pos_word, neg_word=neg_word, levels=levels)
    device = batch.x0.device

    def velocity_fn(x: Tensor, sigma: Tensor) -> Tensor:
        return adapter.velocity(transformer, x, sigma, batch.cond, cfg.train_guidance, resolution)

    def forward(plan: BranchPlan) -> Tensor:
        with autocast(device, mixed_precision):
            return direct_align(velocity_fn, batch.x0, batch.eps, plan).float()

    outcomes: list[tuple[BranchPlan, Any]] = []
    if getattr(objective, "overlap", False):
        # Remote reward: every forward first, so each branch's round trip is in flight while the next
        # branch computes; backwards then run in branch order (denoise first, as the reference).
        tickets = []
        for plan in plans:
            x0_hat = forward(plan)
            tickets.append((plan, x0_hat, objective.submit(x0_hat, request_for(plan, batch.captions, cfg))))
        for plan, x0_hat, ticket in tickets:
            surrogate, result = objective.collect(ticket, x0_hat)
            backward(surrogate)
            outcomes.append((plan, result))
    else:
        for plan in plans:
            surrogate, result = objective.surrogate(forward(plan), request_for(plan, batch.captions, cfg))
            backward(surrogate)  # frees this branch's graph before the next forward
            outcomes.append((plan, result))
    for plan, result in outcomes:
        metrics.branches.append({
            "branch": plan.name, "loss": result.loss, "reward": result.reward,
            "pos_score": result.pos_score, "neg_score": result.neg_score,
            "k": float(plan.k.mean()), "sigma_from": float(plan.sigma_from.mean()),
            "sigma_to": float(plan.sigma_to.mean()), "level": float(plan.level.float().mean()),
        })
    return metrics


def build_optimizer(params, lr: float, betas: list[float] | tuple[float, float], eps: float,
                    weight_decay: float) -> torch.optim.AdamW:
    """AdamW of the reference recipe (constant lr, no warmup)."""
    return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)


def optimizer_step(transformer: torch.nn.Module, optimizer: torch.optim.Optimizer, max_grad_norm: float) -> float:
    """Clip the global gradient norm, step, zero; returns the pre-clip norm."""
    params = [p for p in transformer.parameters() if p.requires_grad]
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def srpo_step(adapter, transformer: torch.nn.Module, optimizer: torch.optim.Optimizer,
              objective: RewardObjective, grid: TrainingGrid, cfg: SRPOConfig, batch: StepBatch, step: int,
              generator: torch.Generator, resolution: int, shift: float, max_grad_norm: float,
              mixed_precision: str = "fp32", levels: list[list[int]] | None = None) -> StepMetrics:
    """A whole SRPO step: both branches, clipping, AdamW."""
    metrics = srpo_backward(adapter, transformer, objective, grid, cfg, batch, step, generator,
                            resolution, shift, mixed_precision, levels)
    metrics.grad_norm = optimizer_step(transformer, optimizer, max_grad_norm)
    return metrics
