"""SRPO_SPEC.md sections 1-2, every number derived by hand here and compared with the code."""
import math

import pytest
import torch

from helpers import recipe_grid
from pipeline.schedules import (injection_weights, model_timestep, relative_discount,
                                rollout_sigmas, time_shift)


def shift3(t: float) -> float:  # s t / (1 + (s - 1) t) with s = 3, written out
    return 3 * t / (1 + 2 * t)


def test_time_shift_values():
    assert time_shift(0.9, 3.0).item() == pytest.approx(2.7 / 2.8, abs=1e-15)
    assert time_shift(0.5, 3.0).item() == pytest.approx(0.75, abs=1e-15)
    assert time_shift(0.4, 3.0).item() == pytest.approx(2 / 3, abs=1e-15)
    assert time_shift(1.0, 3.0).item() == 1.0 and time_shift(0.0, 3.0).item() == 0.0


def test_rollout_sigmas_25_steps():
    s = rollout_sigmas(25, 3.0)
    assert s.numel() == 26
    for i in range(26):
        assert s[i].item() == pytest.approx(shift3(1 - i / 25), abs=1e-14)
    assert s[0].item() == 1.0 and s[-1].item() == 0.0
    assert bool((s[1:] < s[:-1]).all()), "sigmas must decrease monotonically"


def test_model_timestep_truncates():
    assert model_timestep(0.96429).item() == pytest.approx(0.964)
    assert model_timestep(0.7509).item() == pytest.approx(0.750)
    assert model_timestep(1.0).item() == 1.0


@pytest.mark.parametrize("ts,end", [((5, 25), 0.75), ((5, 30), 2 / 3)])
def test_grid_endpoints(ts, end):
    grid = recipe_grid(train_timestep=ts)
    assert grid.N == 1000
    # b_5 = shift(1 - 5/50) = shift(0.9) = 27/28 = 0.9643; b_25 = shift(0.5) = 0.75; b_30 = shift(0.4) = 2/3
    assert grid.g[0].item() == pytest.approx(27 / 28, abs=1e-12)
    assert grid.g[-1].item() == pytest.approx(end, abs=1e-12)
    step = (end - 27 / 28) / 999
    for i in (0, 1, 400, 500, 999):
        assert grid.g[i].item() == pytest.approx(27 / 28 + i * step, abs=1e-12)


def test_span_is_100_in_float64():
    # (1 - 0.9) = 0.09999999999999998 in float64, times 1000 = 99.99999999999997, int -> 99, + 1 -> 100
    assert int((1 - 0.9) * 1000) == 99
    assert recipe_grid(groundtruth_ratio=0.9).span == 100
    assert recipe_grid(groundtruth_ratio=0.5).span == 501


def test_span_clamping_at_the_edges():
    grid = recipe_grid()
    assert grid.clamp_span(5) == 5  # min(995, 100, 5)
    assert grid.clamp_span(995) == 5  # min(5, 100, 995)
    assert grid.clamp_span(500) == 100
    assert grid.clamp_span(950) == 50  # min(50, 100, 950)
    assert grid.clamp_span(60) == 60


def _g(i, end=0.75):
    return 27 / 28 + i * (end - 27 / 28) / 999


@pytest.mark.parametrize("m,hi_idx,lo_idx,inv_m,inv_lo_idx,inv_hi_idx", [
    # m = 500: K = 100. denoise g[1000-600], g[1000-500]; inversion m' = 400: g[600], g[1000-500]
    (500, 400, 500, 400, 600, 500),
    # m = 5: K = 5. denoise g[1000-10], g[995]; m' = max(0, 1) = 1: g[999], g[1000-6]
    (5, 990, 995, 1, 999, 994),
    # m = 995: K = 5. denoise g[1000-1000], g[5]; m' = 990: g[10], g[1000-995]
    (995, 0, 5, 990, 10, 5),
])
def test_branch_sigmas(m, hi_idx, lo_idx, inv_m, inv_lo_idx, inv_hi_idx):
    grid = recipe_grid()
    s_hi, s_lo, k = grid.denoise_sigmas(m)
    assert s_hi == pytest.approx(_g(hi_idx), abs=1e-12) and s_lo == pytest.approx(_g(lo_idx), abs=1e-12)
    assert k == pytest.approx(0.1 + m * 0.15 / 999, abs=1e-12)  # d_pos = linspace(0.1, 0.25, 1000)[m]
    i_lo, i_hi, k_inv, m_inv = grid.inversion_sigmas(m)
    assert m_inv == inv_m
    assert i_lo == pytest.approx(_g(inv_lo_idx), abs=1e-12) and i_hi == pytest.approx(_g(inv_hi_idx), abs=1e-12)
    assert k_inv == pytest.approx(0.3 + inv_m * (0.01 - 0.3) / 999, abs=1e-12)  # d_inv[m']
    assert s_hi > s_lo and i_hi > i_lo


def test_both_branches_recover_at_g_n_minus_m_in_the_interior():
    grid = recipe_grid()
    for m in range(105, 896, 7):
        _, s_lo, _ = grid.denoise_sigmas(m)
        _, i_hi, _, _ = grid.inversion_sigmas(m)
        assert s_lo == i_hi == grid.g[1000 - m].item()


def test_pickscore_tables():
    grid = recipe_grid(train_timestep=(5, 30), d_pos=(0.1, 0.5), d_inv=(0.6, 0.01))
    assert grid.d_pos[0].item() == pytest.approx(0.1) and grid.d_pos[-1].item() == pytest.approx(0.5)
    assert grid.d_inv[0].item() == pytest.approx(0.6) and grid.d_inv[-1].item() == pytest.approx(0.01)


def test_sample_m_range_and_determinism():
    grid = recipe_grid()
    draws = grid.sample_m(torch.Generator().manual_seed(0), 20000)
    assert min(draws) == 5 and max(draws) == 995  # inclusive on both ends
    assert draws == grid.sample_m(torch.Generator().manual_seed(0), 20000)
    assert draws != grid.sample_m(torch.Generator().manual_seed(1), 20000)


def test_relative_discount_index():
    # shift(linspace(0, 1, N + 1))[m] = shift(m / N)
    for m in (5, 100, 500, 995):
        assert relative_discount(m, 1000, 3.0) == pytest.approx(shift3(m / 1000), abs=1e-14)


def test_injection_weights():
    assert injection_weights(1, 0.5) == [1.0]
    w = injection_weights(3, 0.5)  # 1, 0.5, 0.25 normalised by 1.75
    assert w == pytest.approx([1 / 1.75, 0.5 / 1.75, 0.25 / 1.75])
    assert math.fsum(w) == pytest.approx(1.0)
