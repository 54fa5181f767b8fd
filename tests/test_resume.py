"""Exact resume and recovery on a local Ray cluster (tiny preset, 2 FSDP2 learners, CPU).

Two runs of the same 4 steps: uninterrupted; and one stopped after 2 steps, continued with
`srpo train --resume`, whose learner rank 1 is SIGKILLed at step 3 and restarted by Ray Train
(FailureConfig) from the step-2 checkpoint. On the CPU, with gloo, every step is
deterministic, so the losses and the final weights must be identical (atol 0).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

# Colocated rollout and reward: nothing asynchronous, so a step's inputs are a function of the
# restored state alone. The actor placements are exercised by test_ray_pipeline.
COMMON = ("rollout.placement=colocated", "reward.placement=colocated", "train.checkpoint_every=2",
          "train.keep_checkpoints=1", "log.image_every=0")


def _losses(run_id: str, tracking_uri: str) -> dict[int, list[float]]:
    from mlflow.tracking import MlflowClient

    out: dict[int, list[float]] = {}
    for m in MlflowClient(tracking_uri).get_metric_history(run_id, "loss"):
        out.setdefault(m.step, []).append(m.value)
    return out


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "transformer" / "diffusion_pytorch_model.safetensors"))


@pytest.fixture(scope="module")
def reference_run(ray_local, tiny_world, tmp_path_factory):
    from conftest import REPO, world_overrides
    from pipeline.config import load_config
    from pipeline.ray.driver import run_ray

    out = tmp_path_factory.mktemp("uninterrupted")
    cfg = load_config(REPO / "configs/tiny.yaml", world_overrides(tiny_world, out) + [*COMMON, "train.max_steps=4"])
    result = run_ray(cfg)
    losses = _losses(result["run_id"], result["tracking_uri"])
    assert sorted(losses) == [0, 1, 2, 3] and all(len(v) == 1 for v in losses.values())
    return {k: v[0] for k, v in losses.items()}, _weights(out)


def test_stop_resume_and_killed_learner_equal_the_uninterrupted_run(reference_run, ray_local, tiny_cfg, tmp_path,
                                                                   monkeypatch):
    """A run stopped after 2 steps, continued with `srpo train --resume ... train.max_steps=4`; in the
    continued run learner rank 1 is SIGKILLed at step 3 and Ray Train (max_failures=1) restarts the
    group from the step-2 checkpoint. Both recoveries in one run keep the suite short."""
    from jobs.train import main as train_main
    from pipeline.checkpoint import find_checkpoints, read_run
    from pipeline.ray.driver import run_ray

    ref_losses, ref_weights = reference_run
    out = tmp_path / "stopped"
    run_ray(tiny_cfg(*COMMON, "train.max_steps=2", f"output.dir={out}"))
    ckpts = find_checkpoints(out)
    assert len(ckpts) == 1 and json.loads((ckpts[0] / "srpo_state.json").read_text())["step"] == 2
    first = read_run(out)

    marker = tmp_path / "fault-fired"
    monkeypatch.setenv("SRPO_FAULT_KILL_AT_STEP", "3")
    monkeypatch.setenv("SRPO_FAULT_MARKER", str(marker))
    # Continue the stopped run for two more steps, through the console entry point.
    assert train_main(["--resume", str(out), "train.max_steps=4", "train.max_failures=1"]) == 0
    assert marker.is_file(), "the fault was never injected"
    run = read_run(out)
    assert run["run_id"] == first["run_id"] and run["ray_run_name"] == first["ray_run_name"]
    losses = _losses(run["run_id"], run["tracking_uri"])  # the same MLflow run, continued
    # Steps 0-1 ran in the first job; the resumed job ran step 2, was killed entering step 3, and the
    # restarted group resumed at the step-2 checkpoint: step 2 is logged twice, with the same value.
    assert sorted(losses) == [0, 1, 2, 3]
    assert losses[2] == [ref_losses[2]] * 2
    for step in (0, 1, 3):
        assert losses[step] == [ref_losses[step]], f"step {step}: {losses[step]} vs {ref_losses[step]}"
    weights = _weights(out)
    for name, ref in ref_weights.items():
        torch.testing.assert_close(weights[name], ref, rtol=0, atol=0, msg=name)
    # Pruning: checkpoints at steps 2 and 4 exist in storage order, keep_checkpoints=1 keeps the newest.
    steps = [json.loads((c / "srpo_state.json").read_text())["step"] for c in find_checkpoints(out)]
    assert steps == [4]
    # Resuming a finished run without more steps is refused before any cluster work.
    assert train_main(["--resume", str(out)]) == 2
