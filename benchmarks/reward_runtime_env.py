"""Opt-in check: a reward worker in its own Ray ``runtime_env`` (pip packages the learner lacks).

    python benchmarks/reward_runtime_env.py [--hpsv2] [--out benchmarks/results/reward_runtime_env.json]

Not part of the test suite: Ray builds a virtualenv per pip runtime_env (about 30 s on a 2-core host
for one local wheel, minutes for hpsv2 and its dependencies).

1. probe: a wheel built here (``srpo-env-probe``, offline) goes into ``reward.runtime_env.pip`` of a
   remote reward (``start_reward_actors``, the product's own path). Checked: the reward actor imports
   the package and the driver cannot; the actor's relay gradient (dLoss/dx0_hat of one branch) equals
   the one computed in this process; the driver's MLflow logs and reads back a metric afterwards.
2. ``--hpsv2``: the authors' ``hpsv2`` package (it pins protobuf < 4, which mlflow's environment does
   not allow beside it) in a worker's runtime_env. Checked: the worker starts (Ray itself with the
   older protobuf), imports ``hpsv2`` and its bundled open_clip, and reports the protobuf version it
   got; the driver keeps its own protobuf and MLflow.
Writes a JSON report.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
for _k, _v in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DIFFUSERS_VERBOSITY": "error",
               "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}.items():
    os.environ.setdefault(_k, _v)

import google.protobuf  # noqa: E402
import mlflow  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402

from actors.reward import RewardWorker, start_reward_actors  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.direct_align import plan_branches  # noqa: E402
from pipeline.ray.driver import connect_ray  # noqa: E402
from pipeline.srpo_step import grid_from_config, request_for  # noqa: E402
from pipeline.tiny import make_tiny_world  # noqa: E402

PROBE = "srpo_env_probe"


def probe_wheel(folder: Path) -> Path:
    """A one-module wheel that exists nowhere else, built offline with the venv's setuptools."""
    src = folder / "src"
    (src / PROBE).mkdir(parents=True)
    (src / PROBE / "__init__.py").write_text('__version__ = "1.0"\n')
    (src / "pyproject.toml").write_text('[build-system]\nrequires = ["setuptools>=68"]\n'
                                        'build-backend = "setuptools.build_meta"\n'
                                        '[project]\nname = "srpo-env-probe"\nversion = "1.0"\n')
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(folder / "dist")], check=True)
    return next((folder / "dist").glob("*.whl"))


def in_worker(module: str) -> dict[str, Any]:
    """What a worker process sees (run inside the actor through ``__ray_call__``)."""
    import google.protobuf as pb

    return {"has_module": importlib.util.find_spec(module) is not None, "python": sys.executable,
            "protobuf": pb.__version__, "pid": os.getpid()}


def check_probe(cfg, folder: Path) -> dict[str, Any]:
    wheel = probe_wheel(folder)
    entry = dataclasses.replace(cfg.reward, placement="remote", num_actors=1, num_cpus=0.5,
                                runtime_env={"pip": [str(wheel)]})
    t0 = time.perf_counter()
    (actor,) = start_reward_actors(cfg, entry)
    seen = ray.get(actor.__ray_call__.remote(lambda self: in_worker(PROBE)))
    ready_s = time.perf_counter() - t0
    local = RewardWorker.from_config(cfg)
    x0_hat = local.adapter.sample_noise(2, cfg.data.resolution, torch.Generator().manual_seed(0))
    plan = plan_branches(grid_from_config(cfg.srpo, cfg.rollout.shift), [300, 700], "Detail", "Anime")[0]
    req = request_for(plan, ["a cat", "a dog"], cfg.srpo)
    remote_grad, _ = ray.get(actor.loss_grad.remote(x0_hat, req))
    local_grad, _ = local.loss_grad(x0_hat, req)
    ray.kill(actor)
    return {"worker": seen, "driver_has_module": importlib.util.find_spec(PROBE) is not None,
            "seconds_to_first_answer": ready_s,
            "relay_grad_max_abs_diff": float((remote_grad - local_grad).abs().max()),
            "relay_grad_max_abs": float(local_grad.abs().max()),
            "relay_grad_close": bool(torch.allclose(remote_grad, local_grad, rtol=1e-4, atol=1e-7))}


def check_hpsv2() -> dict[str, Any]:
    """The authors' package in a worker's own environment (the network must reach a package index)."""
    def imports(_self) -> str:
        import hpsv2  # noqa: F401 - the point is whether it imports here
        from hpsv2.src.open_clip import create_model_and_transforms  # noqa: F401

        return hpsv2.__file__

    actor_cls = ray.remote(num_cpus=0.5, runtime_env={"pip": ["hpsv2==1.2.0"]})(type("HPSv2Env", (), {}))
    t0 = time.perf_counter()
    actor = actor_cls.remote()
    out: dict[str, Any] = {"worker": ray.get(actor.__ray_call__.remote(lambda self: in_worker("hpsv2"))),
                           "seconds_to_worker": time.perf_counter() - t0}
    try:
        out["hpsv2_file"] = ray.get(actor.__ray_call__.remote(imports))
        out["imports"] = True
    except Exception as e:  # noqa: BLE001 - the report says what stopped it
        cause = getattr(e, "cause", None) or e  # a RayTaskError carries the worker's exception
        lines = [line for line in str(cause).splitlines() if line.strip()]
        out["imports"], out["error"] = False, f"{type(cause).__name__}: {lines[-1][:500] if lines else ''}"
    ray.kill(actor)
    return out


def check_mlflow(folder: Path) -> dict[str, Any]:
    """The driver's MLflow (and its protobuf) after the workers' environments came and went."""
    client = mlflow.MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    run = client.create_run(client.create_experiment("runtime-env-check"))
    client.log_metric(run.info.run_id, "x", 1.5)
    value = client.get_run(run.info.run_id).data.metrics["x"]
    return {"ok": value == 1.5, "protobuf": google.protobuf.__version__, "mlflow": mlflow.__version__}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hpsv2", action="store_true", help="also install the hpsv2 package in a worker's env")
    p.add_argument("--out", default=str(REPO / "benchmarks/results/reward_runtime_env.json"))
    args = p.parse_args()
    world = make_tiny_world(REPO / ".cache" / "bench" / "world-tiny", seed=0)
    cfg = load_config(REPO / "configs/tiny.yaml", [
        f"model.path={world['flux']}", f"reward.path={world['hps_checkpoint']}", f"reward.arch={world['hps_arch']}",
        "tiny.enabled=false", "train.device=cpu"])
    connect_ray(num_cpus=8)
    folder = Path(tempfile.mkdtemp(prefix="srpo-runtime-env-"))
    report: dict[str, Any] = {"command": " ".join(sys.argv), "probe": check_probe(cfg, folder)}
    if args.hpsv2:
        report["hpsv2"] = check_hpsv2()
    report["driver_mlflow"] = check_mlflow(folder)
    ray.shutdown()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    probe = report["probe"]
    ok = (probe["worker"]["has_module"] and not probe["driver_has_module"] and probe["relay_grad_close"]
          and report["driver_mlflow"]["ok"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
