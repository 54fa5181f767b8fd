"""Direct-Align (SRPO_SPEC.md section 3): inject known noise, take one Euler step, recover x0.

Pure, model-agnostic torch. Latents are any shape [B, ...]; per-sample sigmas are [B] tensors
(or floats) broadcast over the trailing dimensions.

Both branches share the same three formulas:
  noise:    x       = sigma_a * eps + (1 - sigma_a) * x0                  (no gradient)
  step:     x'      = x + (sigma_b - sigma_a) * v,  v = model(x, t(sigma_a))  (gradient through v)
  recover:  x0_hat  = (x' - sigma_b * eps) / (1 - sigma_b)
Denoise: sigma_a = s_hi -> sigma_b = s_lo (toward data). Inversion: sigma_a = s_lo -> sigma_b = s_hi
(toward noise), so d x0_hat / d v = (sigma_b - sigma_a) / (1 - sigma_b) changes sign between them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from pipeline.schedules import TrainingGrid, injection_weights, relative_discount

DENOISE = "denoise"
INVERSION = "inversion"


@dataclass(frozen=True)
class Variant:
    """An SRPO variant as a strategy, chosen once from ``srpo.variant``.

    branches: the Direct-Align branches of one injection, in reference order (denoise first).
    loss_kind: "hinge" (relu(margin - R), the reference) or "relative" (-(r_pos - r_neg) * discount).
    discounted: whether each sample carries the relative discount shift(linspace(0,1,N+1))[m].
    """

    name: str
    branches: tuple[str, ...]
    loss_kind: str
    discounted: bool = False

    def discount(self, m: list[int], grid: TrainingGrid, shift: float) -> Tensor | None:
        if not self.discounted:
            return None
        return torch.tensor([relative_discount(mi, grid.N, shift) for mi in m], dtype=torch.float64)


VARIANTS = {
    # denoise + inversion branches, hinge loss: the authors' released recipe
    "reference": Variant("reference", (DENOISE, INVERSION), "hinge"),
    # the denoise branch alone: the paper's sanity check (reward hacking appears)
    "denoise_only": Variant("denoise_only", (DENOISE,), "hinge"),
    # the authors' later (Qwen-Image) recipe: discounted relative reward, denoise branch only
    "relative_discount": Variant("relative_discount", (DENOISE,), "relative", discounted=True),
}


def variant_named(name: str | Variant) -> Variant:
    if isinstance(name, Variant):
        return name
    if name not in VARIANTS:
        raise ValueError(f"srpo.variant: got {name!r}, expected one of {sorted(VARIANTS)}")
    return VARIANTS[name]


def _bcast(sigma: Tensor | float, like: Tensor) -> Tensor:
    s = torch.as_tensor(sigma, dtype=like.dtype, device=like.device)
    return s.reshape(-1, *([1] * (like.dim() - 1))) if s.dim() else s


def add_noise(x0: Tensor, eps: Tensor, sigma: Tensor | float) -> Tensor:
    """``x_sigma = sigma * eps + (1 - sigma) * x0``."""
    s = _bcast(sigma, x0)
    return s * eps + (1 - s) * x0


def euler_step(x: Tensor, v: Tensor, sigma_from: Tensor | float, sigma_to: Tensor | float) -> Tensor:
    """``x_to = x + (sigma_to - sigma_from) * v``."""
    return x + (_bcast(sigma_to, x) - _bcast(sigma_from, x)) * v


def recover_x0(x: Tensor, eps: Tensor, sigma: Tensor | float) -> Tensor:
    """One-step recovery with the known noise: ``x0_hat = (x - sigma * eps) / (1 - sigma)``."""
    s = _bcast(sigma, x)
    return (x - s * eps) / (1 - s)


@dataclass(frozen=True)
class BranchPlan:
    """Everything one Direct-Align branch needs for a batch, derived from the per-sample levels m.

    sigma_from / sigma_to / k / level: [B] float64 (CPU); level is m (denoise) or m' (inversion).
    pos_word / neg_word are the control words *as given to the reward* (swapped for inversion).
    weight multiplies the branch loss: 1 / num_branches times the injection weight lambda_j.
    discount: [B] the relative-discount factor (only used by the relative_discount variant).
    """

    name: str
    sigma_from: Tensor
    sigma_to: Tensor
    k: Tensor
    level: Tensor
    pos_word: str
    neg_word: str
    weight: float
    discount: Tensor | None = None


def plan_branches(grid: TrainingGrid, m: list[int], pos_word: str, neg_word: str,
                  variant: str | Variant = "reference", injection_weight: float = 1.0,
                  shift: float | None = None) -> list[BranchPlan]:
    """The branches of one noise injection for a batch with per-sample levels ``m``, in reference order.

    ``shift`` (the rollout's time shift) is needed by discounted variants only.
    """
    variant = variant_named(variant)
    den = [grid.denoise_sigmas(mi) for mi in m]
    t = lambda vals: torch.tensor(vals, dtype=torch.float64)  # noqa: E731
    w = injection_weight / len(variant.branches)
    if variant.discounted and shift is None:
        raise ValueError(f"srpo.variant={variant.name}: the relative discount needs rollout.shift")
    plans = [BranchPlan(
        name=DENOISE,
        sigma_from=t([d[0] for d in den]), sigma_to=t([d[1] for d in den]), k=t([d[2] for d in den]),
        level=t(m), pos_word=pos_word, neg_word=neg_word, weight=w,
        discount=variant.discount(m, grid, shift) if variant.discounted else None,
    )]
    if INVERSION in variant.branches:
        inv = [grid.inversion_sigmas(mi) for mi in m]
        plans.append(BranchPlan(
            name=INVERSION,
            sigma_from=t([i[0] for i in inv]), sigma_to=t([i[1] for i in inv]), k=t([i[2] for i in inv]),
            level=t([i[3] for i in inv]), pos_word=neg_word, neg_word=pos_word, weight=w,
        ))
    return plans


def direct_align(velocity_fn: Callable[[Tensor, Tensor], Tensor], x0: Tensor, eps: Tensor,
                 plan: BranchPlan) -> Tensor:
    """Run one branch; returns ``x0_hat`` with the graph through the model's velocity.

    velocity_fn(x, sigma[B]) -> v has the model, text and guidance bound in.
    """
    with torch.no_grad():
        x = add_noise(x0, eps, plan.sigma_from)
    v = velocity_fn(x, plan.sigma_from)
    x_next = euler_step(x, v, plan.sigma_from, plan.sigma_to)
    return recover_x0(x_next, eps, plan.sigma_to)


def draw_levels(grid: TrainingGrid, generator: torch.Generator, batch: int, num_injections: int = 1) -> list[list[int]]:
    """m for every injection and sample: ``out[j][b]``; per sample sorted noisiest first (j = 0)."""
    per_sample = [sorted(grid.sample_m(generator, num_injections), reverse=True) for _ in range(batch)]
    return [[per_sample[b][j] for b in range(batch)] for j in range(num_injections)]


def plan_step(grid: TrainingGrid, levels: list[list[int]], pos_word: str, neg_word: str,
              variant: str | Variant = "reference", injection_discount: float = 1.0,
              shift: float | None = None) -> list[BranchPlan]:
    """All branches of one optimizer step: injections (noisiest first) x branches (denoise first)."""
    weights = injection_weights(len(levels), injection_discount)
    plans: list[BranchPlan] = []
    for m, w in zip(levels, weights):
        plans += plan_branches(grid, m, pos_word, neg_word, variant, w, shift)
    return plans
