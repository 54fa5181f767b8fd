"""Weight store, rollout stage and the Ray Data stream: versions, parity with the published weights,
and the staleness bound under a slow learner."""
import time

import numpy as np
import pytest
import torch

from actors.rollout import RolloutStage
from actors.weights import WeightStore, WeightSubscriber, publish_state
from pipeline.models import load_adapter
from pipeline.rollout import sample_x0
from pipeline.sources import draw_eps


def _perturbed(state, scale, seed):
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in state.items()}


@pytest.fixture()
def store(ray_local):
    ray = ray_local
    handle = ray.remote(WeightStore).remote()
    yield handle
    ray.kill(handle)


def test_publish_then_every_subscriber_holds_the_learner_weights(tiny_world, store, ray_local):
    learner = load_adapter("flux", tiny_world["flux"], load_text_encoders=False).transformer
    subs = [WeightSubscriber(store, load_adapter("flux", tiny_world["flux"], load_text_encoders=False).transformer)
            for _ in range(2)]
    for version, seed in ((0, None), (1, 1), (2, 2)):
        state = learner.state_dict() if seed is None else _perturbed(learner.state_dict(), 0.01, seed)
        learner.load_state_dict(state)
        sync = publish_state(store, version, learner.state_dict())
        assert sync["weight_sync/bytes"] == sum(v.numel() * v.element_size() for v in learner.state_dict().values())
        for sub in subs:
            assert sub.refresh(version) == version
            for k, v in learner.state_dict().items():
                assert torch.equal(sub.module.state_dict()[k], v), k
    with pytest.raises(Exception, match="weight version must increase"):
        ray_local.get(store.publish.remote(2, [None], 0))


def test_wait_for_times_out_when_the_learner_is_behind(store, ray_local):
    # The actor's TimeoutError (asyncio.wait_for) comes back as a RayTaskError that is also a TimeoutError.
    with pytest.raises(TimeoutError, match=r"ray::WeightStore\.wait_for\(\)"):
        ray_local.get(store.wait_for.remote(5, 0.5))


def test_rollout_sample_records_the_version_that_made_it(tiny_cfg, tiny_world, store):
    cfg = tiny_cfg("rollout.placement=actors", "train.batch_size=2", "learner.num_workers=1")
    base = load_adapter("flux", tiny_world["flux"], load_text_encoders=True)
    v1 = _perturbed(base.transformer.state_dict(), 0.05, 7)
    publish_state(store, 0, base.transformer.state_dict())
    publish_state(store, 1, v1)
    stage = RolloutStage(cfg.to_dict(), store)
    captions = ["a fox walking through the snow", "a teapot and two cups"]
    cond = base.encode_prompts(captions)
    batch = {"caption": np.array(captions), "step": np.array([2, 2]), "noise_seed": np.array([11, 12]),
             "prompt_embeds": cond.prompt_embeds.numpy(), "pooled": cond.pooled.numpy()}
    out = stage(dict(batch))
    assert out["policy_version"].tolist() == [1, 1]
    # Recompute with version 1's weights, independently of the stage.
    base.transformer.load_state_dict(v1)
    eps = draw_eps(base, [11, 12], cfg.data.resolution)
    x0 = sample_x0(base, base.transformer, eps, base.conditioning_from_arrays(batch, torch.device("cpu")),
                   cfg.data.resolution, cfg.rollout.steps, cfg.rollout.shift, cfg.rollout.guidance)
    torch.testing.assert_close(torch.as_tensor(out["x0"]), x0, rtol=0, atol=0)
    torch.testing.assert_close(torch.as_tensor(out["eps"]), eps, rtol=0, atol=0)


@pytest.mark.parametrize("max_staleness", [0, 2])
def test_staleness_bound_holds_with_a_slow_learner(tiny_cfg, tiny_world, store, ray_local, max_staleness):
    """A fake learner consumes the real stream slowly and publishes a version per step."""
    from pipeline.ray.stream import build_dataset
    from pipeline.sources import global_batch

    cfg = tiny_cfg("rollout.placement=actors", "rollout.num_actors=2", f"rollout.max_staleness={max_staleness}",
                   "train.batch_size=2", "learner.num_workers=1", "train.max_steps=6", "rollout.steps=2")
    learner = load_adapter("flux", tiny_world["flux"], load_text_encoders=False).transformer
    publish_state(store, 0, learner.state_dict())
    ds = build_dataset(cfg, store)
    ds.context.execution_options.preserve_order = True
    lags, steps = [], []
    for step, batch in enumerate(ds.iter_batches(batch_size=global_batch(cfg), drop_last=True,
                                                  batch_format="numpy", prefetch_batches=0)):
        assert batch["step"].tolist() == [step] * global_batch(cfg), "samples arrive at the step they were made for"
        lags += [step - int(v) for v in batch["policy_version"]]
        steps.append(step)
        time.sleep(0.6)  # a slow learner: rollout actors would run far ahead without flow control
        publish_state(store, step + 1, _perturbed(learner.state_dict(), 0.001, step))
    assert steps == list(range(6))
    assert max(lags) <= max_staleness, lags
    assert min(lags) >= 0
    if max_staleness == 0:
        assert set(lags) == {0}


def test_a_reused_generation_is_rolled_out_for_its_first_step(tiny_cfg, tiny_world, store, ray_local):
    """rollout.reuse=2 with max_staleness=0: generation g (its rows carry step 2g) waits for version 2g,
    the policy of the first step it serves; the learner then trains two steps on it (two versions)."""
    from pipeline.ray.stream import build_dataset
    from pipeline.sources import global_batch

    cfg = tiny_cfg("rollout.placement=actors", "rollout.num_actors=2", "rollout.max_staleness=0", "rollout.reuse=2",
                   "train.batch_size=2", "learner.num_workers=1", "train.max_steps=5", "rollout.steps=2")
    learner = load_adapter("flux", tiny_world["flux"], load_text_encoders=False).transformer
    publish_state(store, 0, learner.state_dict())
    ds = build_dataset(cfg, store)
    ds.context.execution_options.preserve_order = True
    versions = []
    for g, batch in enumerate(ds.iter_batches(batch_size=global_batch(cfg), drop_last=True,
                                               batch_format="numpy", prefetch_batches=0)):
        assert batch["step"].tolist() == [2 * g] * global_batch(cfg)
        assert batch["sample_index"].tolist() == [2 * g, 2 * g + 1], "generation g holds one step's samples"
        versions.append(sorted(set(int(v) for v in batch["policy_version"])))
        for step in (2 * g, 2 * g + 1):  # two optimizer steps on the generation, a version each
            time.sleep(0.3)
            publish_state(store, step + 1, _perturbed(learner.state_dict(), 0.001, step))
    assert versions == [[0], [2], [4]], "3 generations for 5 steps, each made by its first step's policy"
