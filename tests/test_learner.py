"""One learner for every process layout: the single process and Ray Train run the same Learner.

- Ray Train with 1 worker (colocated rollout and reward, learner.strategy=single) equals the single
  process, bit for bit on the CPU: the same rows, seeds, levels, lr schedule, step count, losses and
  weights. (This needs the Ray Data columns copied into fresh tensors: MKL rounds differently with an
  operand's alignment.) FSDP2 at world size 1 is not bit for bit: its clipping norm sums the
  shards' squares in another order, so it is compared with a tolerance, like 2 workers.
- 2 FSDP2 workers (batch 2 each) through the real Ray Train worker function equal the single
  process with batch 4 on the same samples, within float tolerance (the per-rank batch of the
  rollout and the gradient average over ranks change the order of float operations).
- The single process keeps checkpoints and resumes exactly.
"""
from __future__ import annotations

import json

import pytest
import torch
from ray.util.state import list_actors

from conftest import REPO, RESUME_COMMON, run_losses, run_weights, world_overrides
from pipeline.checkpoint import find_checkpoints, read_run
from pipeline.config import load_config
from pipeline.ray import driver
from pipeline.runs import run_local

LR, WARMUP = 3e-3, 2


def _cfg(tiny_world, out, *extra: str):
    return load_config(REPO / "configs/tiny.yaml", world_overrides(tiny_world, out) + [*RESUME_COMMON, *extra])


@pytest.fixture(scope="module")
def single_four_steps(tiny_world, tmp_path_factory):
    """4 steps of the single-process learner with batch 4 (the FSDP2 reference's global batch)."""
    out = tmp_path_factory.mktemp("single4")
    result = run_local(_cfg(tiny_world, out, "learner.num_workers=0", "train.batch_size=4", "train.max_steps=4"))
    losses = run_losses(result["run_id"], result["tracking_uri"])
    assert sorted(losses) == [0, 1, 2, 3] and all(len(v) == 1 for v in losses.values())
    return out, {k: v[0] for k, v in losses.items()}, run_weights(out), result


def test_ray_train_one_worker_equals_the_single_process(ray_local, tiny_world, tmp_path):
    from pipeline.ray.driver import run_ray

    # The same CPU threads in both (a matmul's summation order depends on how many threads split it).
    common = ("learner.num_cpus=2", "train.batch_size=2", "train.max_steps=3", f"optim.lr={LR}", f"optim.warmup_steps={WARMUP}")
    single = run_local(_cfg(tiny_world, tmp_path / "single", "learner.num_workers=0", *common))
    ray_run = run_ray(_cfg(tiny_world, tmp_path / "ray", "learner.num_workers=1", "learner.strategy=single", *common))
    for key in ("loss", "denoise/reward", "inversion/reward", "grad_norm", "rollout/reward"):
        a = run_losses(single["run_id"], single["tracking_uri"], key)
        b = run_losses(ray_run["run_id"], ray_run["tracking_uri"], key)
        assert sorted(a) == sorted(b) == [0, 1, 2], f"{key}: steps {sorted(a)} vs {sorted(b)}"
        assert a == b, f"{key}: single {a} vs Ray Train {b}"
    # The lr schedule (linear warmup over 2 steps), derived here, is what both applied.
    want = {s: [LR * min(1.0, (s + 1) / WARMUP)] for s in range(3)}
    for result in (single, ray_run):
        got = run_losses(result["run_id"], result["tracking_uri"], "lr")
        assert got.keys() == want.keys() and all(got[s][0] == pytest.approx(want[s][0], rel=1e-12) for s in want)
    w1, w2 = run_weights(tmp_path / "single"), run_weights(tmp_path / "ray")
    assert w1.keys() == w2.keys()
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=0, atol=0, msg=name)
    # The local cluster ran Ray Train without its preemption watcher (QUIET_LOCAL_CLUSTER): one helper
    # process fewer, on a machine that is never drained.
    actors = list_actors(address=driver._DASHBOARD["url"], limit=10_000, raise_on_missing_output=False)
    classes = {a.class_name for a in actors}
    assert "TrainController" in classes and "PreemptionWatcher" not in classes, classes


def test_two_fsdp2_workers_equal_the_single_process_on_the_same_samples(fsdp2_reference_run, single_four_steps,
                                                                       tiny_world):
    """Losses to rtol 1e-5. Weights: AdamW divides each gradient element by its own running RMS, so a
    last-bit difference in a near-zero gradient moves that element by up to a fraction of lr; after
    4 steps the measured max |single - FSDP2| is 5.4e-6 against updates of up to 4 lr = 1.2e-2.
    Bound: max 2% of lr, mean 0.1% of the mean update (measured 1.3e-8 vs 5.4e-3)."""
    from safetensors.torch import load_file

    ref_losses, ref_weights = fsdp2_reference_run
    _, losses, weights, _ = single_four_steps
    for step in range(4):  # the mean over ranks of per-rank means = the mean over the global batch
        assert losses[step] == pytest.approx(ref_losses[step], rel=1e-5, abs=1e-7), step
    initial = load_file(f"{tiny_world['flux']}/transformer/diffusion_pytorch_model.safetensors")
    n = sum(w.numel() for w in weights.values())
    max_diff = max(float((weights[k] - ref_weights[k]).abs().max()) for k in weights)
    mean_diff = sum(float((weights[k] - ref_weights[k]).abs().sum()) for k in weights) / n
    mean_update = sum(float((weights[k] - initial[k]).abs().sum()) for k in weights) / n
    print(f"\nsingle vs 2 FSDP2 workers after 4 steps: max |dw| {max_diff:.3g}, mean |dw| {mean_diff:.3g}, "
          f"mean |update| {mean_update:.3g}")
    assert max_diff <= 0.02 * LR
    assert mean_diff <= 1e-3 * mean_update


def test_single_process_run_folder_checkpoints_and_exact_resume(single_four_steps, tiny_world, tmp_path):
    """A single-process run writes the run folder and checkpoints; stopped after 2 steps and continued
    with `srpo train --resume`, it equals the uninterrupted run exactly (losses and weights)."""
    from jobs.train import main as train_main

    ref_out, ref_losses, ref_weights, _ = single_four_steps
    run = read_run(ref_out)
    assert run["ray_run_name"] is None and (ref_out / "config.yaml").is_file()
    assert [json.loads((c / "srpo_state.json").read_text())["step"] for c in find_checkpoints(ref_out)] == [4]
    out = tmp_path / "stopped"
    run_local(_cfg(tiny_world, out, "learner.num_workers=0", "train.batch_size=4", "train.max_steps=2"))
    assert train_main(["--resume", str(out), "train.max_steps=4"]) == 0
    resumed = read_run(out)
    losses = run_losses(resumed["run_id"], resumed["tracking_uri"])
    assert {k: v for k, v in losses.items()} == {k: [v] for k, v in ref_losses.items()}
    weights = run_weights(out)
    for name, ref in ref_weights.items():
        torch.testing.assert_close(weights[name], ref, rtol=0, atol=0, msg=name)
    assert train_main(["--resume", str(out), "learner.num_workers=2", "train.max_steps=6"]) == 2
