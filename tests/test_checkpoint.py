"""Checkpoint files without Ray: complete/incomplete detection, atomicity, exact restore."""
from __future__ import annotations

import json
import shutil

import pytest
import torch


def _engine(tiny_world, seed: int = 0):
    from diffusers import FluxTransformer2DModel

    from pipeline.config import OptimConfig
    from pipeline.parallel import SingleEngine

    torch.manual_seed(seed)
    model = FluxTransformer2DModel.from_pretrained(tiny_world["flux"], subfolder="transformer")
    return SingleEngine(model, OptimConfig(lr=1e-2), torch.device("cpu"), activation_checkpointing=False)


def _train_a_bit(engine, n: int) -> None:
    for _ in range(n):
        loss = sum((p.float() ** 2).mean() for p in engine.transformer.parameters())
        engine.backward(loss)
        engine.step(1.0)


def _save(engine, folder, step: int, gen: torch.Generator) -> None:
    from pipeline.checkpoint import save_training_checkpoint

    save_training_checkpoint(folder, engine, "single", 0, 1, gen, {"step": step, "model_path": "x"})


def test_interrupted_write_leaves_the_previous_checkpoint_usable(tiny_world, tmp_path):
    from pipeline.checkpoint import checkpoint_problem, find_checkpoints, latest_checkpoint, load_training_checkpoint

    engine = _engine(tiny_world)
    gen = torch.Generator().manual_seed(3)
    _train_a_bit(engine, 2)
    _save(engine, tmp_path / "run" / "ckpt_a", 2, gen)
    saved = {k: v.clone() for k, v in engine.transformer.state_dict().items()}
    saved_opt = {k: v.clone() for k, v in engine.optimizer.state_dict()["state"][0].items()}
    saved_draw = torch.rand(4, generator=gen)  # what the level generator gives right after the save
    _train_a_bit(engine, 2)
    _save(engine, tmp_path / "run" / "ckpt_b", 4, gen)
    assert [c.name for c in find_checkpoints(tmp_path / "run")] == ["ckpt_a", "ckpt_b"]

    # A crash in the middle of writing ckpt_b: one shard cut short.
    shard = next((tmp_path / "run" / "ckpt_b" / "model_optim").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    assert "interrupted write" in checkpoint_problem(tmp_path / "run" / "ckpt_b")
    assert latest_checkpoint(tmp_path / "run").name == "ckpt_a"
    # ...or before its manifest (the last file) was written.
    shutil.copytree(tmp_path / "run" / "ckpt_a", tmp_path / "run" / "ckpt_c")
    (tmp_path / "run" / "ckpt_c" / "srpo_state.json").write_text(json.dumps(
        {**json.loads((tmp_path / "run" / "ckpt_a" / "srpo_state.json").read_text()), "step": 6}))
    (tmp_path / "run" / "ckpt_c" / "manifest" / "rank_0.json").unlink()
    assert "rank 0 did not finish" in checkpoint_problem(tmp_path / "run" / "ckpt_c")
    assert latest_checkpoint(tmp_path / "run").name == "ckpt_a"

    fresh = _engine(tiny_world, seed=1)
    gen2 = torch.Generator().manual_seed(999)
    state = load_training_checkpoint(latest_checkpoint(tmp_path / "run"), fresh, "single", 0, 1, gen2)
    assert state["step"] == 2 and state["world_size"] == 1
    for k, v in fresh.transformer.state_dict().items():
        torch.testing.assert_close(v, saved[k], rtol=0, atol=0)
    for k, v in fresh.optimizer.state_dict()["state"][0].items():
        torch.testing.assert_close(v, saved_opt[k], rtol=0, atol=0)
    torch.testing.assert_close(torch.rand(4, generator=gen2), saved_draw, rtol=0, atol=0)


def test_restore_refuses_another_world_size_or_strategy(tiny_world, tmp_path):
    from pipeline.checkpoint import load_training_checkpoint

    engine = _engine(tiny_world)
    gen = torch.Generator().manual_seed(0)
    _save(engine, tmp_path / "c", 1, gen)
    with pytest.raises(ValueError, match="learner.num_workers"):
        load_training_checkpoint(tmp_path / "c", engine, "single", 0, 2, gen)
    with pytest.raises(ValueError, match="learner.strategy=single"):
        load_training_checkpoint(tmp_path / "c", engine, "fsdp2", 0, 1, gen)
    with pytest.raises(ValueError, match="not a complete srpo-ray checkpoint"):
        load_training_checkpoint(tmp_path / "nothing", engine, "single", 0, 1, gen)


def test_lr_schedule_is_a_function_of_the_step():
    from pipeline.schedules import lr_at

    assert [lr_at(s, 1.0, 0) for s in range(3)] == [1.0, 1.0, 1.0]
    assert [lr_at(s, 1.0, 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_resume_refuses_other_control_words_or_the_other_process_layout(tiny_cfg, tmp_path):
    """`--resume` must keep the checkpoint's control words and learner layout (0 versus Ray); the
    error names the fields (learner count and strategy: the test above)."""
    from pipeline.checkpoint import TrainingState, write_json_atomic
    from pipeline.config import ConfigError
    from pipeline.runs import check_resumable

    cfg = tiny_cfg()
    saved = TrainingState.from_json(json.loads(json.dumps(TrainingState(step=2).to_json(cfg, 1))))
    saved.check_phase(cfg)  # the same word lists: accepted
    with pytest.raises(ValueError, match=r"^srpo\.positive_words / srpo\.negative_words: the checkpoint's next "
                                         r"control words are .* the config gives 'Sharp' / "):
        saved.check_phase(tiny_cfg("srpo.positive_words=[Sharp, Vivid]"))

    for recorded, ray_run, trained in ((None, True, r"in a single process \(learner\.num_workers=0\)"),
                                       ("srpo-0123abcd", False, r"on Ray \(learner\.num_workers >= 1\)")):
        write_json_atomic(tmp_path / "run.json", {"run_id": "x", "tracking_uri": "sqlite:///x.db",
                                                  "ray_run_name": recorded})
        with pytest.raises(ConfigError, match=rf"^learner\.num_workers: the run in .* was trained {trained}; "
                                              "resume it with the learner count it started with"):
            check_resumable(cfg, tmp_path, ray_run=ray_run)
