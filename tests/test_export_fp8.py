"""fp8 export (`srpo export --dtype fp8 [--layout comfyui]`) on the tiny world: the quantization error
stays inside e4m3's rounding bound, the diffusers-layout file loads through diffusers' documented fp8
path (BFLQuantizationConfig + from_single_file) and its image stays near the bf16 export's, and the
ComfyUI layout has FLUX's original (BFL) key names with ComfyUI's scaled-fp8 tensors.

Expected values come from e4m3's definition (3 mantissa bits, largest finite 448), the BFL naming of
the `flux` reference code, the real model's module types, and diffusers' own BFL -> diffusers converter.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

F8 = torch.float8_e4m3fn
E4M3_MAX = 448.0  # 1.75 * 2^8: the largest finite e4m3fn value (S.1111.110)
REL_STEP = 2.0 ** -4  # 3 mantissa bits: normal numbers are spaced 2^-3 relative, round-to-nearest errs <= half
SUB_STEP = 2.0 ** -10  # subnormals (|x| < 2^-6) are spaced 2^-9 apart: error <= 2^-10 (in units of the scale)
PROMPT, SEED, STEPS, GUIDANCE, RESOLUTION, MAX_SEQ = "a photo of a cat sitting on a wooden table", 7, 4, 3.5, 64, 32


def rounding_bound(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Per element, the most round-to-nearest e4m3 can move ``w`` (scale broadcast to w), plus fp32 slack."""
    return torch.maximum(REL_STEP * w.abs(), SUB_STEP * scale) * (1 + 1e-5) + 1e-12


@pytest.fixture(scope="module")
def state(tiny_world) -> dict[str, torch.Tensor]:
    from pipeline.export import load_weights

    return load_weights(tiny_world["flux"])  # the tiny FLUX transformer, fp32, diffusers keys


@pytest.fixture(scope="module")
def block_linears(tiny_world) -> set[str]:
    """Weights of the nn.Linear modules inside the family's blocks, from the real module types."""
    from diffusers import FluxTransformer2DModel

    from pipeline.models import FAMILIES

    t = FluxTransformer2DModel.from_pretrained(tiny_world["flux"], subfolder="transformer", local_files_only=True)
    block_ids = {id(b) for b in FAMILIES["flux"].shard_blocks(t)}
    prefixes = [f"{n}." for n, m in t.named_modules() if id(m) in block_ids]
    return {f"{n}.weight" for n, m in t.named_modules()
            if isinstance(m, torch.nn.Linear) and any(n.startswith(p) for p in prefixes)}


@pytest.fixture(scope="module")
def exports(state, tmp_path_factory) -> dict[str, Path]:
    from pipeline.export import export_single_file, export_transformer

    tmp = tmp_path_factory.mktemp("fp8")
    return {"bf16": export_transformer(state, tmp / "bf16.safetensors", "bf16"),
            "fp8": export_single_file(state, tmp / "fp8.safetensors", "fp8", step=3),
            "comfyui": export_single_file(state, tmp / "comfy.safetensors", "fp8", layout="comfyui", family="flux")}


# ------------------------------------------------------------------------------------------ 1


def test_quantization_error_is_within_e4m3_rounding_and_per_row_scales_protect_small_rows():
    from pipeline.export import dequantize_fp8, quantize_fp8

    g = torch.Generator().manual_seed(0)
    # Rows of very different magnitudes (as modulation and attention rows are), one all-zero row,
    # and elements down in e4m3's subnormal range.
    w = torch.randn(6, 64, generator=g) * torch.tensor([1.0, 1e-4, 30.0, 0.0, 1e-2, 1.0])[:, None]
    w[0, :8] *= 1e-4
    q, s = quantize_fp8(w, per_row=True)
    assert q.dtype == F8 and s.dtype == torch.float32 and s.shape == (6,)
    amax = w.abs().amax(dim=1)
    nonzero = amax > 0
    torch.testing.assert_close(s[nonzero], amax[nonzero] / E4M3_MAX, rtol=0, atol=0)  # amax lands on 448
    assert torch.equal(q.float().abs().amax(dim=1)[nonzero], torch.full((5,), E4M3_MAX))
    assert torch.equal(q[3].float(), torch.zeros(64)) and s[3] > 0  # an all-zero row stays zero
    err = (dequantize_fp8(q, s) - w).abs()
    assert (err <= rounding_bound(w, s[:, None])).all()
    normal = w.abs() >= 2.0 ** -6 * s[:, None]
    assert (err[normal] / w.abs()[normal]).max() > REL_STEP / 2  # really 3 bits, not a finer format

    # One scale per tensor: the 1e-4 row sits ~1e5 times below the tensor's amax, in the subnormals,
    # and loses most of its bits; its own row scale keeps it at 3 bits (why the diffusers layout is per row).
    qt, st = quantize_fp8(w, per_row=False)
    assert st.shape == () and (dequantize_fp8(qt, st) - w).abs().le(rounding_bound(w, st)).all()
    row_err = lambda d: ((d[1] - w[1]).abs() / w[1].abs()).median().item()  # noqa: E731
    assert row_err(dequantize_fp8(qt, st)) > 4 * REL_STEP > REL_STEP >= row_err(dequantize_fp8(q, s))


# ------------------------------------------------------------------------------------------ 2


def test_diffusers_layout_keys_dtypes_scales_and_size(state, block_linears, exports):
    from safetensors import safe_open
    from safetensors.torch import load_file

    from pipeline.export import load_weights

    f = load_file(str(exports["fp8"]))
    quantized = {k for k, v in f.items() if v.dtype == F8}
    assert quantized == block_linears and len(quantized) == 26  # 1 double block x 14 + 2 single x 6
    assert set(f) == set(state) | {k[:-len("weight")] + "weight_scale" for k in quantized}
    for k, v in state.items():
        if k in quantized:
            scale = f[k[:-len("weight")] + "weight_scale"]
            assert scale.dtype == torch.float32 and scale.shape == (v.shape[0],), k  # one per output row
            assert (f[k].float() * scale[:, None] - v).abs().le(rounding_bound(v, scale[:, None])).all(), k
        else:  # norms, biases, embedders, output layers: bf16, exactly the cast
            assert f[k].dtype == torch.bfloat16 and torch.equal(f[k], v.to(torch.bfloat16)), k
    with safe_open(str(exports["fp8"]), framework="pt") as sf:
        assert sf.metadata() == {"format": "pt", "quantization": "fp8r", "srpo_step": "3"}

    # Bytes: 1 per quantized weight + 4 per row scale + 2 per other element; the rest is the JSON header.
    payload = sum(v.numel() + 4 * v.shape[0] if k in quantized else 2 * v.numel() for k, v in state.items())
    size = exports["fp8"].stat().st_size
    assert payload < size < payload + 64 * 1024
    assert size < 0.75 * exports["bf16"].stat().st_size

    # Our own reader (srpo sample / evaluate --weights) applies the scales.
    back = load_weights(exports["fp8"])
    assert set(back) == set(state)
    for k in quantized:
        scale = f[k[:-len("weight")] + "weight_scale"]
        assert back[k].dtype == torch.float32 and torch.equal(back[k], f[k].float() * scale[:, None]), k


# ------------------------------------------------------------------------------------------ 3


def _image(pipe) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    return pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=RESOLUTION, width=RESOLUTION,
                max_sequence_length=MAX_SEQ, generator=torch.Generator("cpu").manual_seed(SEED),
                output_type="pt").images


def test_fp8_export_loads_through_diffusers_and_stays_near_the_bf16_image(tiny_world, state, exports):
    """Tolerance: e4m3 rounds weights 2^4 = 16 times coarser than bf16 (3 vs 7 mantissa bits). To first
    order the image moves linearly with the weight error, so fp8-vs-bf16 may differ by up to
    (16 + 1) x the bf16-vs-fp32 distance (+1: the bf16 image is itself off the fp32 one by that much).
    Everything computes in fp32, so only the stored weights differ. Measured here: ~1.3x."""
    from diffusers import BFLQuantizationConfig, FluxPipeline, FluxTransformer2DModel
    from diffusers.quantizers.bfl.utils import BFLFP8RLinear
    from safetensors.torch import load_file

    flux = tiny_world["flux"]
    fp8 = FluxTransformer2DModel.from_single_file(  # the path diffusers documents (docs: quantization/bfl)
        str(exports["fp8"]), config=flux, subfolder="transformer", local_files_only=True, torch_dtype=torch.float32,
        quantization_config=BFLQuantizationConfig(compute_dtype=torch.float32))
    q = fp8.transformer_blocks[0].attn.to_q
    assert isinstance(q, BFLFP8RLinear) and q.weight.dtype == F8  # stored as fp8, dequantized per forward
    assert fp8.x_embedder.weight.dtype == torch.float32  # not quantized, upcast from bf16
    image_fp8 = _image(FluxPipeline.from_pretrained(flux, transformer=fp8, local_files_only=True))

    pipe = FluxPipeline.from_pretrained(flux, local_files_only=True)  # fp32
    image_fp32 = _image(pipe)
    pipe.transformer.load_state_dict(load_file(str(exports["bf16"])))  # the authors' way
    image_bf16 = _image(pipe)
    # The control a missing scale would give: the e4m3 values read as weights.
    pipe.transformer.load_state_dict({k: v.float() for k, v in load_file(str(exports["fp8"])).items()
                                      if not k.endswith("weight_scale")})
    image_unscaled = _image(pipe)

    dist = lambda a, b: (a - b).abs().mean().item()  # noqa: E731  mean |difference| in [0, 1] image units
    bf16_error = dist(image_bf16, image_fp32)
    tolerance = 17 * bf16_error
    assert image_fp32.std() > 0.05 and bf16_error > 0  # a real image, and bf16 does move it
    assert 0 < dist(image_fp8, image_bf16) <= tolerance
    assert dist(image_unscaled, image_bf16) > 5 * tolerance  # the check would catch a scale bug


# ------------------------------------------------------------------------------------------ 4


def bfl_flux_keys(double: int, single: int, guidance: bool) -> set[str]:
    """The tensor names of Black Forest Labs' `flux` reference model (flux/model.py, modules/layers.py)."""
    linear = ["img_in", "txt_in", "time_in.in_layer", "time_in.out_layer", "vector_in.in_layer",
              "vector_in.out_layer", "final_layer.linear", "final_layer.adaLN_modulation.1"]
    linear += ["guidance_in.in_layer", "guidance_in.out_layer"] if guidance else []
    norms = []
    for i in range(double):
        for s in ("img", "txt"):
            linear += [f"double_blocks.{i}.{s}_{m}" for m in ("mod.lin", "attn.qkv", "attn.proj", "mlp.0", "mlp.2")]
            norms += [f"double_blocks.{i}.{s}_attn.norm.{n}_norm.scale" for n in ("query", "key")]
    for i in range(single):
        linear += [f"single_blocks.{i}.{m}" for m in ("linear1", "linear2", "modulation.lin")]
        norms += [f"single_blocks.{i}.norm.{n}_norm.scale" for n in ("query", "key")]
    return {f"{m}.{p}" for m in linear for p in ("weight", "bias")} | set(norms)


def test_comfyui_layout_has_bfl_names_and_comfyuis_scaled_fp8_tensors(state, exports):
    from safetensors.torch import load_file

    from pipeline.models.original_keys import to_original_keys

    f = load_file(str(exports["comfyui"]))
    inner, mlp = 32, 128  # the tiny world: 2 heads x 16, mlp_ratio 4
    weights = bfl_flux_keys(double=1, single=2, guidance=True)
    quantized = {k for k in weights if k.endswith(".weight") and k.startswith(("double_blocks.", "single_blocks."))}
    assert set(f) == weights | {k[:-len("weight")] + "scale_weight" for k in quantized} | {"scaled_fp8"}
    assert f["scaled_fp8"].dtype == F8 and f["scaled_fp8"].numel() == 0  # ComfyUI's marker, as it saves it
    assert f["double_blocks.0.img_attn.qkv.weight"].shape == (3 * inner, inner)
    assert f["single_blocks.1.linear1.weight"].shape == (3 * inner + mlp, inner)
    assert f["single_blocks.1.linear2.weight"].shape == (inner, inner + mlp)
    for k in quantized:
        assert f[k].dtype == F8 and f[k[:-6] + "scale_weight"].dtype == torch.float32, k
        assert f[k[:-6] + "scale_weight"].shape == (), k  # one per tensor: ComfyUI's Linear holds a scalar

    # Values, by the BFL convention: fused q|k|v (|mlp) rows, (shift, scale) where diffusers has (scale, shift).
    qkv = torch.cat([state[f"transformer_blocks.0.attn.{p}.weight"] for p in ("to_q", "to_k", "to_v")])
    single = torch.cat([state[f"single_transformer_blocks.1.{p}.weight"]
                        for p in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")])
    for key, expected in [("double_blocks.0.img_attn.qkv.weight", qkv), ("single_blocks.1.linear1.weight", single)]:
        scale = f[key[:-6] + "scale_weight"]
        torch.testing.assert_close(scale, expected.abs().amax() / E4M3_MAX, rtol=0, atol=0)
        dequantized = f[key].float() * scale  # what ComfyUI computes: weight * scale
        assert (dequantized - expected).abs().le(rounding_bound(expected, scale)).all(), key
    scale, shift = state["norm_out.linear.weight"].chunk(2)
    assert torch.equal(f["final_layer.adaLN_modulation.1.weight"], torch.cat([shift, scale]).to(torch.bfloat16))
    assert torch.equal(f["single_blocks.0.norm.key_norm.scale"],
                       state["single_transformer_blocks.0.attn.norm_k.weight"].to(torch.bfloat16))
    original = to_original_keys("flux", state)  # every other quantized tensor within the same bound
    for k in quantized:
        s = f[k[:-6] + "scale_weight"]
        assert (f[k].float() * s - original[k]).abs().le(rounding_bound(original[k], s)).all(), k


def test_original_layout_inverts_diffusers_own_flux_converter(state):
    """diffusers' BFL -> diffusers converter (what from_single_file runs on flux1-dev.safetensors)
    gives back every key and value. It hard-codes FLUX.1's width (3072, mlp 12288) for the single
    blocks' split, so the tiny world's keys carry FLUX-width rows of random values."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    from pipeline.models.original_keys import to_original_keys

    g = torch.Generator().manual_seed(0)
    synthetic = {}
    for k, v in state.items():
        single_qkv = k.startswith("single_transformer_blocks.") and ".attn.to_" in k
        rows = 3072 if single_qkv else 12288 if ".proj_mlp." in k else 4
        synthetic[k] = torch.randn((rows, 2) if v.ndim == 2 else (rows,), generator=g)
    converted = convert_flux_transformer_checkpoint_to_diffusers(to_original_keys("flux", synthetic))
    assert set(converted) == set(synthetic)
    assert all(torch.equal(converted[k], synthetic[k]) for k in synthetic)

    with pytest.raises(KeyError, match="no BFL name for"):
        to_original_keys("flux", {**state, "extra_head.weight": torch.zeros(2, 2)})  # nothing dropped silently
    with pytest.raises(ValueError, match="no original single-file key layout"):
        to_original_keys("sd3", state)


# ------------------------------------------------------------------------------------------ 5


def test_srpo_export_cli_fp8_and_comfyui(state, exports, tiny_world, tmp_path, capsys):
    from safetensors.torch import load_file

    from jobs.export import main
    from pipeline.export import export_single_file, export_transformer, load_weights

    src = export_transformer(state, tmp_path / "src" / "diffusion_pytorch_model.safetensors", "fp32")
    assert main([str(src), "--dtype", "fp8", "--out", str(tmp_path / "out")]) == 0
    written = load_file(str(tmp_path / "out" / "diffusion_pytorch_model_fp8_e4m3fn.safetensors"))
    assert written.keys() == load_file(str(exports["fp8"])).keys()

    assert main([str(src), "--dtype", "fp8", "--layout", "comfyui", "--out", str(tmp_path / "c")]) == 2
    assert "expected --model-path BASE" in capsys.readouterr().err  # the family comes from the base folder
    assert main([str(src), "--dtype", "fp8", "--layout", "comfyui", "--out", str(tmp_path / "c"),
                 "--model-path", tiny_world["flux"]]) == 0
    comfy = load_file(str(tmp_path / "c" / "diffusion_model_fp8_e4m3fn_scaled.safetensors"))
    assert "scaled_fp8" in comfy and "double_blocks.0.img_attn.qkv.scale_weight" in comfy
    assert main([str(src), "--dtype", "bf16", "--layout", "comfyui", "--out", str(tmp_path / "c"),
                 "--model-path", tiny_world["flux"]]) == 0
    bf16 = load_file(str(tmp_path / "c" / "diffusion_model_bf16.safetensors"))
    assert bf16.keys() == bfl_flux_keys(1, 2, True) and {v.dtype for v in bf16.values()} == {torch.bfloat16}

    assert main([str(src), "--dtype", "fp8", "--diffusers-folder", "--out", str(tmp_path / "d")]) == 2
    assert "from_single_file" in capsys.readouterr().err and not (tmp_path / "d").exists()

    with pytest.raises(ValueError, match="ComfyUI-layout fp8 export"):
        load_weights(exports["comfyui"])  # original key names do not load as diffusers weights
    for kwargs, match in [(dict(dtype="int8"), "dtype"), (dict(dtype="fp8", layout="bfl"), "layout"),
                          (dict(dtype="fp8", layout="comfyui"), "family is unknown")]:
        with pytest.raises(ValueError, match=match):
            export_single_file(state, tmp_path / "x.safetensors", **kwargs)
    with pytest.raises(ValueError, match="no 2-D weight inside a numbered block list"):
        export_single_file({"proj.weight": torch.ones(2, 2)}, tmp_path / "x.safetensors", "fp8")
    assert not (tmp_path / "x.safetensors").exists()
