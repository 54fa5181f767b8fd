"""Reward deployments on Ray Serve (reward.placement=serve), several rewards at once, a shared service.

Tiny FLUX + tiny rewards on the CPU, on the session's local cluster (tests/conftest.py `ray_local`),
Serve started on it without proxies.

Tolerances. Relay against colocated in this process: the replica or actor computes dLoss/dx0_hat in
another process that Ray limits to one intra-op thread while this process uses the machine's threads,
so float32 reductions may be split differently: rtol 1e-4 with an atol of 1e-6 of the largest entry
(tests/test_reward_actors.py explains it; a wrong branch, word, weight or scale changes gradients at
O(1) relative); two relayed rewards summed: an atol of 5e-5 of the largest entry (see that test).
Whole runs: the learner worker (learner.num_cpus=1), every replica (half a CPU: Ray gives it one
intra-op thread) and the single-process reference (torch set to one thread) each compute on one
thread; per-step losses and exported weights are compared at rtol 1e-5, far below the effect of a
step computed twice, skipped, or with the other run's gradients (the two runs' lr differ by 2x).
"""
from __future__ import annotations

import dataclasses
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from ray import serve

from actors.reward import RewardWorker, start_reward_actors
from actors.reward_serve import DEPLOYMENT, ServeReward, deploy_reward, start_serve
from conftest import cluster_processes, non_loopback_listeners, run_losses, run_weights, thread_niceness
from pipeline.config import ConfigError, RewardConfig, config_from_dict, reward_entries
from pipeline.objective import ColocatedReward, WeightedRewards, reward_model_from_config
from pipeline.ray.driver import run_ray
from pipeline.runs import run_local
from sleepy_reward import BUSY_DIR, SLEEP, SleepyRewardWorker
from test_reward_actors import _assert_branches_close, _assert_grads_close, _batch, _step_grads
from helpers import StepHarness

# Half a CPU per replica: up to 3 replicas and two runs fit the session cluster's 8 logical CPUs (Ray
# still gives a fractional-CPU worker one intra-op thread).
SERVE = ("reward.placement=serve", "reward.num_cpus=0.5", "train.batch_size=2")
# Short autoscaling delays: the tests watch replicas come and go within seconds.
FAST = {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 1.0, "upscale_delay_s": 0.5,
        "downscale_delay_s": 2.0, "metrics_interval_s": 0.25, "look_back_period_s": 1.0}


@pytest.fixture(scope="module")
def serve_on(ray_local):
    """Serve on the session's cluster (no proxies); shut down after this module, with the detached
    deployer of shared services (it would idle at ~2% of a core through the rest of the session)."""
    start_serve()
    yield serve
    serve.shutdown()
    try:
        ray_local.kill(ray_local.get_actor("srpo-service-deployer", namespace="srpo"))
    except ValueError:  # no shared service was deployed by this module's tests
        pass


def _replicas(app: str) -> dict[str, int]:
    """Replica counts by state (RUNNING, STARTING, STOPPING...) of the reward deployment of ``app``."""
    return dict(serve.status().applications[app].deployments[DEPLOYMENT].replica_states)


def _wait_for(what: str, cond, timeout: float = 600.0, every: float = 0.1):
    """Poll ``cond`` until it returns something truthy; fail naming ``what`` after ``timeout`` s (a
    deadline against hanging, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


# -------------------------------------------------------------------------------------- config
def test_reward_block_is_a_one_entry_list_and_rewards_entries_start_from_it(tiny_cfg, tiny_world):
    single = tiny_cfg(*SERVE)
    assert reward_entries(single) == [("reward", single.reward)]
    cfg = _two_rewards(tiny_cfg, tiny_world, "reward.autoscaling.max_replicas=4", "reward.num_gpus=0.25")
    hps, pick = cfg.rewards
    # Unset fields come from the reward block (kind, path, resources, autoscaling); set ones win.
    assert (hps.kind, hps.path, hps.weight, hps.num_gpus, hps.autoscaling.max_replicas) == (
        "hpsv2", single.reward.path, 0.25, 0.25, 4)
    assert (pick.kind, pick.weight, pick.scale, pick.srp_form, pick.placement, pick.num_gpus) == (
        "pickscore", 0.75, 2.0, "cfg", "remote", 0.25)
    assert [w for w, _ in reward_entries(cfg)] == ["rewards[0]", "rewards[1]"]
    assert config_from_dict(cfg.to_dict()).rewards == cfg.rewards  # the run's config.yaml loads back the same


@pytest.mark.parametrize("entries, match", [
    ([{"name": "x"}, {"name": "x", "kind": "clip"}], r"^rewards\[1\]\.name: 'x' is also the name of rewards\[0\]"),
    ([{}, {"kind": "hpsv2"}], r"^rewards\[1\]\.name: 'hpsv2' is also the name of rewards\[0\]"),
    ([{"service": "s", "placement": "remote"}], r"^rewards\[0\]\.service: got 's' with placement=remote; .*placement=serve"),
    ([{"runtime_env": {"pips": ["x"]}}], r"^rewards\[0\]\.runtime_env: unknown key 'pips'; expected Ray runtime_env keys"),
    ([{"placement": "colocated", "runtime_env": {"pip": ["x"]}}], r"^rewards\[0\]\.runtime_env: a colocated reward"),
    ([{"autoscaling": {"min_replicas": 3, "max_replicas": 2}}],
     r"^rewards\[0\]\.autoscaling\.max_replicas: got 2, expected >= 1 and >= autoscaling\.min_replicas \(3\)"),
    ([{"weight": 0}], r"^rewards\[0\]\.weight: got 0\.0, expected > 0"),
    ([{"num_gpus": -1}], r"^rewards\[0\]\.num_gpus: got -1\.0, expected >= 0"),
])
def test_bad_reward_entries_name_the_field(tiny_cfg, entries, match):
    data = tiny_cfg(*SERVE).to_dict()
    data["rewards"] = entries
    with pytest.raises(ConfigError, match=match):
        config_from_dict(data)


def test_gold_reward_must_differ_from_every_training_reward(tiny_cfg, tiny_world):
    data = _two_rewards(tiny_cfg, tiny_world).to_dict()
    data["eval"].update(every=1, gold=[{"kind": "pickscore", "path": tiny_world["pickscore"]}])
    with pytest.raises(ConfigError, match=r"^eval\.gold\[0\]: the gold reward must differ from the training reward "
                                          r"rewards\[1\] \(pickscore:"):
        config_from_dict(data)


def test_two_colocated_rewards_log_their_own_metrics(tiny_cfg, tiny_world):
    """The single-process run with two colocated rewards: each reward's numbers under reward/<name>/ in
    MLflow, and the step's loss is the sum of the rewards' weighted branch losses."""
    cfg = _two_rewards(tiny_cfg, tiny_world, "train.max_steps=1", "log.image_every=0")
    data = cfg.to_dict()
    for r in data["rewards"]:
        r["placement"] = "colocated"
    result = run_local(config_from_dict(data))
    m = MlflowClient(result["tracking_uri"]).get_run(result["run_id"]).data.metrics  # step 0's values
    parts = [m[f"reward/{n}/{b}/loss"] for n in ("hps", "pick") for b in ("denoise", "inversion")]
    assert m["loss"] == pytest.approx(sum(parts), rel=1e-6)
    assert m["rollout/reward"] == pytest.approx(0.25 * m["reward/hps/rollout/reward"] + 0.75 * m["reward/pick/rollout/reward"],
                                                rel=1e-6)
    assert {"reward/hps/wait_s", "reward/pick/wait_s", "reward/pick/denoise/pos_score"} <= set(m)
    assert m["denoise/reward"] == pytest.approx(0.25 * m["reward/hps/denoise/reward"] + 0.75 * m["reward/pick/denoise/reward"],
                                                rel=1e-6)


# --------------------------------------------------------------------------------------------
def test_serve_relay_gradients_equal_colocated_and_nothing_listens_outside_loopback(serve_on, tiny_cfg):
    """One SRPO step through a reward deployment = the colocated step; Serve runs no HTTP proxy, and
    no process of the cluster (replicas included) listens on a non-loopback address."""
    cfg = tiny_cfg(*SERVE)
    app, owned = deploy_reward(cfg, cfg.reward, "reward", run_tag="grad")
    assert owned and app == "srpo-grad-hpsv2"
    status = serve.status()
    assert status.proxies == {} and _replicas(app) == {"RUNNING": 1}
    assert non_loopback_listeners() == []
    replicas = cluster_processes(f"ServeReplica:{app}")
    assert len(replicas) == 1 and thread_niceness(replicas) == {0}  # the work's niceness (actors/priority.py)
    torch.manual_seed(0)
    tr = StepHarness(cfg)
    batch = _batch(tr)
    colocated, m_col = _step_grads(tr, tr.objective, batch)
    relay = ServeReward.for_app(app, cfg.reward)
    relayed, m_rel = _step_grads(tr, relay, batch)
    _assert_grads_close(relayed, colocated)
    _assert_branches_close(m_rel, m_col)
    assert relay.reward_wait_s > 0 and relay.resubmits == 0
    serve.delete(app)


def _sleepy_entry(cfg, busy_dir: Path | None = None, sleep_s: float = 1.0, **autoscaling) -> RewardConfig:
    """The config's reward as a sleeping deployment (tests/sleepy_reward.py) with short delays."""
    env = {SLEEP: str(sleep_s), **({BUSY_DIR: str(busy_dir)} if busy_dir else {})}
    return dataclasses.replace(cfg.reward, runtime_env={"env_vars": env},
                               autoscaling=dataclasses.replace(cfg.reward.autoscaling, **{**FAST, **autoscaling}))


class _Flood:
    """Rounds of ``n`` score requests at once to a deployment from a thread of this process, each answer
    checked against the same reward scored here: the queue stays full until ``stop``."""

    def __init__(self, app: str, cfg, n: int = 6) -> None:
        worker = RewardWorker.from_config(cfg)  # the same reward in this process, without the sleep
        self.latents = worker.adapter.sample_noise(1, cfg.data.resolution, torch.Generator().manual_seed(0))
        self.args = (self.latents, ["a cat"], "Detail", "Anime", 0.2)
        self.expected = worker.score(*self.args)
        self.n, self.answers, self._stop = n, [], threading.Event()

    def start(self, handle) -> None:
        def load():
            while not self._stop.is_set():
                self.answers.extend(r.result() for r in [handle.score.remote(*self.args) for _ in range(self.n)])

        self._thread = threading.Thread(target=load, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        assert len(self.answers) >= self.n and len(self.answers) % self.n == 0
        for a in self.answers:
            assert a == pytest.approx(self.expected, rel=1e-5)


def test_replicas_grow_while_requests_queue_and_shrink_after_idle(serve_on, tiny_cfg):
    """Autoscaling on this machine: a reward whose requests sleep 1 s (request-bound, not CPU-bound).
    While 6 requests are kept in flight, the deployment grows from 1 replica; once idle it shrinks
    back to 1. Every request is answered with the value a direct call gives (none lost)."""
    cfg = tiny_cfg(*SERVE)
    entry = _sleepy_entry(cfg)
    app, _ = deploy_reward(cfg, entry, "reward", run_tag="autoscale", worker_cls=SleepyRewardWorker)
    assert _replicas(app) == {"RUNNING": 1}
    flood = _Flood(app, cfg)
    flood.start(serve.get_app_handle(app))
    seen = [_replicas(app).get("RUNNING", 0)]
    _wait_for("the deployment to scale up", lambda: seen.append(_replicas(app).get("RUNNING", 0)) or seen[-1] >= 2)
    flood.stop()  # every answer equals the direct score: none lost, none mixed up
    _wait_for("the deployment to scale back to 1 replica", lambda: _replicas(app) == {"RUNNING": 1})
    assert seen[0] == 1 and max(seen) >= 2
    serve.delete(app)


class _Scaled:
    """A reward model whose SRP scale is ``factor`` times the model's: the independent expectation of a
    reward entry's ``scale`` (srp.py multiplies reward, pos and neg scores by the model's scale)."""

    def __init__(self, model, factor: float) -> None:
        self.model, self.factor = model, factor

    def encode_text(self, texts):
        return self.model.encode_text(texts)

    def encode_image(self, images):
        return self.model.encode_image(images)

    @property
    def score_scale(self) -> float:
        return self.model.score_scale * self.factor


def _two_rewards(tiny_cfg, tiny_world, *extra: str):
    """HPS (weight 0.25, via Serve) + PickScore (weight 0.75, scale 2, the paper's cfg SRP form, via a
    remote actor pool): the issue's "HPSv2.1 plus PickScore, each with its own scale"."""
    cfg = tiny_cfg(*SERVE, *extra)
    data = cfg.to_dict()
    data["rewards"] = [
        {"name": "hps", "weight": 0.25},  # the rest (kind, path, arch, placement) from the reward block
        {"name": "pick", "kind": "pickscore", "path": tiny_world["pickscore"], "arch": "", "weight": 0.75,
         "scale": 2.0, "srp_form": "cfg", "placement": "remote", "num_actors": 1}]
    return config_from_dict(data)


def test_two_rewards_relay_sum_equals_colocated_weighted_sum(serve_on, tiny_cfg, tiny_world):
    """The relayed step of two rewards (one on Serve, one on an actor pool) = 0.25 x the HPS step +
    0.75 x the PickScore step (scale 2, cfg form), each computed colocated on its own; per-reward
    metrics are each reward's own branch numbers."""
    from actors.learner import reward_objective

    cfg = _two_rewards(tiny_cfg, tiny_world)
    hps, pick = cfg.rewards
    assert (hps.kind, hps.placement, hps.arch, pick.placement) == ("hpsv2", "serve", cfg.reward.arch, "remote")
    app, _ = deploy_reward(cfg, hps, "rewards[0]", run_tag="two")
    workers = [app, start_reward_actors(cfg, pick)]
    relay = reward_objective(cfg, workers, torch.device("cpu"))
    assert isinstance(relay, WeightedRewards) and relay.overlap
    torch.manual_seed(0)
    tr = StepHarness(tiny_cfg(*SERVE))  # the HPS reward alone, colocated
    batch = _batch(tr)
    g_hps, m_hps = _step_grads(tr, ColocatedReward(tr.adapter, tr.reward_model, 64), batch)
    pick_model = _Scaled(reward_model_from_config(pick, torch.device("cpu")), 2.0)
    single = tr.cfg
    tr.cfg = dataclasses.replace(single, srpo=dataclasses.replace(single.srpo, srp_form="cfg"))
    g_pick, m_pick = _step_grads(tr, ColocatedReward(tr.adapter, pick_model, 64), batch)
    tr.cfg = single
    expected = {n: 0.25 * g_hps[n] + 0.75 * g_pick[n] for n in g_hps}
    relay.reset_timers()
    got, m = _step_grads(tr, relay, batch)
    # Two relayed terms summed: entries where they cancel keep the rounding of both (measured: 9e-6 of
    # the largest entry); weights swapped to 0.5 / 0.5 move some entry by 0.4 of it.
    scale = max(float(g.abs().max()) for g in expected.values())
    assert got.keys() == expected.keys() and len(expected) > 10 and scale > 0
    for n in expected:
        torch.testing.assert_close(got[n], expected[n], rtol=1e-4, atol=5e-5 * scale, msg=n)
    metrics = relay.step_metrics()
    for name, weight, ref in (("hps", 0.25, m_hps), ("pick", 0.75, m_pick)):
        for branch in ref.branches:
            b = branch["branch"]
            assert metrics[f"reward/{name}/{b}/loss"] == pytest.approx(weight * branch["loss"], rel=1e-4, abs=1e-7)
            for key in ("reward", "pos_score", "neg_score"):
                assert metrics[f"reward/{name}/{b}/{key}"] == pytest.approx(branch[key], rel=1e-4, abs=1e-7)
        assert metrics[f"reward/{name}/wait_s"] > 0
    for got_b, h, p in zip(m.branches, m_hps.branches, m_pick.branches):
        assert got_b["loss"] == pytest.approx(0.25 * h["loss"] + 0.75 * p["loss"], rel=1e-4, abs=1e-7)
        assert got_b["reward"] == pytest.approx(0.25 * h["reward"] + 0.75 * p["reward"], rel=1e-4, abs=1e-7)
    serve.delete(app)


# Whole runs: one single-engine learner worker, colocated rollout (nothing asynchronous besides the
# reward), 4 steps of batch 2; the reward's sleep makes each step wait on the deployment.
RUN = (*SERVE, "learner.num_workers=1", "learner.strategy=single", "learner.num_cpus=1",
       "rollout.placement=colocated", "rollout.max_staleness=0", "train.max_steps=4", "log.image_every=0")
LRS = {"a": "3.0e-3", "b": "6.0e-3"}  # an lr sweep of two runs


def _in_threads(jobs: dict) -> dict:
    """Run each job (a no-argument callable) in its own thread; their results (or errors) by key."""
    out: dict = {}

    def call(key, job):
        try:
            out[key] = job()
        except BaseException as e:  # noqa: BLE001 - re-raised below, in the test's thread
            out[key] = e

    threads = [threading.Thread(target=call, args=item, daemon=True) for item in jobs.items()]
    for t in threads:
        t.start()
    return {"threads": threads, "out": out}


def _joined(started: dict) -> dict:
    for t in started["threads"]:
        t.join(timeout=600)
    for key, val in started["out"].items():
        if isinstance(val, BaseException):
            raise AssertionError(f"run {key} failed") from val
    return started["out"]


def _solo_run(cfg) -> dict:
    """The single-process run (the Learner in this process, reward colocated) on one thread, as the
    Ray Train worker (learner.num_cpus=1) and every reward replica (one thread each) compute."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_local(cfg)
    finally:
        torch.set_num_threads(threads)


def _steps_logged_once(result) -> dict[int, float]:
    losses = run_losses(result["run_id"], result["tracking_uri"])
    assert sorted(losses) == [0, 1, 2, 3] and all(len(v) == 1 for v in losses.values()), losses
    return {k: v[0] for k, v in losses.items()}


def test_two_runs_share_a_service_across_scaling_and_a_killed_replica(serve_on, tiny_cfg, tiny_overrides,
                                                                      tmp_path, monkeypatch):
    """An lr sweep of two concurrent runs attached to one shared reward service (reward.service), whose
    replicas sleep 1 s per request. Before step 2 both runs hold until the deployment has grown from 1
    replica; during step 2 a replica serving one of their requests is SIGKILLed; before step 3 both
    hold until it has shrunk back to 1. Each run logs every step exactly once, and its losses and
    exported weights equal its solo run's (the same config in one process, reward colocated)."""
    store = next(o for o in tiny_overrides if o.startswith("log.tracking_uri="))
    service = ("reward.service=shared-hps",
               *(f"reward.autoscaling.{k}={v}" for k, v in {**FAST, "downscale_delay_s": 3.0}.items()))

    def cfg(key: str, *extra: str):
        return tiny_cfg(*RUN, f"optim.lr={LRS[key]}", f"output.dir={tmp_path / key}", store, *extra)

    busy = tmp_path / "busy"
    busy.mkdir()
    first = cfg("a", *service)
    app, owned = deploy_reward(first, _sleepy_entry(first, busy, sleep_s=0.5, downscale_delay_s=3.0), "reward",
                               worker_cls=SleepyRewardWorker)  # as the first run would, with the sleep
    assert (app, owned) == ("shared-hps", False)
    with pytest.raises(ConfigError, match=r"^reward\.service: 'shared-hps' already runs on this cluster with a "
                                          r"different reward \(.*reward_kind='hpsv2'"):
        deploy_reward(first, dataclasses.replace(first.reward, kind="clip"), "reward")
    hold = tmp_path / "hold"
    monkeypatch.setenv("SRPO_FAULT_HOLD_AT_STEPS", "2,3")
    monkeypatch.setenv("SRPO_FAULT_HOLD_FILE", str(hold))
    handle, flood = serve.get_app_handle(app), _Flood(app, first, n=4)
    running, stop = [], threading.Event()

    def watch():
        while not stop.is_set() and app in serve.status().applications:
            running.append(_replicas(app).get("RUNNING", 0))
            time.sleep(0.1)

    threading.Thread(target=watch, daemon=True).start()
    started = _in_threads({k: (lambda k=k: run_ray(cfg(k, *service))) for k in LRS})
    # Extra requests of this test queue beside the runs' until the deployment has grown: a replica takes
    # longer to start on 2 busy cores than the runs' first steps, and Serve stops a starting replica
    # when the load is gone before it is up.
    flood.start(handle)

    def holding(step: int) -> bool:
        for key, val in started["out"].items():  # a run that failed early will never get there
            if isinstance(val, BaseException):
                raise AssertionError(f"run {key} failed") from val
        return len(list(tmp_path.glob(f"hold.{step}.waiting.*"))) == len(LRS)

    _wait_for("both runs to reach step 2", lambda: holding(2))
    _wait_for("the deployment to grow", lambda: max(running) >= 2)
    flood.stop()  # every request of the flood answered: from here on only the runs' requests are served
    hold.with_name("hold.2").touch()
    victim = _wait_for("a replica serving step 2", lambda: next(busy.glob("busy.*"), None))
    os.kill(int(victim.name.split(".")[1]), signal.SIGKILL)
    _wait_for("both runs to reach step 3", lambda: holding(3))
    _wait_for("the deployment to shrink to 1 replica", lambda: _replicas(app) == {"RUNNING": 1})
    hold.with_name("hold.3").touch()
    shared = _joined(started)
    stop.set()
    assert running[0] == 1 and max(running) >= 2

    solo = {k: _solo_run(cfg(k, "reward.placement=colocated", "learner.num_workers=0",
                             f"output.dir={tmp_path / ('solo-' + k)}")) for k in LRS}
    resubmits = 0
    for k in LRS:
        got, want = _steps_logged_once(shared[k]), _steps_logged_once(solo[k])
        assert got == pytest.approx(want, rel=1e-5), k
        w_got, w_want = run_weights(tmp_path / k), run_weights(tmp_path / f"solo-{k}")
        for n in w_want:
            torch.testing.assert_close(w_got[n], w_want[n], rtol=1e-5, atol=1e-7, msg=f"{k}: {n}")
        resubmits += run_losses(shared[k]["run_id"], shared[k]["tracking_uri"], "reward/resubmits")[3][0]
    assert resubmits >= 1  # the killed replica's request was sent again by a run
    w_a, w_b = run_weights(tmp_path / "a"), run_weights(tmp_path / "b")
    assert max(float((w_a[n] - w_b[n]).abs().max()) for n in w_a) > 1e-4  # the two lrs are told apart
    serve.delete(app)
