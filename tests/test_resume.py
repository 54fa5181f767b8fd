"""Exact resume and recovery on a local Ray cluster (tiny preset, 2 FSDP2 learners, CPU).

Two runs of the same 4 steps: uninterrupted; and one stopped after 2 steps, continued with
`srpo train --resume`, whose learner rank 1 is SIGKILLed at step 3 and restarted by Ray Train
(FailureConfig) from the step-2 checkpoint. On the CPU, with gloo, every step is
deterministic, so the losses and the final weights must be identical (atol 0).
"""
from __future__ import annotations

import json

import torch

from conftest import RESUME_COMMON as COMMON
from conftest import run_losses as _losses
from conftest import run_weights as _weights


def test_stop_resume_and_killed_learner_equal_the_uninterrupted_run(fsdp2_reference_run, ray_local, tiny_cfg, tmp_path,
                                                                   monkeypatch):
    """A run stopped after 2 steps, continued with `srpo train --resume ... train.max_steps=4`; in the
    continued run learner rank 1 is SIGKILLed at step 3 and Ray Train (max_failures=1) restarts the
    group from the step-2 checkpoint. Both recoveries in one run keep the suite short."""
    from jobs.train import main as train_main
    from pipeline.checkpoint import find_checkpoints, read_run
    from pipeline.ray.driver import run_ray

    ref_losses, ref_weights = fsdp2_reference_run
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
