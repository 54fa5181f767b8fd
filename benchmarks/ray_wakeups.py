"""What idle Ray helper processes cost a CPU-bound learner beside them.

    python benchmarks/ray_wakeups.py [--actors 10] [--pairs 2] [--out benchmarks/results/ray_wakeups.json]

A Ray Train run on a local cluster starts about ten helper actors (Train: controller, synchronization,
placement-group cleaner; Data: split coordinator, dataset manager, stats, autoscaling coordinator,
actor-location tracker), each its own process. Each uses little CPU (benchmarks/ray_background.py),
and the main thread of every Ray worker process wakes about 100 times a second. This measures what
such processes cost a learner at niceness 0 (the driver here; the work's niceness in every Ray
process, actors/priority.py); it does not isolate why (docs/benchmarks.md).

Measured here, in one run on a local cluster:
    * wakeups: voluntary context switches per second of each process's main thread and of all its
      threads, over 10 s, with ``--actors`` idle actors (num_cpus=0) alive;
    * cost: the single-process learner on the small preset (59.6M, 256 px, 25 rollout steps, batch 2,
      colocated rollout and reward, 5 steps) in this process, with 0 and with ``--actors`` idle actors
      alive, alternated ``--pairs`` times; the median time/step_wall_s of steps 1-4 of each run.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
for _k, _v in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DIFFUSERS_VERBOSITY": "error",
               "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}.items():
    os.environ.setdefault(_k, _v)

import mlflow  # noqa: E402
import ray  # noqa: E402

from pipeline.checkpoint import write_json_atomic  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.ray.driver import connect_ray  # noqa: E402
from pipeline.runs import run_local  # noqa: E402
from pipeline.tiny import make_tiny_world  # noqa: E402


@ray.remote(num_cpus=0)
class Idle:
    def pid(self) -> int:
        return os.getpid()


def switches(pid: int) -> tuple[int, int]:
    """(voluntary context switches of the main thread, of all threads) of a process, from /proc."""
    def vol(path: Path) -> int:
        return int(re.search(r"^voluntary_ctxt_switches:\s+(\d+)", path.read_text(), re.M).group(1))

    tasks = Path(f"/proc/{pid}/task")
    return vol(tasks / str(pid) / "status"), sum(vol(t / "status") for t in tasks.iterdir())


def wakeups(pids: list[int], seconds: float = 10.0) -> dict[str, float]:
    before = {p: switches(p) for p in pids}
    time.sleep(seconds)
    after = {p: switches(p) for p in pids}
    main = [(after[p][0] - before[p][0]) / seconds for p in pids]
    every = [(after[p][1] - before[p][1]) / seconds for p in pids]
    return {"main_thread_per_s_median": statistics.median(main), "all_threads_per_s_median": statistics.median(every)}


def step_s(base: list[str], out: Path) -> float:
    result = run_local(load_config(REPO / "configs/tiny.yaml", base + [f"output.dir={out}"]))
    client = mlflow.MlflowClient(tracking_uri=result["tracking_uri"])
    return statistics.median(m.value for m in client.get_metric_history(result["run_id"], "time/step_wall_s")
                             if m.step >= 1)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--actors", type=int, default=10)
    p.add_argument("--pairs", type=int, default=2)
    p.add_argument("--out", default=str(REPO / "benchmarks/results/ray_wakeups.json"))
    args = p.parse_args()
    world = make_tiny_world(REPO / ".cache" / "bench" / "world-small", seed=0, size="small")
    root = Path(tempfile.mkdtemp(prefix="bench-wakeups-"))
    base = [f"model.path={world['flux']}", f"reward.path={world['hps_checkpoint']}",
            f"reward.arch={world['hps_arch']}", f"data.prompts={REPO / 'configs/prompts/tiny_train.txt'}",
            "tiny.enabled=false", "train.device=cpu", "log.image_every=0", "log.every=1", "train.max_steps=5",
            "data.resolution=256", "rollout.steps=25", "model.max_sequence_length=64", "learner.num_workers=0",
            "train.batch_size=2", "rollout.placement=colocated", "reward.placement=colocated",
            f"log.tracking_uri=sqlite:///{root / 'mlflow.db'}"]
    connect_ray(num_cpus=max(8, 2 * args.actors))
    runs: dict[str, list[float]] = {"0": [], str(args.actors): []}
    woke = None
    for i in range(args.pairs):
        runs["0"].append(step_s(base, root / f"none-{i}"))
        actors = [Idle.remote() for _ in range(args.actors)]
        pids = ray.get([a.pid.remote() for a in actors])
        woke = woke or wakeups(pids)
        runs[str(args.actors)].append(step_s(base, root / f"idle-{i}"))
        for a in actors:
            ray.kill(a)
    ray.shutdown()
    medians = {k: statistics.median(v) for k, v in runs.items()}
    report = {"command": " ".join(sys.argv), "cpus": os.cpu_count(), "idle_actors": args.actors,
              "idle_actor_wakeups": woke, "step_wall_s": runs, "step_wall_s_median": medians,
              "slowdown_with_idle_actors": medians[str(args.actors)] / medians["0"]}
    write_json_atomic(args.out, report)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
