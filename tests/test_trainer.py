"""The Learner learns on the tiny preset (single process), and the `srpo train` job logs a complete run."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.checkpoint import LocalCheckpoints
from pipeline.config import load_config
from pipeline.data import read_prompts
from pipeline.gold import heldout_srp_reward
from pipeline.learner import build_learner
from pipeline.models import load_adapter
from pipeline.sources import InProcessSource

REPO = Path(__file__).resolve().parents[1]
HELDOUT_SEED = 4321  # noise never used in training (training noise comes from cfg.seed)


def _run(cfg, tmp_path, steps=30):
    """Held-out reward of the Learner's policy before and after ``steps`` single-process steps."""
    cfg.train.max_steps = steps
    learner = build_learner(cfg, InProcessSource(cfg), LocalCheckpoints(tmp_path / "ckpt", 1),
                            device=torch.device("cpu"))
    held = read_prompts(cfg.data.heldout_prompts)
    assert not set(held) & set(read_prompts(cfg.data.prompts)), "held-out prompts must not be training prompts"
    text = load_adapter(cfg.model.family, cfg.model.path, "cpu", cfg.model.max_sequence_length,
                        load_transformer=False)
    cond = text.encode_prompts(held)

    def reward() -> float:
        return heldout_srp_reward(cfg, learner.adapter, learner.engine.transformer, learner.objective.reward_model,
                                  cond, held, seed=HELDOUT_SEED)

    before = reward()
    learner.run()
    return before, reward()


def test_thirty_steps_raise_heldout_reward_and_lr_zero_does_not(tiny_cfg, tmp_path):
    before, after = _run(tiny_cfg("learner.num_workers=0"), tmp_path / "a")
    before0, after0 = _run(tiny_cfg("learner.num_workers=0", "optim.lr=0", f"output.dir={tmp_path / 'b'}"),
                           tmp_path / "b")
    print(f"\nheld-out mean SRP reward (full rollout): lr=3e-3 {before:.5f} -> {after:.5f};"
          f" lr=0 {before0:.5f} -> {after0:.5f}")
    assert before == pytest.approx(before0, abs=1e-7), "same start, same held-out noise"
    # Learning: a clear rise, not noise (measured about +0.025 on a base of 0.035).
    assert after - before > 0.01
    # No learning at lr = 0: identical policy, identical images, identical reward.
    assert after0 == pytest.approx(before0, abs=1e-6)


def test_train_job_end_to_end(tiny_overrides, tmp_path):
    """`python -m jobs.train` with the single-process trainer: MLflow run with params, metrics, export."""
    out = tmp_path / "run"
    overrides = [o for o in tiny_overrides if not o.startswith("output.dir=")] + [f"output.dir={out}", "train.max_steps=3",
                                                                                   "learner.num_workers=0"]
    proc = subprocess.run([sys.executable, "-m", "jobs.train", "--config", "configs/tiny.yaml", *overrides],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    weights = out / "transformer" / "diffusion_pytorch_model.safetensors"
    assert weights.is_file()
    # The console: one line per step with loss, reward, policy lag, step time and ETA.
    steps = re.findall(r"^\[srpo\] step (\d+)/3 loss -?\d+\.\d{4} reward\(denoise\) -?\d+\.\d{4} lag 0 "
                       r"\d+\.\ds/step eta \d+s$", proc.stdout, flags=re.M)
    assert steps == ["1", "2", "3"], proc.stdout[-3000:]
    # Without Ray: the preset's actor placements are run in this process (and said so), no cluster starts.
    assert ("[srpo] learner.num_workers=0: rollout and reward run in this process (rollout.placement=actors, "
            "reward.placement=remote apply to Ray runs)") in proc.stdout
    assert "Ray instance" not in proc.stdout + proc.stderr
    assert json.loads((out / "run.json").read_text())["ray_run_name"] is None

    import mlflow
    from safetensors.torch import load_file

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    (exp,) = [e for e in client.search_experiments() if e.name == "srpo-tiny"]
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["optim.lr"] == "0.003" and run.data.params["srpo.train_timestep"] == "[5, 25]"
    # Every config field is a param; the provenance tags.
    assert set(run.data.params) == set(load_config(REPO / "configs/tiny.yaml", overrides).flat())
    assert run.data.tags["srpo.code_version"] and run.data.tags["srpo.model_path"] == tiny_overrides[1].split("=", 1)[1]
    assert run.data.tags["srpo.reward"] == f"hpsv2:{tiny_overrides[2].split('=', 1)[1]}"
    # The per-step metrics of docs/tracking.md (those of rollout actors and reward actors aside: none in one process).
    branch = [f"{b}/{k}" for b in ("denoise", "inversion")
              for k in ("loss", "reward", "pos_score", "neg_score", "k", "sigma_from", "sigma_to", "level")]
    for key in ("loss", "grad_norm", "lr", "samples_per_s", "time/step_wall_s", *branch, "rollout/reward",
                "rollout/pos_score", "rollout/neg_score", "time/rollout_wait_s", "time/rollout_s", "time/learner_s",
                "time/reward_wait_s", "policy_lag/max", "policy_lag/mean"):
        assert len(client.get_metric_history(run.info.run_id, key)) == 3, key
    # The exported state dict loads into the diffusers transformer of the tiny folder.
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel.from_pretrained(Path(tiny_overrides[1].split("=", 1)[1]), subfolder="transformer")
    result = model.load_state_dict(load_file(weights), strict=True)
    assert not result.missing_keys and not result.unexpected_keys


def test_bad_config_exits_before_any_work(tiny_overrides):
    proc = subprocess.run([sys.executable, "-m", "jobs.train", "--config", "configs/tiny.yaml",
                           *tiny_overrides, "data.resolution=100"], cwd=REPO, capture_output=True, text=True,
                          timeout=600)  # a deadline against hanging: the imports alone take 10 s on 2 idle cores
    assert proc.returncode == 2
    assert "config error: data.resolution: got 100, expected a positive multiple of 16" in proc.stderr
