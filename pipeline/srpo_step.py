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

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

from pipeline.config import Config, SRPOConfig
from pipeline.device import autocast
from pipeline.direct_align import BranchPlan, direct_align, draw_levels, plan_step, variant_named
from pipeline.objective import BranchResult, RewardObjective, RewardRequest
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
    return RewardRequest(
        captions=captions, pos_word=plan.pos_word, neg_word=plan.neg_word, k=plan.k, weight=plan.weight,
        hinge_margin=cfg.hinge_margin, loss_kind=variant_named(cfg.variant).loss_kind,
        discount=plan.discount, srp_form=cfg.srp_form, branch=plan.name,
    )


class SRPOStep:
    """One SRPO optimizer step, built once from the config: grid, variant, recipe numbers, adapter,
    reward objective and engine are fixed here; ``run`` takes only the per-step inputs.

        levels m --> plans (injections x branches) --> per branch: x0_hat = direct_align(...)
                 --> objective.surrogate / submit+collect --> engine.backward --> engine.step(clip)
    """

    def __init__(self, adapter, engine, objective: RewardObjective, grid: TrainingGrid, cfg: SRPOConfig,
                 resolution: int, shift: float, mixed_precision: str, max_grad_norm: float) -> None:
        self.adapter, self.engine, self.objective, self.grid, self.cfg = adapter, engine, objective, grid, cfg
        self.variant = variant_named(cfg.variant)
        self.resolution, self.shift, self.mixed_precision = resolution, shift, mixed_precision
        self.max_grad_norm = max_grad_norm

    @classmethod
    def from_config(cls, cfg: Config, adapter, engine, objective: RewardObjective) -> "SRPOStep":
        """The grid's sigmas use the rollout's shift; ``shift`` here is the relative discount's, fixed at
        3 in the authors' recipe even where the rollout is unshifted (Qwen-Image: rollout shift 1)."""
        return cls(adapter, engine, objective, grid_from_config(cfg.srpo, cfg.rollout.shift), cfg.srpo,
                   cfg.data.resolution, cfg.srpo.discount_shift, cfg.train.mixed_precision, cfg.optim.max_grad_norm)

    def draw_levels(self, generator: torch.Generator, batch: int) -> list[list[int]]:
        return draw_levels(self.grid, generator, batch, self.cfg.num_injections)

    def sample_levels(self, seeds: list[int]) -> list[list[int]]:
        """Levels m of each sample from its own seed (``level_seed`` of pipeline/sources.py)."""
        per_sample = [self.draw_levels(torch.Generator().manual_seed(int(s)), 1) for s in seeds]
        return [[ps[j][0] for ps in per_sample] for j in range(self.cfg.num_injections)]

    def run(self, batch: StepBatch, step: int, levels: list[list[int]]) -> StepMetrics:
        """Both branches' forward + backward, then clip, AdamW and zero grad through the engine."""
        metrics = self.backward(batch, step, levels)
        metrics.grad_norm = self.engine.step(self.max_grad_norm)
        return metrics

    def backward(self, batch: StepBatch, step: int, levels: list[list[int]]) -> StepMetrics:
        """Gradients of every branch accumulate in the engine's model; no optimizer step.

        When the objective overlaps (remote reward), every branch's forward runs first and its reward
        round trip is in flight while the next forward computes; backwards then run in branch order.
        """
        cfg = self.cfg
        pos_word, neg_word = control_words(step, tuple(cfg.positive_words), tuple(cfg.negative_words))
        plans = plan_step(self.grid, levels, pos_word, neg_word, self.variant, cfg.injection_discount, self.shift)
        metrics = StepMetrics(step=step, pos_word=pos_word, neg_word=neg_word, levels=levels)
        with self.engine.step_scope(len(plans)):
            outcomes = self._overlapped(plans, batch) if self.objective.overlap else self._in_turn(plans, batch)
        metrics.branches = [_branch_metrics(plan, result) for plan, result in outcomes]
        return metrics

    def _in_turn(self, plans: list[BranchPlan], batch: StepBatch) -> list[tuple[BranchPlan, BranchResult]]:
        outcomes = []
        for plan in plans:
            surrogate, result = self.objective.surrogate(self._forward(plan, batch),
                                                         request_for(plan, batch.captions, self.cfg))
            self.engine.backward(surrogate)  # frees this branch's graph before the next forward
            outcomes.append((plan, result))
        return outcomes

    def _overlapped(self, plans: list[BranchPlan], batch: StepBatch) -> list[tuple[BranchPlan, BranchResult]]:
        tickets = []
        for plan in plans:
            x0_hat = self._forward(plan, batch)
            tickets.append((plan, x0_hat, self.objective.submit(x0_hat, request_for(plan, batch.captions, self.cfg))))
        outcomes = []
        for plan, x0_hat, ticket in tickets:  # denoise first, as the reference
            surrogate, result = self.objective.collect(ticket, x0_hat)
            self.engine.backward(surrogate)
            outcomes.append((plan, result))
        return outcomes

    def _forward(self, plan: BranchPlan, batch: StepBatch) -> Tensor:
        model = self.engine.transformer

        def velocity_fn(x: Tensor, sigma: Tensor) -> Tensor:
            return self.adapter.velocity(model, x, sigma, batch.cond, self.cfg.train_guidance, self.resolution)

        with autocast(batch.x0.device, self.mixed_precision):
            return direct_align(velocity_fn, batch.x0, batch.eps, plan).float()


def _branch_metrics(plan: BranchPlan, result: BranchResult) -> dict[str, Any]:
    return {"branch": plan.name, "loss": result.loss, "reward": result.reward,
            "pos_score": result.pos_score, "neg_score": result.neg_score,
            "k": float(plan.k.mean()), "sigma_from": float(plan.sigma_from.mean()),
            "sigma_to": float(plan.sigma_to.mean()), "level": float(plan.level.float().mean())}


class _ModuleEngine:
    """A bare module as an engine (the functional API below): a backward, no optimizer."""

    def __init__(self, transformer: torch.nn.Module, backward: Callable[[Tensor], None]) -> None:
        self.transformer, self.backward = transformer, backward

    def step_scope(self, backwards: int) -> AbstractContextManager:
        return nullcontext()  # a caller holding a real engine opens the engine's own scope


def srpo_backward(adapter, transformer: torch.nn.Module, objective: RewardObjective, grid: TrainingGrid,
                  cfg: SRPOConfig, batch: StepBatch, step: int, generator: torch.Generator,
                  resolution: int, shift: float, *, mixed_precision: str,
                  levels: list[list[int]] | None = None,
                  backward: Callable[[Tensor], None] = torch.Tensor.backward) -> StepMetrics:
    """:meth:`SRPOStep.backward` on a bare module (tests and benchmarks that build no engine).

    ``levels`` (m per injection and sample) overrides the generator, for replay and tests.
    """
    step_obj = SRPOStep(adapter, _ModuleEngine(transformer, backward), objective, grid, cfg, resolution, shift,
                        mixed_precision, max_grad_norm=float("nan"))
    if levels is None:
        levels = step_obj.draw_levels(generator, len(batch.captions))
    return step_obj.backward(batch, step, levels)


def build_optimizer(params, lr: float, betas: list[float] | tuple[float, float], eps: float,
                    weight_decay: float) -> torch.optim.AdamW:
    """AdamW of the reference recipe (the lr schedule is set per step by the learner)."""
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
              generator: torch.Generator, resolution: int, shift: float, *, max_grad_norm: float,
              mixed_precision: str, levels: list[list[int]] | None = None) -> StepMetrics:
    """A whole SRPO step: both branches, clipping, AdamW."""
    metrics = srpo_backward(adapter, transformer, objective, grid, cfg, batch, step, generator,
                            resolution, shift, mixed_precision=mixed_precision, levels=levels)
    metrics.grad_norm = optimizer_step(transformer, optimizer, max_grad_norm)
    return metrics
