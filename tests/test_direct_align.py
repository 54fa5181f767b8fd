"""Direct-Align (SRPO_SPEC.md section 3): exact recovery and the chain rule through it."""
import pytest
import torch

from pipeline.direct_align import (DENOISE, INVERSION, add_noise, direct_align, draw_levels, plan_branches,
                                   plan_step, recover_x0)
from helpers import recipe_grid

GRID = recipe_grid()


def _data(b=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 16, 64, generator=g, dtype=torch.float64), torch.randn(b, 16, 64, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("m_values", [[5, 6, 7, 8], [995, 994, 993, 992], [500, 250, 750, 105]])
def test_recovery_is_exact_with_the_true_velocity(m_values):
    x0, eps = _data()
    for plan in plan_branches(GRID, m_values, "P", "N"):
        # A model that predicts exactly eps - x0 must give x0 back from either branch.
        x0_hat = direct_align(lambda x, s: eps - x0, x0, eps, plan)
        torch.testing.assert_close(x0_hat, x0, rtol=0, atol=1e-12)


def test_recovery_exact_at_every_grid_point():
    x0, eps = _data(b=1)
    for m in range(5, 996):
        for plan in plan_branches(GRID, [m], "P", "N"):
            x0_hat = direct_align(lambda x, s: eps - x0, x0, eps, plan)
            assert torch.allclose(x0_hat, x0, rtol=0, atol=1e-10), (m, plan.name)


def test_noise_formula():
    x0, eps = _data(b=2)
    s = torch.tensor([0.25, 0.9], dtype=torch.float64)
    x = add_noise(x0, eps, s)
    torch.testing.assert_close(x[0], 0.25 * eps[0] + 0.75 * x0[0])
    torch.testing.assert_close(recover_x0(x, eps, s), x0)


@pytest.mark.parametrize("m", [5, 300, 500, 995])
def test_gradient_through_recovery_matches_hand_derivation(m):
    """x0_hat = (x + (s_to - s_from) v - s_to eps) / (1 - s_to)  =>  dL/dv = dL/dx0_hat (s_to - s_from) / (1 - s_to).

    Denoise steps toward data (s_to < s_from): the factor is negative. Inversion steps toward noise
    (s_to > s_from): positive. So the same reward gradient pushes v in opposite directions.
    """
    x0, eps = _data(b=1)
    w = torch.randn_like(x0)  # dL/dx0_hat for L = sum(w * x0_hat)
    den_plan, inv_plan = plan_branches(GRID, [m], "P", "N")
    s_hi, s_lo, _ = GRID.denoise_sigmas(m)
    i_lo, i_hi, _, _ = GRID.inversion_sigmas(m)
    for plan, s_from, s_to, sign in ((den_plan, s_hi, s_lo, -1), (inv_plan, i_lo, i_hi, +1)):
        v = torch.randn_like(x0).requires_grad_(True)
        x0_hat = direct_align(lambda x, s: v, x0, eps, plan)
        (w * x0_hat).sum().backward()
        factor = (s_to - s_from) / (1 - s_to)
        assert (factor > 0) == (sign > 0)
        torch.testing.assert_close(v.grad, w * factor, rtol=1e-12, atol=1e-14)


def test_plan_words_weights_and_order():
    den, inv = plan_branches(GRID, [500], "Detail", "Anime")
    assert (den.name, inv.name) == (DENOISE, INVERSION)
    assert (den.pos_word, den.neg_word) == ("Detail", "Anime")
    assert (inv.pos_word, inv.neg_word) == ("Anime", "Detail")  # roles swapped in the inversion branch
    assert den.weight == inv.weight == 0.5  # the "/ 2" of two branches
    (only,) = plan_branches(GRID, [500], "Detail", "Anime", variant="denoise_only")
    assert only.name == DENOISE and only.weight == 1.0
    (rel,) = plan_branches(GRID, [500], "Detail", "Anime", variant="relative_discount", shift=3.0)
    assert rel.discount is not None and rel.discount[0].item() == pytest.approx(1.5 / 2.0)  # shift(0.5) = 0.75
    with pytest.raises(ValueError, match="relative discount needs rollout.shift"):
        plan_branches(GRID, [500], "Detail", "Anime", variant="relative_discount")
    with pytest.raises(ValueError, match="srpo.variant: got 'bogus'"):
        plan_branches(GRID, [500], "Detail", "Anime", variant="bogus")


def test_reward_aggregation_plan():
    levels = draw_levels(GRID, torch.Generator().manual_seed(3), batch=2, num_injections=3)
    assert len(levels) == 3 and all(len(l) == 2 for l in levels)
    for b in range(2):  # noisiest (largest m) first
        assert levels[0][b] >= levels[1][b] >= levels[2][b]
    plans = plan_step(GRID, levels, "P", "N", injection_discount=0.5)
    assert [p.name for p in plans] == [DENOISE, INVERSION] * 3
    assert sum(p.weight for p in plans) == pytest.approx(1.0)
    assert plans[0].weight == pytest.approx(0.5 / 1.75) and plans[4].weight == pytest.approx(0.5 * 0.25 / 1.75)
