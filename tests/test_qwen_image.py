"""Qwen-Image, the second family: the adapter against diffusers' own QwenImagePipeline on the tiny
Qwen-Image folder (real QwenImageTransformer2DModel, AutoencoderKLQwenImage, Qwen2.5-VL and a locally
built Qwen2 tokenizer), then the SRPO machinery on it: Direct-Align, a learning signal, export into
QwenImagePipeline, and the Ray pipeline. Everything on the CPU in fp32.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import ConfigError, load_config
from pipeline.direct_align import direct_align, plan_branches
from pipeline.models import QwenImageAdapter, family_class, family_of, load_adapter, parameter_template
from pipeline.models.qwen_image import (NEGATIVE_PROMPT, PROMPT_TEMPLATE, PROMPT_TEMPLATE_DROP, TOKENIZER_MAX_LENGTH,
                                        QwenConditioning, unpack_latents)
from pipeline.rollout import sample_x0
from pipeline.sampling import generate, load_scheduler_config
from pipeline.schedules import rollout_sigmas
from pipeline.srpo_step import grid_from_config

REPO = Path(__file__).resolve().parents[1]
PRESET = REPO / "configs/tiny_qwen_image.yaml"
MAX_SEQ = 32  # configs/tiny_qwen_image.yaml model.max_sequence_length
RES = 64
# Two prompts of different token lengths: batched together, the shorter one is padded and masked.
PROMPTS = ["a photo of a cat", "a red sports car parked on a city street at night"]


def qwen_overrides(world: dict[str, str], out_dir: Path) -> list[str]:
    """Point configs/tiny_qwen_image.yaml at the session's tiny world and an output folder."""
    return [
        f"tiny.dir={Path(world['flux']).parent}", f"model.path={world['qwen_image']}",
        f"reward.path={world['pickscore']}",
        f"data.prompts={REPO / 'configs/prompts/tiny_train.txt'}",
        f"data.heldout_prompts={REPO / 'configs/prompts/tiny_heldout.txt'}",
        f"output.dir={out_dir}", f"log.tracking_uri=sqlite:///{out_dir / 'mlflow.db'}",
    ]


@pytest.fixture()
def tiny_qwen_cfg(tiny_qwen_world, tmp_path):
    def make(*extra: str):
        return load_config(PRESET, qwen_overrides(tiny_qwen_world, tmp_path / "run") + list(extra))

    return make


@pytest.fixture(scope="module")
def pipe(tiny_qwen_world):
    from diffusers import QwenImagePipeline

    p = QwenImagePipeline.from_pretrained(tiny_qwen_world["qwen_image"], local_files_only=True)  # fp32, as saved
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def adapter(tiny_qwen_world):
    return load_adapter("qwen_image", tiny_qwen_world["qwen_image"], "cpu", max_sequence_length=MAX_SEQ)


def _pipe_call(pipe, prompt: str, seed: int, steps: int, cfg_scale: float, **kw):
    """QwenImagePipeline as a user calls it: one prompt, a CPU generator per image, our negative prompt."""
    return pipe(prompt, negative_prompt=NEGATIVE_PROMPT, true_cfg_scale=cfg_scale, height=RES, width=RES,
                num_inference_steps=steps, max_sequence_length=MAX_SEQ,
                generator=torch.Generator("cpu").manual_seed(seed), **kw).images


# ------------------------------------------------------------------------------------------ the tiny folder


def test_tiny_folder_is_a_qwen_image_pipeline_that_generates(pipe, tiny_qwen_world):
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

    assert isinstance(pipe.transformer, QwenImageTransformer2DModel) and isinstance(pipe.vae, AutoencoderKLQwenImage)
    assert isinstance(pipe.text_encoder, Qwen2_5_VLForConditionalGeneration)
    assert isinstance(pipe.tokenizer, Qwen2Tokenizer)
    image = _pipe_call(pipe, "a photo of a cat", 0, steps=3, cfg_scale=4.0, output_type="pt")
    assert image.shape == (1, 3, RES, RES) and torch.isfinite(image).all()
    assert 0.0 <= image.min() and image.max() <= 1.0 and image.std() > 0
    # The family is found from the folder, and its pre-flight layout check passes.
    assert family_of(tiny_qwen_world["qwen_image"]) == "qwen_image"
    QwenImageAdapter.check_model_folder(tiny_qwen_world["qwen_image"])


def test_tiny_folder_is_deterministic_per_seed_and_leaves_the_callers_rng(tiny_qwen_world, tmp_path):
    from safetensors.torch import load_file

    from pipeline.tiny import make_tiny_qwen_image

    state = torch.random.get_rng_state()
    again = make_tiny_qwen_image(tmp_path / "again", seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)
    session = Path(tiny_qwen_world["qwen_image"])
    files = sorted(p.relative_to(session) for p in session.rglob("*.safetensors"))
    assert len(files) == 3  # transformer, vae, text_encoder
    for f in files:
        a, b = load_file(str(session / f)), load_file(str(again / f))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f
    assert (session / "tokenizer/tokenizer.json").read_text() == (again / "tokenizer/tokenizer.json").read_text()


def test_prompt_template_and_its_drop_are_the_pipelines(pipe):
    assert PROMPT_TEMPLATE == pipe.prompt_template_encode
    assert PROMPT_TEMPLATE_DROP == pipe.prompt_template_encode_start_idx
    assert TOKENIZER_MAX_LENGTH == pipe.tokenizer_max_length
    # The tiny tokenizer cuts the system prompt where the real one does: the dropped tokens end at "user\n".
    ids = pipe.tokenizer(PROMPT_TEMPLATE.format("a cat")).input_ids
    assert pipe.tokenizer.decode(ids[:PROMPT_TEMPLATE_DROP]) == PROMPT_TEMPLATE.split("{}")[0]
    assert pipe.tokenizer.decode(ids[PROMPT_TEMPLATE_DROP:]).startswith("a cat<|im_end|>")


# ------------------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("max_seq", [MAX_SEQ, 8])
def test_prompt_encoding_matches_the_pipeline(pipe, adapter, max_seq):
    """Embeddings and mask as QwenImagePipeline.encode_prompt: template dropped, padded to the longest
    prompt with a mask (None when nothing is padded), cut at max_sequence_length; the negative prompt too."""
    ours = QwenImageAdapter(None, adapter.vae, adapter.text_encoder, adapter.tokenizer, max_seq).encode_prompts(PROMPTS)
    embeds, mask = pipe.encode_prompt(PROMPTS, max_sequence_length=max_seq)
    our_embeds, our_mask = ours.text()
    torch.testing.assert_close(our_embeds, embeds, rtol=1e-6, atol=1e-6)
    if max_seq == 8:  # both prompts are longer than 8 tokens: no padding, no mask (as the pipeline)
        assert mask is None and our_mask is None and our_embeds.shape[1] == 8
    else:
        assert mask is not None and mask[0].sum() < mask[1].sum()  # the shorter prompt is padded
        torch.testing.assert_close(our_mask, mask, rtol=0, atol=0)
    neg_embeds, neg_mask = pipe.encode_prompt([NEGATIVE_PROMPT], max_sequence_length=max_seq)
    ours_neg, ours_neg_mask = ours.text(negative=True)
    assert ours_neg.shape[0] == len(PROMPTS) and neg_mask is None and ours_neg_mask is None
    for row in ours_neg:
        torch.testing.assert_close(row, neg_embeds[0], rtol=1e-6, atol=1e-6)


def test_noise_pack_unpack_and_latent_normalisation_are_the_pipelines(pipe, adapter):
    h = w = RES // 8
    noise = adapter.sample_noise(1, RES, torch.Generator().manual_seed(3))
    ref = pipe.prepare_latents(1, 16, RES, RES, torch.float32, "cpu", torch.Generator().manual_seed(3))
    torch.testing.assert_close(noise, ref, rtol=0, atol=0)  # drawn [B, 1, C, h, w] and packed, as the pipeline
    assert noise.shape == (1, (h // 2) * (w // 2), 64)
    z = torch.randn(2, 16, 1, h, w)
    x = pipe._pack_latents(z, 2, 16, h, w)
    torch.testing.assert_close(unpack_latents(x, h, w), z, rtol=0, atol=0)
    torch.testing.assert_close(unpack_latents(x, h, w), pipe._unpack_latents(x, RES, RES, 8), rtol=0, atol=0)
    # Per-channel normalisation from the VAE config: z_model = (z_vae - mean_c) / std_c.
    images = torch.rand(2, 3, RES, RES)
    z_vae = pipe.vae.encode((images * 2 - 1)[:, :, None]).latent_dist.mean[:, :, 0]
    mean = torch.tensor(pipe.vae.config.latents_mean).view(1, 16, 1, 1)
    std = torch.tensor(pipe.vae.config.latents_std).view(1, 16, 1, 1)
    assert len(set(pipe.vae.config.latents_std)) > 1  # really per channel
    expected = pipe._pack_latents((z_vae - mean) / std, 2, 16, h, w)
    torch.testing.assert_close(adapter.encode_images(images), expected, rtol=1e-5, atol=1e-5)


def test_decode_is_the_pipelines_and_differentiable(pipe, adapter):
    x = torch.randn(1, 16, 64) * 0.5
    z = pipe._unpack_latents(x, RES, RES, 8)
    mean = torch.tensor(pipe.vae.config.latents_mean).view(1, 16, 1, 1, 1)
    std_inv = 1.0 / torch.tensor(pipe.vae.config.latents_std).view(1, 16, 1, 1, 1)
    ref = pipe.image_processor.postprocess(pipe.vae.decode(z / std_inv + mean, return_dict=False)[0][:, :, 0],
                                           output_type="pt")
    torch.testing.assert_close(adapter.decode(x, RES), ref, rtol=0, atol=1e-6)
    # The authors' reward input (reward.image_norm=minmax): the raw VAE frame min-max normalised per
    # image, computed here in numpy.
    raw = pipe.vae.decode(z / std_inv + mean, return_dict=False)[0][:, :, 0].detach().double().numpy()
    lo, hi = raw.min(axis=(1, 2, 3), keepdims=True), raw.max(axis=(1, 2, 3), keepdims=True)
    np.testing.assert_allclose(adapter.decode(x, RES, "minmax").detach().numpy(), (raw - lo) / (hi - lo),
                               rtol=0, atol=1e-5)
    for norm in ("clamp", "minmax"):
        xg = x.clone().requires_grad_(True)
        adapter.decode(xg, RES, norm).mean().backward()
        assert xg.grad is not None and xg.grad.abs().sum() > 0
    assert all(p.grad is None for p in adapter.vae.parameters()), "the VAE is frozen"


def test_velocity_is_the_pipeline_transformer_call_with_true_cfg(pipe, adapter):
    """One call = the transformer as QwenImagePipeline calls it (truncated timestep, mask, img_shapes);
    guidance > 1 = the pipeline's true CFG with norm rescaling, written out here."""
    cond = adapter.encode_prompts(PROMPTS)
    x = adapter.sample_noise(2, RES, torch.Generator().manual_seed(0))
    (embeds, mask), (neg, neg_mask) = pipe.encode_prompt(PROMPTS, max_sequence_length=MAX_SEQ), \
        pipe.encode_prompt([NEGATIVE_PROMPT] * 2, max_sequence_length=MAX_SEQ)

    def call(e, m, t):
        return pipe.transformer(hidden_states=x, timestep=torch.tensor([t, t]), encoder_hidden_states=e,
                                encoder_hidden_states_mask=m, img_shapes=[[(1, 4, 4)]] * 2, return_dict=False)[0]

    v = adapter.velocity(adapter.transformer, x, 0.96429, cond, guidance=1.0, resolution=RES)
    v_c = call(embeds, mask, 0.964)  # floor(1000 sigma) / 1000, as the authors' script
    torch.testing.assert_close(v, v_c, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(v, call(embeds, mask, 0.96429))  # the truncation matters
    v_u = call(neg, neg_mask, 0.964)
    comb = v_u + 4.0 * (v_c - v_u)
    expected = comb * (v_c.norm(dim=-1, keepdim=True) / comb.norm(dim=-1, keepdim=True))
    v4 = adapter.velocity(adapter.transformer, x, 0.96429, cond, guidance=4.0, resolution=RES)
    torch.testing.assert_close(v4, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(v4, v)


def test_conditioning_round_trips_through_fixed_shape_arrays(adapter, tiny_qwen_world):
    cond = adapter.encode_prompts(PROMPTS)
    arrays = adapter.conditioning_to_arrays(cond)
    shapes = QwenImageAdapter.conditioning_shapes(tiny_qwen_world["qwen_image"], MAX_SEQ)
    assert {k: list(a.shape[1:]) for k, a in arrays.items()} == shapes  # padded to max_sequence_length
    assert all(a.dtype == np.float32 for a in arrays.values())
    back = QwenImageAdapter.conditioning_from_arrays({**arrays, "caption": np.array(PROMPTS)}, "cpu")  # class level
    for field in ("prompt_embeds", "prompt_mask", "negative_embeds", "negative_mask"):
        torch.testing.assert_close(getattr(back, field), getattr(cond, field), rtol=0, atol=0)
    # A sub-batch is trimmed to its own longest prompt; the padded rows never reach the model's output.
    one = back.select([0])
    assert one.prompt_embeds.shape[1] == int(cond.prompt_mask[0].sum()) and one.text()[1] is None
    x = adapter.sample_noise(1, RES, torch.Generator().manual_seed(1))
    v_alone = adapter.velocity(adapter.transformer, x, 0.5, one, 4.0, RES)
    v_padded = adapter.velocity(adapter.transformer, torch.cat([x, x]), 0.5, back, 4.0, RES)[:1]
    torch.testing.assert_close(v_padded, v_alone, rtol=1e-5, atol=1e-5)


def test_rollout_equals_the_pipeline_on_the_same_sigmas(pipe, adapter):
    """sample_x0 (shift 1, 4 Euler steps, CFG 4) = QwenImagePipeline with a scheduler that keeps the given
    sigmas (no dynamic shift): sigmas 1, .75, .5, .25, 0, where floor(1000 sigma) = 1000 sigma, so the
    truncated timestep of the training rollout and the pipeline's exact one agree."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline

    plain = QwenImagePipeline(**{**pipe.components, "scheduler": FlowMatchEulerDiscreteScheduler(shift=1.0)})
    plain.set_progress_bar_config(disable=True)
    sigmas = rollout_sigmas(4, 1.0)
    assert sigmas.tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]
    ref = _pipe_call(plain, PROMPTS[1], 5, steps=4, cfg_scale=4.0, sigmas=sigmas[:-1].tolist(), output_type="latent")
    eps = adapter.sample_noise(1, RES, torch.Generator().manual_seed(5))
    x0 = sample_x0(adapter, adapter.transformer, eps, adapter.encode_prompts([PROMPTS[1]]), RES, 4, 1.0, 4.0)
    torch.testing.assert_close(x0, ref, rtol=0, atol=1e-6)
    assert (x0 - eps).abs().mean() > 0.1  # the rollout moved


@pytest.mark.parametrize("cfg_scale", [1.0, 4.0])
def test_generate_reproduces_the_pipeline_batched(pipe, adapter, tiny_qwen_world, cfg_scale):
    """generate (both prompts in one padded batch) = QwenImagePipeline one prompt at a time, its own scheduler
    (dynamic exponential shift), CFG or not. fp32, same ops: the batch's padding only changes rounding."""
    images = generate(adapter, adapter.transformer, PROMPTS, [11, 12], 3, cfg_scale, RES, batch_size=2,
                      scheduler_config=load_scheduler_config(tiny_qwen_world["qwen_image"]))
    for i, prompt in enumerate(PROMPTS):
        ref = _pipe_call(pipe, prompt, 11 + i, steps=3, cfg_scale=cfg_scale, output_type="pt")
        torch.testing.assert_close(images[i:i + 1], ref, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------ Direct-Align


class _Oracle(torch.nn.Module):
    """A 'transformer' with QwenImageTransformer2DModel's call signature that predicts exactly eps - x0."""

    def __init__(self, velocity: torch.Tensor) -> None:
        super().__init__()
        self.v = velocity

    def forward(self, hidden_states, timestep, guidance, encoder_hidden_states_mask, encoder_hidden_states,
                img_shapes, return_dict=False):
        assert guidance is None and img_shapes == [[(1, 4, 4)]] * hidden_states.shape[0]
        return (self.v.clone(),)


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_direct_align_recovery_is_exact_through_the_adapter(adapter, tiny_qwen_cfg, guidance):
    """With the true velocity eps - x0 through adapter.velocity (packed latents, img_shapes, with or
    without CFG: conditional = unconditional), both branches recover x0 at every grid level of the
    Qwen-Image recipe (N 100, [5, 40], shift 1)."""
    cfg = tiny_qwen_cfg()
    grid = grid_from_config(cfg.srpo, cfg.rollout.shift)
    g = torch.Generator().manual_seed(0)
    x0 = adapter.sample_noise(1, RES, g)
    eps = adapter.sample_noise(1, RES, g)
    cond = adapter.encode_prompts(["a cat"])
    oracle = _Oracle(eps - x0)
    for m in range(cfg.srpo.m_margin, grid.N - cfg.srpo.m_margin + 1):
        for plan in plan_branches(grid, [m], "P", "N", variant="reference"):
            x0_hat = direct_align(lambda x, s: adapter.velocity(oracle, x, s, cond, guidance, RES), x0, eps, plan)
            # fp32 rounding only (velocities are fp32; 1 / (1 - sigma) <= 10 here): the test_direct_align.py
            # formulas at 1e-12 in float64, and the adapter passes the model's velocity through unchanged.
            torch.testing.assert_close(x0_hat, x0, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------ family surface


def test_family_surface(adapter, tiny_qwen_world):
    path = tiny_qwen_world["qwen_image"]
    assert family_class("qwen_image") is QwenImageAdapter
    assert parameter_template(path) == {k: tuple(v.shape) for k, v in adapter.transformer.state_dict().items()}
    t = adapter.transformer
    assert adapter.shard_blocks(t) == list(t.transformer_blocks) and len(t.transformer_blocks) == 2
    with pytest.raises(TypeError, match="Linear: no transformer_blocks"):
        QwenImageAdapter.shard_blocks(torch.nn.Linear(2, 2))
    (tok,) = QwenImageAdapter.load_tokenizers(path)
    assert tok.pad_token == "<|endoftext|>"
    block = dict(t.transformer_blocks[0].named_modules())
    assert all(isinstance(block[n], torch.nn.Linear) for n in QwenImageAdapter.lora_target_modules())


def test_errors_name_the_field_or_file(tmp_path, tiny_qwen_world):
    with pytest.raises(FileNotFoundError, match="no model_index.json; expected a local diffusers folder with the "
                                                "Qwen-Image layout"):
        load_adapter("qwen_image", str(tmp_path / "nope"))
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="transformer: missing; expected the Qwen-Image component"):
        load_adapter("qwen_image", str(tmp_path))
    with pytest.raises(ValueError, match=r"text_encoder/config\.json.*expected the Qwen2\.5-VL config"):
        QwenImageAdapter.conditioning_shapes(tmp_path, 32)
    with pytest.raises(ConfigError, match="model.path: .*does not list component 'transformer'"):
        QwenImageAdapter.check_model_folder(tmp_path)
    # A FLUX folder is not a Qwen-Image folder: the pre-flight names the class it expected.
    with pytest.raises(ConfigError, match="model.path: .*FluxTransformer2DModel'; expected "
                                          "'QwenImageTransformer2DModel'"):
        QwenImageAdapter.check_model_folder(Path(tiny_qwen_world["flux"]))
    with pytest.raises(ConfigError, match="model.family: got 'sd3', expected one of"):
        load_config(PRESET, ["model.family=sd3"])
    with pytest.raises(ValueError, match="model.max_sequence_length: got 2048, expected 1..1024"):
        QwenImageAdapter(None, load_adapter("qwen_image", tiny_qwen_world["qwen_image"], load_text_encoders=False,
                                            load_transformer=False).vae, None, None, 2048)


def test_conditioning_batch_helpers():
    e, m = torch.randn(2, 5, 3), torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 0, 0]])
    cond = QwenConditioning.build(e, m, e, torch.ones_like(m), 5)
    assert cond.prompt_embeds.shape == (2, 3, 3) and cond.negative_embeds.shape == (2, 5, 3)  # trimmed per part
    assert len(cond) == 2 and cond.text()[1] is not None and cond.text(negative=True)[1] is None


def test_pickscore_preset_is_the_authors_qwen_image_recipe():
    """configs/qwen_image_pickscore.yaml against SRPO_SPEC section 7 (numbers written out here)."""
    c = load_config(REPO / "configs/qwen_image_pickscore.yaml")
    assert (c.model.family, c.reward.kind, c.srpo.variant) == ("qwen_image", "pickscore", "relative_discount")
    assert (c.rollout.steps, c.rollout.shift, c.rollout.guidance, c.srpo.train_guidance) == (26, 1.0, 4.0, 1.0)
    assert (c.srpo.timestep_length, c.srpo.train_timestep, c.srpo.groundtruth_ratio) == (100, [5, 40], 0.6)
    assert (c.srpo.m_margin, c.srpo.num_injections, c.srpo.d_pos) == (2, 2, [0.0, 0.0])
    assert c.srpo.negative_words == ["Concept art", "Painting", "Anime"]
    assert c.srpo.positive_words == ["Natural-lighting", "Detail", "Detailed", "Real"]
    assert (c.optim.lr, c.optim.weight_decay, c.optim.max_grad_norm) == (3e-6, 1e-4, 50.0)
    assert (c.data.resolution, c.train.mixed_precision, c.model.activation_checkpointing) == (720, "bf16", True)
    assert c.reward.image_norm == "minmax"  # (x - min) / (max - min) per image, not x / 2 + 0.5 clamped
    grid = grid_from_config(c.srpo, c.rollout.shift)
    # K = int(0.4 * 100) + 1; the grid runs over the unshifted 51-point base grid from index 5 to 40.
    assert grid.span == 41 and grid.N == 100
    assert float(grid.g[0]) == pytest.approx(0.9) and float(grid.g[-1]) == pytest.approx(0.2)
    assert {2, 98} <= set(grid.sample_m(torch.Generator().manual_seed(0), 5000)) <= set(range(2, 99))


# ------------------------------------------------------------------------------------------ training on it

HELDOUT_SEED = 4321  # noise never used in training (tests/test_trainer.py's metric)


@pytest.fixture(scope="module")
def learned(tiny_qwen_world, tmp_path_factory):
    """30 single-process Learner steps of the tiny Qwen-Image preset (the authors' recipe: relative_discount,
    2 injections, rollout CFG 4, branch without CFG), at lr 3e-3 and at lr 0; the held-out SRP reward of
    full rollouts before and after each, as tests/test_trainer.py measures FLUX."""
    threads = torch.get_num_threads()
    # One thread: on a shared 2-core host, two OpenMP threads competing with other processes ran these
    # steps 20x slower (measured 77 s against 4 s); the numbers do not depend on it.
    torch.set_num_threads(1)
    try:
        return {lr: _learn(tiny_qwen_world, tmp_path_factory.mktemp(f"learn-{lr}"), lr) for lr in (3e-3, 0.0)}
    finally:
        torch.set_num_threads(threads)


def _learn(world: dict[str, str], tmp: Path, lr: float) -> dict:
    from pipeline.checkpoint import LocalCheckpoints
    from pipeline.data import read_prompts
    from pipeline.gold import heldout_srp_reward
    from pipeline.learner import build_learner
    from pipeline.sources import InProcessSource

    cfg = load_config(PRESET, qwen_overrides(world, tmp / "run") + [
        "learner.num_workers=0", f"optim.lr={lr}", "train.max_steps=30"])
    learner = build_learner(cfg, InProcessSource(cfg), LocalCheckpoints(tmp / "ckpt", 1), device=torch.device("cpu"))
    held = read_prompts(cfg.data.heldout_prompts)
    cond = load_adapter("qwen_image", cfg.model.path, "cpu", MAX_SEQ, load_transformer=False).encode_prompts(held)

    def reward() -> dict[str, float]:  # as the reward sees the images in training (minmax), and as the pipeline
        return {norm: heldout_srp_reward(cfg, learner.adapter, learner.engine.transformer,
                                         learner.objective.reward_model, cond, held, seed=HELDOUT_SEED,
                                         image_norm=norm) for norm in ("minmax", "clamp")}

    before = reward()
    learner.run()
    return {"before": before, "after": reward(), "learner": learner, "cfg": cfg}


def test_learning_signal_heldout_reward_rises_and_lr_zero_stays(learned):
    run, still = learned[3e-3], learned[0.0]
    for norm in ("minmax", "clamp"):
        print(f"\nheld-out mean SRP reward ({norm} images, full CFG rollouts): lr=3e-3 {run['before'][norm]:.5f} -> "
              f"{run['after'][norm]:.5f}; lr=0 {still['before'][norm]:.5f} -> {still['after'][norm]:.5f}")
        assert run["before"][norm] == pytest.approx(still["before"][norm], abs=1e-7), "same start, same noise"
        assert still["after"][norm] == pytest.approx(still["before"][norm], abs=1e-6)  # lr = 0: the same policy
    # A clear rise, not noise: of the score the reward trains on (minmax images, measured 0.127 -> 0.153),
    # and of the pipeline's images too (measured 0.124 -> 0.141; 0.124 -> 0.181 when trained on them).
    assert run["after"]["minmax"] - run["before"]["minmax"] > 0.015
    assert run["after"]["clamp"] - run["before"]["clamp"] > 0.01


def test_export_loads_into_qwen_image_pipeline_and_reproduces_the_image(learned, tiny_qwen_world, tmp_path, pipe):
    """The trained weights as a diffusers folder: QwenImagePipeline.from_pretrained gives the image that
    generate gives with the in-memory trained transformer (fp32: measured ~1e-6, batched rounding), and
    not the base model's."""
    from diffusers import QwenImagePipeline

    from pipeline.export import export_diffusers_folder

    learner = learned[3e-3]["learner"]
    state = {k: v.detach().cpu() for k, v in learner.engine.transformer.state_dict().items()}
    out = export_diffusers_folder(state, tiny_qwen_world["qwen_image"], tmp_path / "srpo-qwen", "fp32")
    exported = QwenImagePipeline.from_pretrained(str(out), local_files_only=True)
    exported.set_progress_bar_config(disable=True)
    full = load_adapter("qwen_image", tiny_qwen_world["qwen_image"], "cpu", MAX_SEQ)  # with its text encoder
    ours = generate(full, learner.engine.transformer, PROMPTS, [21, 22], 3, 4.0, RES, batch_size=2,
                    scheduler_config=load_scheduler_config(tiny_qwen_world["qwen_image"]))
    for i, prompt in enumerate(PROMPTS):
        image = _pipe_call(exported, prompt, 21 + i, steps=3, cfg_scale=4.0, output_type="pt")
        torch.testing.assert_close(ours[i:i + 1], image, rtol=0, atol=1e-5)
        base = _pipe_call(pipe, prompt, 21 + i, steps=3, cfg_scale=4.0, output_type="pt")
        assert (image - base).abs().max() > 1e-3  # the trained weights, not the base's


def test_lora_starts_at_the_base_and_exports_for_qwen_image_pipeline(tiny_qwen_world, tmp_path):
    """The family's LoRA surface: the default targets in every block, velocity unchanged at initialisation,
    and the adapter folder that QwenImagePipeline.load_lora_weights loads gives our adapted velocity."""
    from diffusers import QwenImagePipeline

    from pipeline.lora import LoraSpec, adapter_state_dict, add_lora, save_lora_folder

    path = tiny_qwen_world["qwen_image"]
    ad = load_adapter("qwen_image", path, "cpu", MAX_SEQ)
    cond = ad.encode_prompts(PROMPTS[:1])
    x = ad.sample_noise(1, RES, torch.Generator().manual_seed(2))
    base_v = ad.velocity(ad.transformer, x, 0.5, cond, 4.0, RES)
    spec = LoraSpec(rank=4, alpha=4.0, dropout=0.0, target_modules=())
    names = add_lora(ad.transformer, spec, ad, seed=0)
    assert len(names) == len(QwenImageAdapter.lora_target_modules()) * 2  # every default target of both blocks
    torch.testing.assert_close(ad.velocity(ad.transformer, x, 0.5, cond, 4.0, RES), base_v, rtol=0, atol=0)
    with torch.no_grad():
        for n, p in ad.transformer.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05, generator=torch.Generator().manual_seed(len(n)))
    adapted = ad.velocity(ad.transformer, x, 0.5, cond, 4.0, RES)
    assert not torch.allclose(adapted, base_v, atol=1e-4)
    folder = save_lora_folder(ad, adapter_state_dict(ad.transformer), spec, tmp_path / "lora")
    pipe = QwenImagePipeline.from_pretrained(path, local_files_only=True)
    pipe.load_lora_weights(str(folder))
    torch.testing.assert_close(ad.velocity(pipe.transformer, x, 0.5, cond, 4.0, RES), adapted, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------ the jobs and Ray


def test_make_tiny_family_flag_and_the_preset_pass_the_preflight(tiny_qwen_world, capsys):
    import argparse

    from jobs.common import prepared_config
    from jobs.make_tiny import main

    root = Path(tiny_qwen_world["flux"]).parent
    assert main([str(root), "--family", "qwen_image"]) == 0  # the written world is reused, not rebuilt
    assert json.loads(capsys.readouterr().out)["qwen_image"] == tiny_qwen_world["qwen_image"]
    cfg = prepared_config(argparse.Namespace(config=str(PRESET), overrides=qwen_overrides(tiny_qwen_world, root / "x")))
    assert cfg.model.family == "qwen_image" and cfg.srpo.variant == "relative_discount"


def test_ray_pipeline_runs_on_qwen_image(tiny_qwen_cfg, ray_local, tiny_qwen_world):
    """The whole design on the second family: 2 FSDP2 learners over gloo, a rollout actor (CFG rollouts)
    with versioned weights, a remote reward actor (gradient relay), MLflow; 2 steps (one actor each:
    test_ray_pipeline.py covers pools and failures, this covers the family)."""
    import mlflow
    from diffusers import QwenImageTransformer2DModel
    from safetensors.torch import load_file

    from pipeline.ray.driver import run_ray

    cfg = tiny_qwen_cfg("learner.num_workers=2", "learner.strategy=fsdp2", "rollout.placement=actors",
                        "rollout.num_actors=1", "reward.placement=remote", "reward.num_actors=1",
                        "train.batch_size=2", "rollout.max_staleness=0", "train.max_steps=2", "rollout.steps=2",
                        "log.image_every=1")
    result = run_ray(cfg)
    client = mlflow.MlflowClient(tracking_uri=result["tracking_uri"])
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED" and run.data.params["model.family"] == "qwen_image"
    for key in ("loss", "grad_norm", "denoise/reward", "denoise/pos_score", "weight_sync/bytes", "policy_lag/max"):
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, key)) == [0, 1], key
    assert not client.get_metric_history(run.info.run_id, "inversion/reward")  # relative_discount: denoise only
    # Full fine-tuning: every sync moves the whole fp32 transformer.
    full_bytes = 4 * sum(int(np.prod(s)) for s in parameter_template(cfg.model.path).values())
    assert client.get_metric_history(run.info.run_id, "weight_sync/bytes")[-1].value == full_bytes
    model = QwenImageTransformer2DModel.from_pretrained(cfg.model.path, subfolder="transformer")
    loaded = model.load_state_dict(load_file(result["export"]), strict=True)
    assert not loaded.missing_keys and not loaded.unexpected_keys


# ------------------------------------------------------------------------------------------ srpo preprocess

LONG_PROMPT = ("a very detailed photograph of an old stone lighthouse on a rocky cliff above a stormy sea at "
               "dusk with waves crashing against the rocks and seagulls circling the lamp")


class _Recorder:
    """A tracker that keeps the learner's logged metrics (every other call is a no-op)."""

    def __init__(self) -> None:
        self.metrics: dict[int, dict[str, float]] = {}

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.metrics[step] = dict(metrics)

    def __getattr__(self, name: str):
        return lambda *a, **kw: None


def _two_steps(cfg) -> tuple[dict[int, dict[str, float]], dict[str, torch.Tensor]]:
    from pipeline.checkpoint import LocalCheckpoints
    from pipeline.learner import build_learner
    from pipeline.sources import InProcessSource

    recorder = _Recorder()
    learner = build_learner(cfg, InProcessSource(cfg), LocalCheckpoints(Path(cfg.output.dir) / "ckpt", 1),
                            device=torch.device("cpu"), tracker=recorder)
    learner.run()
    return recorder.metrics, {k: v.detach().clone() for k, v in learner.engine.transformer.state_dict().items()}


def test_preprocess_then_training_from_the_parquet_equals_encoding_in_process(tiny_qwen_cfg, tiny_cfg, ray_local,
                                                                           tiny_qwen_world, tmp_path):
    """`srpo preprocess` on tiny Qwen-Image writes the family's four conditioning columns (masks and the
    negative prompt included) and its truncation counts; two single-process training steps reading them
    log the same losses and reach the same weights as two steps encoding the prompts in process. A
    FLUX config refuses the folder on one line naming data.prompt_embeddings.

    Tolerances: a prompt's Qwen2.5-VL output depends on its batch's padding by float32 rounding
    (preprocess encodes 4 prompts at once, training 2, the reference here 1): measured at most 2.4e-7
    (FLUX's fixed-length padding is bit-exact, tests/test_preprocess.py). Measured: step 0 bit-equal,
    step 1's metrics within 3e-6 relative, weights within 1e-6; asserted at 1e-4 relative."""
    from pipeline.data import read_prompts
    from pipeline.embeddings import META, check_compatible, load_embeddings, read_captions
    from pipeline.preflight import preflight
    from pipeline.ray.preprocess import preprocess, read_embedding_dataset

    prompts = tmp_path / "prompts.txt"
    lines = read_prompts(REPO / "configs/prompts/tiny_train.txt")
    prompts.write_text("\n".join([lines[0], LONG_PROMPT, *lines[1:]]) + "\n")
    common = (f"data.prompts={prompts}", "learner.num_workers=0", "train.max_steps=2", "log.image_every=0",
              "rollout.placement=colocated", "reward.placement=colocated")
    in_process = tiny_qwen_cfg(*common)
    out = tmp_path / "emb"
    report = preprocess(in_process, out, batch_size=4, num_actors=1, progress=False)

    # Counts and the arrays, against the adapter's own encoding, one prompt at a time, untruncated.
    captions = read_captions(out)
    assert captions == read_prompts(prompts) and report.encoded == len(captions) == 17
    wide = load_adapter("qwen_image", in_process.model.path, "cpu", max_sequence_length=1024, load_transformer=False)
    kept = [int(wide.encode_prompts([c]).prompt_mask.sum()) for c in captions]
    assert (report.truncated_t5, report.truncated_clip) == (sum(n > MAX_SEQ for n in kept), 0) and kept[1] > MAX_SEQ
    meta = json.loads((out / META).read_text())
    d = wide.encode_prompts([captions[0]]).prompt_embeds.shape[-1]
    assert meta["shapes"] == {"prompt_embeds": [MAX_SEQ, d], "prompt_mask": [MAX_SEQ],
                              "negative_embeds": [MAX_SEQ, d], "negative_mask": [MAX_SEQ]}
    loaded = load_embeddings(out, range(len(captions)))
    narrow = load_adapter("qwen_image", in_process.model.path, "cpu", MAX_SEQ, load_transformer=False)
    for i in (0, 1, 5):
        one = narrow.conditioning_to_arrays(narrow.encode_prompts([captions[i]]))
        for k, a in one.items():
            np.testing.assert_allclose(loaded[k][i], a[0], rtol=0, atol=1e-5, err_msg=f"{k} of prompt {i}")
    assert loaded["prompt_mask"][1].sum() == MAX_SEQ and loaded["prompt_mask"][0].sum() < MAX_SEQ
    assert sorted(read_embedding_dataset(out).columns()) == sorted(["prompt_index", "caption", *meta["shapes"]])

    # Training reads them: same losses and weights as encoding in process.
    from_parquet = tiny_qwen_cfg(*common, f"data.prompt_embeddings={out}", f"output.dir={tmp_path / 'run2'}")
    (m_a, w_a), (m_b, w_b) = _two_steps(in_process), _two_steps(from_parquet)
    assert sorted(m_a) == sorted(m_b) == [0, 1]
    for step in (0, 1):
        for key in ("loss", "denoise/reward", "grad_norm"):
            assert m_b[step][key] == pytest.approx(m_a[step][key], rel=1e-4, abs=1e-7), (step, key)
    for k in w_a:
        torch.testing.assert_close(w_b[k], w_a[k], rtol=1e-4, atol=1e-6, msg=k)

    # Another family's config: refused on one line naming the field, by the check and by the pre-flight.
    flux = tiny_cfg(f"data.prompt_embeddings={out}")
    expected = r"^data\.prompt_embeddings: .* was made with model\.family='qwen_image', this config has model\.family='flux'"
    for check in (lambda: check_compatible(out, flux), lambda: preflight(flux)):
        with pytest.raises(ConfigError, match=expected) as e:
            check()
        assert "\n" not in str(e.value)
