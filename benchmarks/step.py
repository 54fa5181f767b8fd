"""Benchmark the SRPO step (both branches, backward, AdamW) and the rollout, single process.

    python benchmarks/step.py [--presets tiny small] [--repeats 5] [--out benchmarks/results/step.json]

tiny: the CPU default preset (64x64). small: a ~60M-parameter FLUX transformer (6 double + 12 single
blocks, width 384) at 256x256 with the full 25-step rollout. Prints and saves median seconds per
step, per rollout, and the process's peak memory (CUDA peak allocation on a GPU, peak RSS on CPU).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from pipeline.config import load_config  # noqa: E402
from pipeline.device import peak_memory_bytes, reset_peak_memory, synchronize  # noqa: E402
from pipeline.tiny import make_tiny_world  # noqa: E402
from pipeline.checkpoint import LocalCheckpoints  # noqa: E402
from pipeline.learner import build_learner  # noqa: E402
from pipeline.sources import InProcessSource  # noqa: E402

PRESETS = {
    "tiny": dict(size="tiny", overrides=[]),
    "small": dict(size="small", overrides=["data.resolution=256", "rollout.steps=25", "train.batch_size=1",
                                           "model.max_sequence_length=64"]),
}


def bench(preset: str, repeats: int, cache: Path) -> dict:
    spec = PRESETS[preset]
    world = make_tiny_world(cache / f"world-{spec['size']}", seed=0, size=spec["size"])
    cfg = load_config(REPO / "configs/tiny.yaml", [
        f"model.path={world['flux']}", f"reward.path={world['hps_checkpoint']}", f"reward.arch={world['hps_arch']}",
        f"data.prompts={REPO / 'configs/prompts/tiny_train.txt'}", "tiny.enabled=false", f"train.max_steps={repeats + 1}", *spec["overrides"]])
    device = torch.device("cpu")
    # The Learner's own stages: inputs (text conditioning + the colocated rollout) and train_step.
    learner = build_learner(cfg, InProcessSource(cfg), LocalCheckpoints(cache / "unused", 1), device=device)
    n_params = sum(p.numel() for p in learner.engine.transformer.parameters())
    batches = learner.source.batches(0)
    learner.train_step(learner.inputs(next(batches), 0), 0)  # warm-up (allocator, lazy inits)
    reset_peak_memory(device)
    rollout_s, step_s = [], []
    for i in range(1, repeats + 1):
        batch = next(batches)
        synchronize(device)
        t0 = time.perf_counter()
        inputs = learner.inputs(batch, i)
        synchronize(device)
        t1 = time.perf_counter()
        learner.srpo.run(inputs.batch, i, inputs.levels)  # both branches, backward, clip, AdamW
        synchronize(device)
        t2 = time.perf_counter()
        rollout_s.append(t1 - t0)
        step_s.append(t2 - t1)
    return {
        "preset": preset, "transformer_params": n_params, "resolution": cfg.data.resolution,
        "batch_size": cfg.train.batch_size, "rollout_steps": cfg.rollout.steps, "repeats": repeats,
        "device": str(device), "median_rollout_s": statistics.median(rollout_s),
        "median_srpo_step_s": statistics.median(step_s), "rollout_s": rollout_s, "srpo_step_s": step_s,
        "peak_memory_bytes": peak_memory_bytes(device),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--presets", nargs="+", default=["tiny", "small"], choices=sorted(PRESETS))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--cache", default=str(REPO / ".cache" / "bench"))
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "step.json"))
    args = p.parse_args()
    results = {"host": {"machine": platform.machine(), "cpus": os.cpu_count(), "torch": torch.__version__,
                        "threads": torch.get_num_threads()}, "runs": []}
    for preset in args.presets:
        # Each preset in a fresh process would isolate peak RSS; in one process the peak is cumulative,
        # so run the presets in increasing size (tiny first).
        r = bench(preset, args.repeats, Path(args.cache))
        results["runs"].append(r)
        print(f"{preset:6s} params {r['transformer_params']/1e6:7.2f}M  {r['resolution']}px  "
              f"rollout {r['median_rollout_s']:.3f}s  srpo step {r['median_srpo_step_s']:.3f}s  "
              f"peak {r['peak_memory_bytes']/2**30:.2f} GiB", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
