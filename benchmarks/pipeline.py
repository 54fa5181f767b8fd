"""Throughput of the single-process trainer against the Ray pipeline, in one process and one Ray cluster.

    python benchmarks/pipeline.py [--preset small|tiny] [--steps N] [--rollout-steps S] [--resolution R]
                                  [--batch-size B] [--set key=value ...] [--skip NAME ...]
                                  [--quiet-wait S] [--retries N] [--out benchmarks/results/pipeline.json]

Configurations (same global batch everywhere, = train.batch_size per learner x 2 learners):
    single          SRPOTrainer.fit in this process, train.batch_size = global batch
    ray-colocated   learner.num_workers=2 (fsdp2), rollout.placement=colocated, reward.placement=colocated
    ray-remote-xN   the same learners, reward.placement=remote, reward.num_actors=N for N in 1, 2, 4

What is measured and how:
    * Every configuration runs ``--steps`` optimizer steps; step 0 is warm-up (allocator, lazy inits,
      Ray Data start-up, the first FSDP collectives) and is discarded. Model loading never counts.
    * samples/s = (steps - 1) * global_batch / (wall time of steps 1..steps-1).
      - single: the wall time is taken with time.perf_counter() in SRPOTrainer.fit's on_step callback.
      - Ray: the learner logs ``samples_per_s = (step + 1) * global_batch / elapsed_step`` to MLflow, with
        ``elapsed_step`` a perf_counter on rank 0 since the loop started. It is inverted to recover
        ``elapsed_step`` exactly (float64 in the sqlite store), and the wall time of steps 1.. is
        ``elapsed_last - elapsed_0``. The logged final-step samples_per_s (which includes the warm-up
        step) is kept in the JSON as ``samples_per_s_logged_final`` for reference, and the MLflow
        timestamps of the ``loss`` metric give an independent (millisecond) cross-check.
    * Time split: the median over steps 1.. of each time/* metric the run logged (per-rank means, as the
      learner reduces them). ``learner_s`` contains ``reward_wait_s`` (remote reward) or the reward
      compute itself (colocated). ``other_s`` = per-step wall time minus rollout_wait + rollout + learner:
      the learner's no-grad rollout scoring (score_many; the single trainer does not do it), the metric
      all-reduce, MLflow logging and ray.train.report.
    * Rollout images are not logged (log.image_every=0): that is logging cost, not pipeline throughput.
    * The work per step is not quite identical: the Ray learner also scores its rollouts (score_many,
      one no-grad decode + reward per step, in ``other_s``) and gets its text embeddings from a Ray Data
      actor, while the single trainer encodes prompts inside its rollout.
    * Shared hosts: a CpuMonitor records the cores used by this benchmark's processes ("own") and by
      everybody else's ("foreign") during steps 1..; before each configuration the script waits up to
      --quiet-wait seconds for the host to go quiet. A run with foreign load is reported, flagged on
      the plot, not hidden. Under contention the single trainer (torch's 2 OpenMP threads, which spin
      and wait on each other) degrades far more than 1-thread Ray workers do.

Isolation from other Ray clusters on the same host (see isolate_ray_cluster): the script's cluster keeps
its session files in a private RAY_TMPDIR (so ray.init never joins somebody else's `ray start` cluster)
and points the state API at an address where nothing listens (so Ray Train's PlacementGroupCleaner
cannot mistake another cluster's dashboard on localhost:8265 for ours and tear down a live run).

Caveat, and the reason to read the Ray numbers with care: on a CPU-only host with 2 cores (the machine
this was written on) the two learner workers, the text-embedding actor and the reward actors all share
the same 2 cores (Ray gives each worker OMP_NUM_THREADS=1; the single-process trainer uses torch's
default thread count). The Ray figures therefore measure the pipeline's orchestration overhead
(process boundaries, object store, gradient relay, FSDP2 collectives over gloo) against one process
doing the same work, NOT how the pipeline scales on GPUs, where each learner and reward actor would own
a device. More reward actors cannot help when there are no idle cores to run them.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# REPO ahead of this script's own folder (sys.path[0]): this file is itself named pipeline.py, and
# `import pipeline.config` must find the package. Ray copies this order to its workers.
sys.path.insert(0, str(REPO))
# Nothing may reach a hub; keep the output to the benchmark's own lines where possible.
for _k, _v in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DIFFUSERS_VERBOSITY": "error",
               "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}.items():
    os.environ.setdefault(_k, _v)

import torch  # noqa: E402

from pipeline.config import Config, load_config  # noqa: E402
from pipeline.sources import global_batch  # noqa: E402
from pipeline.tiny import make_tiny_world  # noqa: E402

# Mirrors benchmarks/step.py's presets (kept here so this script does not import another benchmark
# that is edited independently). ``small``: ~60M-parameter FLUX transformer at 256x256, 25 rollout steps,
# one prompt per learner; ``tiny``: configs/tiny.yaml as is (64x64, 10 rollout steps, 2 per learner).
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"size": "tiny", "overrides": []},
    "small": {"size": "small", "overrides": ["data.resolution=256", "rollout.steps=25", "train.batch_size=1",
                                             "model.max_sequence_length=64"]},
}

NUM_LEARNERS = 2
REWARD_ACTOR_COUNTS = (1, 2, 4)
RAY_LOGICAL_CPUS = 16  # more logical CPUs than cores: Train reserves its workers', Ray Data needs some too

# What every Ray configuration shares: two FSDP2 learners that roll out themselves; 1 logical CPU for
# each learner, the text-embedding actor (rollout.num_cpus) and each reward actor, so the largest
# configuration asks for 2 + 1 + 4 = 7 of the 16 logical CPUs.
RAY_COMMON = [f"learner.num_workers={NUM_LEARNERS}", "learner.strategy=fsdp2", "learner.num_cpus=1",
              "rollout.placement=colocated", "rollout.num_cpus=1", "reward.num_cpus=1"]

TIME_KEYS = ("time/rollout_wait_s", "time/rollout_s", "time/learner_s", "time/reward_wait_s",
             "time/weight_sync_s", "time/weight_publish_s")


def ray_configurations() -> list[tuple[str, list[str]]]:
    """(name, overrides) of the Ray runs, in the order they are run."""
    runs = [("ray-colocated", RAY_COMMON + ["reward.placement=colocated"])]
    for n in REWARD_ACTOR_COUNTS:
        runs.append((f"ray-remote-x{n}", RAY_COMMON + ["reward.placement=remote", f"reward.num_actors={n}"]))
    return runs


# --------------------------------------------------------------------------------------- host


def isolate_ray_cluster() -> dict[str, str]:
    """Environment that keeps this script's local Ray cluster apart from any other on the host.

    Two things leak between Ray clusters on one machine (observed with Ray 2.60 while another Ray
    cluster with a dashboard ran on this host):
    * ``ray.init()`` without an address joins the cluster named in ``$RAY_TMPDIR/ray_current_cluster``
      (written by any ``ray start``), and then refuses ``num_cpus``. connect_ray now passes
      address="local", which prevents that; the private RAY_TMPDIR is kept as a second guard and keeps
      this run's session logs apart from everybody else's.
    * Ray Train V2's PlacementGroupCleaner polls the state API for the controller actor; without a
      dashboard (connect_ray starts none) it falls back to http://localhost:8265. If another cluster's
      dashboard answers there, it reports our controller "not found", the cleaner takes that for dead
      and removes the live run's placement group, killing the learners mid-run. RAY_API_SERVER_ADDRESS
      pointing at a closed port makes every poll fail, which the cleaner tolerates ("continuing to
      monitor"); it only matters when a controller dies ungracefully, and the cluster is shut down at
      the end of the script anyway.
    Both are set in os.environ before ray.init (inherited by the raylet and every worker) and returned
    for the job's runtime_env as well.
    """
    # Short path: Ray's unix sockets live below it and socket paths are limited to ~107 bytes.
    tmp = tempfile.mkdtemp(prefix="srb-ray-", dir="/tmp")
    env = {"RAY_TMPDIR": tmp, "RAY_API_SERVER_ADDRESS": "http://127.0.0.1:9"}  # port 9 (discard): closed
    os.environ.update(env)
    return env


class CpuMonitor:
    """CPU used during a measurement, split into this process tree's and everybody else's.

    The host may be shared (other people's test suites ran on this 2-core machine while this was
    written), and a benchmark that loses half its cores to a stranger is not measuring the pipeline.
    A thread samples every process's CPU time once a second; "ours" are this process and its
    descendants (the Ray raylet and all its workers). A process first seen after the start is counted
    from 0 (it was born during the run); CPU spent by a process that lives less than one interval is
    missed, so the foreign figure is a lower bound.
    """

    def __init__(self, interval_s: float = 1.0) -> None:
        import threading

        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="cpu-monitor", daemon=True)
        self._first: dict[tuple[int, float], float] = {}
        self._last: dict[tuple[int, float], float] = {}
        self._ours: set[tuple[int, float]] = set()
        self._t0 = 0.0
        self._wall0 = 0.0
        # (unix time, cumulative CPU-seconds of ours, of foreign processes) per sample, so that the
        # steady-state window (steps after the first) can be cut out afterwards.
        self.series: list[tuple[float, float, float]] = []

    def _sample(self) -> None:
        import psutil

        me = psutil.Process(os.getpid())
        try:
            ours = {me.pid} | {c.pid for c in me.children(recursive=True)}
        except psutil.Error:
            ours = {me.pid}
        for proc in psutil.process_iter(["pid", "create_time", "cpu_times"]):
            info = proc.info
            if info["cpu_times"] is None or info["create_time"] is None:
                continue
            key = (info["pid"], info["create_time"])
            cpu = info["cpu_times"].user + info["cpu_times"].system
            if key not in self._first:
                self._first[key] = 0.0 if info["create_time"] > self._wall0 else cpu
            self._last[key] = cpu
            if info["pid"] in ours:
                self._ours.add(key)
        own = sum(self._last[k] - self._first[k] for k in self._ours)
        total = sum(self._last[k] - self._first[k] for k in self._last)
        self.series.append((time.time(), own, total - own))

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> "CpuMonitor":
        self._t0, self._wall0 = time.perf_counter(), time.time()
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        self.wall_s = time.perf_counter() - self._t0

    def result(self, start: float | None = None, end: float | None = None) -> dict[str, float]:
        """Average busy cores, ours and foreign (other users' processes), over the samples inside
        [start, end] (unix seconds; the whole run where the window holds fewer than two samples)."""
        inside = [x for x in self.series if (start is None or x[0] >= start) and (end is None or x[0] <= end)]
        if len(inside) < 2:
            inside = self.series
        (t_a, own_a, for_a), (t_b, own_b, for_b) = inside[0], inside[-1]
        span = max(t_b - t_a, 1e-9)
        return {"own_cores": (own_b - own_a) / span, "foreign_cores": (for_b - for_a) / span, "window_s": span}


def wait_for_quiet(max_wait_s: float, threshold_cores: float, window_s: float = 3.0) -> dict[str, float]:
    """Wait (at most max_wait_s) until the host's busy cores drop below threshold_cores.

    Starting a measurement while somebody else's job saturates the cores gives numbers about their
    job; a short wait often lets it finish. Returns what was seen, for the JSON.
    """
    t0 = time.perf_counter()
    while True:
        b0 = host_cpu_busy_s()
        time.sleep(window_s)
        busy = (host_cpu_busy_s() - b0) / window_s
        waited = time.perf_counter() - t0
        if busy < threshold_cores or waited >= max_wait_s:
            return {"host_busy_cores_before": busy, "quiet_wait_s": waited}


def host_cpu_busy_s() -> float:
    """CPU-seconds the whole host has been busy (all processes, /proc/stat): compared with the run's
    wall time it shows whether something else shared the cores during a measurement."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError):
        return float("nan")
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def host_info() -> dict[str, Any]:
    cpu_model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    import ray

    return {
        "machine": platform.machine(), "platform": platform.platform(), "cpu_model": cpu_model,
        "cpus": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)), "mem_gib": mem_gib,
        "python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__,
        "torch_threads_driver": torch.get_num_threads(), "cuda": torch.cuda.is_available(),
    }


def ray_worker_threads() -> dict[str, Any]:
    """What a 1-CPU Ray worker sees (Ray sets OMP_NUM_THREADS from the worker's CPU request)."""
    import ray

    @ray.remote(num_cpus=1)
    def probe() -> dict[str, Any]:
        import torch as _torch

        return {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "torch_threads": _torch.get_num_threads()}

    return ray.get(probe.remote())


# --------------------------------------------------------------------------------------- configs


def cli_overrides(args: argparse.Namespace) -> list[str]:
    """The command line's departures from the preset (e.g. fewer rollout steps to fit the machine)."""
    out = []
    if args.rollout_steps is not None:
        out.append(f"rollout.steps={args.rollout_steps}")
    if args.resolution is not None:
        out.append(f"data.resolution={args.resolution}")
    if args.batch_size is not None:
        out.append(f"train.batch_size={args.batch_size}")
    return out + list(args.set)


def base_overrides(args: argparse.Namespace, world: dict[str, str]) -> list[str]:
    """World paths, preset and CLI overrides: identical for every configuration."""
    return [f"model.path={world['flux']}", f"reward.path={world['hps_checkpoint']}",
            f"reward.arch={world['hps_arch']}", f"data.prompts={REPO / 'configs/prompts/tiny_train.txt'}",
            "tiny.enabled=false", "train.device=cpu", "log.image_every=0", "log.every=1",
            "log.experiment=bench-pipeline", *PRESETS[args.preset]["overrides"], f"train.max_steps={args.steps}",
            *cli_overrides(args)]


def run_summary(cfg: Config) -> dict[str, Any]:
    """The fields that define a configuration's cost, for the table and the JSON."""
    return {
        "learner.num_workers": cfg.learner.num_workers, "learner.strategy": cfg.learner.strategy,
        "rollout.placement": cfg.rollout.placement, "reward.placement": cfg.reward.placement,
        "reward.num_actors": cfg.reward.num_actors if cfg.reward.placement == "remote" else 0,
        "train.batch_size": cfg.train.batch_size, "global_batch": global_batch(cfg),
        "train.max_steps": cfg.train.max_steps, "data.resolution": cfg.data.resolution,
        "rollout.steps": cfg.rollout.steps, "train.mixed_precision": cfg.train.mixed_precision,
    }


# --------------------------------------------------------------------------------------- (a) single process


def bench_single(base: list[str], ray_per_device_batch: int) -> dict[str, Any]:
    """SRPOTrainer.fit with the Ray runs' global batch in one process; per-step perf_counter."""
    from pipeline.trainer import SRPOTrainer

    gb = ray_per_device_batch * NUM_LEARNERS
    out_dir = tempfile.mkdtemp(prefix="single-")
    # The trainer is single-process and colocated by construction; saying so in the config keeps the
    # recorded summary (and global_batch) truthful whatever the preset's Ray defaults are.
    cfg = load_config(REPO / "configs/tiny.yaml", base + [
        f"train.batch_size={gb}", f"output.dir={out_dir}", "learner.num_workers=0",
        "rollout.placement=colocated", "reward.placement=colocated"])
    torch.manual_seed(cfg.seed)
    t_load = time.perf_counter()
    trainer = SRPOTrainer(cfg)
    load_s = time.perf_counter() - t_load
    ends: list[float] = []
    splits: list[dict[str, float]] = []

    unix_ends: list[float] = []

    def on_step(m: Any) -> None:
        ends.append(time.perf_counter())
        unix_ends.append(time.time())
        splits.append(dict(getattr(m, "timings", {}) or {}))

    with CpuMonitor() as mon:
        busy0, t0 = host_cpu_busy_s(), time.perf_counter()
        trainer.fit(cfg.train.max_steps, on_step=on_step)
        host_busy = (host_cpu_busy_s() - busy0) / (time.perf_counter() - t0)
    walls = [ends[0] - t0] + [b - a for a, b in zip(ends, ends[1:])]
    steady = walls[1:]
    split = {k: statistics.median(s[k] for s in splits[1:]) for k in ("time/rollout_s", "time/learner_s")}
    other = [w - s["time/rollout_s"] - s["time/learner_s"] for w, s in zip(walls[1:], splits[1:])]
    split["other_s"] = statistics.median(other)
    result = {
        "name": "single", "config": run_summary(cfg) | {"torch_threads": torch.get_num_threads()},
        "samples_per_s": len(steady) * gb / sum(steady), "samples_per_s_method": "perf_counter in fit(on_step)",
        "step_wall_s": walls, "median_step_s": statistics.median(steady), "time_split_median_s": split,
        "load_s": load_s, "transformer_params": sum(p.numel() for p in trainer.transformer.parameters()),
        "host_busy_cores": host_busy, "loadavg_after": os.getloadavg(),
        # Cores busy while steps 1.. ran: ours (this process) and everybody else's.
        "cpu_steady": mon.result(unix_ends[0], unix_ends[-1]), "cpu_whole_run": mon.result(),
    }
    del trainer
    gc.collect()
    shutil.rmtree(out_dir, ignore_errors=True)
    return result


# --------------------------------------------------------------------------------------- (b), (c) Ray


def wait_for_idle_cluster(timeout_s: float = 60.0) -> float:
    """Wait until the previous run's actors have released their CPUs; returns the free CPUs."""
    import ray

    total = ray.cluster_resources().get("CPU", 0.0)
    deadline = time.time() + timeout_s
    free = ray.available_resources().get("CPU", 0.0)
    while free < total and time.time() < deadline:
        time.sleep(0.5)
        free = ray.available_resources().get("CPU", 0.0)
    return free


def metric_series(client: Any, run_id: str, key: str) -> dict[int, tuple[float, int]]:
    """step -> (value, timestamp ms) of one MLflow metric."""
    return {m.step: (m.value, m.timestamp) for m in client.get_metric_history(run_id, key)}


def bench_ray(name: str, base: list[str], extra: list[str], root: Path) -> dict[str, Any]:
    """One run_ray, then samples/s and the time split read back from its MLflow run."""
    import mlflow

    from pipeline.ray.driver import required_cpus, run_ray

    out_dir = root / name
    cfg = load_config(REPO / "configs/tiny.yaml", base + extra + [f"output.dir={out_dir}"])
    free = wait_for_idle_cluster()
    need = required_cpus(cfg)
    if need > free:
        raise RuntimeError(f"{name}: needs {need} logical CPUs, {free} free of {RAY_LOGICAL_CPUS}")
    with CpuMonitor() as mon:
        busy0, t0 = host_cpu_busy_s(), time.perf_counter()
        result = run_ray(cfg)
        run_wall_s = time.perf_counter() - t0
    # Busy cores of the whole host over the whole run (model loading included), all processes.
    host_busy = (host_cpu_busy_s() - busy0) / run_wall_s
    client = mlflow.MlflowClient(tracking_uri=result["tracking_uri"])
    run = client.get_run(result["run_id"])
    if run.info.status != "FINISHED":
        raise RuntimeError(f"{name}: MLflow run ended {run.info.status}")
    gb, steps = global_batch(cfg), cfg.train.max_steps
    sps = metric_series(client, result["run_id"], "samples_per_s")
    if sorted(sps) != list(range(steps)):
        raise RuntimeError(f"{name}: samples_per_s logged for steps {sorted(sps)}, expected 0..{steps - 1}")
    # elapsed_k = (k + 1) * gb / samples_per_s_k: rank 0's perf_counter seconds from the loop start to step k.
    elapsed = [(k + 1) * gb / sps[k][0] for k in range(steps)]
    walls = [elapsed[0]] + [b - a for a, b in zip(elapsed, elapsed[1:])]
    steady_wall = elapsed[-1] - elapsed[0]
    loss_ts = metric_series(client, result["run_id"], "loss")
    ts_wall = (loss_ts[steps - 1][1] - loss_ts[0][1]) / 1000.0
    split: dict[str, float] = {}
    per_step: dict[str, list[float]] = {}
    for key in TIME_KEYS:
        series = metric_series(client, result["run_id"], key)
        vals = [series[k][0] for k in range(1, steps) if k in series]
        if vals:  # weight sync/publish exist only with rollout actors
            split[key.removeprefix("time/")] = statistics.median(vals)
            per_step[key.removeprefix("time/")] = vals
    other = [walls[k] - sum(per_step.get(p, [0.0] * (steps - 1))[k - 1]
                            for p in ("rollout_wait_s", "rollout_s", "learner_s")) for k in range(1, steps)]
    split["other_s"] = statistics.median(other)
    return {
        "name": name, "config": run_summary(cfg) | {"overrides": extra},
        "samples_per_s": (steps - 1) * gb / steady_wall,
        "samples_per_s_method": "(steps-1)*global_batch / (elapsed_last - elapsed_0), elapsed from logged samples_per_s",
        "samples_per_s_logged_final": sps[steps - 1][0],
        "samples_per_s_mlflow_timestamps": (steps - 1) * gb / ts_wall if ts_wall > 0 else None,
        "step_wall_s": walls, "median_step_s": statistics.median(walls[1:]), "time_split_median_s": split,
        "run_wall_s": run_wall_s, "required_cpus": need, "mlflow_run_id": result["run_id"],
        "host_busy_cores": host_busy, "loadavg_after": os.getloadavg(),
        # Cores busy while steps 1.. ran (window from the loss metric's MLflow timestamps): ours (the
        # driver, raylet and every Ray worker) and everybody else's.
        "cpu_steady": mon.result(loss_ts[0][1] / 1000.0, loss_ts[steps - 1][1] / 1000.0),
        "cpu_whole_run": mon.result(),
    }


# --------------------------------------------------------------------------------------- output


SPLIT_ORDER = (  # (JSON key, legend): stacked bottom to top; learner compute excludes the reward wait
    ("rollout_wait_s", "rollout wait"), ("rollout_s", "rollout"), ("learner_compute_s", "learner (excl. reward wait)"),
    ("reward_wait_s", "reward wait"), ("other_s", "other (scoring, logging, report)"),
)


def stacked_parts(r: dict[str, Any]) -> dict[str, float]:
    s = r["time_split_median_s"]
    learner = s.get("learner_s", s.get("time/learner_s", 0.0))
    parts = {"rollout_wait_s": s.get("rollout_wait_s", 0.0),
             "rollout_s": s.get("rollout_s", s.get("time/rollout_s", 0.0)),
             "learner_compute_s": learner - s.get("reward_wait_s", 0.0),
             "reward_wait_s": s.get("reward_wait_s", 0.0), "other_s": s.get("other_s", 0.0)}
    return {k: max(v, 0.0) for k, v in parts.items()}  # medians of different steps need not add up exactly


def print_table(runs: list[dict[str, Any]]) -> str:
    head = (f"{'configuration':16s} {'samples/s':>10s} {'step s':>8s} {'wait':>7s} {'rollout':>8s} "
            f"{'learner':>8s} {'rew.wait':>8s} {'other':>7s} {'vs single':>9s} {'own cores':>9s} {'foreign':>8s}")
    # step s .. other: median seconds per step (steps after the first); learner includes rew.wait;
    # own cores / foreign: CPU cores busy during steps 1.., this benchmark's processes / everybody else's.
    lines = [head, "-" * len(head)]
    base = next((r["samples_per_s"] for r in runs if r["name"] == "single" and "error" not in r), None)
    for r in runs:
        if "error" in r:
            lines.append(f"{r['name']:16s} FAILED: {r['error'].splitlines()[-1][:80]}")
            continue
        p = stacked_parts(r)
        rel = f"{r['samples_per_s'] / base:8.2f}x" if base else "        -"
        learner = p["learner_compute_s"] + p["reward_wait_s"]
        lines.append(f"{r['name']:16s} {r['samples_per_s']:10.4f} {r['median_step_s']:8.3f} {p['rollout_wait_s']:7.3f} "
                     f"{p['rollout_s']:8.3f} {learner:8.3f} {p['reward_wait_s']:8.3f} {p['other_s']:7.3f} {rel} "
                     f"{r['cpu_steady']['own_cores']:9.2f} {r['cpu_steady']['foreign_cores']:8.2f}")
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def plot(runs: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on a build machine
    import matplotlib.pyplot as plt

    ok = [r for r in runs if "error" not in r]
    names = [r["name"] for r in ok]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(15, 5.0))
    bars = ax1.bar(names, [r["samples_per_s"] for r in ok], color="tab:blue")
    # Say on the bar when other users' processes took a noticeable share of the cores meanwhile.
    labels = [f"{r['samples_per_s']:.3f}" + (f"\n(others used {r['cpu_steady']['foreign_cores']:.1f} cores)"
                                            if r["cpu_steady"]["foreign_cores"] >= 0.1 else "") for r in ok]
    ax1.bar_label(bars, labels=labels, fontsize=7)
    ax1.margins(y=0.15)
    ax1.set_ylabel("samples / s (steps after the first)")
    ax1.set_title("throughput")
    bottom = [0.0] * len(ok)
    for key, label in SPLIT_ORDER:
        vals = [stacked_parts(r)[key] for r in ok]
        ax2.bar(names, vals, bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax2.scatter(names, [r["median_step_s"] for r in ok], color="black", marker="_", s=400, zorder=3,
                label="median step wall time")
    ax2.set_ylabel("seconds per step (median over steps after the first)")
    ax2.set_title("time split per step")
    ax2.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: never hides a bar
    for ax in (ax1, ax2):
        ax.tick_params(axis="x", labelrotation=20, labelsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------- main


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small", choices=sorted(PRESETS))
    p.add_argument("--steps", type=int, default=6, help="optimizer steps per configuration (first = warm-up)")
    p.add_argument("--rollout-steps", type=int, default=None, help="override rollout.steps")
    p.add_argument("--resolution", type=int, default=None, help="override data.resolution")
    p.add_argument("--batch-size", type=int, default=None, help="override train.batch_size (per learner)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="further config overrides")
    p.add_argument("--quiet-wait", type=float, default=20.0,
                   help="seconds to wait at most, before each configuration, for the host to go quiet")
    p.add_argument("--quiet-threshold", type=float, default=0.5, help="busy cores below which the host is quiet")
    p.add_argument("--retries", type=int, default=1, help="re-runs of a failed Ray configuration")
    p.add_argument("--skip", nargs="*", default=[], help="configuration names to skip")
    p.add_argument("--cache", default=str(REPO / ".cache" / "bench"))
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "pipeline.json"))
    p.add_argument("--plot", default=None, help="PNG path (default: --out with .png)")
    args = p.parse_args()
    if args.steps < 2:
        p.error("--steps must be >= 2: the first step is warm-up and is discarded")
    t_start = time.perf_counter()
    loadavg_start = os.getloadavg()

    world = make_tiny_world(Path(args.cache) / f"world-{PRESETS[args.preset]['size']}", seed=0,
                            size=PRESETS[args.preset]["size"])
    base = base_overrides(args, world)
    per_device = load_config(REPO / "configs/tiny.yaml", base).train.batch_size
    root = Path(tempfile.mkdtemp(prefix="srpo-bench-pipeline-"))
    runs: list[dict[str, Any]] = []

    # (a) first, before Ray starts, so no idle Ray process shares the cores with it.
    if "single" not in args.skip:
        print(f"[bench] single: SRPOTrainer.fit, global batch {per_device * NUM_LEARNERS}", flush=True)
        quiet = wait_for_quiet(args.quiet_wait, args.quiet_threshold)
        try:
            runs.append(bench_single(base, per_device) | quiet)
        except Exception:  # noqa: BLE001 - one failed configuration must not lose the others
            runs.append({"name": "single", "error": traceback.format_exc()})
            print(runs[-1]["error"], flush=True)

    import ray

    from pipeline.ray.driver import connect_ray

    ray_env = isolate_ray_cluster()
    connect_ray(num_cpus=RAY_LOGICAL_CPUS, runtime_env={"env_vars": ray_env | {
        k: os.environ[k] for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "DIFFUSERS_VERBOSITY",
                                   "TRANSFORMERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS")}})
    host = host_info() | {"ray_logical_cpus": ray.cluster_resources().get("CPU"),
                          "ray_worker_1cpu": ray_worker_threads(), "ray_isolation_env": ray_env,
                          "loadavg_at_start": loadavg_start}
    try:
        for name, extra in ray_configurations():
            if name in args.skip:
                continue
            print(f"[bench] {name}: {' '.join(extra)}", flush=True)
            errors: list[str] = []
            for attempt in range(1 + args.retries):
                # Our own idle cluster (raylet, GCS) takes a little CPU too: allow for it.
                quiet = wait_for_quiet(args.quiet_wait, args.quiet_threshold + 0.3)
                try:
                    r = bench_ray(name, base, extra, root / f"attempt{attempt}") | quiet
                    r["failed_attempts"] = errors  # kept: a retried run is reported, not hidden
                    runs.append(r)
                    break
                except Exception:  # noqa: BLE001 - one failed configuration must not lose the others
                    errors.append(traceback.format_exc())
                    print(errors[-1], flush=True)
            else:
                runs.append({"name": name, "error": errors[-1], "failed_attempts": errors})
    finally:
        ray.shutdown()
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(ray_env["RAY_TMPDIR"], ignore_errors=True)

    total_s = time.perf_counter() - t_start
    print()
    table = print_table(runs)
    cfg0 = load_config(REPO / "configs/tiny.yaml", base)
    title = (f"srpo-ray pipeline, preset {args.preset}: {cfg0.data.resolution}px, {cfg0.rollout.steps} rollout steps, "
             f"global batch {per_device * NUM_LEARNERS}, {args.steps} steps (first discarded); "
             f"{host['cpus']} CPU cores, no GPU: Ray numbers = orchestration overhead, not GPU scaling")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "command": " ".join([Path(sys.executable).name, *sys.argv]), "preset": args.preset,
        "steps": args.steps, "global_batch": per_device * NUM_LEARNERS, "overrides": base,
        # What differs from the preset as defined (e.g. fewer rollout steps so that it fits the machine).
        "deviations_from_preset": cli_overrides(args),
        "host": host, "total_wall_s": total_s, "table": table.splitlines(), "runs": runs,
        "note": "CPU-only host: the Ray configurations share the same cores, so they measure orchestration "
                "overhead (process boundaries, object store, gradient relay, gloo collectives), not GPU scaling.",
    }, indent=2))
    png = Path(args.plot) if args.plot else out.with_suffix(".png")
    plot(runs, png, title)
    print(f"saved {out} and {png} (total {total_s:.0f}s)", flush=True)
    return 1 if any("error" in r for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
