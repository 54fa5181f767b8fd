"""Noise schedules and the SRPO training grid (SRPO_SPEC.md sections 1-3).

Conventions: ``x_sigma = (1 - sigma) * x0 + sigma * eps``; sigma = 1 is pure noise. Index
conventions are the reference code's: the training grid ``g`` runs from noisy (index 0) to clean
(index N - 1), and a sample's level ``m`` addresses it as ``g[N - m]`` (larger m = noisier).
All tensors here are float64 on the CPU: they are tiny and the exact values matter
(K = 100 only comes out in float64).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def time_shift(t: torch.Tensor | float, shift: float) -> torch.Tensor:
    """``shift(t) = s t / (1 + (s - 1) t)`` (SD3 / FLUX resolution shift with a fixed s)."""
    t = torch.as_tensor(t, dtype=torch.float64)
    return shift * t / (1 + (shift - 1) * t)


def rollout_sigmas(steps: int, shift: float) -> torch.Tensor:
    """``sigma_i = shift(1 - i / S)`` for i = 0..S: S + 1 values from 1 down to 0."""
    i = torch.arange(steps + 1, dtype=torch.float64)
    return time_shift(1 - i / steps, shift)


def model_timestep(sigma: torch.Tensor | float) -> torch.Tensor:
    """Time fed to the transformer in training and rollouts (every family): ``floor(1000 sigma) / 1000``.

    The reference (the authors' FLUX and Qwen-Image scripts) passes an integer timestep (truncated) and
    divides by 1000, so the model never sees the exact sigma; we reproduce that rather than the
    diffusers pipeline's exact value.
    """
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    return torch.floor(1000 * sigma) / 1000


@dataclass(frozen=True)
class TrainingGrid:
    """The Direct-Align training grid and the SRP interpolation tables.

    g: [N] noise levels, ``linspace(b[A], b[B], N)``, b_j = shift(1 - j / base_steps)
    d_pos: [N] k for the denoise branch, indexed by m
    d_inv: [N] k for the inversion branch, indexed by m'
    span: K = int((1 - groundtruth_ratio) * N) + 1 (before clamping to the sample's m)
    """

    g: torch.Tensor
    d_pos: torch.Tensor
    d_inv: torch.Tensor
    span: int
    margin: int

    @property
    def N(self) -> int:  # noqa: N802 (the paper's name)
        return int(self.g.numel())

    @classmethod
    def build(
        cls,
        *,
        train_timestep: tuple[int, int] | list[int],
        timestep_length: int,
        groundtruth_ratio: float,
        shift: float,
        base_steps: int,
        d_pos: tuple[float, float] | list[float],
        d_inv: tuple[float, float] | list[float],
        margin: int,
    ) -> "TrainingGrid":
        """The recipe's numbers come from the config (``grid_from_config``); none are defaulted here."""
        n = timestep_length
        b = rollout_sigmas(base_steps, shift)
        a_idx, b_idx = train_timestep
        g = torch.linspace(float(b[a_idx]), float(b[b_idx]), n, dtype=torch.float64)
        span = int((1 - groundtruth_ratio) * n) + 1
        return cls(
            g=g,
            d_pos=torch.linspace(d_pos[0], d_pos[1], n, dtype=torch.float64),
            d_inv=torch.linspace(d_inv[0], d_inv[1], n, dtype=torch.float64),
            span=span,
            margin=margin,
        )

    def clamp_span(self, m: int) -> int:
        """``K = min(N - m, K, m)``: keeps both branches inside the grid."""
        return min(self.N - m, self.span, m)

    def sample_m(self, generator: torch.Generator, n: int = 1) -> list[int]:
        """m ~ U{margin, ..., N - margin}, inclusive on both ends (Python ``random.randint``)."""
        lo, hi = self.margin, self.N - self.margin
        return torch.randint(lo, hi + 1, (n,), generator=generator).tolist()

    def denoise_sigmas(self, m: int) -> tuple[float, float, float]:
        """Denoise branch: (s_hi, s_lo, k) with s_hi = g[N - min(m+K, N)], s_lo = g[N - m], k = d_pos[m]."""
        n, k_span = self.N, self.clamp_span(m)
        s_hi = float(self.g[n - min(m + k_span, n)])
        s_lo = float(self.g[n - m])
        return s_hi, s_lo, float(self.d_pos[m])

    def inversion_sigmas(self, m: int) -> tuple[float, float, float, int]:
        """Inversion branch: (s_lo, s_hi, k, m') with m' = max(m - K, 1), s_lo = g[N - m'],
        s_hi = g[N - min(m' + K, N)], k = d_inv[m']."""
        n, k_span = self.N, self.clamp_span(m)
        m_inv = max(m - k_span, 1)
        s_lo = float(self.g[n - m_inv])
        s_hi = float(self.g[n - min(m_inv + k_span, n)])
        return s_lo, s_hi, float(self.d_inv[m_inv]), m_inv


def relative_discount(m: int, n: int, shift: float) -> float:
    """The authors' later denoise-only recipe weights (r_pos - r_neg) by shift(linspace(0,1,N+1))[m]."""
    table = time_shift(torch.linspace(0, 1, n + 1, dtype=torch.float64), shift)
    return float(table[m])


def injection_weights(num: int, discount: float) -> list[float]:
    """Reward-aggregation weights lambda_j ∝ discount^j (j = 0 is the noisiest draw), summing to 1.

    The paper discounts the late (clean) noise levels where reward hacking happens; with
    discount = 1 every injection counts the same.
    """
    raw = [discount**j for j in range(num)]
    total = math.fsum(raw)
    return [w / total for w in raw]


def lr_at(step: int, lr: float, warmup_steps: int) -> float:
    """The learning rate of a step: linear warmup then constant (constant when warmup_steps = 0).
    A pure function of the step, so a resumed run continues the schedule exactly."""
    return lr if warmup_steps <= 0 else lr * min(1.0, (step + 1) / warmup_steps)
