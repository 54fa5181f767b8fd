"""How far a cheaper rollout moves the anchor x0, and what it costs: bf16, compile and fewer Euler steps.

    python benchmarks/rollout_precision.py [--presets tiny small] [--repeats 3]
                                           [--out benchmarks/results/rollout_precision.json]

For each preset, the held-out prompts on held-out noise are rolled out by the untrained policy with
the reference rollout (fp32, the preset's steps, eager) and with each cheaper variant. Reported per
variant: the median rollout time of ``--repeats`` tries (after one warm-up call, which for compile
holds the compilation, reported apart), and the distance of its x0 from the reference's:
||x0 - x0_ref|| / ||x0_ref|| over the batch, and the largest per-sample value.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
for _k, _v in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DIFFUSERS_VERBOSITY": "error",
               "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}.items():
    os.environ.setdefault(_k, _v)

import torch  # noqa: E402

from pipeline.checkpoint import write_json_atomic  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.data import read_prompts  # noqa: E402
from pipeline.models import load_adapter  # noqa: E402
from pipeline.rollout import rollout_model, rollout_precision, sample_x0  # noqa: E402
from pipeline.tiny import make_tiny_world  # noqa: E402

PRESETS = {"small": ("small", ["data.resolution=256", "rollout.steps=25", "model.max_sequence_length=64"], 4),
           "tiny": ("tiny", ["data.resolution=64", "rollout.steps=10"], 8)}
VARIANTS = {"bf16": ["rollout.dtype=bf16"], "compile": ["rollout.compile=true"],
            "half-steps": None,  # rollout.steps = half the preset's (set below)
            "bf16+compile": ["rollout.dtype=bf16", "rollout.compile=true"]}
HELDOUT_SEED = 4321


def timed(fn, repeats: int) -> tuple[torch.Tensor, float, float]:
    """(x0, first call's seconds, median seconds of the next ``repeats`` calls)."""
    t0 = time.perf_counter()
    x0 = fn()
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return x0, first, statistics.median(times)


def measure(preset: str, repeats: int) -> dict:
    size, overrides, n = PRESETS[preset]
    world = make_tiny_world(REPO / ".cache" / "bench" / f"world-{size}", seed=0, size=size)
    base = [f"model.path={world['flux']}", "tiny.enabled=false", "train.device=cpu", "train.mixed_precision=fp32",
            f"data.heldout_prompts={REPO / 'configs/prompts/tiny_heldout.txt'}", *overrides]
    ref_cfg = load_config(REPO / "configs/tiny.yaml", base)
    adapter = load_adapter("flux", world["flux"], "cpu", ref_cfg.model.max_sequence_length)
    model = adapter.transformer.eval()
    captions = read_prompts(ref_cfg.data.heldout_prompts)[:n]
    cond = adapter.encode_prompts(captions)
    eps = adapter.sample_noise(len(captions), ref_cfg.data.resolution, torch.Generator().manual_seed(HELDOUT_SEED))

    def run(cfg, module):
        return lambda: sample_x0(adapter, module, eps, cond, cfg.data.resolution, cfg.rollout.steps, cfg.rollout.shift,
                                 cfg.rollout.guidance, rollout_precision(cfg))

    x_ref, _, ref_s = timed(run(ref_cfg, model), repeats)
    out = {"preset": preset, "samples": len(captions), "reference": {"steps": ref_cfg.rollout.steps, "median_s": ref_s}}
    for name, extra in VARIANTS.items():
        extra = extra if extra is not None else [f"rollout.steps={ref_cfg.rollout.steps // 2}"]
        cfg = load_config(REPO / "configs/tiny.yaml", base + extra)
        torch._dynamo.reset()
        x0, first, median = timed(run(cfg, rollout_model(cfg, model)), repeats)
        per_sample = ((x0 - x_ref).flatten(1).norm(dim=1) / x_ref.flatten(1).norm(dim=1)).tolist()
        out[name] = {"overrides": extra, "first_call_s": first, "median_s": median, "speedup": ref_s / median,
                     "rel_l2": ((x0 - x_ref).norm() / x_ref.norm()).item(), "rel_l2_max_sample": max(per_sample)}
        print(f"{preset:>6} {name:>13}: {median:.2f}s (x{ref_s / median:.2f}; first call {first:.1f}s)  "
              f"x0 moves {out[name]['rel_l2']:.4f} of its norm (worst sample {max(per_sample):.4f})", flush=True)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["tiny", "small"], choices=sorted(PRESETS))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(REPO / "benchmarks/results/rollout_precision.json"))
    args = p.parse_args()
    flags = open("/proc/cpuinfo").read() if Path("/proc/cpuinfo").exists() else ""
    report = {"command": " ".join(sys.argv), "runs": [measure(p, args.repeats) for p in args.presets],
              "host": {"cpus": os.cpu_count(), "machine": platform.machine(), "torch": torch.__version__,
                       "threads": torch.get_num_threads(), "avx512_bf16": "avx512_bf16" in flags,
                       "amx_bf16": "amx_bf16" in flags}}
    write_json_atomic(args.out, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
