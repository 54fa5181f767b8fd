"""The CPU a local Ray cluster takes while it does nothing, with Ray's defaults and with srpo's settings.

    python benchmarks/ray_background.py [--idle-s 60] [--out benchmarks/results/ray_background.json]

On a 2-core host the learner's threads share the cores with Ray's own processes (raylet, GCS,
dashboard, log monitor, idle workers, Ray Data's coordinators), so what those take while a run
trains is taken from the step. For each variant a fresh process starts a cluster with
``connect_ray`` (the product's local cluster), runs a small Ray Data pipeline and three actors (so
the coordinators and log files of a real run exist), waits 20 s, then reads every process's CPU
time from /proc before and after ``--idle-s`` seconds of idling. Variants:

    ray-defaults   Ray's own settings (QUIET_LOCAL_CLUSTER overridden back to Ray's defaults)
    srpo           connect_ray as shipped (pipeline.ray.driver.QUIET_LOCAL_CLUSTER)

Reported: background cores (CPU seconds of all processes / wall seconds) and the ten largest.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.checkpoint import write_json_atomic  # noqa: E402
from pipeline.ray.driver import QUIET_LOCAL_CLUSTER  # noqa: E402

RAY_DEFAULTS = {"RAY_num_workers_soft_limit": "-1", "RAY_prestart_worker_first_driver": "1",
                "RAY_LOG_MONITOR_MANY_FILES_THRESHOLD": "1000", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "1"}
assert set(RAY_DEFAULTS) == set(QUIET_LOCAL_CLUSTER), "keep the defaults beside the settings they undo"
VARIANTS = {"ray-defaults": RAY_DEFAULTS, "srpo": {}}


def cpu_seconds() -> dict[str, tuple[float, str]]:
    """pid -> (user + system CPU seconds, command line) of every process, from /proc (100 Hz ticks)."""
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            cmd = Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ").strip()
        except OSError:  # the process ended between the listing and the read
            continue
        fields = stat.rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        out[pid] = ((int(fields[11]) + int(fields[12])) / ticks, cmd[:80] or stat.split("(")[1].split(")")[0])
    return out


def child(idle_s: float) -> dict:
    """One variant, in this (fresh) process: the environment was set by the parent."""
    import ray

    from pipeline.ray.driver import connect_ray

    connect_ray(num_cpus=8)
    ray.data.range(64).map_batches(lambda b: b, batch_size=8).take_all()
    actors = [ray.remote(num_cpus=0)(_Pinger).remote() for _ in range(3)]
    ray.get([a.ping.remote() for a in actors])
    for a in actors:
        ray.kill(a)
    time.sleep(20)
    before, t0 = cpu_seconds(), time.perf_counter()
    time.sleep(idle_s)
    after, wall = cpu_seconds(), time.perf_counter() - t0
    ray.shutdown()
    used = sorted(((after[p][0] - before[p][0], after[p][1]) for p in after if p in before), reverse=True)
    return {"idle_s": wall, "background_cores": sum(u for u, _ in used) / wall,
            "largest": [{"cpu_s": round(u, 2), "process": name} for u, name in used[:10]]}


class _Pinger:
    def ping(self) -> int:
        return os.getpid()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--idle-s", type=float, default=60.0)
    p.add_argument("--out", default=str(REPO / "benchmarks/results/ray_background.json"))
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.idle_s)))
        return 0
    results = {}
    for name, env in VARIANTS.items():
        proc = subprocess.run([sys.executable, __file__, "--child", f"--idle-s={args.idle_s}"],
                              env={**os.environ, **env}, capture_output=True, text=True, check=True)
        results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    report = {"command": " ".join(sys.argv), "cpus": os.cpu_count(), "variants": results,
              "settings": QUIET_LOCAL_CLUSTER}
    write_json_atomic(args.out, report)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
