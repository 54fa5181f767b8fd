"""FLUX adapter against diffusers' own FluxPipeline on the tiny folder (the FLUX.1-dev layout)."""
import json

import numpy as np
import pytest
import torch

from pipeline.models import family_of, load_adapter, parameter_template
from pipeline.models.flux import (FLUX_VAE_SCALE, FLUX_VAE_SHIFT, FluxAdapter, denormalize_vae_latent,
                                  latent_image_ids, normalize_vae_latent, pack_latents, unpack_latents)
from pipeline.rollout import sample_x0
from pipeline.schedules import rollout_sigmas


@pytest.fixture(scope="module")
def pipe(tiny_world):
    from diffusers import FluxPipeline

    return FluxPipeline.from_pretrained(tiny_world["flux"], local_files_only=True)


@pytest.fixture(scope="module")
def adapter(tiny_world):
    return load_adapter("flux", tiny_world["flux"], "cpu", max_sequence_length=32)


def test_pack_round_trip_and_matches_diffusers(pipe):
    z = torch.randn(2, 16, 8, 12)
    x = pack_latents(z)
    assert x.shape == (2, 4 * 6, 64)
    torch.testing.assert_close(x, pipe._pack_latents(z, 2, 16, 8, 12), rtol=0, atol=0)
    torch.testing.assert_close(unpack_latents(x, 8, 12), z, rtol=0, atol=0)
    torch.testing.assert_close(latent_image_ids(8, 12), pipe._prepare_latent_image_ids(1, 4, 6, "cpu", torch.float32))


def test_vae_normalisation_constants():
    z = torch.randn(3, 16, 4, 4)
    torch.testing.assert_close(normalize_vae_latent(z), (z - 0.1159) * 0.3611)
    torch.testing.assert_close(denormalize_vae_latent(normalize_vae_latent(z)), z)
    assert (FLUX_VAE_SHIFT, FLUX_VAE_SCALE) == (0.1159, 0.3611)


def test_tiny_folder_runs_in_diffusers_flux_pipeline(pipe):
    out = pipe("a photo of a cat", height=64, width=64, num_inference_steps=3, guidance_scale=3.5,
               max_sequence_length=32, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert out.shape == (1, 3, 64, 64) and torch.isfinite(out).all()
    assert 0.0 <= out.min() and out.max() <= 1.0 and out.std() > 0


def test_prompt_encoding_matches_flux_pipeline(pipe, adapter):
    prompts = ["a photo of a cat", "an astronaut riding a horse on the moon, highly detailed"]
    ours = adapter.encode_prompts(prompts)
    embeds, pooled, text_ids = pipe.encode_prompt(prompts, prompt_2=None, max_sequence_length=32)
    # 1e-5: the pipeline moves the text encoders through accelerate hooks; same math, fp32 rounding.
    torch.testing.assert_close(ours.prompt_embeds, embeds, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.pooled, pooled, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.text_ids, text_ids, rtol=0, atol=0)


def test_velocity_is_the_pipeline_transformer_call(pipe, adapter):
    """Our call = the transformer as FluxPipeline calls it with the truncated timestep."""
    cond = adapter.encode_prompts(["a red car"])
    x = adapter.sample_noise(1, 64, torch.Generator().manual_seed(0))
    sigma = 0.96429
    v = adapter.velocity(adapter.transformer, x, sigma, cond, guidance=3.5, resolution=64)
    ref = pipe.transformer(hidden_states=x, timestep=torch.tensor([0.964]), guidance=torch.tensor([3.5]),
                           pooled_projections=cond.pooled, encoder_hidden_states=cond.prompt_embeds,
                           txt_ids=cond.text_ids, img_ids=pipe._prepare_latent_image_ids(1, 4, 4, "cpu", torch.float32),
                           return_dict=False)[0]
    torch.testing.assert_close(v, ref, rtol=1e-6, atol=1e-6)
    # The truncation matters: an untruncated sigma gives a different output.
    v_exact = pipe.transformer(hidden_states=x, timestep=torch.tensor([sigma]), guidance=torch.tensor([3.5]),
                               pooled_projections=cond.pooled, encoder_hidden_states=cond.prompt_embeds,
                               txt_ids=cond.text_ids, img_ids=adapter.image_ids(64), return_dict=False)[0]
    assert not torch.allclose(v, v_exact)


def test_rollout_is_the_euler_recursion(adapter):
    """sample_x0 = x_{i+1} = x_i + (sigma_{i+1} - sigma_i) v(x_i, t(sigma_i)), written out here."""
    cond = adapter.encode_prompts(["a bowl of fruit", "a lighthouse"])
    eps = adapter.sample_noise(2, 64, torch.Generator().manual_seed(1))
    x0 = sample_x0(adapter, adapter.transformer, eps, cond, 64, steps=4, shift=3.0, guidance=1.0)
    s = [3 * t / (1 + 2 * t) for t in (1.0, 0.75, 0.5, 0.25, 0.0)]
    x = eps.clone()
    with torch.no_grad():
        for i in range(4):
            x = x + (s[i + 1] - s[i]) * adapter.velocity(adapter.transformer, x, s[i], cond, 1.0, 64)
    torch.testing.assert_close(x0, x, rtol=1e-6, atol=1e-6)
    assert torch.allclose(rollout_sigmas(4, 3.0), torch.tensor(s, dtype=torch.float64))


def test_decode_is_differentiable_and_in_range(adapter):
    x = (torch.randn(1, 16, 64) * 0.5).requires_grad_(True)
    img = adapter.decode(x, 64)
    assert img.shape == (1, 3, 64, 64) and 0 <= img.min() and img.max() <= 1
    img.mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in adapter.vae.parameters()), "the VAE is frozen"


def test_encode_then_decode_shapes(adapter, pipe):
    img = torch.rand(2, 3, 64, 64)
    x = adapter.encode_images(img)
    assert x.shape == (2, 16, 64)
    assert adapter.decode(x, 64).shape == (2, 3, 64, 64)
    # The posterior mean (not a sample), normalised and packed as FluxPipeline does, through the
    # pipeline's own VAE and config: the README's "VAE-encoded (posterior mean)".
    with torch.no_grad():
        mean = pipe.vae.encode(img * 2 - 1).latent_dist.mean
    vae = pipe.vae.config
    expected = pipe._pack_latents((mean - vae.shift_factor) * vae.scaling_factor, 2, 16, 8, 8)
    torch.testing.assert_close(x, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(adapter.encode_images(img, torch.Generator().manual_seed(1)), x, rtol=0, atol=0)


def test_missing_component_names_the_path(tmp_path):
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="transformer"):
        load_adapter("flux", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        load_adapter("flux", str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="model.family"):
        load_adapter("sd3", str(tmp_path))


# ------------------------------------------------------------------------------------------ the family surface
# What generic code (engines, export, preprocess, Ray batches) gets from the adapter instead of FLUX names.


def test_conditioning_round_trips_through_arrays_bit_for_bit(adapter):
    cond = adapter.encode_prompts(["a photo of a cat", "a red car"])
    arrays = adapter.conditioning_to_arrays(cond)
    assert set(arrays) == {"prompt_embeds", "pooled"} and all(a.dtype == np.float32 for a in arrays.values())
    back = FluxAdapter.conditioning_from_arrays({**arrays, "caption": np.array(["x", "y"])}, "cpu")  # class level
    for field in ("prompt_embeds", "pooled", "text_ids"):
        torch.testing.assert_close(getattr(back, field), getattr(cond, field), rtol=0, atol=0)


def test_shard_blocks_are_every_double_then_single_stream_block(adapter):
    t = adapter.transformer
    blocks = adapter.shard_blocks(t)
    assert blocks == [*t.transformer_blocks, *t.single_transformer_blocks] and len(blocks) >= 2
    with pytest.raises(TypeError, match="Linear: no transformer_blocks"):
        FluxAdapter.shard_blocks(torch.nn.Linear(2, 2))


def test_parameter_template_and_conditioning_shapes_need_no_weights(adapter, tiny_world):
    assert family_of(tiny_world["flux"]) == "flux"
    template = parameter_template(tiny_world["flux"])
    assert template == {k: tuple(v.shape) for k, v in adapter.transformer.state_dict().items()}
    cond = adapter.encode_prompts(["a cat"])
    shapes = FluxAdapter.conditioning_shapes(tiny_world["flux"], 32)
    assert shapes == {k: list(v.shape[1:]) for k, v in adapter.conditioning_to_arrays(cond).items()}
    clip_tok, t5_tok = FluxAdapter.load_tokenizers(tiny_world["flux"])
    assert clip_tok.model_max_length == 77 and t5_tok("a cat").input_ids[-1] == t5_tok.eos_token_id


def test_family_level_errors_name_the_file(tmp_path):
    (tmp_path / "transformer").mkdir()
    with pytest.raises(ValueError, match=r"text encoders' config\.json under .*d_model"):
        FluxAdapter.conditioning_shapes(tmp_path, 32)
    with pytest.raises(FileNotFoundError, match=r"tokenizer: missing"):
        FluxAdapter.load_tokenizers(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"transformer/config\.json: missing"):
        family_of(tmp_path / "nowhere")
    (tmp_path / "transformer" / "config.json").write_text(json.dumps({"_class_name": "SD3Transformer2DModel"}))
    with pytest.raises(ValueError, match="'SD3Transformer2DModel' belongs to no model family"):
        family_of(tmp_path)
