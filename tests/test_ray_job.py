"""`ray job submit` of the README's command against a Ray head started on 127.0.0.1 by the test."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ray_job_submit_runs_the_training_job(tiny_overrides, tmp_path):
    env = dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
               HF_HUB_OFFLINE="1", RAY_AUTH_MODE="token",  # token auth: head and client share ~/.ray/auth_token
               # On SIGTERM `ray start --block` first drains the node (for Serve upgrades on Kubernetes) and
               # waits up to 30 s for it to go idle, which this throwaway head never does: 33 s of the test.
               RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")
    env.pop("RAY_ADDRESS", None)
    dash = _free_port()
    ports = {name: _free_port() for name in ("port", "dashboard-agent-listen-port",
                                             "dashboard-agent-grpc-port", "runtime-env-agent-port",
                                             "metrics-export-port", "node-manager-port", "object-manager-port")}
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", "--num-cpus=8",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         *[f"--{k}={v}" for k, v in ports.items()]],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        address = f"http://127.0.0.1:{dash}"
        deadline = time.time() + 120
        while time.time() < deadline:  # the job server is up once `ray job list` answers
            if subprocess.run([str(BIN / "ray"), "job", "list", "--address", address], env=env,
                              capture_output=True, timeout=60).returncode == 0:
                break
            assert head.poll() is None, head.stdout.read()
            time.sleep(2)
        out = tmp_path / "job-run"
        store = f"sqlite:///{tmp_path / 'mlflow.db'}"
        base = [o for o in tiny_overrides if not o.startswith(("output.dir=", "log.tracking_uri="))]
        # A relative output.dir would be written inside Ray's working-dir package, which Ray deletes:
        # the job fails at start, naming the field.
        proc = subprocess.run(
            [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", ".", "--",
             "python", "-m", "jobs.train", "--config", "configs/tiny.yaml", *base, "output.dir=runs/lost",
             f"log.tracking_uri={store}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode != 0
        assert "config error: output.dir:" in proc.stdout + proc.stderr and "_ray_pkg_" in proc.stdout + proc.stderr
        # As the README's job command: storage and tracking set explicitly; storage as a URI (a
        # file:// folder standing in for s3:// or gs://): Ray Train's checkpoints and our run files
        # both go through pyarrow's filesystem.
        overrides = base + [
            f"output.dir=file://{out}", f"log.tracking_uri={store}", "train.max_steps=3", "rollout.steps=4",
            # Colocated: what is tested here is the submission path, not the actor placements (which
            # test_ray_pipeline covers); fewer actors keep this test to about a minute on 2 cores.
            "rollout.placement=colocated", "reward.placement=colocated"]
        # The README's command, verbatim apart from the address and the overrides.
        proc = subprocess.run(
            [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", ".", "--",
             "python", "-m", "jobs.train", "--config", "configs/tiny.yaml", *overrides],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
        assert "succeeded" in proc.stdout + proc.stderr

        import mlflow

        client = mlflow.MlflowClient(tracking_uri=store)
        (exp,) = [e for e in client.search_experiments() if e.name == "srpo-tiny"]
        (run,) = client.search_runs([exp.experiment_id])
        assert run.info.status == "FINISHED"
        assert run.data.params["learner.num_workers"] == "2"
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss")) == [0, 1, 2]
        assert (out / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
        assert json.loads((out / "run.json").read_text())["run_id"] == run.info.run_id
        ray_run = out / "ray" / json.loads((out / "run.json").read_text())["ray_run_name"]
        assert any(p.name.startswith("checkpoint_") for p in ray_run.iterdir())
    finally:
        if head.poll() is None:
            os.killpg(head.pid, signal.SIGTERM)  # `ray start --block` stops the processes it started
            try:
                head.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(head.pid, signal.SIGKILL)
