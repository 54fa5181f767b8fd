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
