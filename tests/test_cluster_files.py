"""The cluster launcher file is valid and keeps the security defaults."""
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def test_ray_cluster_yaml():
    c = yaml.safe_load((REPO / "ray_cluster.yaml").read_text())
    assert c["head_node_type"] in c["available_node_types"]
    gpu = [n for n, t in c["available_node_types"].items() if n != c["head_node_type"]]
    assert gpu and c["available_node_types"][gpu[0]]["max_workers"] * 8 >= 32  # room for the 32-GPU recipe
    assert any("pip install -e ~/srpo-ray" in cmd for cmd in c["setup_commands"])
    assert any("/mnt/shared" in cmd for cmd in c["setup_commands"])
    head = " ".join(c["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "RAY_AUTH_MODE=token" in head
    # README: a CPU head (no GPU, no tasks), up to 4 nodes of 8 GPUs, token auth on every node.
    head_type = c["available_node_types"][c["head_node_type"]]
    assert head_type["resources"] == {"CPU": 0} and head_type["max_workers"] == 0
    assert head_type["node_config"]["InstanceType"] == "m6i.4xlarge"  # an AWS general-purpose (CPU) type
    (gpu_type,) = [c["available_node_types"][n] for n in gpu]
    assert gpu_type["max_workers"] == 4 and c["max_workers"] == 4
    assert gpu_type["node_config"]["InstanceType"] == "p5.48xlarge"  # 8 x H100 per node
    workers = c["worker_start_ray_commands"]
    assert workers and all("RAY_AUTH_MODE=token" in cmd for cmd in workers)


def test_local_cluster_runs_with_the_quiet_settings(ray_local):
    """connect_ray's local cluster: the raylet was started with QUIET_LOCAL_CLUSTER in its environment
    (what it reads at start), and Ray kept at most that many idle workers once idle (1 s after work)."""
    import time

    import ray
    from ray._private import ray_constants

    from pipeline.ray.driver import QUIET_LOCAL_CLUSTER

    node = ray._private.worker._global_node
    (raylet,) = node.all_processes[ray_constants.PROCESS_TYPE_RAYLET]
    environ = Path(f"/proc/{raylet.process.pid}/environ").read_text().split("\0")
    env = dict(kv.split("=", 1) for kv in environ if "=" in kv)
    assert {k: env.get(k) for k in QUIET_LOCAL_CLUSTER} == QUIET_LOCAL_CLUSTER
    assert QUIET_LOCAL_CLUSTER["RAY_num_workers_soft_limit"] == "1"
    ray.get([ray.remote(lambda: 1).remote() for _ in range(4)])  # workers exist, then go idle
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        idle = [p for p in Path("/proc").iterdir()  # this cluster's: the raylet starts its workers
                if p.name.isdigit() and _cmdline(p).startswith("ray::IDLE") and _ppid(p) == raylet.process.pid]
        if len(idle) <= 1:
            break
        time.sleep(0.5)
    assert len(idle) <= 1, f"{len(idle)} idle Ray workers (Ray's default keeps up to one per logical CPU)"


def _ppid(proc: Path) -> int:
    try:
        return int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def _cmdline(proc: Path) -> str:
    try:
        return (proc / "cmdline").read_text().replace("\0", " ")
    except OSError:
        return ""


def test_end_of_run_wait_asks_this_clusters_dashboard_not_the_last_ray_start(ray_local, monkeypatch):
    """run_ray waits for Ray Train's placement-group cleaner through the state API of the cluster this
    process joined (its loopback dashboard), by address. Left to auto-detect, the state API reads
    /tmp/ray/ray_current_cluster (the last `ray start` on the machine, e.g. tests/test_ray_job.py's, long
    gone) and retried that dead GCS for 40 s at the end of every run. Without a known dashboard it asks
    nothing."""
    import ray
    import ray.dashboard.utils as dashboard_utils

    import pipeline.ray.driver as driver

    def auto_detect(*args, **kwargs):
        raise AssertionError("the state API auto-detected a cluster")

    asked, real = [], driver.list_actors

    def spy(**kwargs):
        try:
            got = real(**kwargs)
        except Exception as e:  # noqa: BLE001 - the driver swallows it; the test must not
            got = e
        asked.append((kwargs["address"], type(got).__name__))
        return got

    monkeypatch.setattr(dashboard_utils, "ray_address_to_api_server_url", auto_detect)
    monkeypatch.setattr(driver, "list_actors", spy)
    driver._wait_for_train_cleanup(timeout_s=30)
    url = ray._private.worker.global_worker.node.address_info["webui_url"]
    assert asked and set(asked) == {(f"http://{url}", "list")}  # answered (no cleaner alive: one query)
    asked.clear()
    monkeypatch.setitem(driver._DASHBOARD, "url", "")
    driver._wait_for_train_cleanup(timeout_s=30)
    assert asked == []
