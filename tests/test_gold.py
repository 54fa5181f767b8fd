"""The held-out gold reward during training: scores, best-weights export, early stopping, state."""
from __future__ import annotations

import json
from pathlib import Path

import torch


def _gold_cfg(tiny_cfg, tiny_world, *extra):
    gold = json.dumps([{"kind": "pickscore", "path": tiny_world["pickscore"]}])
    return tiny_cfg(f"eval.gold={gold}", "eval.every=1", "eval.patience=2", "eval.num_prompts=3", *extra)


def _engine(cfg):
    from pipeline.config import OptimConfig
    from pipeline.models import load_adapter
    from pipeline.parallel import SingleEngine

    adapter = load_adapter("flux", cfg.model.path, "cpu", cfg.model.max_sequence_length, load_text_encoders=False)
    return adapter, SingleEngine(adapter.transformer, OptimConfig(), torch.device("cpu"), False)


def test_gold_scores_equal_direct_scoring_of_full_rollouts(tiny_cfg, tiny_world):
    from pipeline.data import read_prompts
    from pipeline.evaluation import score_images
    from pipeline.gold import GoldReward
    from pipeline.models import load_adapter
    from pipeline.rollout import sample_x0
    from rewards.scorers import load_scorers

    cfg = _gold_cfg(tiny_cfg, tiny_world)
    adapter, engine = _engine(cfg)
    gold = GoldReward.create(cfg, adapter, torch.device("cpu"), 0, 1, None)
    got = gold.scores(adapter, engine.transformer)

    # Independently: the first 3 held-out prompts, noise seed eval.seed + i, rollout sampler, pickscore.
    prompts = read_prompts(cfg.data.heldout_prompts)[:3]
    text = load_adapter("flux", cfg.model.path, "cpu", cfg.model.max_sequence_length, load_transformer=False)
    cond = text.encode_prompts(prompts)
    eps = torch.cat([adapter.sample_noise(1, 64, torch.Generator().manual_seed(cfg.eval.seed + i)) for i in range(3)])
    x0 = sample_x0(adapter, adapter.transformer, eps, cond, 64, cfg.rollout.steps, cfg.rollout.shift,
                   cfg.rollout.guidance)
    direct = score_images(load_scorers(cfg.eval.gold, "cpu"), adapter.decode(x0, 64), prompts)["pickscore"]
    assert set(got) == {"pickscore"}
    torch.testing.assert_close(torch.tensor(got["pickscore"], dtype=torch.float64), direct.double().mean(),
                               rtol=1e-6, atol=1e-6)


def test_best_export_patience_and_resumable_state(tiny_cfg, tiny_world, tmp_path):
    from safetensors.torch import load_file

    from pipeline.gold import GoldReward

    cfg = _gold_cfg(tiny_cfg, tiny_world, f"output.dir={tmp_path}")
    adapter, engine = _engine(cfg)
    gold = GoldReward.create(cfg, adapter, torch.device("cpu"), 0, 1, None)
    sequence = iter([0.5, 0.4, 0.6, 0.55, 0.52])
    gold.scores = lambda adapter, transformer: {"pickscore": next(sequence)}  # the bookkeeping alone

    def weights_mark(value: float) -> None:  # a recognisable weight so the export can be traced
        with torch.no_grad():
            next(engine.transformer.parameters()).fill_(value)

    first = next(iter(engine.transformer.state_dict()))
    weights_mark(1.0)
    m = gold.evaluate(adapter, engine, 0, cfg)  # 0.5: best
    assert m["gold/best"] == 0.5 and m["gold/evals_without_improvement"] == 0 and not gold.should_stop()
    weights_mark(2.0)
    gold.evaluate(adapter, engine, 1, cfg)  # 0.4: worse
    assert gold.bad == 1 and not gold.should_stop()
    weights_mark(3.0)
    gold.evaluate(adapter, engine, 2, cfg)  # 0.6: new best, exported
    best = json.loads((tmp_path / "best" / "best.json").read_text())
    assert best["step"] == 3 and best["gold_score"] == 0.6
    assert float(load_file(str(tmp_path / "best" / "diffusion_pytorch_model.safetensors"))[first].flatten()[0]) == 3.0

    resumed = GoldReward(cfg, gold.cond, gold.eps, gold.captions, gold.valid, gold.scorers, 0, 1,
                         json.loads(json.dumps(gold.state())))  # through JSON, as in srpo_state.json
    resumed.scores = gold.scores
    weights_mark(4.0)
    resumed.evaluate(adapter, engine, 3, cfg)  # 0.55
    assert not resumed.should_stop()
    resumed.evaluate(adapter, engine, 4, cfg)  # 0.52: second evaluation without a new best
    assert resumed.should_stop() and resumed.best == 0.6 and resumed.best_step == 3
    assert [h[0] for h in resumed.history] == [1, 2, 3, 4, 5]
    # The best weights on disk are still those of step 3.
    assert float(load_file(str(tmp_path / "best" / "diffusion_pytorch_model.safetensors"))[first].flatten()[0]) == 3.0


def test_prompts_are_split_evenly_with_padding_across_ranks(tiny_cfg, tiny_world):
    from pipeline.gold import GoldReward

    cfg = _gold_cfg(tiny_cfg, tiny_world)  # 3 prompts over 2 ranks: 2 + (1 + 1 padding row)
    adapter, _ = _engine(cfg)
    ranks = [GoldReward.create(cfg, adapter, torch.device("cpu"), r, 2, None) for r in (0, 1)]
    assert [len(g.captions) for g in ranks] == [2, 2]
    assert ranks[0].valid.tolist() == [1.0, 1.0] and ranks[1].valid.tolist() == [1.0, 0.0]
    assert ranks[1].captions[0] == ranks[1].captions[1]


def test_gold_must_differ_from_the_training_reward(tiny_cfg, tiny_world):
    import pytest

    from pipeline.config import ConfigError

    same = json.dumps([{"kind": "hpsv2", "path": tiny_world["hps_checkpoint"]}])
    with pytest.raises(ConfigError, match=r"eval.gold\[0\].*must differ"):
        tiny_cfg(f"eval.gold={same}", "eval.every=1")
    with pytest.raises(ConfigError, match="eval.gold"):
        tiny_cfg("eval.every=1")


def test_early_stop_tags_the_run_and_checkpoints_the_gold_state(tiny_cfg, tiny_world, monkeypatch):
    """A single-process run whose gold scores are fixed (0.5, then 0.4; the scoring itself is checked
    above) stops after step 2 of 6 with patience 1: the tag, the metrics under the scorer's name and
    gold/score, and a checkpoint at the stop (none is due before the end) holding the gold state."""
    from mlflow.tracking import MlflowClient

    from pipeline.checkpoint import latest_checkpoint
    from pipeline.gold import GoldReward
    from pipeline.runs import run_local

    sequence = iter([0.5, 0.4])
    monkeypatch.setattr(GoldReward, "scores", lambda self, adapter, transformer: {"pickscore": next(sequence)})
    cfg = _gold_cfg(tiny_cfg, tiny_world, "learner.num_workers=0", "train.max_steps=6", "train.batch_size=1",
                    "train.checkpoint_every=0", "log.image_every=0", "rollout.steps=2", "eval.patience=1")
    result = run_local(cfg)
    client = MlflowClient(result["tracking_uri"])
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["srpo.early_stopped_at_step"] == "2"

    def history(key):
        return sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))

    assert [s for s, _ in history("loss")] == [0, 1]
    assert history("gold/pickscore") == history("gold/score") == [(0, 0.5), (1, 0.4)]
    assert history("gold/best") == [(0, 0.5), (1, 0.5)]
    state = json.loads((latest_checkpoint(Path(cfg.output.dir) / "checkpoints") / "srpo_state.json").read_text())
    assert state["step"] == 2
    assert state["gold"] == {"best": 0.5, "best_step": 1, "evals_without_improvement": 1,
                             "history": [[1, 0.5], [2, 0.4]]}
    assert json.loads((Path(cfg.output.dir) / "best" / "best.json").read_text())["step"] == 1
    assert Path(result["export"]).is_file()
    # log.image_every=0: no image at all, the gold evaluation's held-out images included.
    assert not [a.path for a in client.list_artifacts(run.info.run_id, "images")]
