"""The Ray driver: wires the weight store, reward actors, the Ray Data stream and the learner.

    connect_ray          local cluster (127.0.0.1) or RAY_ADDRESS
    MLflow run           params, config, tags (the driver owns the run; rank 0 logs into it)
    WeightStore          rollout.placement=actors only
    reward workers       per training reward: remote = a fixed actor pool, serve = a Serve deployment
                         (autoscaled; reward.service: shared by runs), colocated = none (gradient relay)
    offline scan         rollout.mode=offline: every image decoded once; skips counted and logged
    build_dataset        prompts -> text embeddings -> [rollout actors]  |  images -> VAE -> text embeddings
                         (a callable: Ray Train rebuilds it from the restored step after a restart)
    TorchTrainer.fit     learner.num_workers x train_loop_per_worker (actors/learner.py), FailureConfig
    export               <output.dir>/transformer/diffusion_pytorch_model.safetensors, logged to MLflow
"""
from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any

import ray
import ray._private.ray_constants as ray_constants
from ray.data import DataContext
from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.util.state import list_actors

from actors.learner import train_loop_per_worker
from actors.priority import work_runtime_env
from actors.reward import start_reward_actors
from actors.reward_serve import delete_apps, deploy_reward, start_serve
from actors.weights import WeightStore
from pipeline.checkpoint import ray_snapshot_step
from pipeline.config import Config, absolute_paths, reward_entries
from pipeline.embeddings import check_compatible
from pipeline.learner import EXPORT_NAME
from pipeline.ray.images import scan_images as scan_images_ray
from pipeline.ray.stream import build_dataset, ingest_options
from pipeline.runs import check_resumable, close_run, log_image_scan, open_run


# A local cluster's own background, which on a small host competes with the learner's threads: Ray
# keeps up to one idle worker process per logical CPU (each polling), and its log monitor re-lists
# every log file 10 times a second while there are fewer than 1000. Measured on 2 cores, an idle
# cluster after a Ray Data run: 0.21 cores by default, 0.13 with these
# (benchmarks/ray_background.py). Read by the raylet at start; a cluster joined through RAY_ADDRESS
# keeps its own settings. Every Ray worker process also wakes its main thread 100 times a second, and
# idle helpers slow a learner beside them (benchmarks/ray_wakeups.py), so a local cluster starts no
# helper it cannot use: Ray Train's preemption watcher polls for node drains, which one machine never has.
QUIET_LOCAL_CLUSTER = {
    "RAY_num_workers_soft_limit": "1",          # idle workers above 1 exit (they start again on demand)
    "RAY_prestart_worker_first_driver": "0",    # and none are started ahead of any task
    "RAY_LOG_MONITOR_MANY_FILES_THRESHOLD": "0",  # re-list log files every 0.5 s, not every 0.1 s
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",  # no PreemptionWatcher actor per run
}


# The dashboard (state API) URL of the cluster this process joined, from ray.init ("" when it has
# none). Asked by address: left to auto-detect, the state API reads /tmp/ray/ray_current_cluster,
# which names the last `ray start` cluster on this machine (often long gone), and retries its GCS for 40 s.
_DASHBOARD = {"url": ""}


def connect_ray(num_cpus: int | None = None, runtime_env: dict[str, Any] | None = None) -> None:
    """Join the cluster named by RAY_ADDRESS (e.g. under `ray job submit`) or start a local one.

    A local cluster gets more logical CPUs than cores: Ray Train reserves its workers' CPUs and
    Ray Data would otherwise have none left for its actor pools on a small machine. It listens on
    127.0.0.1 only: Ray binds every interface unless it believes it runs on a laptop, a switch read
    at import time, so it is set both in the environment (for the raylet and workers) and on the
    constants module (for this process).
    """
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        _remember_dashboard(ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True,
                                     runtime_env=runtime_env))
        return
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    # address="local": always a new cluster. Without it ray.init attaches to any cluster that
    # `ray start` left on this machine (/tmp/ray/ray_current_cluster), with other resources.
    # A dashboard on 127.0.0.1 and a free port: Ray Train's placement-group cleaner asks the state API
    # whether the run is alive. Without a dashboard it falls back to localhost:8265, where another
    # cluster's dashboard may answer "no" (and tear the live run down) or nothing does (a warning a second).
    # The cleaner must also be told where that dashboard is: left to auto-detect, it fails ("Found
    # multiple active Ray instances") when other clusters run on the host, and its thread dies
    # silently. The raylet and every worker inherit the address from this environment at init; this
    # process's own value is restored so later Ray clients it starts are not redirected.
    for key, value in QUIET_LOCAL_CLUSTER.items():  # the user's own settings win
        os.environ.setdefault(key, value)
    port = _free_port()
    previous = os.environ.get("RAY_API_SERVER_ADDRESS")
    os.environ.setdefault("RAY_API_SERVER_ADDRESS", f"http://127.0.0.1:{port}")
    try:
        ctx = ray.init(address="local", num_cpus=num_cpus or max(8, os.cpu_count() or 1), include_dashboard=True,
                       dashboard_host="127.0.0.1", dashboard_port=port, log_to_driver=True,
                       runtime_env=_local_runtime_env(runtime_env))
        _remember_dashboard(ctx)
    finally:
        if previous is None:
            os.environ.pop("RAY_API_SERVER_ADDRESS", None)


def _remember_dashboard(ctx) -> None:
    _DASHBOARD["url"] = f"http://{ctx.dashboard_url}" if ctx.dashboard_url else ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _local_runtime_env(runtime_env: dict[str, Any] | None) -> dict[str, Any]:
    """Actors load models with transformers / diffusers, whose per-load progress bars would
    interleave with the step lines; the user's own settings win."""
    env = dict(runtime_env or {})
    quiet = {k: os.environ.get(k, v) for k, v in {"HF_HUB_DISABLE_PROGRESS_BARS": "1",
                                                   "TRANSFORMERS_VERBOSITY": "error",
                                                   "DIFFUSERS_VERBOSITY": "error"}.items()}
    env["env_vars"] = {**quiet, **env.get("env_vars", {})}
    return env


def required_cpus(cfg: Config) -> float:
    """Logical CPUs a local run needs (learners + actor pools + one text-embedding actor)."""
    n = cfg.learner.num_workers * cfg.learner.num_cpus + cfg.rollout.num_cpus
    if cfg.rollout.mode == "offline" or cfg.rollout.placement == "actors":
        n += cfg.rollout.num_actors * cfg.rollout.num_cpus
    for _, r in reward_entries(cfg):
        if r.placement == "remote":
            n += r.num_actors * r.num_cpus
        elif r.placement == "serve":  # room for the largest deployment
            n += r.autoscaling.max_replicas * r.num_cpus
    return n


def _dataset_factory(cfg: Config, store, storage: str, ray_run_name: str, images):
    """The training dataset as a callable: Ray Train calls it whenever it (re)starts the learner
    group, so a restarted group reads from the step of the checkpoint it restores instead of
    regenerating every earlier sample."""
    def make():
        # Runs in the Train controller's process: its DataContext, not the driver's, decides whether
        # Ray Data prints progress (bars, or every 10 s without a terminal) between the step lines.
        DataContext.get_current().enable_progress_bars = False
        return build_dataset(cfg, store, start_step=ray_snapshot_step(storage, ray_run_name), images=images)

    return make


def _start_actors(cfg: Config, loop_config: dict[str, Any], run_tag: str) -> tuple[list[Any], list[str]]:
    """The weight store (rollout actors) and every training reward's workers: actors of the Ray actors
    to kill at the end, and the Serve applications this run owns (a shared service is left running).
    ``loop_config["reward_workers"]``: per reward, None (colocated), its actor handles, or its app name."""
    actors: list[Any] = []
    if cfg.rollout.mode == "online" and cfg.rollout.placement == "actors":
        loop_config["store"] = ray.remote(WeightStore).options(num_cpus=0, max_restarts=0).remote()
        actors.append(loop_config["store"])
    workers: list[Any] = []
    apps: list[str] = []
    for where, r in reward_entries(cfg):
        if r.placement == "remote":
            workers.append(start_reward_actors(cfg, r))
            actors.extend(workers[-1])
        elif r.placement == "serve":
            start_serve()
            name, owned = deploy_reward(cfg, r, where, run_tag)
            workers.append(name)
            apps.extend([name] if owned else [])
        else:
            workers.append(None)
    loop_config["reward_workers"] = workers
    return actors, apps


def _trainer(cfg: Config, loop_config: dict[str, Any], storage: str, ray_run_name: str, images) -> TorchTrainer:
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=cfg.learner.num_workers, use_gpu=cfg.learner.use_gpu,
                                     resources_per_worker={"CPU": cfg.learner.num_cpus}),
        run_config=RunConfig(name=ray_run_name, storage_path=storage,
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
                             failure_config=FailureConfig(max_failures=cfg.train.max_failures),
                             worker_runtime_env=work_runtime_env()),
        datasets={"train": _dataset_factory(cfg, loop_config.get("store"), storage, ray_run_name, images)},
        dataset_config=DataConfig(execution_options=ingest_options()),
    )


def run_ray(cfg: Config, resume: str | Path | None = None) -> dict[str, Any]:
    """Train on Ray. ``resume``: a run folder of an earlier (stopped or failed) run to continue:
    same Ray Train run name (Ray restores its latest registered checkpoint), same MLflow run."""
    if cfg.learner.num_workers < 1:
        raise ValueError("learner.num_workers: the Ray pipeline needs >= 1 learner worker")
    cfg = absolute_paths(cfg)  # Ray workers do not run in this directory
    if cfg.data.prompt_embeddings and cfg.rollout.mode == "online":
        check_compatible(cfg.data.prompt_embeddings, cfg)  # same encoder, complete: before any cluster work
    previous = check_resumable(cfg, resume, ray_run=True)
    connect_ray(num_cpus=int(max(8, required_cpus(cfg) + 2)))
    run = open_run(cfg, previous, ray_run=True)
    ray_run_name, storage = run.info["ray_run_name"], run.info["storage_path"]
    status, actors, apps = "FAILED", [], []
    try:
        images = None
        if cfg.rollout.mode == "offline":
            scan = scan_images_ray(cfg.data.images, cfg.data.resolution, cfg.data.min_image_size,
                                   cfg.data.max_image_pixels)
            images = log_image_scan(scan, run.tracker)
        loop_config: dict[str, Any] = {
            "cfg": cfg.to_dict(), "mlflow_run_id": run.tracker.run_id, "tracking_uri": run.info["tracking_uri"],
            "fault": {k: v for k, v in os.environ.items() if k.startswith("SRPO_FAULT_")},
        }
        actors, apps = _start_actors(cfg, loop_config, run.tracker.run_id[:8])
        result = _trainer(cfg, loop_config, storage, ray_run_name, images).fit()
        _wait_for_train_cleanup()
        status = "FINISHED"
        return {"run_id": run.tracker.run_id, "tracking_uri": run.info["tracking_uri"],
                "export": run.storage.uri(EXPORT_NAME), "run_dir": run.storage.uri(),
                "checkpoint": result.checkpoint.path if result.checkpoint else None}
    finally:
        close_run(run, status)
        delete_apps(apps)
        for a in actors:
            try:
                ray.kill(a)
            except Exception:  # noqa: BLE001 - best-effort clean-up of our own actors
                pass


def _wait_for_train_cleanup(timeout_s: float = 10.0) -> None:
    """Ray Train's detached placement-group cleaner polls the state API about once a second until the
    controller stops it; a local cluster torn down under a poll prints a GCS traceback. Wait (briefly)
    until it has gone. Only on a cluster whose dashboard this process knows (see _DASHBOARD)."""
    address = _DASHBOARD["url"]
    if not address:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            alive = list_actors(address=address, timeout=5,
                                filters=[("class_name", "=", "PlacementGroupCleaner"), ("state", "=", "ALIVE")])
        except Exception:  # noqa: BLE001 - the state API is best effort here; nothing depends on it
            return
        if not alive:
            return
        time.sleep(0.5)
