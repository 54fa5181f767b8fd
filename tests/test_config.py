"""Config: presets match SRPO_SPEC section 5; bad input fails at load naming the field."""
import re
from pathlib import Path

import pytest

from pipeline.config import ConfigError, check_paths, load_config, parse_override

REPO = Path(__file__).resolve().parents[1]


def test_hps_preset_is_the_reference_recipe():
    c = load_config(REPO / "configs/flux_hpsv2.yaml")
    assert (c.optim.lr, c.optim.betas, c.optim.eps, c.optim.weight_decay, c.optim.max_grad_norm) == \
        (5e-6, [0.9, 0.999], 1e-8, 1e-4, 0.1)
    assert (c.data.resolution, c.train.batch_size, c.train.max_steps, c.train.mixed_precision) == (720, 1, 20, "bf16")
    assert (c.rollout.steps, c.rollout.guidance, c.rollout.shift) == (25, 1.0, 3.0)
    s = c.srpo
    assert (s.train_timestep, s.timestep_length, s.groundtruth_ratio, s.train_guidance) == ([5, 25], 1000, 0.9, 3.5)
    assert (s.d_pos, s.d_inv, s.hinge_margin, s.variant) == ([0.1, 0.25], [0.3, 0.01], 0.7, "reference")
    assert (c.reward.kind, c.reward.arch, c.model.max_sequence_length) == ("hpsv2", "ViT-H-14", 512)
    assert c.model.activation_checkpointing
    # One process unless asked (README: the FLUX presets leave learner.num_workers at 0), everything
    # colocated as in the reference, and the restartable weight sync by default.
    for name in ("flux_hpsv2", "flux_pickscore"):
        p = load_config(REPO / f"configs/{name}.yaml")
        assert (p.learner.num_workers, p.rollout.placement, p.reward.placement) == (0, "colocated", "colocated"), name
        assert p.rollout.weight_sync == "object_store", name


def test_tiny_preset_is_the_readme_quick_start():
    """The numbers the README's quick start and preset table give for configs/tiny.yaml."""
    c = load_config(REPO / "configs/tiny.yaml")
    assert (c.data.resolution, c.rollout.steps, c.train.mixed_precision, c.train.max_steps, c.optim.lr) == \
        (64, 10, "fp32", 8, 3e-3)
    assert (c.learner.num_workers, c.learner.strategy) == (2, "fsdp2")
    assert (c.rollout.placement, c.rollout.num_actors, c.reward.placement, c.reward.num_actors) == \
        ("actors", 2, "remote", 2)
    assert (c.tiny.enabled, c.tiny.dir, c.output.dir) == (True, ".cache/srpo-tiny", "runs/tiny")
    # `srpo evaluate` on the tiny preset: 4 scorers.
    assert [s.kind for s in c.eval.scorers] == ["hpsv2", "pickscore", "clip", "aesthetic"]


def test_pickscore_preset():
    c = load_config(REPO / "configs/flux_pickscore.yaml")
    assert (c.rollout.guidance, c.srpo.train_timestep, c.srpo.d_pos, c.srpo.d_inv) == (2.0, [5, 30], [0.1, 0.5], [0.6, 0.01])
    assert c.reward.kind == "pickscore"
    # Everything else equals the HPS recipe.
    h = load_config(REPO / "configs/flux_hpsv2.yaml")
    assert (c.optim, c.train, c.srpo.groundtruth_ratio) == (h.optim, h.train, h.srpo.groundtruth_ratio)


def test_authors_advice_on_k_tables_holds_in_presets():
    for name in ("flux_hpsv2", "flux_pickscore"):
        s = load_config(REPO / f"configs/{name}.yaml").srpo
        assert s.d_pos[0] > s.d_inv[-1] and s.d_inv[0] > s.d_pos[-1]


def test_overrides():
    c = load_config(REPO / "configs/flux_hpsv2.yaml", ["optim.lr=1e-5", "srpo.train_timestep=[5, 30]",
                                                        "train.mixed_precision=fp32", "srpo.variant=denoise_only"])
    assert c.optim.lr == 1e-5 and c.srpo.train_timestep == [5, 30]
    assert c.train.mixed_precision == "fp32" and c.srpo.variant == "denoise_only"
    assert parse_override("a.b=3") == {"a": {"b": 3}}


@pytest.mark.parametrize("override,field", [
    ("data.resolution=100", "data.resolution"),
    ("srpo.train_timestep=[0, 25]", "srpo.train_timestep"),
    ("srpo.train_timestep=[25, 5]", "srpo.train_timestep"),
    ("srpo.train_timestep=[5, 50]", "srpo.train_timestep"),
    ("srpo.groundtruth_ratio=1.0", "srpo.groundtruth_ratio"),
    ("srpo.groundtruth_ratio=0", "srpo.groundtruth_ratio"),
    ("optim.lr=fast", "optim.lr"),
    ("train.batch_size=1.5", "train.batch_size"),
    ("train.mixed_precision=fp8", "train.mixed_precision"),
    ("reward.kind=imagereward", "reward.kind"),
    ("srpo.variant=grpo", "srpo.variant"),
    ("optim.betas=[0.9]", "optim.betas"),
    ("train.max_steps=0", "train.max_steps"),
    ("rollout.mode=offline", "data.images"),  # offline without images
    ("rollout.mode=replay", "rollout.mode"),
    ("optim.warmup_steps=-1", "optim.warmup_steps"),
    ("train.max_failures=-2", "train.max_failures"),
    ("eval.every=5", "eval.gold"),  # a gold evaluation without a gold scorer
    ("eval.resolution=100", "eval.resolution"),
    ("eval.scorers=[{kind: imagereward, path: x}]", "eval.scorers[0].kind"),
    ("learner.strategy=ring", "learner.strategy"),
    ("learner.num_workers=-1", "learner.num_workers"),
])
def test_bad_values_name_the_field(override, field):
    # The message starts with the dotted field, then ": " (pipeline.config._require and the type checks).
    with pytest.raises(ConfigError, match=rf"^{re.escape(field)}: "):
        load_config(REPO / "configs/flux_hpsv2.yaml", [override])


@pytest.mark.parametrize("workers", [0, 1])
def test_single_strategy_runs_one_learner_at_most(workers):
    c = load_config(REPO / "configs/tiny.yaml", ["learner.strategy=single", f"learner.num_workers={workers}"])
    assert (c.learner.strategy, c.learner.num_workers) == ("single", workers)


def test_single_strategy_with_several_learners_names_the_field():
    with pytest.raises(ConfigError, match=r"^learner\.strategy: got single with learner\.num_workers=2, "
                                          r"expected fsdp2 or deepspeed for more than one learner worker"):
        load_config(REPO / "configs/tiny.yaml", ["learner.strategy=single", "learner.num_workers=2"])
    # The sharded strategies take any number of workers.
    for strategy in ("fsdp2", "deepspeed"):
        assert load_config(REPO / "configs/tiny.yaml", [f"learner.strategy={strategy}",
                                                        "learner.num_workers=2"]).learner.num_workers == 2


def test_unknown_keys_are_rejected_with_the_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown config key optim.learning_rate; valid keys here: .*'lr'"):
        load_config(REPO / "configs/flux_hpsv2.yaml", ["optim.learning_rate=1e-5"])
    with pytest.raises(ConfigError, match="unknown config key bogus"):
        load_config(None, ["bogus=1"])


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="expected key.path=value"):
        load_config(None, ["optim.lr"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(tmp_path / "list.yaml")


def test_missing_model_path_is_named():
    c = load_config(REPO / "configs/flux_hpsv2.yaml", ["model.path=/nonexistent/FLUX.1-dev"])
    with pytest.raises(ConfigError, match=r"model.path: '/nonexistent/FLUX.1-dev' does not exist; expected a local diffusers folder"):
        check_paths(c)
    c = load_config(REPO / "configs/flux_hpsv2.yaml", ["model.path="])
    with pytest.raises(ConfigError, match="model.path: missing"):
        check_paths(c)


def test_missing_reward_checkpoint_is_named(tiny_cfg, tmp_path):
    c = tiny_cfg(f"reward.path={tmp_path / 'HPS_v2.1_compressed.pt'}")
    with pytest.raises(ConfigError, match=r"reward.path: .* does not exist; expected the HPSv2.1 checkpoint file"):
        check_paths(c)
    check_paths(tiny_cfg())  # the tiny world itself is complete


def test_flat_params_cover_every_field():
    flat = load_config(REPO / "configs/tiny.yaml").flat()
    assert flat["optim.lr"] == 3e-3 and flat["srpo.d_pos"] == [0.1, 0.25] and "model.path" in flat


def test_relative_paths_become_absolute_for_ray_workers(tmp_path):
    from pipeline.config import absolute_paths

    c = load_config(REPO / "configs/tiny.yaml")
    assert not Path(c.model.path).is_absolute()
    a = absolute_paths(c, base=tmp_path)
    assert a.model.path == str(tmp_path / ".cache/srpo-tiny/flux")
    assert a.reward.arch == str(tmp_path / ".cache/srpo-tiny/hps/open_clip_config.json")
    assert a.data.prompts == str(tmp_path / "configs/prompts/tiny_train.txt")
    assert a.output.dir == str(tmp_path / "runs/tiny")
    assert c.model.path == ".cache/srpo-tiny/flux", "the input config is not modified"
    h = absolute_paths(load_config(REPO / "configs/flux_hpsv2.yaml"), base=tmp_path)
    assert h.reward.arch == "ViT-H-14" and h.model.path == "/mnt/models/FLUX.1-dev"


def test_offline_and_evaluation_paths_are_checked_when_used(tiny_cfg, tmp_path):
    cfg = tiny_cfg("rollout.mode=offline", f"data.images={tmp_path / 'missing'}")
    with pytest.raises(ConfigError, match=r"^data\.images: .*missing' is neither a folder nor a \.parquet/\.jsonl"):
        check_paths(cfg)
    scorers = tiny_cfg("eval.scorers=[{kind: aesthetic, path: /nope/mlp.pth, clip_path: /nope/clip}]")
    check_paths(scorers)  # training does not load eval.scorers
    with pytest.raises(ConfigError, match=r"eval.scorers\[0\].path"):
        check_paths(scorers, scorers=True)  # `srpo evaluate` does
    gold = tiny_cfg("eval.gold=[{kind: pickscore, path: /nope}]", "eval.every=2")
    with pytest.raises(ConfigError, match=r"eval.gold\[0\].path"):
        check_paths(gold)


def test_offline_mode_runs_without_ray(tiny_cfg, tmp_path):
    """rollout.mode=offline is valid with learner.num_workers=0 (the single-process Learner reads the
    images itself) as with the Ray pipeline; only the images are required."""
    (tmp_path / "images").mkdir()
    for workers in ("0", "2"):
        cfg = tiny_cfg("rollout.mode=offline", f"data.images={tmp_path / 'images'}", f"learner.num_workers={workers}")
        assert (cfg.rollout.mode, cfg.learner.num_workers) == ("offline", int(workers))
        check_paths(cfg)
    with pytest.raises(ConfigError, match=r"^data\.images: rollout\.mode=offline needs data\.images"):
        tiny_cfg("rollout.mode=offline", "data.images=", "learner.num_workers=0")
