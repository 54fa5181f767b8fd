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

from pipeline.driver import run_ray

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


def test_end_to_end_two_learners_two_rollout_two_reward_actors(tiny_cfg, ray_local):
    cfg = tiny_cfg(*FULL, "train.max_steps=4", "log.image_every=2", "train.checkpoint_every=2")
    result = run_ray(cfg)
    client = _client(result)
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    for key in EXPECTED_METRICS:
        history = client.get_metric_history(run.info.run_id, key)
        assert sorted(m.step for m in history) == [0, 1, 2, 3], key
    lags = [m.value for m in client.get_metric_history(run.info.run_id, "policy_lag/max")]
    assert max(lags) <= 1, lags  # rollout.max_staleness
    sync_bytes = client.get_metric_history(run.info.run_id, "weight_sync/bytes")[0].value
    assert sync_bytes > 300_000  # the tiny transformer in fp32 (~0.1M params x 4 bytes)
    assert run.data.params["learner.num_workers"] == "2" and run.data.params["reward.placement"] == "remote"
    assert run.data.tags["srpo.model_path"] == cfg.model.path
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "rollouts", "transformer"} <= artifacts
    images = [a.path for a in client.list_artifacts(run.info.run_id, "rollouts") if a.path.endswith(".png")]
    assert len(images) >= 2, images  # steps 0 and 2
    assert Path(result["export"]).is_file()
    # The last sharded checkpoint (DCP: metadata + one shard file per learner rank, model and AdamW state).
    ckpt = Path(result["checkpoint"])
    from pipeline.checkpoint import checkpoint_problem

    assert checkpoint_problem(ckpt) is None  # both ranks' manifests, every file complete
    shards = ckpt / "model_optim"
    assert (shards / ".metadata").is_file() and len(list(shards.glob("*.distcp"))) == 2
    state = json.loads((ckpt / "srpo_state.json").read_text())
    assert state["step"] == 4 and state["world_size"] == 2 and state["strategy"] == "fsdp2"
    assert state["control_word_phase"]["positive"] == ["Natural-lighting", "Detail", "Detailed", "Real"][4 % 4]
    assert sorted(p.name for p in (ckpt / "rng").iterdir()) == [
        "rank_0.json", "rank_0.safetensors", "rank_1.json", "rank_1.safetensors"]
    import torch.distributed.checkpoint as dcp

    keys = set(dcp.FileSystemReader(str(shards)).read_metadata().state_dict_metadata)
    assert any(k.startswith("model.") for k in keys) and any(k.startswith("optim.state.") for k in keys)


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


def test_killed_reward_and_rollout_actors_are_restarted_and_no_step_is_lost(tiny_cfg, ray_local):
    cfg = tiny_cfg(*FULL, "train.max_steps=6", "log.image_every=0", "rollout.steps=4")
    killed: dict[str, int] = {}

    def killer():
        import mlflow

        client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{Path(cfg.output.dir).resolve() / 'mlflow.db'}")
        deadline = time.time() + 300
        while time.time() < deadline and len(killed) < 2:
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

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    result = run_ray(cfg)
    t.join(timeout=5)
    assert set(killed) == {"RewardWorker", "RolloutStage"}, killed
    client = _client(result)
    assert client.get_run(result["run_id"]).info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(result["run_id"], "loss")]
    assert sorted(steps) == list(range(6)), steps  # none lost, none counted twice
