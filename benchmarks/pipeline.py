"""What the Ray path costs beside the single process: the same Learner, the same work, one run.

    python benchmarks/pipeline.py [--preset small|tiny] [--steps N] [--set key=value ...] [--skip NAME ...]
                                  [--rounds R] [--out benchmarks/results/pipeline.json]

Configurations (the same global batch, colocated rollout and reward unless named otherwise):
    single          learner.num_workers=0: the Learner in this process (torch's default threads)
    ray-1           Ray Train, 1 worker, learner.strategy=single, learner.num_cpus = the host's cores
    ray-fsdp2-2     Ray Train, 2 FSDP2 workers (gloo), learner.num_cpus = cores / 2 each
    ray-fsdp2-2-gathered the same with learner.fsdp_keep_gathered=true: one all-gather and one
                    reduce-scatter per step instead of one per forward / backward / branch
    ray-fsdp2-2-remote   the same learners with reward.placement=remote, 1 reward actor: the gradient
                    relay's overhead against colocated scoring on the same CPUs

Measured per configuration, from what the Learner logs to MLflow (nothing is timed outside it):
    * per-step wall time: time/step_wall_s (one step: inputs, rollout, SRPO step, publish, metrics);
    * loop time of steps 1..N-1 from samples_per_s (= steps done x global batch / seconds since the
      loop started, so it also holds data waits, logging and checkpoints); step 0 is warm-up;
    * samples/s = (N - 1) x global batch / loop time of steps 1..N-1, and its ratio to single's;
    * the median of each time/* metric over steps 1..N-1.
With --rounds R every configuration runs R times, alternating (all configurations, then all again), and
each run's ratio is taken against the single process of its own round; the summary gives the median
ratio per configuration, so a slow spell of the host shows as a spread, not as one configuration's loss.
Before each configuration the script waits (up to --settle-s) for the host's 1-minute load average
to fall below --settle-load, so that the previous configuration's teardown does not slow the next
one; the load average it started at is recorded: a busy host is reported, not hidden. On a 2-core
CPU host the Ray figures measure orchestration overhead against one process doing the same work,
not GPU scaling.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this file is named pipeline.py: the package must win
for _k, _v in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DIFFUSERS_VERBOSITY": "error",
               "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}.items():
    os.environ.setdefault(_k, _v)

import mlflow  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402

from pipeline.checkpoint import write_json_atomic  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.ray.driver import connect_ray, run_ray  # noqa: E402
from pipeline.runs import run_local  # noqa: E402
from pipeline.sources import global_batch  # noqa: E402
from pipeline.tiny import make_tiny_world  # noqa: E402

PRESETS = {  # the world size and the preset overrides
    "small": ("small", ["data.resolution=256", "rollout.steps=25", "model.max_sequence_length=64"]),
    "tiny": ("tiny", ["data.resolution=64", "rollout.steps=10"]),
}
GLOBAL_BATCH = 2
TIME_KEYS = ("time/step_wall_s", "time/rollout_s", "time/learner_s", "time/reward_wait_s", "time/rollout_wait_s")


def configurations(cores: int) -> dict[str, list[str]]:
    colocated = ["rollout.placement=colocated", "reward.placement=colocated"]
    return {
        "single": ["learner.num_workers=0", f"train.batch_size={GLOBAL_BATCH}", *colocated],
        "ray-1": ["learner.num_workers=1", "learner.strategy=single", f"learner.num_cpus={cores}",
                  f"train.batch_size={GLOBAL_BATCH}", *colocated],
        "ray-fsdp2-2": ["learner.num_workers=2", "learner.strategy=fsdp2", f"learner.num_cpus={max(1, cores // 2)}",
                        f"train.batch_size={GLOBAL_BATCH // 2}", *colocated],
        "ray-fsdp2-2-gathered": ["learner.num_workers=2", "learner.strategy=fsdp2", "learner.fsdp_keep_gathered=true",
                                 f"learner.num_cpus={max(1, cores // 2)}", f"train.batch_size={GLOBAL_BATCH // 2}",
                                 *colocated],
        "ray-fsdp2-2-remote": ["learner.num_workers=2", "learner.strategy=fsdp2",
                               f"learner.num_cpus={max(1, cores // 2)}", f"train.batch_size={GLOBAL_BATCH // 2}",
                               "rollout.placement=colocated", "reward.placement=remote", "reward.num_actors=1",
                               "reward.num_cpus=1"],
    }


def series(result: dict[str, Any], key: str) -> dict[int, float]:
    client = mlflow.MlflowClient(tracking_uri=result["tracking_uri"])
    return {m.step: m.value for m in client.get_metric_history(result["run_id"], key)}


def settle(max_s: float, below: float) -> float:
    """Wait until the 1-minute load average is below ``below`` (at most ``max_s``); seconds waited."""
    t0 = time.perf_counter()
    while os.getloadavg()[0] >= below and time.perf_counter() - t0 < max_s:
        time.sleep(2.0)
    return time.perf_counter() - t0


def measure(name: str, overrides: list[str], base: list[str], root: Path, settle_s: float,
            settle_load: float, round_: int = 0) -> dict[str, Any]:
    cfg = load_config(REPO / "configs/tiny.yaml", base + overrides + [
        f"output.dir={root / f'{name}-{round_}'}", f"log.tracking_uri=sqlite:///{root / 'mlflow.db'}"])
    waited = settle(settle_s, settle_load)
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    result = (run_local if cfg.learner.num_workers == 0 else run_ray)(cfg)
    total_s = time.perf_counter() - t0
    gb, steps = global_batch(cfg), cfg.train.max_steps
    sps = series(result, "samples_per_s")
    elapsed = {k: (k + 1) * gb / v for k, v in sps.items()}  # seconds since the loop started, after step k
    loop_s = elapsed[steps - 1] - elapsed[0]
    medians = {}
    for key in TIME_KEYS:
        values = [v for k, v in series(result, key).items() if k >= 1]
        if values:
            medians[key] = statistics.median(values)
    return {"name": name, "round": round_, "overrides": overrides, "global_batch": gb, "steps": steps,
            "samples_per_s": (steps - 1) * gb / loop_s, "loop_s_steps_1_on": loop_s,
            "median": medians, "run_total_s": total_s, "loadavg_before": load, "settle_wait_s": waited}


def add_ratios(runs: list[dict[str, Any]]) -> None:
    """Each run's samples/s against the single process's of the same round (None without one)."""
    single = {r["round"]: r["samples_per_s"] for r in runs if r["name"] == "single"}
    for r in runs:
        r["ratio_to_single"] = r["samples_per_s"] / single[r["round"]] if r["round"] in single else None


def summary(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per configuration: its samples/s and its ratio to single in every round, and their medians."""
    out: dict[str, dict[str, Any]] = {}
    for r in runs:
        row = out.setdefault(r["name"], {"samples_per_s": [], "ratios": []})
        row["samples_per_s"].append(r["samples_per_s"])
        row["ratios"].append(r["ratio_to_single"])
    for row in out.values():
        row["samples_per_s_median"] = statistics.median(row["samples_per_s"])
        known = [x for x in row["ratios"] if x is not None]
        row["ratio_to_single_median"] = statistics.median(known) if known else None
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="small")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config overrides")
    p.add_argument("--skip", action="append", default=[], help="configuration names to skip")
    p.add_argument("--settle-s", type=float, default=120.0, help="longest wait for the host to go quiet")
    p.add_argument("--settle-load", type=float, default=0.5, help="1-minute load average counted as quiet")
    p.add_argument("--rounds", type=int, default=1,
                   help="run every configuration this many times, alternating: round 1 runs all, then round 2 ...")
    p.add_argument("--out", default=str(REPO / "benchmarks/results/pipeline.json"))
    args = p.parse_args()
    size, preset = PRESETS[args.preset]
    world = make_tiny_world(REPO / ".cache" / "bench" / f"world-{size}", seed=0, size=size)
    base = [f"model.path={world['flux']}", f"reward.path={world['hps_checkpoint']}",
            f"reward.arch={world['hps_arch']}", f"data.prompts={REPO / 'configs/prompts/tiny_train.txt'}",
            "tiny.enabled=false", "train.device=cpu", "log.image_every=0",
            "log.every=1", "log.experiment=bench-pipeline", f"train.max_steps={args.steps}", *preset, *args.set]
    cores = os.cpu_count() or 1
    connect_ray(num_cpus=max(8, 4 * cores))
    root = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    runs = [measure(n, o, base, root, args.settle_s, args.settle_load, i) for i in range(args.rounds)
            for n, o in configurations(cores).items() if n not in args.skip]
    ray.shutdown()
    add_ratios(runs)
    report = {"command": " ".join(sys.argv), "preset": args.preset, "base_overrides": base, "runs": runs,
              "summary": summary(runs),
              "host": {"cpus": cores, "machine": platform.machine(), "torch": torch.__version__,
                       "ray": ray.__version__, "torch_threads_driver": torch.get_num_threads()}}
    write_json_atomic(args.out, report)
    print(json.dumps(report, indent=2))
    for r in runs:
        step_s = r["median"].get("time/step_wall_s", float("nan"))
        ratio = r["ratio_to_single"] or 0
        print(f"{r['name']:>20} round {r['round']}: {r['samples_per_s']:.3f} samples/s  x{ratio:.2f} of single  "
              f"step {step_s:.2f}s  (load before {r['loadavg_before']:.1f})")
    for name, row in report["summary"].items():
        rounds = len(row["ratios"])
        print(f"{name:>20}: median x{row['ratio_to_single_median'] or 0:.2f} of single over {rounds} round(s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
