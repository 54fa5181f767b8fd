"""The SRPO step on the tiny FLUX + tiny HPSv2.1: chain rule, loss definition, replay, variants."""
import copy
import dataclasses

import pytest
import torch

from pipeline.direct_align import plan_branches
from pipeline.objective import RewardRequest, relay_surrogate
from pipeline.srpo_step import SRPOStep, StepBatch, request_for, srpo_backward, srpo_step
from helpers import StepHarness as SRPOTrainer


@pytest.fixture()
def trainer(tiny_cfg):
    torch.manual_seed(0)
    return SRPOTrainer(tiny_cfg("train.batch_size=1"))


def _batch(tr, seed=0, captions=("a photo of a cat sitting on a wooden table",)):
    r = tr.rollout(list(captions), generator=torch.Generator().manual_seed(seed))
    return StepBatch(x0=r.x0, eps=r.eps, cond=r.cond, captions=r.captions)


def test_branch_gradient_wrt_model_output_matches_chain_rule(trainer):
    """dLoss/dv = dLoss/dx0_hat * (sigma_to - sigma_from) / (1 - sigma_to), sign flipped for inversion."""
    tr = trainer
    batch = _batch(tr)
    cfg = tr.cfg.srpo
    for plan in plan_branches(tr.grid, [400], "Detail", "Anime"):
        captured = {}

        def velocity_fn(x, sigma):
            v = tr.adapter.velocity(tr.transformer, x, sigma, batch.cond, cfg.train_guidance, 64)
            v.retain_grad()
            captured["v"] = v
            return v

        from pipeline.direct_align import direct_align

        x0_hat = direct_align(velocity_fn, batch.x0, batch.eps, plan)
        req = request_for(plan, batch.captions, cfg)
        grad_x0_hat, _ = tr.objective.loss_grad(x0_hat, req)  # independent: autograd on a detached leaf
        surrogate, result = tr.objective.surrogate(x0_hat, req)
        surrogate.backward()
        s_from, s_to = float(plan.sigma_from[0]), float(plan.sigma_to[0])
        factor = (s_to - s_from) / (1 - s_to)
        assert (factor < 0) == (plan.name == "denoise")
        assert grad_x0_hat.abs().sum() > 0, "the hinge must be active on the tiny reward"
        torch.testing.assert_close(captured["v"].grad, grad_x0_hat * factor, rtol=1e-4, atol=1e-9)
        # The loss is relu(0.7 - R) / 2 per branch.
        assert result.loss == pytest.approx(max(0.0, 0.7 - result.reward) / 2, rel=1e-5, abs=1e-7)
        tr.optimizer.zero_grad(set_to_none=True)


def test_relay_gradient_equals_colocated_backward(trainer):
    """x0_hat.backward(dLoss/dx0_hat) gives the same transformer gradients as loss.backward()."""
    tr = trainer
    batch = _batch(tr)
    (plan, _) = plan_branches(tr.grid, [600], "Real", "Oil")
    from pipeline.direct_align import direct_align

    vf = lambda x, s: tr.adapter.velocity(tr.transformer, x, s, batch.cond, 3.5, 64)  # noqa: E731
    req = request_for(plan, batch.captions, tr.cfg.srpo)
    tr.objective.surrogate(direct_align(vf, batch.x0, batch.eps, plan), req)[0].backward()
    colocated = {n: p.grad.clone() for n, p in tr.transformer.named_parameters() if p.grad is not None}
    tr.optimizer.zero_grad(set_to_none=True)
    x0_hat = direct_align(vf, batch.x0, batch.eps, plan)
    grad, _ = tr.objective.loss_grad(x0_hat, req)
    relay_surrogate(x0_hat, grad).backward()  # = x0_hat.backward(grad)
    relayed = {n: p.grad.clone() for n, p in tr.transformer.named_parameters() if p.grad is not None}
    assert colocated.keys() == relayed.keys() and len(colocated) > 10
    for n in colocated:
        torch.testing.assert_close(relayed[n], colocated[n], rtol=1e-5, atol=1e-10)


def test_step_metrics_control_words_and_sigmas(trainer):
    tr = trainer
    m = srpo_backward(tr.adapter, tr.transformer, tr.objective, tr.grid, tr.cfg.srpo, _batch(tr), step=7,
                      generator=torch.Generator().manual_seed(0), resolution=64, shift=3.0,
                      mixed_precision=tr.cfg.train.mixed_precision, levels=[[500]])
    assert (m.pos_word, m.neg_word) == ("Real", "Anime")  # 7 % 4 = 3 -> "Real"; 7 % 5 = 2 -> "Anime"
    flat = m.flat()
    assert [b["branch"] for b in m.branches] == ["denoise", "inversion"]
    g = lambda i: 27 / 28 + i * (0.75 - 27 / 28) / 999  # noqa: E731
    assert flat["denoise/sigma_from"] == pytest.approx(g(400)) and flat["denoise/sigma_to"] == pytest.approx(g(500))
    assert flat["inversion/sigma_from"] == pytest.approx(g(600)) and flat["inversion/sigma_to"] == pytest.approx(g(500))
    assert flat["denoise/k"] == pytest.approx(0.1 + 500 * 0.15 / 999)
    assert flat["inversion/k"] == pytest.approx(0.3 + 400 * (0.01 - 0.3) / 999)
    for key in ("denoise/reward", "denoise/pos_score", "denoise/neg_score", "inversion/loss", "loss"):
        assert key in flat


def _replay(tr, state, opt_state, batch, seed):
    tr.transformer.load_state_dict(state)
    # load_state_dict keeps the given tensors (same device/dtype) and AdamW updates them in place.
    tr.optimizer.load_state_dict(copy.deepcopy(opt_state))
    srpo_step(tr.adapter, tr.transformer, tr.optimizer, tr.objective, tr.grid, tr.cfg.srpo, batch, 3,
              torch.Generator().manual_seed(seed), 64, 3.0, max_grad_norm=0.1, mixed_precision=tr.cfg.train.mixed_precision)
    return {k: v.clone() for k, v in tr.transformer.state_dict().items()}


def test_replaying_a_step_is_bit_identical(trainer):
    tr = trainer
    batch = _batch(tr)
    # One real step first so AdamW has state to replay from.
    srpo_step(tr.adapter, tr.transformer, tr.optimizer, tr.objective, tr.grid, tr.cfg.srpo, batch, 0,
              torch.Generator().manual_seed(9), 64, 3.0, max_grad_norm=0.1, mixed_precision=tr.cfg.train.mixed_precision)
    state = copy.deepcopy(tr.transformer.state_dict())
    opt_state = copy.deepcopy(tr.optimizer.state_dict())
    a = _replay(tr, state, opt_state, batch, seed=1)
    b = _replay(tr, state, opt_state, batch, seed=1)
    c = _replay(tr, state, opt_state, batch, seed=2)  # different levels m
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    assert any(not torch.equal(a[k], state[k]) for k in a), "the step must change the parameters"


def test_denoise_only_and_relative_discount_variants(tiny_cfg):
    tr = SRPOTrainer(tiny_cfg("srpo.variant=denoise_only", "train.batch_size=1"))
    m = srpo_backward(tr.adapter, tr.transformer, tr.objective, tr.grid, tr.cfg.srpo, _batch(tr), 0,
                      torch.Generator().manual_seed(0), 64, 3.0, mixed_precision=tr.cfg.train.mixed_precision, levels=[[500]])
    assert [b["branch"] for b in m.branches] == ["denoise"]
    assert m.branches[0]["loss"] == pytest.approx(max(0, 0.7 - m.branches[0]["reward"]), rel=1e-5)

    tr = SRPOTrainer(tiny_cfg("srpo.variant=relative_discount", "train.batch_size=1"))
    m = srpo_backward(tr.adapter, tr.transformer, tr.objective, tr.grid, tr.cfg.srpo, _batch(tr), 0,
                      torch.Generator().manual_seed(0), 64, 3.0, mixed_precision=tr.cfg.train.mixed_precision, levels=[[500]])
    (b,) = m.branches
    discount = 3 * 0.5 / (1 + 2 * 0.5)  # shift(linspace(0, 1, 1001))[500] = shift(0.5)
    assert b["reward"] == pytest.approx((b["pos_score"] - b["neg_score"]) * discount, rel=1e-5)
    assert b["loss"] == pytest.approx(-b["reward"], rel=1e-5)
    # The discount's shift is srpo.discount_shift (the authors' 3), not the rollout's (1 for Qwen-Image).
    cfg = tiny_cfg("srpo.variant=relative_discount", "rollout.shift=1.0")
    assert SRPOStep.from_config(cfg, tr.adapter, None, tr.objective).shift == 3.0
    assert SRPOStep.from_config(tiny_cfg("srpo.discount_shift=2.0"), tr.adapter, None, tr.objective).shift == 2.0


def test_reward_aggregation_runs_every_injection(tiny_cfg):
    tr = SRPOTrainer(tiny_cfg("srpo.num_injections=3", "srpo.injection_discount=0.5", "train.batch_size=1"))
    m = srpo_backward(tr.adapter, tr.transformer, tr.objective, tr.grid, tr.cfg.srpo, _batch(tr), 0,
                      torch.Generator().manual_seed(0), 64, 3.0, mixed_precision=tr.cfg.train.mixed_precision)
    assert len(m.branches) == 6 and len(m.levels) == 3
    # weights 1, .5, .25 over 1.75, halved per branch: the first denoise loss is relu(0.7-R) * (1/1.75) / 2
    first = m.branches[0]
    assert first["loss"] == pytest.approx(max(0, 0.7 - first["reward"]) / 1.75 / 2, rel=1e-5)


def test_bad_loss_kind_is_rejected(trainer):
    req = RewardRequest(captions=["x"], pos_word="P", neg_word="N", k=torch.tensor([0.1]), weight=1.0, loss_kind="l2")
    with pytest.raises(ValueError, match="loss_kind"):
        trainer.objective.loss(torch.zeros(1, 16, 64), req)


def _per_branch_grads(tr, cfg, batch, levels):
    """Both branches of one step with the SRPO config ``cfg``: metrics and each branch's own
    transformer gradients (the backward hook snapshots and clears them after every branch)."""
    params = dict(tr.transformer.named_parameters())
    per_branch = []

    def backward(surrogate):
        surrogate.backward()
        per_branch.append({n: None if p.grad is None else p.grad.clone() for n, p in params.items()})
        tr.optimizer.zero_grad(set_to_none=True)

    tr.optimizer.zero_grad(set_to_none=True)
    m = srpo_backward(tr.adapter, tr.transformer, tr.objective, tr.grid, cfg, batch, 0,
                      torch.Generator().manual_seed(0), 64, 3.0, mixed_precision=tr.cfg.train.mixed_precision, levels=levels,
                      backward=backward)
    return m, per_branch


def test_reward_above_the_hinge_margin_gives_zero_loss_and_zero_gradient(tiny_cfg):
    """loss = relu(margin - R) / 2 per branch: with R > margin (margin -1 here) the loss is 0 and
    d relu / d input = 0, so nothing reaches the transformer: every parameter's gradient is exactly
    0 in both branches, and the step's clipped global norm is 0. The same batch with the recipe's
    margin (0.7) is the control: there the hinge is active and the gradients are not 0."""
    torch.manual_seed(0)
    tr = SRPOTrainer(tiny_cfg("train.batch_size=1", "srpo.hinge_margin=-1"))
    margin = tr.cfg.srpo.hinge_margin
    assert margin == -1.0
    batch, levels = _batch(tr), [[500]]
    m, grads = _per_branch_grads(tr, tr.cfg.srpo, batch, levels)
    assert [b["branch"] for b in m.branches] == ["denoise", "inversion"] and len(grads) == 2
    trainable = [n for n, p in tr.transformer.named_parameters() if p.requires_grad]
    assert len(trainable) > 10
    for branch, g in zip(m.branches, grads):
        # Precondition, from the logged reward of the single sample: R > margin. (The SRP of unit
        # features is bounded by (1 + k) + 1 <= 2.3 in magnitude, so a margin of -3 could never bind;
        # -1 is checked rather than assumed.)
        assert branch["reward"] > margin, branch
        assert branch["loss"] == 0.0, branch  # relu(margin - R) = 0 exactly, not a small number
        for n in trainable:
            # None (no gradient reached the parameter) or a tensor of exact zeros: both are a zero gradient.
            assert g[n] is None or torch.count_nonzero(g[n]) == 0, (branch["branch"], n)
    assert m.flat()["loss"] == 0.0

    # The control: the recipe's margin on the same batch and levels is active and moves every branch.
    m_on, grads_on = _per_branch_grads(tr, dataclasses.replace(tr.cfg.srpo, hinge_margin=0.7), batch, levels)
    for branch, off, g in zip(m_on.branches, m.branches, grads_on):
        assert branch["reward"] == pytest.approx(off["reward"], rel=1e-6)  # the margin does not change R
        assert branch["loss"] == pytest.approx(max(0.0, 0.7 - branch["reward"]) / 2, rel=1e-5) and branch["loss"] > 0
        assert any(g[n] is not None and torch.count_nonzero(g[n]) > 0 for n in trainable), branch["branch"]

    # The whole step (clip + AdamW) sees a global gradient norm of exactly 0.
    step = srpo_step(tr.adapter, tr.transformer, tr.optimizer, tr.objective, tr.grid, tr.cfg.srpo, batch, 0,
                     torch.Generator().manual_seed(0), 64, 3.0, max_grad_norm=0.1, mixed_precision=tr.cfg.train.mixed_precision, levels=levels)
    assert step.grad_norm == 0.0 and step.flat()["loss"] == 0.0
