"""The Ray pipeline end to end on a local cluster (tiny preset): FSDP2 learners over gloo, rollout
actors with versioned weights, reward actors with the gradient relay, MLflow from rank 0, and
recovery from killed actors."""
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from pipeline.ray.driver import run_ray

FULL = ("learner.num_workers=2", "learner.strategy=fsdp2", "rollout.placement=actors", "rollout.num_actors=2",
        "reward.placement=remote", "reward.num_actors=2", "train.batch_size=2", "rollout.max_staleness=1")

EXPECTED_METRICS = [
    "loss", "grad_norm", "lr", "samples_per_s",
    "denoise/loss", "denoise/reward", "denoise/pos_score", "denoise/neg_score", "denoise/k",
    "inversion/loss", "inversion/reward", "inversion/pos_score", "inversion/neg_score", "inversion/k",
    "time/rollout_wait_s", "time/rollout_s", "time/learner_s", "time/reward_wait_s", "time/weight_sync_s",
    "time/weight_publish_s", "weight_sync/bytes", "policy_lag/max", "policy_lag/mean", "rollout/reward",
]


def _client(result):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=result["tracking_uri"])


def test_end_to_end_with_killed_reward_and_rollout_actors(tiny_cfg, ray_local):
    """The whole design in one run (one run keeps the suite short): 2 FSDP2 learners, 2 rollout
    actors, 2 reward actors; a reward actor and a rollout actor are SIGKILLed after step 2 of 6. Every
    metric is logged at every step exactly once, images, export and checkpoint are complete."""
    cfg = tiny_cfg(*FULL, "train.max_steps=6", "log.image_every=2", "train.checkpoint_every=2", "rollout.steps=4")
    killed, stop = _start_killer(cfg)
    try:
        result = run_ray(cfg)
    finally:
        stop.set()  # never let the thread outlive this run and kill a later test's actors
    assert set(killed) == {"RewardWorker", "RolloutStage"}, killed
    client = _client(result)
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    for key in EXPECTED_METRICS:
        history = client.get_metric_history(run.info.run_id, key)
        assert sorted(m.step for m in history) == list(range(6)), key  # none lost, none counted twice
    lags = [m.value for m in client.get_metric_history(run.info.run_id, "policy_lag/max")]
    assert max(lags) <= 1, lags  # rollout.max_staleness
    sync_bytes = client.get_metric_history(run.info.run_id, "weight_sync/bytes")[0].value
    assert sync_bytes > 300_000  # the tiny transformer in fp32 (~0.1M params x 4 bytes)
    assert run.data.params["learner.num_workers"] == "2" and run.data.params["reward.placement"] == "remote"
    assert run.data.tags["srpo.model_path"] == cfg.model.path
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "rollouts", "transformer"} <= artifacts
    images = [a.path for a in client.list_artifacts(run.info.run_id, "rollouts") if a.path.endswith(".png")]
    assert len(images) == 3, images  # steps 0, 2 and 4
    assert Path(result["export"]).is_file()
    # The last checkpoint: DCP metadata + one shard file per learner rank, model and AdamW state.
    ckpt = Path(result["checkpoint"])
    from pipeline.checkpoint import checkpoint_problem

    assert checkpoint_problem(ckpt) is None  # both ranks' manifests, every file complete
    shards = ckpt / "model_optim"
    assert (shards / ".metadata").is_file() and len(list(shards.glob("*.distcp"))) == 2
    state = json.loads((ckpt / "srpo_state.json").read_text())
    assert state["step"] == 6 and state["world_size"] == 2 and state["strategy"] == "fsdp2"
    assert state["control_word_phase"]["positive"] == ["Natural-lighting", "Detail", "Detailed", "Real"][6 % 4]
    assert sorted(p.name for p in (ckpt / "rng").iterdir()) == [
        "rank_0.json", "rank_0.safetensors", "rank_1.json", "rank_1.safetensors"]
    import torch.distributed.checkpoint as dcp

    keys = set(dcp.FileSystemReader(str(shards)).read_metadata().state_dict_metadata)
    assert any(k.startswith("model.") for k in keys) and any(k.startswith("optim.state.") for k in keys)


def _start_killer(cfg) -> tuple[dict[str, int], threading.Event]:
    """A thread that SIGKILLs one RewardWorker and one RolloutStage process once 2 steps are logged."""
    killed: dict[str, int] = {}
    stop = threading.Event()

    def killer():
        import mlflow

        client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{Path(cfg.output.dir).resolve() / 'mlflow.db'}")
        deadline = time.time() + 300
        while time.time() < deadline and len(killed) < 2 and not stop.is_set():
            try:
                runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
                done = max((len(client.get_metric_history(r.info.run_id, "loss")) for r in runs), default=0)
            except Exception:  # noqa: BLE001 - the store may not exist yet
                done = 0
            if done >= 2:
                for title in ("RewardWorker", "RolloutStage"):
                    pids = _processes(title)
                    if pids and title not in killed:
                        os.kill(pids[0], signal.SIGKILL)
                        killed[title] = pids[0]
            time.sleep(0.5)

    threading.Thread(target=killer, daemon=True).start()
    return killed, stop


def _processes(title: str) -> list[int]:
    import psutil

    pids = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if title in " ".join(p.info["cmdline"] or []):
                pids.append(p.info["pid"])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return pids
