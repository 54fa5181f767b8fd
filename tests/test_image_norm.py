"""reward.image_norm: how a decoded image reaches the reward's [0, 1] input (clamp, or the authors'
Qwen-Image min-max), checked against numpy and a hand-derived gradient; the config field; the FLUX
adapter's decode with it. Relay = colocated with minmax: tests/test_reward_actors.py; Qwen-Image's
decode against the pipeline's VAE: tests/test_qwen_image.py."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import REPO
from pipeline.config import ConfigError, load_config
from pipeline.models import load_adapter
from pipeline.models.base import MINMAX_EPS, unit_image


def _images(seed: int = 0) -> np.ndarray:
    """Two images [2, 3, 5, 4] of different ranges, one overshooting [-1, 1] as a VAE's output can."""
    rng = np.random.default_rng(seed)
    return np.stack([rng.uniform(-1.3, 1.2, (3, 5, 4)), rng.uniform(-0.2, 0.4, (3, 5, 4))])


def test_both_norms_equal_numpy():
    x = _images()
    lo, hi = x.min(axis=(1, 2, 3), keepdims=True), x.max(axis=(1, 2, 3), keepdims=True)
    expected_minmax = (x - lo) / (hi - lo)
    out = unit_image(torch.from_numpy(x), "minmax").numpy()
    np.testing.assert_allclose(out, expected_minmax, rtol=1e-12, atol=1e-12)
    assert out[1].min() == 0 and out[1].max() == 1  # the low-contrast image is stretched to [0, 1]
    np.testing.assert_allclose(unit_image(torch.from_numpy(x), "clamp").numpy(), np.clip(x / 2 + 0.5, 0, 1),
                               rtol=1e-12, atol=1e-12)
    f32 = unit_image(torch.from_numpy(x).float(), "minmax")
    assert f32.dtype == torch.float32
    np.testing.assert_allclose(f32.numpy(), expected_minmax, rtol=0, atol=1e-6)


def _hand_gradient(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """d/dx of sum(w * (x - min) / (max - min)) for one image with a unique min and max, by hand:
    y_i = (x_i - m) / R, R = M - m; dL/dx_j = w_j / R, plus sum_i w_i (y_i - 1) / R at the argmin
    (through m in the numerator and in R), minus sum_i w_i y_i / R at the argmax (through R)."""
    m, big = x.min(), x.max()
    r = big - m
    y = (x - m) / r
    g = w / r
    g.flat[np.argmin(x)] += np.sum(w * (y - 1)) / r
    g.flat[np.argmax(x)] -= np.sum(w * y) / r
    return g


def test_minmax_gradient_is_the_hand_derived_one_and_finite_differences_agree():
    x = _images(1)
    w = np.random.default_rng(2).normal(size=x.shape)
    xt = torch.from_numpy(x).requires_grad_(True)
    (unit_image(xt, "minmax") * torch.from_numpy(w)).sum().backward()
    expected = np.stack([_hand_gradient(x[b], w[b]) for b in range(len(x))])
    np.testing.assert_allclose(xt.grad.numpy(), expected, rtol=1e-10, atol=1e-12)
    # Finite differences (float64; random values have a unique min and max, so the map is smooth here).
    assert torch.autograd.gradcheck(lambda t: unit_image(t, "minmax"), (torch.from_numpy(x).requires_grad_(True),))
    # clamp passes no gradient where the VAE overshoots; minmax does (every pixel of a non-flat image).
    xc = torch.from_numpy(x).requires_grad_(True)
    unit_image(xc, "clamp").sum().backward()
    outside = np.abs(x) > 1
    assert outside.any() and (xc.grad.numpy()[outside] == 0).all()
    assert (xt.grad.numpy()[outside] != 0).all()


def test_minmax_of_a_flat_image_is_zero_with_a_finite_gradient():
    """max == min: the range floor MINMAX_EPS gives 0, not 0 / 0; an almost flat image stays in [0, 1)."""
    flat = torch.full((1, 3, 4, 4), 0.25, dtype=torch.float64, requires_grad=True)
    out = unit_image(flat, "minmax")
    assert (out == 0).all()
    out.sum().backward()
    assert torch.isfinite(flat.grad).all()
    almost = torch.full((1, 3, 4, 4), 0.25, dtype=torch.float64)
    almost[0, 0, 0, 0] += MINMAX_EPS / 4
    out = unit_image(almost, "minmax")
    assert float(out.max()) == pytest.approx(0.25) and float(out.min()) == 0
    with pytest.raises(ValueError, match=r"image norm: got 'unit', expected one of \['clamp', 'minmax'\]"):
        unit_image(almost, "unit")


def test_image_norm_config_field(tiny_cfg):
    assert tiny_cfg().reward.image_norm == "clamp"  # the default: FLUX's recipe, the pipelines' image
    assert tiny_cfg("reward.image_norm=minmax").reward.image_norm == "minmax"
    with pytest.raises(ConfigError, match=r"^reward\.image_norm: got 'zscore', expected one of \['clamp', 'minmax'\]$"):
        tiny_cfg("reward.image_norm=zscore")
    two = ("rewards=[{name: a, image_norm: minmax}, {name: b, image_norm: clip}]",)
    with pytest.raises(ConfigError, match=r"rewards\[1\]\.image_norm: got 'clip', expected one of"):
        tiny_cfg(*two)
    presets = {p: load_config(REPO / "configs" / p).reward.image_norm
               for p in ("qwen_image_pickscore.yaml", "tiny_qwen_image.yaml", "flux_hpsv2.yaml", "tiny.yaml")}
    assert presets == {"qwen_image_pickscore.yaml": "minmax", "tiny_qwen_image.yaml": "minmax",
                       "flux_hpsv2.yaml": "clamp", "tiny.yaml": "clamp"}


def test_flux_decode_applies_the_norm_to_the_vaes_output(tiny_world):
    """decode(x, res, norm) = numpy's norm of the raw VAE output, computed here from the VAE config."""
    adapter = load_adapter("flux", tiny_world["flux"], "cpu", load_text_encoders=False, load_transformer=False)
    x = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(0))
    vae = adapter.vae
    z = x.view(2, 4, 4, 16, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(2, 16, 8, 8)  # FluxPipeline._unpack_latents
    with torch.no_grad():
        raw = vae.decode(z / vae.config.scaling_factor + vae.config.shift_factor, return_dict=False)[0].numpy()
    lo, hi = raw.min(axis=(1, 2, 3), keepdims=True), raw.max(axis=(1, 2, 3), keepdims=True)
    with torch.no_grad():
        np.testing.assert_allclose(adapter.decode(x, 64, "minmax").numpy(), (raw - lo) / (hi - lo), rtol=0, atol=1e-5)
        np.testing.assert_allclose(adapter.decode(x, 64).numpy(), np.clip(raw / 2 + 0.5, 0, 1), rtol=0, atol=1e-6)
