"""What Ray's worker niceness does to a learner: one Ray Train worker at niceness 15 (Ray's default) and
at 0 (the work's niceness, actors/priority.py), against the single process, alternated.

    python benchmarks/ray_niceness.py [--pairs 2] [--steps 6] [--out benchmarks/results/ray_niceness.json]

Each round runs, on the small preset (59.6M, 256 px, 25 rollout steps, global batch 2, colocated
rollout and reward), the single-process learner, then Ray Train with 1 worker
(``learner.strategy=single``, ``learner.num_cpus`` = the host's cores) with its processes at niceness
15, then at 0. Measured per run:
    * the median time/step_wall_s of steps 1..N-1 (from MLflow) and its ratio to the round's single run;
    * preemption: over a window in the middle of the run, the involuntary context switches per second
      (``nonvoluntary_ctxt_switches`` in /proc/<pid>/task/<tid>/status) of the learner's compute threads
      (the threads that used more than half a core in the window), and their niceness.
The host's speed drifts by up to 25% over minutes (this 2-core VM), so ratios are taken within a
round; the switch rates do not depend on the host's speed.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
for _k, _v in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DIFFUSERS_VERBOSITY": "error",
               "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}.items():
    os.environ.setdefault(_k, _v)

import mlflow  # noqa: E402
import psutil  # noqa: E402
import ray  # noqa: E402

from actors import priority  # noqa: E402
from pipeline.checkpoint import write_json_atomic  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.ray.driver import connect_ray, run_ray  # noqa: E402
from pipeline.runs import run_local  # noqa: E402
from pipeline.tiny import make_tiny_world  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def thread_sample(pid: int) -> dict[int, tuple[float, int, int]]:
    """tid -> (CPU seconds, involuntary context switches, niceness) of every thread of ``pid``."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = task.joinpath("stat").read_text().rsplit(")", 1)[1].split()
            status = task.joinpath("status").read_text()
        except FileNotFoundError:  # a thread that ended meanwhile
            continue
        switches = int(status.split("nonvoluntary_ctxt_switches:")[1].split()[0])
        out[int(task.name)] = ((int(stat[11]) + int(stat[12])) / TICK, switches, int(stat[16]))
    return out


def preemption(pid_of, start_s: float, window_s: float) -> dict[str, Any]:
    """Involuntary switches/s of the compute threads of the process ``pid_of()`` names, over
    ``window_s`` seconds starting ``start_s`` seconds from now."""
    deadline = time.monotonic() + start_s
    pid = None
    while pid is None or time.monotonic() < deadline:
        pid = pid_of() or pid
        if pid is None and time.monotonic() > deadline + 300:  # never hang on a process that did not start
            raise RuntimeError(f"no learner process found within {start_s + 300:.0f} s")
        time.sleep(0.5)
    before = thread_sample(pid)
    time.sleep(window_s)
    after = thread_sample(pid)
    busy = [t for t in after if t in before and (after[t][0] - before[t][0]) / window_s > 0.5]
    rates = [(after[t][1] - before[t][1]) / window_s for t in busy]
    return {"compute_threads": len(busy), "involuntary_switches_per_s": rates,
            "niceness": sorted({after[t][2] for t in busy}), "window_s": window_s, "start_s": start_s}


def train_worker_pid() -> int | None:
    for p in psutil.Process().children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(p.cmdline()):
                return p.pid
        except psutil.Error:
            continue
    return None


def run(cfg, pid_of, start_s: float, window_s: float) -> dict[str, Any]:
    found: dict[str, Any] = {}
    sampler = threading.Thread(target=lambda: found.update(preemption(pid_of, start_s, window_s)), daemon=True)
    sampler.start()
    result = (run_local if cfg.learner.num_workers == 0 else run_ray)(cfg)
    sampler.join()
    client = mlflow.MlflowClient(tracking_uri=result["tracking_uri"])
    steps = [m.value for m in client.get_metric_history(result["run_id"], "time/step_wall_s") if m.step >= 1]
    return {"step_wall_s": statistics.median(steps), **found}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=2)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--start-s", type=float, default=40.0, help="seconds from a run's start to its window")
    p.add_argument("--window-s", type=float, default=20.0)
    p.add_argument("--out", default=str(REPO / "benchmarks/results/ray_niceness.json"))
    args = p.parse_args()
    world = make_tiny_world(REPO / ".cache" / "bench" / "world-small", seed=0, size="small")
    root = Path(tempfile.mkdtemp(prefix="bench-niceness-"))
    cores = os.cpu_count() or 1
    base = [f"model.path={world['flux']}", f"reward.path={world['hps_checkpoint']}",
            f"reward.arch={world['hps_arch']}", f"data.prompts={REPO / 'configs/prompts/tiny_train.txt'}",
            "tiny.enabled=false", "train.device=cpu", "log.image_every=0", "log.every=1",
            f"train.max_steps={args.steps}", "data.resolution=256", "rollout.steps=25", "model.max_sequence_length=64",
            "train.batch_size=2", "rollout.placement=colocated", "reward.placement=colocated",
            f"log.tracking_uri=sqlite:///{root / 'mlflow.db'}"]
    ray_1 = ["learner.num_workers=1", "learner.strategy=single", f"learner.num_cpus={cores}"]
    connect_ray(num_cpus=max(8, 4 * cores))
    rounds = []
    for i in range(args.pairs):
        row = {}
        for name, niceness in (("single", None), ("ray-1-niceness-15", "15"), ("ray-1-niceness-0", "0")):
            overrides = ["learner.num_workers=0"] if niceness is None else ray_1
            cfg = load_config(REPO / "configs/tiny.yaml", base + overrides + [f"output.dir={root / f'{name}-{i}'}"])
            if niceness is not None:  # the runtime_env every work process of this run starts with
                priority.WORK_NICENESS["RAY_worker_niceness"] = niceness
            row[name] = run(cfg, os.getpid if niceness is None else train_worker_pid, args.start_s, args.window_s)
        for name in row:
            row[name]["ratio_to_single"] = row["single"]["step_wall_s"] / row[name]["step_wall_s"]
        rounds.append(row)
    ray.shutdown()
    report = {"command": " ".join(sys.argv), "cpus": cores, "rounds": rounds,
              "ratio_to_single_median": {n: statistics.median(r[n]["ratio_to_single"] for r in rounds)
                                         for n in rounds[0]}}
    write_json_atomic(args.out, report)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
