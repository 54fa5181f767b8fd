"""The Ray driver: wires the weight store, reward actors, the Ray Data stream and the learner.

    connect_ray          local cluster (127.0.0.1) or RAY_ADDRESS
    MLflow run           params, config, tags (the driver owns the run; rank 0 logs into it)
    WeightStore          rollout.placement=actors only
    reward actors        reward.placement=remote only (gradient relay)
    offline scan         rollout.mode=offline: every image decoded once; skips counted and logged
    build_dataset        prompts -> text embeddings -> [rollout actors]  |  images -> VAE -> text embeddings
                         (a callable: Ray Train rebuilds it from the restored step after a restart)
    TorchTrainer.fit     learner.num_workers x train_loop_per_worker (actors/learner.py), FailureConfig
    export               <output.dir>/transformer/diffusion_pytorch_model.safetensors, logged to MLflow
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pipeline.config import Config, ConfigError, absolute_paths


def connect_ray(num_cpus: int | None = None, runtime_env: dict[str, Any] | None = None) -> None:
    """Join the cluster named by RAY_ADDRESS (e.g. under `ray job submit`) or start a local one.

    A local cluster gets more logical CPUs than cores: Ray Train reserves its workers' CPUs and
    Ray Data would otherwise have none left for its actor pools on a small machine. It listens on
    127.0.0.1 only: Ray binds every interface unless it believes it runs on a laptop, a switch read
    at import time, so it is set both in the environment (for the raylet and workers) and on the
    constants module (for this process).
    """
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True, runtime_env=runtime_env)
        return
    import ray._private.ray_constants as ray_constants

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

    ray_constants.ENABLE_RAY_CLUSTER = False
    # address="local": always a new cluster. Without it ray.init attaches to any cluster that
    # `ray start` left on this machine (/tmp/ray/ray_current_cluster), with other resources.
    # Without a dashboard, Ray Train's placement-group cleaner asks http://localhost:8265 whether the
    # run is alive; another cluster's dashboard there answers "no" and the live run is torn down.
    # The local cluster's processes (started by ray.init, inheriting this environment) get a closed
    # port (9, discard) unless the user set an address; this process's environment is restored so
    # that later Ray clients it starts (e.g. `ray job submit`) are not affected.
    previous = os.environ.get("RAY_API_SERVER_ADDRESS")
    os.environ.setdefault("RAY_API_SERVER_ADDRESS", "http://127.0.0.1:9")
    try:
        ray.init(address="local", num_cpus=num_cpus or max(8, os.cpu_count() or 1), include_dashboard=False,
                 dashboard_host="127.0.0.1", log_to_driver=True, runtime_env=runtime_env)
    finally:
        if previous is None:
            os.environ.pop("RAY_API_SERVER_ADDRESS", None)


def required_cpus(cfg: Config) -> float:
    """Logical CPUs a local run needs (learners + actor pools + one text-embedding actor)."""
    n = cfg.learner.num_workers * cfg.learner.num_cpus + cfg.rollout.num_cpus
    if cfg.rollout.mode == "offline" or cfg.rollout.placement == "actors":
        n += cfg.rollout.num_actors * cfg.rollout.num_cpus
    if cfg.reward.placement == "remote":
        n += cfg.reward.num_actors * cfg.reward.num_cpus
    return n


def _dataset_factory(cfg: Config, store, storage: str, ray_run_name: str, images):
    """The training dataset as a callable: Ray Train calls it whenever it (re)starts the learner
    group, so a restarted group reads from the step of the checkpoint it restores instead of
    regenerating every earlier sample."""
    def make():
        from pipeline.checkpoint import ray_snapshot_step
        from pipeline.ray.stream import build_dataset

        return build_dataset(cfg, store, start_step=ray_snapshot_step(storage, ray_run_name), images=images)

    return make


def run_ray(cfg: Config, resume: str | Path | None = None) -> dict[str, Any]:
    """Train on Ray. ``resume``: a run folder of an earlier (stopped or failed) run to continue:
    same Ray Train run name (Ray restores its latest registered checkpoint), same MLflow run."""
    import ray
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from actors.learner import train_loop_per_worker
    from pipeline.checkpoint import RUN_FILE, read_run, write_json_atomic
    from pipeline.ray.stream import ingest_options
    from pipeline.tracking import MLflowRun, default_tracking_uri

    if cfg.learner.num_workers < 1:
        raise ValueError("learner.num_workers: the Ray pipeline needs >= 1 learner worker")
    cfg = absolute_paths(cfg)  # Ray workers do not run in this directory
    out = Path(cfg.output.dir).resolve()
    if cfg.data.prompt_embeddings and cfg.rollout.mode == "online":
        from pipeline.embeddings import check_compatible

        check_compatible(cfg.data.prompt_embeddings, cfg)  # same encoder, complete: before any cluster work
    previous = read_run(resume) if resume is not None else None
    if previous is None and (out / RUN_FILE).is_file():
        # A new run in the folder of an old one: both stay in MLflow and under ray/, but run.json (what
        # --resume, export and evaluate read) now names the new run.
        print(f"[srpo] {out} held run {read_run(out).get('run_id')}; starting a new run there", flush=True)
    if previous is not None:
        from pipeline.checkpoint import ray_snapshot_step

        done = ray_snapshot_step(out / "ray", previous["ray_run_name"])
        if done >= cfg.train.max_steps:
            raise ConfigError(f"train.max_steps: the run in {out} has already trained {done} steps; "
                             f"resume with train.max_steps > {done} to train longer")
    images = None
    connect_ray(num_cpus=int(max(8, required_cpus(cfg) + 2)))
    out.mkdir(parents=True, exist_ok=True)
    run = MLflowRun(cfg, resume_run_id=previous["run_id"] if previous else None)
    ray_run_name = previous["ray_run_name"] if previous else f"srpo-{run.run_id[:8]}"
    write_json_atomic(out / RUN_FILE, {"run_id": run.run_id, "tracking_uri": default_tracking_uri(cfg),
                                       "experiment": cfg.log.experiment, "ray_run_name": ray_run_name,
                                       "storage_path": str(out / "ray")})
    (out / "config.yaml").write_text(cfg.to_yaml())
    status = "FAILED"
    actors: list[Any] = []
    try:
        if cfg.rollout.mode == "offline":
            images = _scan_offline_images(cfg, run)
        loop_config: dict[str, Any] = {
            "cfg": cfg.to_dict(), "mlflow_run_id": run.run_id, "tracking_uri": default_tracking_uri(cfg),
            "export_path": str(out / "transformer" / "diffusion_pytorch_model.safetensors"),
            "fault": {k: v for k, v in os.environ.items() if k.startswith("SRPO_FAULT_")},
        }
        store = None
        if cfg.rollout.mode == "online" and cfg.rollout.placement == "actors":
            from actors.weights import WeightStore

            store = ray.remote(WeightStore).options(num_cpus=0, max_restarts=0).remote()
            loop_config["store"] = store
            actors.append(store)
        if cfg.reward.placement == "remote":
            from actors.reward import start_reward_actors

            loop_config["reward_actors"] = start_reward_actors(cfg)
            actors.extend(loop_config["reward_actors"])
        from ray.data import DataContext

        # The learner prints one progress line per step; Ray Data's bars would interleave with it.
        DataContext.get_current().enable_progress_bars = False
        storage = str(out / "ray")
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config=loop_config,
            scaling_config=ScalingConfig(num_workers=cfg.learner.num_workers, use_gpu=cfg.learner.use_gpu,
                                         resources_per_worker={"CPU": cfg.learner.num_cpus}),
            run_config=RunConfig(name=ray_run_name, storage_path=storage,
                                 checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
                                 failure_config=FailureConfig(max_failures=cfg.train.max_failures)),
            datasets={"train": _dataset_factory(cfg, store, storage, ray_run_name, images)},
            dataset_config=DataConfig(execution_options=ingest_options()),
        )
        result = trainer.fit()
        export = Path(loop_config["export_path"])
        if export.is_file():
            run.log_artifact(export, "transformer")
        best = out / "best" / "diffusion_pytorch_model.safetensors"
        if best.is_file():
            run.log_artifact(best, "best")
            run.log_artifact(out / "best" / "best.json", "best")
        status = "FINISHED"
        return {"run_id": run.run_id, "tracking_uri": default_tracking_uri(cfg), "export": str(export),
                "checkpoint": result.checkpoint.path if result.checkpoint else None, "run_dir": str(out)}
    finally:
        run.end(status)
        for a in actors:
            try:
                ray.kill(a)
            except Exception:  # noqa: BLE001 - best-effort clean-up of our own actors
                pass


def _scan_offline_images(cfg: Config, run) -> list:
    """Decode every image once before any learner starts; log what was skipped and why."""
    from pipeline.images import scan_images

    scan = scan_images(cfg.data.images, cfg.data.resolution, cfg.data.min_image_size, use_ray=True)
    run.log_metrics(scan.metrics(), step=0)
    run.log_dict(scan.report(), "data/skipped_images.json")
    counts = {k: v for k, v in scan.counts.items() if v}
    print(f"[srpo] offline data: {len(scan.usable)} usable images, {len(scan.skipped)} skipped {counts}", flush=True)
    return scan.usable
