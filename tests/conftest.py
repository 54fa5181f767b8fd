"""Shared fixtures: one tiny world per test session, written by the same code as `srpo make-tiny`."""
from __future__ import annotations

import ipaddress
import os
from pathlib import Path

import psutil
import pytest

# Nothing may reach a hub; keep logs readable.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory) -> dict[str, str]:
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    from pipeline.tiny import make_tiny_world

    return make_tiny_world(tmp_path_factory.mktemp("tiny-world"), seed=0)


@pytest.fixture(scope="session")
def tiny_qwen_world(tiny_world) -> dict[str, str]:
    """The session's tiny world plus its tiny Qwen-Image folder (``qwen_image``), written on first request only
    (sessions that never ask pay nothing), by the same code as `srpo make-tiny DIR --family qwen_image`."""
    from pipeline.tiny import make_tiny_world

    return make_tiny_world(Path(tiny_world["flux"]).parent, seed=0, families=("qwen_image",))


def tiny_scorers(w: dict[str, str]) -> str:
    """An eval.scorers override naming every reward model of the tiny world ``w`` (configs/tiny.yaml names
    the ones `srpo make-tiny` writes under .cache/srpo-tiny, which a clean clone does not have)."""
    return (f"eval.scorers=[{{kind: hpsv2, path: {w['hps_checkpoint']}, arch: {w['hps_arch']}}}, "
            f"{{kind: pickscore, path: {w['pickscore']}}}, {{kind: clip, path: {w['clip']}}}, "
            f"{{kind: aesthetic, path: {w['aesthetic']}, clip_path: {w['clip']}}}]")


def world_overrides(tiny_world: dict[str, str], out_dir: Path) -> list[str]:
    """Overrides that point configs/tiny.yaml at a tiny world and an output dir."""
    root = Path(tiny_world["flux"]).parent
    return [
        f"tiny.dir={root}", f"model.path={tiny_world['flux']}",
        f"reward.path={tiny_world['hps_checkpoint']}", f"reward.arch={tiny_world['hps_arch']}",
        f"data.prompts={REPO / 'configs/prompts/tiny_train.txt'}",
        f"data.heldout_prompts={REPO / 'configs/prompts/tiny_heldout.txt'}",
        f"output.dir={out_dir}",
        # A store per test, beside its run (the product's default is mlflow.db in the working directory).
        f"log.tracking_uri=sqlite:///{out_dir / 'mlflow.db'}",
        tiny_scorers(tiny_world),
    ]


@pytest.fixture()
def tiny_overrides(tiny_world, tmp_path) -> list[str]:
    """Overrides that point configs/tiny.yaml at the session's tiny world and a fresh output dir."""
    return world_overrides(tiny_world, tmp_path / "run")


@pytest.fixture()
def tiny_cfg(tiny_overrides):
    from pipeline.config import load_config

    def make(*extra: str):
        return load_config(REPO / "configs/tiny.yaml", tiny_overrides + list(extra))

    return make


def non_loopback_listeners() -> list[tuple[int, str, str, int]]:
    """Listening sockets of this process and of every process it started (a local Ray cluster's
    processes are its children) bound to anything but loopback: (pid, name, address, port)."""
    me = psutil.Process()
    out = []
    for proc in [me, *me.children(recursive=True)]:
        try:
            conns, name = proc.net_connections(kind="inet"), proc.name()
        except psutil.Error:  # a process that exited meanwhile
            continue
        for c in conns:
            if c.status != psutil.CONN_LISTEN:
                continue
            ip = ipaddress.ip_address(c.laddr.ip.split("%")[0])
            mapped = getattr(ip, "ipv4_mapped", None)
            if not (ip.is_loopback or (mapped is not None and mapped.is_loopback)):
                out.append((proc.pid, name, c.laddr.ip, c.laddr.port))
    return out


def cluster_processes(title: str) -> list[int]:
    """Processes of this session's local cluster (descendants of this process; another Ray cluster on the
    machine, a user's run or another test session, is left alone) whose command line holds ``title``."""
    pids = []
    for p in psutil.Process().children(recursive=True):
        try:
            if title in " ".join(p.cmdline()):
                pids.append(p.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return sorted(pids)


def thread_niceness(pids: list[int], main_only: bool = False) -> set[int]:
    """The niceness values of every thread (or the main thread) of ``pids``: field 19 of
    /proc/<pid>/task/<tid>/stat. A thread or process that ended while being read is skipped."""
    stats = [Path(f"/proc/{pid}/stat") for pid in pids] if main_only else [
        t / "stat" for pid in pids if Path(f"/proc/{pid}/task").is_dir() for t in Path(f"/proc/{pid}/task").iterdir()]
    values = set()
    for stat in stats:
        try:
            values.add(int(stat.read_text().rsplit(")", 1)[1].split()[16]))
        except FileNotFoundError:
            continue
    return values


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray cluster for the session, started by the product's own connect_ray: 8 logical
    CPUs on 2 cores (Train reserves its workers' CPUs; Ray Data needs some for its actor pools),
    bound to 127.0.0.1, its dashboard on a free loopback port."""
    import ray

    from pipeline.ray.driver import connect_ray

    connect_ray(num_cpus=8, runtime_env={"env_vars": {
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "DIFFUSERS_VERBOSITY": "error",
        # After a learner is killed, Ray Train waits this long for the survivors' process group to shut
        # down (default 30 s; they are blocked in a collective with the dead rank).
        "TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S": "5"}})
    assert ray.util.get_node_ip_address() == "127.0.0.1"
    # The dashboard (Ray Train's state-API target) listens on loopback only, on a free port.
    url = ray._private.worker.global_worker.node.address_info["webui_url"]
    assert url.startswith("127.0.0.1:") and not url.endswith(":8265"), url
    # Nothing of the cluster (GCS, raylet, dashboard and its agents, a worker that ran a task) listens
    # on another interface.
    assert ray.get(ray.remote(num_cpus=0)(lambda: os.getpid()).remote()) != os.getpid()
    assert non_loopback_listeners() == []
    yield ray
    ray.shutdown()


# Colocated rollout and reward: nothing asynchronous, so a step's inputs are a function of the
# restored state alone (the actor placements are exercised by test_ray_pipeline). Noise is not
# shared across ranks, so the samples of a step are the same whatever the number of learners.
RESUME_COMMON = ("rollout.placement=colocated", "reward.placement=colocated", "train.checkpoint_every=2",
                 "train.keep_checkpoints=1", "log.image_every=0", "rollout.share_noise_across_ranks=false")


def run_losses(run_id: str, tracking_uri: str, key: str = "loss") -> dict[int, list[float]]:
    """Every logged value of ``key`` per step (a step logged twice after a restart has two)."""
    from mlflow.tracking import MlflowClient

    out: dict[int, list[float]] = {}
    for m in MlflowClient(tracking_uri).get_metric_history(run_id, key):
        out.setdefault(m.step, []).append(m.value)
    return out


def run_weights(run_dir: Path):
    from safetensors.torch import load_file

    return load_file(str(Path(run_dir) / "transformer" / "diffusion_pytorch_model.safetensors"))


@pytest.fixture(scope="session")
def fsdp2_reference_run(ray_local, tiny_world, tmp_path_factory):
    """4 uninterrupted steps of 2 FSDP2 learners (batch 2 each) through the real Ray Train worker
    function: the reference of the resume tests and of the single-process parity test."""
    from pipeline.config import load_config
    from pipeline.ray.driver import run_ray

    out = tmp_path_factory.mktemp("uninterrupted")
    cfg = load_config(REPO / "configs/tiny.yaml", world_overrides(tiny_world, out) + [
        *RESUME_COMMON, "train.max_steps=4", "learner.num_workers=2", "learner.strategy=fsdp2",
        "train.batch_size=2"])
    result = run_ray(cfg)
    losses = run_losses(result["run_id"], result["tracking_uri"])
    assert sorted(losses) == [0, 1, 2, 3] and all(len(v) == 1 for v in losses.values())
    return {k: v[0] for k, v in losses.items()}, run_weights(out)
