"""Reused rollouts (rollout.reuse = R), compiled and bf16 rollouts: what each step trains on, and resume.

Expected values come from outside the learner: rows from the documented generation rule, x0 from an
independent rollout (sample_x0) of a snapshot of the policy taken before the step, noise from the
documented seeds. Resume inside a generation is compared with the uninterrupted run bit for bit (the
same single process, the same operations in the same order).
"""
from __future__ import annotations

import json

import pytest
import torch

from conftest import REPO, RESUME_COMMON, run_losses, run_weights, world_overrides
from pipeline.checkpoint import LocalCheckpoints, find_checkpoints
from pipeline.config import ConfigError, load_config
from pipeline.learner import build_learner
from pipeline.rollout import sample_x0
from pipeline.runs import run_local
from pipeline.sources import InProcessSource, draw_eps, level_seed, noise_seed, sample_rows

MOD = 2**63 - 1


def _fresh_seed(seed: int, use: int) -> int:
    """pipeline/reuse.py's documented rule, written out independently: use 0 keeps the seed."""
    return seed if use == 0 else (seed * 6_364_136_223_846_793 + 1_442_695_040_888_963 * use) % MOD


def _cfg(tiny_world, out, *extra):
    return load_config(REPO / "configs/tiny.yaml", world_overrides(tiny_world, out) + [
        *RESUME_COMMON, "learner.num_workers=0", "train.batch_size=2", *extra])


def _record(cfg, tmp_path):
    """Run the learner in this process; per step: its inputs, metrics and a snapshot of the policy
    before the step, plus how many colocated rollouts ran."""
    learner = build_learner(cfg, InProcessSource(cfg), LocalCheckpoints(tmp_path / "ckpt", 1),
                            device=torch.device("cpu"))
    seen, rollouts = [], []
    train_step, rollout = learner.train_step, learner.rollout

    def spy_step(inputs, step):
        before = {k: v.detach().clone() for k, v in learner.engine.transformer.state_dict().items()}
        metrics = train_step(inputs, step)
        seen.append((step, inputs, before, metrics))
        return metrics

    def spy_rollout(eps, cond):
        rollouts.append(eps.clone())
        return rollout(eps, cond)

    learner.train_step, learner.rollout = spy_step, spy_rollout
    learner.run()
    return learner, seen, rollouts


# ------------------------------------------------------------------------------------------ rows


@pytest.mark.parametrize("reuse", [1, 2, 3])
def test_rows_come_in_generations_of_one_step_each_serving_reuse_steps(tiny_cfg, reuse):
    cfg = tiny_cfg("learner.num_workers=0", "train.batch_size=2", "train.max_steps=5", f"rollout.reuse={reuse}")
    items = [{"caption": f"c{i}"} for i in range(3)]
    generations = -(-5 // reuse)  # ceil: the last generation may serve fewer steps
    rows = sample_rows(cfg, items)
    assert [r["sample_index"] for r in rows] == list(range(2 * generations))
    assert [r["step"] for r in rows] == [i // 2 * reuse for i in range(2 * generations)]
    assert [r["caption"] for r in rows] == [f"c{i % 3}" for i in range(2 * generations)]
    assert [r["noise_seed"] for r in rows] == [noise_seed(cfg, i, 2, 2) for i in range(2 * generations)]
    assert [r["level_seed"] for r in rows] == [level_seed(cfg, i) for i in range(2 * generations)]
    # A resumed stream starts at the generation holding the step (a begun one comes from the buffer).
    assert sample_rows(cfg, items, start_step=4)[0]["sample_index"] == 4 // reuse * 2


def test_reuse_must_be_positive(tiny_cfg):
    with pytest.raises(ConfigError, match=r"^rollout\.reuse: got 0, expected >= 1"):
        tiny_cfg("rollout.reuse=0")


# ------------------------------------------------------------------------------------------ what a step trains on


def _independent_x0(learner, cfg, before, eps, cond):
    """sample_x0 of the policy snapshot taken before the step, on a fresh copy of the model."""
    model = learner.adapter.transformer
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(before)
    model.eval()
    x0 = sample_x0(learner.adapter, model, eps, cond, cfg.data.resolution, cfg.rollout.steps, cfg.rollout.shift,
                   cfg.rollout.guidance, cfg.train.mixed_precision)
    model.load_state_dict(saved)
    model.train()
    return x0


def test_reuse_one_rolls_out_every_step_with_the_rows_own_noise_and_levels(tiny_world, tmp_path):
    """R = 1 is the reference run: a rollout of the current policy at every step, on the row's noise,
    with the row's levels; nothing is buffered and no checkpoint holds a buffer."""
    cfg = _cfg(tiny_world, tmp_path / "r1", "train.max_steps=3", "rollout.reuse=1")
    learner, seen, rollouts = _record(cfg, tmp_path)
    assert len(rollouts) == 3 and learner.buffer.current is None
    for step, inputs, before, metrics in seen:
        idx = [2 * step, 2 * step + 1]
        eps = draw_eps(learner.adapter, [noise_seed(cfg, i, 2, 2) for i in idx], cfg.data.resolution)
        assert torch.equal(inputs.batch.eps, eps)
        assert inputs.levels == learner.srpo.sample_levels([level_seed(cfg, i) for i in idx])
        assert torch.equal(inputs.batch.x0, _independent_x0(learner, cfg, before, eps, inputs.batch.cond))
        assert inputs.lag == [0, 0] and metrics["rollout/use"] == 1.0
    assert (tmp_path / "ckpt").is_dir() and not list((tmp_path / "ckpt").rglob("rollout_buffer"))


def test_reuse_two_trains_each_anchor_twice_with_fresh_noise_and_levels(tiny_world, tmp_path):
    cfg = _cfg(tiny_world, tmp_path / "r2", "train.max_steps=4", "rollout.reuse=2")
    learner, seen, rollouts = _record(cfg, tmp_path)
    assert len(rollouts) == 2, "one rollout per generation"
    for step, inputs, before, metrics in seen:
        g, use = divmod(step, 2)
        idx = [2 * g, 2 * g + 1]  # generation g's samples
        eps = draw_eps(learner.adapter, [_fresh_seed(noise_seed(cfg, i, 2, 2), use) for i in idx],
                       cfg.data.resolution)
        assert torch.equal(inputs.batch.eps, eps)
        assert inputs.levels == learner.srpo.sample_levels([_fresh_seed(level_seed(cfg, i), use) for i in idx])
        assert inputs.lag == [use, use], "age in policy versions: one more per use"
        assert metrics["rollout/use"] == use + 1
        if use == 0:  # generated by the policy of its first step, on the generation's own noise
            assert torch.equal(inputs.batch.x0, _independent_x0(learner, cfg, before, eps, inputs.batch.cond))
            anchor = inputs.batch
        else:
            assert torch.equal(inputs.batch.x0, anchor.x0) and inputs.batch.captions == anchor.captions
            assert not torch.equal(inputs.batch.eps, anchor.eps), "fresh noise at every use"
            assert metrics["time/rollout_s"] == 0.0


# ------------------------------------------------------------------------------------------ resume


def test_resume_inside_a_generation_equals_the_uninterrupted_run(tiny_world, tmp_path):
    """R = 2: stopped after step 3 (generation 1 has one use left, kept in the checkpoint's buffer) and
    resumed, the run equals the uninterrupted one bit for bit; resuming with another R is refused."""
    from jobs.train import main as train_main

    ref = run_local(_cfg(tiny_world, tmp_path / "ref", "train.max_steps=4", "rollout.reuse=2"))
    out = tmp_path / "stopped"
    run_local(_cfg(tiny_world, out, "train.max_steps=3", "rollout.reuse=2"))
    ckpt = find_checkpoints(out)[-1]
    assert json.loads((ckpt / "srpo_state.json").read_text())["step"] == 3
    held = json.loads((ckpt / "rollout_buffer" / "rank_0.json").read_text())
    assert (held["first_step"], held["reuse"], held["lag"]) == (2, 2, [0, 0])
    assert train_main(["--resume", str(out), "train.max_steps=4", "rollout.reuse=3"]) == 2
    assert train_main(["--resume", str(out), "train.max_steps=4"]) == 0
    want = run_losses(ref["run_id"], ref["tracking_uri"])
    got = json.loads((out / "run.json").read_text())
    assert run_losses(got["run_id"], got["tracking_uri"]) == want
    for name, w in run_weights(tmp_path / "ref").items():
        torch.testing.assert_close(run_weights(out)[name], w, rtol=0, atol=0, msg=name)


# ------------------------------------------------------------------------------------------ compile and bf16


def test_compiled_rollout_equals_the_eager_one_and_compiles_once(tiny_world, tmp_path):
    """rollout.compile: the compiled forward gives the eager x0 within float tolerance (inductor fuses
    and reorders float32 operations: atol 1e-4 on latents of unit scale), and the shapes never change,
    so steps after the first do not recompile."""
    torch._dynamo.reset()
    eager = _record(_cfg(tiny_world, tmp_path / "eager", "train.max_steps=2"), tmp_path / "e")[1]
    from torch._dynamo.utils import counters
    counters.clear()
    compiled = _record(_cfg(tiny_world, tmp_path / "comp", "train.max_steps=2", "rollout.compile=true"),
                       tmp_path / "c")[1]
    torch.testing.assert_close(compiled[0][1].batch.x0, eager[0][1].batch.x0, rtol=0, atol=1e-4)
    # 2 steps x 10 Euler steps = 20 transformer calls, one graph: compiled once, no recompile, no graph break.
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    torch._dynamo.reset()


def test_bf16_rollout_stays_close_to_fp32(tiny_world, tmp_path):
    """rollout.dtype=bf16 with an fp32 learner: the rollout autocasts to bf16 (its x0 differs from
    fp32's, by less than bf16's 8 mantissa bits allow over 10 Euler steps: 5% of the latent's norm),
    while the master weights stay fp32."""
    fp32 = _record(_cfg(tiny_world, tmp_path / "a", "train.max_steps=1", "train.mixed_precision=fp32"), tmp_path / "a")
    bf16 = _record(_cfg(tiny_world, tmp_path / "b", "train.max_steps=1", "train.mixed_precision=fp32",
                        "rollout.dtype=bf16"), tmp_path / "b")
    x32, x16 = fp32[1][0][1].batch.x0, bf16[1][0][1].batch.x0
    assert not torch.equal(x32, x16), "bf16 compute changes the rollout"
    rel = ((x16 - x32).norm() / x32.norm()).item()
    assert rel < 0.05, rel
    assert all(p.dtype == torch.float32 for p in bf16[0].engine.transformer.parameters())


def test_fast_preset_is_the_reference_recipe_with_a_cheaper_rollout():
    fast = load_config(REPO / "configs/flux_hpsv2_fast.yaml").to_dict()
    ref = load_config(REPO / "configs/flux_hpsv2.yaml").to_dict()
    assert (fast["rollout"].pop("steps"), ref["rollout"].pop("steps")) == (12, 25)
    assert (fast["rollout"].pop("dtype"), ref["rollout"].pop("dtype")) == ("bf16", "auto")
    assert ref["train"]["mixed_precision"] == "bf16", "auto is bf16 in the reference too: same rollout precision"
    assert fast == ref
