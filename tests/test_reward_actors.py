"""Reward actors (the gradient relay) on a local Ray cluster, tiny FLUX + tiny HPSv2.1 on the CPU.

Tolerances. In-process (RewardWorker vs ColocatedReward): the same ops on the same weights in the
same process, so equal bit for bit. Through Ray: the actor runs the same ops in another process
that Ray limits to one intra-op thread (OMP_NUM_THREADS = num_cpus = 1) while this process uses the
machine's threads, so float32 reductions may be split differently: rtol 1e-4 with an atol of 1e-6
of the largest gradient entry, far below any real difference (a wrong sign, branch or word swap
changes gradients at O(1) relative).
"""
from __future__ import annotations

import os
import signal
import time

import pytest
import torch

import ray  # noqa: E402

from actors.reward import RemoteReward, RewardWorker, start_reward_actors, worker_kwargs  # noqa: E402
from pipeline.direct_align import direct_align, plan_branches  # noqa: E402
from pipeline.objective import ColocatedReward  # noqa: E402
from pipeline.srpo_step import StepBatch, request_for, srpo_backward  # noqa: E402
from helpers import StepHarness as SRPOTrainer  # noqa: E402
from rewards.srp import semantic_relative_preference  # noqa: E402

REMOTE = ("reward.placement=remote", "reward.num_actors=2", "reward.num_cpus=1", "train.batch_size=2")
LEVELS = [[300, 700]]  # m per sample (one injection), explicit so both runs see the same branches
# Ray's ActorDiedError message (ray.exceptions.ActorDiedError.BASE_ERROR_MSG), with the actor's class.
DIED = r"(?s)The actor died unexpectedly before finishing this task\..*class_name: RewardWorker"


@pytest.fixture(scope="module")
def ray_cluster(ray_local):
    """The session's local Ray (tests/conftest.py); actor pools are cached in the yielded dict."""
    pools: dict = {}
    yield pools
    pools.clear()


@pytest.fixture()
def cfg(tiny_cfg):
    return tiny_cfg(*REMOTE)


@pytest.fixture()
def handles(ray_cluster, cfg):
    """The two reward actors of ``cfg``, started once per module (starting one costs seconds)."""
    key = tuple(sorted(worker_kwargs(cfg).items()))
    if key not in ray_cluster:
        ray_cluster[key] = start_reward_actors(cfg)
    return ray_cluster[key]


@pytest.fixture()
def trainer(cfg):
    torch.manual_seed(0)
    return SRPOTrainer(cfg)


def _batch(tr: SRPOTrainer, seed: int = 0) -> StepBatch:
    r = tr.rollout(tr.prompts_for(0), generator=torch.Generator().manual_seed(seed))
    return StepBatch(x0=r.x0, eps=r.eps, cond=r.cond, captions=r.captions)


def _step_grads(tr: SRPOTrainer, objective, batch: StepBatch, step: int = 3):
    """One SRPO step's transformer gradients (both branches) and branch metrics; grads are reset."""
    tr.optimizer.zero_grad(set_to_none=True)
    m = srpo_backward(tr.adapter, tr.transformer, objective, tr.grid, tr.cfg.srpo, batch, step,
                      torch.Generator().manual_seed(0), tr.cfg.data.resolution, tr.cfg.rollout.shift,
                      mixed_precision=tr.cfg.train.mixed_precision, levels=LEVELS)
    grads = {n: p.grad.clone() for n, p in tr.transformer.named_parameters() if p.grad is not None}
    tr.optimizer.zero_grad(set_to_none=True)
    return grads, m


def _assert_grads_close(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys() and len(expected) > 10
    scale = max(float(g.abs().max()) for g in expected.values())
    assert scale > 0, "the hinge must be active on the tiny reward"
    for n in expected:
        torch.testing.assert_close(actual[n], expected[n], rtol=1e-4, atol=1e-6 * scale, msg=n)


def _assert_branches_close(actual, expected) -> None:
    assert [b["branch"] for b in actual.branches] == [b["branch"] for b in expected.branches] == [
        "denoise", "inversion"]
    for a, e in zip(actual.branches, expected.branches):
        for key in ("loss", "reward", "pos_score", "neg_score", "k", "sigma_from"):
            assert a[key] == pytest.approx(e[key], rel=1e-4, abs=1e-7), key


def _kill(pid: int) -> None:
    """SIGKILL a reward actor's process and wait until it is gone."""
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        with open(f"/proc/{pid}/stat") as f:  # a zombie counts as gone (its parent reaps it later)
            if f.read().split(") ")[-1].startswith("Z"):
                break
        time.sleep(0.01)


# --------------------------------------------------------------------------------------------
def test_worker_loss_grad_equals_colocated_without_ray(cfg, trainer):
    """The plain class: same dLoss/dx0_hat and metrics as ColocatedReward in this process (exact)."""
    worker = RewardWorker.from_config(cfg)
    assert worker.adapter.transformer is None and worker.adapter.text_encoder is None  # VAE only
    tr = trainer
    batch = _batch(tr)
    for plan in plan_branches(tr.grid, LEVELS[0], "Detail", "Anime"):
        vf = lambda x, s: tr.adapter.velocity(tr.transformer, x, s, batch.cond, 3.5, 64)  # noqa: E731
        x0_hat = direct_align(vf, batch.x0, batch.eps, plan)
        req = request_for(plan, batch.captions, tr.cfg.srpo)
        grad, result = worker.loss_grad(x0_hat.detach(), req)
        expected, expected_result = ColocatedReward(tr.adapter, tr.reward_model, 64).loss_grad(x0_hat, req)
        assert grad.shape == x0_hat.shape and grad.device.type == "cpu"
        assert grad.abs().sum() > 0
        torch.testing.assert_close(grad, expected, rtol=0, atol=0)
        assert result == expected_result


def test_remote_step_gradients_equal_colocated(trainer, handles):
    """One SRPO step through 2 reward actors = the colocated step; both actors served requests."""
    tr = trainer
    batch = _batch(tr)
    colocated, m_col = _step_grads(tr, tr.objective, batch)
    before = {s["pid"]: s["requests"] for s in ray.get([h.stats.remote() for h in handles])}
    remote = RemoteReward(handles)
    relayed, m_rem = _step_grads(tr, remote, batch)
    after = {s["pid"]: s["requests"] for s in ray.get([h.stats.remote() for h in handles])}
    _assert_grads_close(relayed, colocated)
    _assert_branches_close(m_rem, m_col)
    assert len(after) == 2 and after.keys() == before.keys() != {os.getpid()}
    assert all(after[p] - before[p] == 1 for p in after), (before, after)  # one branch each
    assert remote.reward_wait_s > 0 and remote.resubmits == 0
    remote.reset_timers()
    assert remote.reward_wait_s == 0.0


def test_both_branches_are_in_flight_before_the_first_collect(trainer, handles):
    calls: list[str] = []

    class Recording(RemoteReward):
        def submit(self, x0_hat, req):
            calls.append(f"submit:{req.pos_word}")
            return super().submit(x0_hat, req)

        def collect(self, ticket, x0_hat):
            calls.append(f"collect:{ticket.args[1].pos_word}")
            return super().collect(ticket, x0_hat)

        def surrogate(self, x0_hat, req):  # pragma: no cover - must not be used when overlapping
            raise AssertionError("srpo_backward must use submit/collect for an overlapping objective")

    _step_grads(trainer, Recording(handles), _batch(trainer), step=0)
    # step 0: denoise scores "Natural-lighting" vs "Concept art"; inversion has the words swapped.
    assert calls == ["submit:Natural-lighting", "submit:Concept art",
                     "collect:Natural-lighting", "collect:Concept art"]


def test_killed_actor_restarts_and_steps_stay_correct(trainer, handles):
    """SIGKILL a reward actor between steps and while a step's request is in flight: Ray restarts
    it, re-runs the lost request, and every step's gradients still equal the colocated ones."""
    tr = trainer
    batch = _batch(tr, seed=1)
    colocated, m_col = _step_grads(tr, tr.objective, batch)
    remote = RemoteReward(handles)
    pids = remote.ping_all()

    _kill(pids[0])  # between steps: the next request to actor 0 waits for its restart
    relayed, m_rem = _step_grads(tr, remote, batch)
    _assert_grads_close(relayed, colocated)
    _assert_branches_close(m_rem, m_col)
    new_pids = remote.ping_all()
    assert new_pids[0] != pids[0] and new_pids[1] == pids[1]

    class KillAfterSubmit(RemoteReward):
        """Kills the actor that got the first request of the step right after sending it."""

        killed: list[int] = []

        def submit(self, x0_hat, req):
            ticket = super().submit(x0_hat, req)
            if not self.killed:
                self.killed.append(new_pids[ticket.actor])
                os.kill(new_pids[ticket.actor], signal.SIGKILL)
            return ticket

    mid = KillAfterSubmit(handles)
    relayed, m_rem = _step_grads(tr, mid, batch)
    _assert_grads_close(relayed, colocated)
    _assert_branches_close(m_rem, m_col)
    assert mid.killed == [new_pids[0]] and mid.resubmits == 0  # Ray retried it (max_task_retries=-1), not us
    final = remote.ping_all()
    assert final[0] not in (pids[0], new_pids[0]) and final[1] == pids[1]
    # The killed request ran again in the restarted process (its counter starts at 0 on restart).
    assert ray.get(handles[0].stats.remote()) == {"pid": final[0], "requests": 1}


def test_dead_actor_request_is_resubmitted_to_the_next_actor(ray_cluster, cfg, trainer, handles):
    """When Ray gives up (no restarts left: ActorDiedError), collect resubmits to the next actor."""
    mortal = ray.remote(RewardWorker).options(num_cpus=1, max_restarts=0).remote(**worker_kwargs(cfg))
    _kill(ray.get(mortal.ping.remote()))
    with pytest.raises(ray.exceptions.RayActorError, match=DIED):
        ray.get(mortal.ping.remote())
    tr = trainer
    batch = _batch(tr)
    colocated, m_col = _step_grads(tr, tr.objective, batch)
    remote = RemoteReward([mortal, handles[1]])
    relayed, m_rem = _step_grads(tr, remote, batch)  # denoise goes to the dead actor first
    _assert_grads_close(relayed, colocated)
    _assert_branches_close(m_rem, m_col)
    assert remote.resubmits == 1
    with pytest.raises(ray.exceptions.RayActorError, match=DIED):  # bounded: a pool of only dead actors fails
        RemoteReward([mortal], max_resubmits=1).surrogate(batch.x0, request_for(
            plan_branches(tr.grid, LEVELS[0], "Detail", "Anime")[0], batch.captions, tr.cfg.srpo))


def test_score_many_matches_direct_scoring(trainer, handles):
    """Rollout metrics over the pool = scoring in this process (SRP form passed through)."""
    tr = trainer
    captions = tr.prompts[:3]  # 3 latents over 2 actors: chunks of 2 and 1 (size-weighted mean)
    r = tr.rollout(captions, generator=torch.Generator().manual_seed(2))
    got = RemoteReward(handles).score_many(r.x0, captions, "Detail", "Anime", 0.2, form="cfg")
    with torch.no_grad():
        srp = semantic_relative_preference(tr.reward_model, tr.adapter.decode(r.x0, 64), captions,
                                           "Detail", "Anime", 0.2, form="cfg")
    expected = {"reward": srp.reward.mean(), "pos_score": srp.pos_score.mean(), "neg_score": srp.neg_score.mean()}
    for key, val in expected.items():
        assert got[key] == pytest.approx(float(val), rel=1e-4, abs=1e-7), key
    assert got["reward"] != pytest.approx(got["pos_score"])  # the contrast is not degenerate


def test_minmax_image_norm_relay_equals_colocated(tiny_cfg, ray_cluster):
    """reward.image_norm=minmax (the authors' Qwen-Image reward input) reaches both placements: a
    RewardWorker in this process equals the colocated objective exactly, a reward actor's step
    gradients and rollout scores equal the colocated ones (tolerance: module docstring), and they
    differ from clamp's, so the norm is really applied on both sides."""
    cfg = tiny_cfg(*REMOTE, "reward.num_actors=1", "reward.image_norm=minmax")
    torch.manual_seed(0)
    tr = SRPOTrainer(cfg)
    assert tr.objective.image_norm == "minmax"
    batch = _batch(tr)
    plan = plan_branches(tr.grid, LEVELS[0], "Detail", "Anime")[0]
    x0_hat = direct_align(lambda x, s: tr.adapter.velocity(tr.transformer, x, s, batch.cond, 3.5, 64),
                          batch.x0, batch.eps, plan).detach()
    req = request_for(plan, batch.captions, cfg.srpo)
    worker = RewardWorker.from_config(cfg)
    grad, result = worker.loss_grad(x0_hat, req)
    expected, expected_result = tr.objective.loss_grad(x0_hat, req)
    torch.testing.assert_close(grad, expected, rtol=0, atol=0)
    assert result == expected_result
    clamp_grad, _ = ColocatedReward(tr.adapter, tr.reward_model, 64).loss_grad(x0_hat, req)
    assert (grad - clamp_grad).abs().max() > 0.1 * clamp_grad.abs().max()

    key = tuple(sorted(worker_kwargs(cfg).items()))
    if key not in ray_cluster:
        ray_cluster[key] = start_reward_actors(cfg)
    handles = ray_cluster[key]
    colocated, m_col = _step_grads(tr, tr.objective, batch)
    relayed, m_rem = _step_grads(tr, RemoteReward(handles), batch)
    _assert_grads_close(relayed, colocated)
    _assert_branches_close(m_rem, m_col)
    got = RemoteReward(handles).score_many(batch.x0, batch.captions, "Detail", "Anime", 0.2, form="cfg")
    want = tr.objective.score_many(batch.x0, batch.captions, "Detail", "Anime", 0.2, form="cfg")
    clamp = ColocatedReward(tr.adapter, tr.reward_model, 64).score_many(batch.x0, batch.captions, "Detail",
                                                                        "Anime", 0.2, form="cfg")
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-4, abs=1e-7), k
    assert want["pos_score"] != pytest.approx(clamp["pos_score"], rel=1e-3)
