"""Reward-bound throughput of a reward deployment on Ray Serve: 1, 2 and 4 replicas, and autoscaling 1 -> 4.

    python benchmarks/reward_serve.py [--sleep 0.5] [--clients 8] [--requests 32] [--repeat 3] [--max-ongoing 1]
                                      [--out benchmarks/results/reward_serve.json]

The reward is tests/sleepy_reward.py: the tiny world's real HPS reward (decode with the frozen VAE,
SRP, backward to the latents) plus a fixed sleep per request, so that a request costs wall time and
no CPU: the figures measure how Serve spreads requests over replicas, not this host's 2 cores.
``--clients`` learner-like clients (threads of this process) each loop over the real relay call,
``ServeReward.surrogate`` (submit the detached x0_hat, collect dLoss/dx0_hat), until ``--requests``
requests are answered; every answer is checked against the same request scored in this process.

Configurations (``reward.placement=serve``, half a CPU per replica, ``reward.max_ongoing_requests`` =
``--max-ongoing``, 1 by default as in the config):
    fixed-1, fixed-2, fixed-4   min_replicas = max_replicas = N
    autoscale-1-4               min 1, max 4, target_ongoing_requests 1, upscale_delay_s 1,
                                downscale_delay_s 5, metrics every 0.5 s over 2 s; 2x the requests
Measured: requests/s over the whole configuration (first submit to last answer), its ratio to fixed-1
and to an ideal replica that never idles (1 / (sleep + the request's compute time on one thread,
measured here)); for autoscaling also the replica count over time and the requests/s once it had 4.
Each try of a configuration runs in its own process on a fresh local cluster; ``--repeat`` rounds of
all four, the median try reported (every try's requests/s is in the JSON). Writes the JSON and a PNG
plot beside it (``--out`` with .png).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # the test-only sleeping reward
for _k, _v in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DIFFUSERS_VERBOSITY": "error",
               "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}.items():
    os.environ.setdefault(_k, _v)

import ray  # noqa: E402
import torch  # noqa: E402
from ray import serve  # noqa: E402

from actors.reward import RewardWorker  # noqa: E402
from actors.reward_serve import DEPLOYMENT, ServeReward, deploy_reward, start_serve  # noqa: E402
from pipeline.config import AutoscalingConfig, load_config  # noqa: E402
from pipeline.direct_align import plan_branches  # noqa: E402
from pipeline.ray.driver import connect_ray  # noqa: E402
from pipeline.srpo_step import grid_from_config, request_for  # noqa: E402
from pipeline.tiny import make_tiny_world  # noqa: E402
from sleepy_reward import SLEEP, SleepyRewardWorker  # noqa: E402


def configurations(requests: int) -> dict[str, tuple[AutoscalingConfig, int]]:
    fixed = {f"fixed-{n}": (AutoscalingConfig(min_replicas=n, max_replicas=n), requests) for n in (1, 2, 4)}
    auto = AutoscalingConfig(min_replicas=1, max_replicas=4, target_ongoing_requests=1.0, upscale_delay_s=1.0,
                             downscale_delay_s=5.0, metrics_interval_s=0.5, look_back_period_s=2.0)
    return {**fixed, "autoscale-1-4": (auto, 2 * requests)}


def relay_inputs(cfg) -> tuple[tuple[torch.Tensor, Any, torch.Tensor], float]:
    """One branch's detached x0_hat [2, L, C] and request, the dLoss/dx0_hat this process computes, and
    the median seconds of that computation on one thread (what a replica adds to its sleep)."""
    worker = RewardWorker.from_config(cfg)
    x0_hat = worker.adapter.sample_noise(2, cfg.data.resolution, torch.Generator().manual_seed(0))
    plan = plan_branches(grid_from_config(cfg.srpo, cfg.rollout.shift), [300, 700], "Detail", "Anime")[0]
    req = request_for(plan, ["a cat", "a dog"], cfg.srpo)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        grad, _ = worker.loss_grad(x0_hat, req)
        times.append(time.perf_counter() - t0)
    torch.set_num_threads(threads)
    return (x0_hat, req, grad), sorted(times)[len(times) // 2]


def measure(name: str, cfg, autoscaling: AutoscalingConfig, requests: int, clients: int, sleep_s: float,
            max_ongoing: int, inputs: tuple) -> dict[str, Any]:
    """Deploy the sleeping reward with ``autoscaling``, answer ``requests`` relay calls from ``clients``
    threads, delete it; requests/s, the replica count over time and every answer's time."""
    entry = dataclasses.replace(cfg.reward, autoscaling=autoscaling, num_cpus=0.5,
                                max_ongoing_requests=max_ongoing, runtime_env={"env_vars": {SLEEP: str(sleep_s)}})
    app, _ = deploy_reward(cfg, entry, "reward", run_tag=name, worker_cls=SleepyRewardWorker)
    x0_hat, req, expected = inputs
    load = os.getloadavg()[0]
    left, lock, done, timeline, stop = [requests], threading.Lock(), [], [], threading.Event()
    mismatches = [0]

    def client():
        relay = ServeReward(serve.get_app_handle(app))
        while True:
            with lock:
                if left[0] == 0:
                    return
                left[0] -= 1
            leaf = x0_hat.clone().requires_grad_(True)
            surrogate, _ = relay.surrogate(leaf, req)
            (grad,) = torch.autograd.grad(surrogate, leaf)
            with lock:
                done.append(time.perf_counter())
                mismatches[0] += int(not torch.allclose(grad, expected, rtol=1e-4, atol=1e-7))

    def watch():
        while not stop.is_set():
            states = serve.status().applications[app].deployments[DEPLOYMENT].replica_states
            timeline.append((time.perf_counter(), states.get("RUNNING", 0)))
            time.sleep(0.25)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = max(done) - t0
    stop.set()
    watcher.join()
    serve.delete(app)
    result = {"name": name, "autoscaling": dataclasses.asdict(autoscaling), "requests": requests, "clients": clients,
              "wall_s": wall, "requests_per_s": requests / wall, "mismatched_gradients": mismatches[0],
              "loadavg_before": load,
              "replicas_over_time": [(round(t - t0, 2), n) for t, n in timeline],
              "done_at_s": [round(t - t0, 3) for t in sorted(done)]}
    full = [t for t, n in timeline if n >= autoscaling.max_replicas]
    if autoscaling.min_replicas != autoscaling.max_replicas and full:
        after = [t for t in done if t >= full[0]]  # answers once every replica was up
        if len(after) > 1:
            result["requests_per_s_at_max_replicas"] = (len(after) - 1) / (after[-1] - after[0])
            result["seconds_to_max_replicas"] = full[0] - t0
    return result


def median_try(tries: list[dict[str, Any]]) -> dict[str, Any]:
    """The try with the median requests/s, plus every try's requests/s."""
    ordered = sorted(tries, key=lambda t: t["requests_per_s"])
    out = dict(ordered[len(ordered) // 2])
    out["requests_per_s_tries"] = [t["requests_per_s"] for t in tries]
    if any("requests_per_s_at_max_replicas" in t for t in tries):
        out["reached_max_replicas_tries"] = ["requests_per_s_at_max_replicas" in t for t in tries]
    return out


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = report["runs"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    names = [r["name"] for r in runs]
    ax1.bar(names, [r["speedup_vs_fixed_1"] for r in runs], color=["#888", "#5a8", "#386", "#c73"])
    for x, r in enumerate(runs):
        ax1.text(x, r["speedup_vs_fixed_1"], f"{r['speedup_vs_fixed_1']:.2f}x\n{r['requests_per_s']:.2f}/s",
                 ha="center", va="bottom", fontsize=8)
    for goal, n in ((1.8, "goal at 2"), (3.2, "goal at 4")):
        ax1.axhline(goal, ls=":", color="k", lw=0.8)
        ax1.text(-0.45, goal, n, fontsize=7, va="bottom")
    ax1.set_ylabel("throughput vs 1 replica")
    ax1.set_ylim(0, 1.2 * max(r["speedup_vs_fixed_1"] for r in runs))
    ax1.set_title(f"sleeping reward ({report['sleep_s']} s/request), {report['clients']} clients, "
                  f"max_ongoing_requests {report['max_ongoing_requests']}", fontsize=9)
    auto = next(r for r in runs if r["name"] == "autoscale-1-4")
    ts, ns = zip(*auto["replicas_over_time"])
    ax2.step(ts, ns, where="post", label="running replicas")
    ax2b = ax2.twinx()
    ax2b.plot(auto["done_at_s"], range(1, len(auto["done_at_s"]) + 1), color="#c73", label="answered requests")
    ax2.set_xlabel("seconds")
    ax2.set_ylabel("running replicas")
    ax2b.set_ylabel("answered requests")
    ax2.set_title("autoscaling 1 -> 4")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def one_configuration(args, name: str, part: Path) -> int:
    """``--only NAME``: one configuration on a fresh local cluster, its result written to ``part``."""
    world = make_tiny_world(REPO / ".cache" / "bench" / "world-tiny", seed=0)
    cfg = load_config(REPO / "configs/tiny.yaml", [
        f"model.path={world['flux']}", f"reward.path={world['hps_checkpoint']}", f"reward.arch={world['hps_arch']}",
        "tiny.enabled=false", "train.device=cpu", "reward.placement=serve"])
    auto, n = configurations(args.requests)[name]
    # Ray first: with torch.set_num_threads called in this process before ray.init (relay_inputs),
    # Serve never scaled the deployment up in 3 tries out of 3; after ray.init it did (not understood).
    connect_ray(num_cpus=8)
    start_serve()
    inputs, compute_s = relay_inputs(cfg)
    result = measure(name, cfg, auto, n, args.clients, args.sleep, args.max_ongoing, inputs)
    result["compute_s_per_request"] = compute_s
    part.write_text(json.dumps(result))
    ray.shutdown()
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sleep", type=float, default=0.5, help="seconds each reward request sleeps")
    p.add_argument("--clients", type=int, default=8, help="concurrent learner-like clients")
    p.add_argument("--requests", type=int, default=32, help="requests per fixed configuration")
    p.add_argument("--repeat", type=int, default=3, help="tries of each configuration (the median is reported)")
    p.add_argument("--max-ongoing", type=int, default=1, help="reward.max_ongoing_requests of every replica")
    p.add_argument("--out", default=str(REPO / "benchmarks/results/reward_serve.json"))
    p.add_argument("--only", help=argparse.SUPPRESS)  # internal: one configuration, in a subprocess
    p.add_argument("--part", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.only:
        return one_configuration(args, args.only, Path(args.part))
    tries: dict[str, list[dict[str, Any]]] = {name: [] for name in configurations(args.requests)}
    with tempfile.TemporaryDirectory() as tmp:
        # Each try in its own process and local cluster: no handle, router or replica of an earlier one
        # is left (after three deployments in one process, Ray 2.60 did not scale a fourth up). Rounds
        # of every configuration, so that a change in the host's load touches all of them alike.
        for round_ in range(args.repeat):
            for name in tries:
                part = Path(tmp) / f"{name}-{round_}.json"
                subprocess.run([sys.executable, __file__, "--only", name, "--part", str(part),
                                "--sleep", str(args.sleep), "--clients", str(args.clients),
                                "--requests", str(args.requests), "--max-ongoing", str(args.max_ongoing)])
                if not part.exists():  # written before Ray shuts down (which may exit non-zero)
                    sys.exit(f"configuration {name} failed: no result")
                tries[name].append(json.loads(part.read_text()))
    runs = [median_try(t) for t in tries.values()]
    compute_s = statistics.median(t["compute_s_per_request"] for ts in tries.values() for t in ts)
    base = runs[0]["requests_per_s"]
    ideal = 1.0 / (args.sleep + compute_s)  # one replica that never idles between requests
    for r in runs:
        r["speedup_vs_fixed_1"] = r["requests_per_s"] / base
        r["speedup_vs_ideal_1"] = r["requests_per_s"] / ideal
    report = {"command": " ".join(sys.argv), "sleep_s": args.sleep, "clients": args.clients, "repeat": args.repeat,
              "compute_s_per_request": compute_s, "ideal_one_replica_per_s": ideal,
              "max_ongoing_requests": args.max_ongoing, "runs": runs,
              "goal": {"fixed-2": 1.8, "fixed-4": 3.2},
              "host": {"cpus": os.cpu_count(), "machine": platform.machine(), "torch": torch.__version__,
                       "ray": ray.__version__}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_name(out.name + ".tmp")
    tmp_out.write_text(json.dumps(report, indent=1))
    tmp_out.replace(out)
    plot(report, out.with_suffix(".png"))
    for r in runs:
        extra = (f"  at 4 replicas {r['requests_per_s_at_max_replicas']:.2f}/s after {r['seconds_to_max_replicas']:.1f} s"
                 if "requests_per_s_at_max_replicas" in r else "")
        tries = ", ".join(f"{v:.2f}" for v in r["requests_per_s_tries"])
        print(f"{r['name']:>14}: {r['requests_per_s']:.2f} requests/s (tries {tries})  x{r['speedup_vs_fixed_1']:.2f} "
              f"(x{r['speedup_vs_ideal_1']:.2f} of an ideal replica)  "
              f"wrong gradients {r['mismatched_gradients']}  (load before {r['loadavg_before']:.1f}){extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
