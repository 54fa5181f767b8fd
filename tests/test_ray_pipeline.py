"""The Ray pipeline end to end on a local cluster (tiny preset): FSDP2 learners over gloo, rollout
actors with versioned weights, reward actors with the gradient relay, MLflow from rank 0, and
recovery from killed actors: a killed rollout actor is restarted and its work continues, and the run
trains exactly as an uninterrupted one."""
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from conftest import cluster_processes, thread_niceness
from pipeline.ray.driver import run_ray

FULL = ("learner.num_workers=2", "learner.strategy=fsdp2", "rollout.placement=actors", "rollout.num_actors=2",
        "reward.placement=remote", "reward.num_actors=2", "train.batch_size=2",
        # Staleness 0: the rollout of step s uses exactly version s (the learner's weights before step s),
        # whichever actor makes it and whenever, so a run's losses do not depend on actor timing.
        "rollout.max_staleness=0")
STEPS = 6
# Process titles of the work (learners, rollout and reward actors, the text-embedding stage).
WORK_PROCESSES = ("RayTrainWorker", "RolloutStage", "RewardWorker", "TextEmbedStage")

EXPECTED_METRICS = [  # docs/tracking.md (time/weight_broadcast_s: rollout.weight_sync=broadcast only)
    "loss", "grad_norm", "lr", "samples_per_s",
    *(f"{branch}/{key}" for branch in ("denoise", "inversion")
      for key in ("loss", "reward", "pos_score", "neg_score", "k", "sigma_from", "sigma_to", "level")),
    "time/rollout_wait_s", "time/rollout_s", "time/learner_s", "time/reward_wait_s", "time/weight_sync_s",
    "time/weight_publish_s", "time/step_wall_s", "weight_sync/bytes", "policy_lag/max", "policy_lag/mean",
    "rollout/reward", "rollout/pos_score", "rollout/neg_score",
]
# Compared step by step with the uninterrupted run: exactly equal on the CPU (see the test).
COMPARED = ["loss", "grad_norm", "denoise/reward", "inversion/reward", "rollout/reward"]


def _client(result):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=result["tracking_uri"])


def test_end_to_end_with_killed_reward_and_rollout_actors(tiny_cfg, ray_local, tmp_path):
    """The whole design in one run: 2 FSDP2 learners, 2 rollout actors, 2 reward actors; a reward
    actor and a rollout actor are SIGKILLed after step 2 of 6. Every metric is logged at every step
    exactly once; images, export and checkpoint are complete. The killed rollout actor is restarted
    (a new process) before the last step, later steps train on its rollouts (the `rollout_pid` of
    every sample, gathered into rollouts/provenance.json), and every step's numbers equal those of
    an uninterrupted run of the same config.

    Exact equality: with rollout.max_staleness=0 the rollout of step s waits for version s and no
    newer version can exist before step s is trained, so every sample is a function of (row seeds,
    version s) alone; every rollout, reward and learner process runs the same fp32 ops with one
    thread (num_cpus=1), and the two ranks' contributions are combined by sums of two terms, which
    do not depend on which rank got which block. Nothing else differs between the runs."""
    cfg = tiny_cfg(*FULL, f"train.max_steps={STEPS}", "log.image_every=2", "train.checkpoint_every=2",
                   "rollout.steps=4")
    killer = Killer(cfg)
    try:
        result = run_ray(cfg)
    finally:
        killer.stop.set()  # never let the thread outlive this run and kill a later test's actors
    assert set(killer.killed) == {"RewardWorker", "RolloutStage"}, killer.killed
    client = _client(result)
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    for key in EXPECTED_METRICS:
        history = client.get_metric_history(run.info.run_id, key)
        assert sorted(m.step for m in history) == list(range(STEPS)), key  # none lost, none counted twice
    for key in ("policy_lag/max", "policy_lag/mean"):
        lags = [m.value for m in client.get_metric_history(run.info.run_id, key)]
        assert lags == [0.0] * STEPS, (key, lags)  # rollout.max_staleness=0: every sample is version = step
    sync_bytes = client.get_metric_history(run.info.run_id, "weight_sync/bytes")[0].value
    assert sync_bytes > 300_000  # the tiny transformer in fp32 (~0.1M params x 4 bytes)
    assert run.data.params["learner.num_workers"] == "2" and run.data.params["reward.placement"] == "remote"
    assert run.data.tags["srpo.model_path"] == cfg.model.path
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "rollouts", "transformer"} <= artifacts
    # Rollout grids are step-indexed images (MLflow's file naming: <key>+step+<step>+...), prompts beside them.
    names = [Path(a.path).name for a in client.list_artifacts(run.info.run_id, "images")]
    steps = sorted(int(n.split("+step+")[1].split("+")[0]) for n in names
                   if n.startswith("rollouts+") and n.endswith(".png"))
    assert steps == [0, 2, 4], names  # log.image_every=2
    texts = sorted(Path(a.path).name for a in client.list_artifacts(run.info.run_id, "rollouts")
                   if a.path.endswith(".txt"))
    assert texts == ["step_00000.txt", "step_00002.txt", "step_00004.txt"], texts
    assert Path(result["export"]).is_file()
    # The last checkpoint: DCP metadata + one shard file per learner rank, model and AdamW state.
    ckpt = Path(result["checkpoint"])
    from pipeline.checkpoint import checkpoint_problem

    assert checkpoint_problem(ckpt) is None  # both ranks' manifests, every file complete
    shards = ckpt / "model_optim"
    assert (shards / ".metadata").is_file() and len(list(shards.glob("*.distcp"))) == 2
    state = json.loads((ckpt / "srpo_state.json").read_text())
    assert state["step"] == STEPS and state["world_size"] == 2 and state["strategy"] == "fsdp2"
    assert state["control_word_phase"]["positive"] == ["Natural-lighting", "Detail", "Detailed", "Real"][STEPS % 4]
    assert sorted(p.name for p in (ckpt / "rng").iterdir()) == [
        "rank_0.json", "rank_0.safetensors", "rank_1.json", "rank_1.safetensors"]
    import torch.distributed.checkpoint as dcp

    keys = set(dcp.FileSystemReader(str(shards)).read_metadata().state_dict_metadata)
    assert any(k.startswith("model.") for k in keys) and any(k.startswith("optim.state.") for k in keys)

    _assert_rollout_actor_restarted_and_used(killer, _provenance(client, run.info.run_id, tmp_path / "killed"))
    # Every process doing the run's work ran every thread at niceness 0 (actors/priority.py), sampled
    # while the run was alive; Ray's own helpers kept Ray's worker niceness 15 on their main thread.
    assert killer.niceness == {**{title: {0} for title in WORK_PROCESSES}, "TrainController": {15}}, killer.niceness

    # The same config, uninterrupted: every step's numbers are equal, bit for bit.
    reference = run_ray(tiny_cfg(*FULL, f"train.max_steps={STEPS}", "log.image_every=2", "train.checkpoint_every=2",
                                 "rollout.steps=4", f"output.dir={tmp_path / 'uninterrupted'}"))
    assert _client(reference).get_run(reference["run_id"]).info.status == "FINISHED"
    for key in COMPARED:
        got, want = _per_step(client, result, key), _per_step(_client(reference), reference, key)
        assert sorted(got) == sorted(want) == list(range(STEPS)), key
        after_kill = [s for s in range(STEPS) if s >= killer.steps_logged_at_kill]
        assert after_kill and all(got[s] == want[s] for s in after_kill), (key, got, want)
        assert got == want, (key, got, want)  # and the steps before the kill too


def _per_step(client, result, key: str) -> dict[int, float]:
    history = client.get_metric_history(result["run_id"], key)
    assert len({m.step for m in history}) == len(history), key  # once per step
    return {m.step: m.value for m in history}


def _provenance(client, run_id: str, dst: Path) -> dict[int, set[int]]:
    """rollouts/provenance.json: step -> pids of the rollout actors that made its samples (all ranks)."""
    dst.mkdir(parents=True)
    path = client.download_artifacts(run_id, "rollouts/provenance.json", str(dst))
    return {int(step): set(pids) for step, pids in json.loads(Path(path).read_text()).items()}


def _assert_rollout_actor_restarted_and_used(killer: "Killer", provenance: dict[int, set[int]]) -> None:
    killed, alive, new = killer.killed["RolloutStage"], set(killer.rollout_pids_at_kill), killer.restarted_pid
    assert sorted(provenance) == list(range(STEPS)), provenance  # every step trained on rollout-actor samples
    assert len(alive) == 2 and killed in alive, (killed, alive)  # rollout.num_actors=2, one of them killed
    # (a) restarted before the last step: a new RolloutStage process was running while step STEPS - 2
    # was not yet logged, i.e. before the last step started.
    assert new is not None and new not in alive, (new, alive)
    assert 0 <= killer.steps_logged_at_restart < STEPS - 1, killer.steps_logged_at_restart
    # Nothing but the two original actors and the restarted one made samples.
    assert set().union(*provenance.values()) <= alive | {new}, provenance
    (survivor,) = alive - {killed}
    killed_steps = sorted(s for s, pids in provenance.items() if killed in pids)
    new_steps = sorted(s for s, pids in provenance.items() if new in pids)
    assert killed_steps, provenance  # the killed process was a working rollout actor
    # (b) the restarted actor made samples of later steps: every step from its first to the last, none
    # before the killed process's last work (a process makes nothing after its death or before its
    # start), the first of them before the last step. Each actor takes one task at a time and a task
    # waits for its step's version, so from then on every step's two device batches come from the
    # two live actors, one each.
    assert new_steps and new_steps == list(range(new_steps[0], STEPS)), provenance
    assert killed_steps[-1] <= new_steps[0] < STEPS - 1, provenance
    assert all(provenance[s] == {survivor, new} for s in new_steps), provenance


class Killer:
    """A thread that SIGKILLs one RewardWorker and one RolloutStage process once 2 steps are logged,
    then waits for the restarted RolloutStage process (a new pid)."""

    def __init__(self, cfg) -> None:
        self.cfg = cfg
        self.killed: dict[str, int] = {}
        self.stop = threading.Event()
        self.steps_logged_at_kill = -1
        self.rollout_pids_at_kill: list[int] = []
        self.restarted_pid: int | None = None
        self.steps_logged_at_restart = -1
        self.niceness: dict[str, set[int]] = {}
        threading.Thread(target=self._run, daemon=True).start()

    def _steps_logged(self, client) -> int:
        try:
            runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
            return max((len(client.get_metric_history(r.info.run_id, "loss")) for r in runs), default=0)
        except Exception:  # noqa: BLE001 - the store may not exist yet
            return 0

    def _run(self) -> None:
        import mlflow

        client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{Path(self.cfg.output.dir).resolve() / 'mlflow.db'}")
        deadline = time.time() + 300
        while time.time() < deadline and not self.stop.is_set():
            if len(self.killed) < 2:
                done = self._steps_logged(client)
                if done >= 2:
                    self.niceness = self.niceness or _niceness()
                    for title in ("RewardWorker", "RolloutStage"):
                        pids = cluster_processes(title)
                        if pids and title not in self.killed:
                            if title == "RolloutStage":
                                self.rollout_pids_at_kill, self.steps_logged_at_kill = pids, done
                            os.kill(pids[0], signal.SIGKILL)
                            self.killed[title] = pids[0]
            else:  # both killed: wait for the restarted rollout actor
                new = set(cluster_processes("RolloutStage")) - set(self.rollout_pids_at_kill)
                if new:
                    self.restarted_pid = min(new)
                    self.steps_logged_at_restart = self._steps_logged(client)
                    return
            time.sleep(0.5)


def _niceness() -> dict[str, set[int]]:
    """Title -> the niceness of every thread of the work processes, and of the main thread of Ray
    Train's controller."""
    found = {title: thread_niceness(cluster_processes(title)) for title in WORK_PROCESSES}
    found["TrainController"] = thread_niceness(cluster_processes("TrainController"), main_only=True)
    return found
