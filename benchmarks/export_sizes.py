"""File sizes of `srpo export` per dtype and layout, computed from parameter shapes (nothing is written).

    python benchmarks/export_sizes.py [--cache .cache/bench] [--out benchmarks/results/export_sizes.json]

tiny and small: the transformers of the tiny worlds (`make_tiny_world`, size tiny / small; cached like
benchmarks/step.py). FLUX.1-dev: diffusers' FluxTransformer2DModel defaults (its published
architecture: 19 double + 38 single blocks, 24 heads x 128) with guidance_embeds=True, as
FLUX.1-dev's transformer/config.json has it. Shapes come from the family's parameter template (the
model built on the meta device) and the quantized set from the export's own rule (is_block_linear).

Bytes are the tensor payload: fp32 4 per element, bf16 2, fp8 1 per quantized weight + 4 per fp32
scale (one per output row in the diffusers layout, one per fused tensor in the ComfyUI layout). The
safetensors JSON header adds ~100 bytes per tensor (under 0.2 MB for FLUX.1-dev).
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from diffusers import FluxTransformer2DModel  # noqa: E402

from pipeline.export import is_block_linear  # noqa: E402
from pipeline.models import parameter_template  # noqa: E402
from pipeline.models.original_keys import to_original_keys  # noqa: E402
from pipeline.tiny import make_tiny_world  # noqa: E402


def flux_dev_config() -> dict:
    """FluxTransformer2DModel's constructor defaults (FLUX.1's architecture) + FLUX.1-dev's guidance embedding."""
    params = inspect.signature(FluxTransformer2DModel.__init__).parameters
    config = {k: p.default for k, p in params.items() if k != "self" and p.default is not inspect.Parameter.empty}
    config["guidance_embeds"] = True  # FLUX.1-dev (schnell: False)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}


def template_of_config(config: dict) -> dict[str, tuple[int, ...]]:
    """The family's parameter template of a transformer config (a folder with transformer/config.json)."""
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "transformer").mkdir()
        (Path(tmp) / "transformer" / "config.json").write_text(
            json.dumps({"_class_name": FluxTransformer2DModel.__name__, **config}))
        return parameter_template(tmp)


def fp8_bytes(shapes: dict[str, tuple[int, ...]], per_row: bool) -> tuple[int, int, int]:
    """(bytes, quantized elements, scales) of an fp8 export: quantized weights 1 + fp32 scales 4, rest bf16 2."""
    total = quantized = scales = 0
    for key, shape in shapes.items():
        n = int(torch.Size(shape).numel())
        if is_block_linear(key, shape):
            quantized += n
            scales += shape[0] if per_row else 1
        else:
            total += 2 * n
    return total + quantized + 4 * scales, quantized, scales


def sizes(shapes: dict[str, tuple[int, ...]]) -> dict:
    n = sum(int(torch.Size(s).numel()) for s in shapes.values())
    meta = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    original = {k: tuple(v.shape) for k, v in to_original_keys("flux", meta).items()}  # fused q|k|v (|mlp)
    fp8, quantized, row_scales = fp8_bytes(shapes, per_row=True)
    comfy_fp8, _, tensor_scales = fp8_bytes(original, per_row=False)
    return {
        "parameters": n, "tensors": len(shapes), "quantized_parameters": quantized,
        "quantized_fraction": quantized / n, "row_scales": row_scales, "comfyui_tensor_scales": tensor_scales,
        "bytes": {"fp32": 4 * n, "bf16": 2 * n, "fp8_diffusers": fp8, "fp8_comfyui": comfy_fp8},
        "gb": {k: round(v / 1e9, 4) for k, v in
               {"fp32": 4 * n, "bf16": 2 * n, "fp8_diffusers": fp8, "fp8_comfyui": comfy_fp8}.items()},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", default=str(REPO / ".cache" / "bench"))
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "export_sizes.json"))
    args = p.parse_args()
    results = {"units": "bytes of tensor payload; gb = 1e9 bytes", "models": {}}
    for size in ("tiny", "small"):
        world = make_tiny_world(Path(args.cache) / f"world-{size}", seed=0, size=size)
        results["models"][size] = sizes(parameter_template(world["flux"]))
    config = flux_dev_config()
    results["models"]["flux1-dev"] = {"config": config, **sizes(template_of_config(config))}
    for name, r in results["models"].items():
        gb = r["gb"]
        print(f"{name:9s} {r['parameters'] / 1e6:10.2f}M params ({100 * r['quantized_fraction']:.1f}% quantized)  "
              f"fp32 {gb['fp32']:.4f} GB  bf16 {gb['bf16']:.4f}  fp8 {gb['fp8_diffusers']:.4f}  "
              f"fp8 comfyui {gb['fp8_comfyui']:.4f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"saved {out}")


if __name__ == "__main__":
    main()
