"""Where runs are tracked and stored: MLflow's URI precedence, one store for many output folders,
evaluations nested under their training run, output.dir as a pyarrow-filesystem URI, and outputs
that would be lost inside a `ray job submit` working-dir package."""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest
from safetensors.torch import load_file

from conftest import REPO
from jobs.evaluate import main as evaluate_main
from jobs.export import main as export_main
from jobs.sample import main as sample_main
from jobs.train import main as train_main
from test_evaluate import scorers_override
from pipeline.config import ConfigError
from pipeline.runs import check_persistent_outputs
from pipeline.tracking import default_tracking_uri

TINY = str(REPO / "configs/tiny.yaml")
WEIGHTS = "transformer/diffusion_pytorch_model.safetensors"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tracking_uri_precedence_config_then_env_then_working_directory(tiny_cfg, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert default_tracking_uri(tiny_cfg("log.tracking_uri=")) == f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert default_tracking_uri(tiny_cfg("log.tracking_uri=")) == "http://127.0.0.1:5999"
    assert default_tracking_uri(tiny_cfg("log.tracking_uri=sqlite:///rel/x.db")) == f"sqlite:///{tmp_path}/rel/x.db"
    assert default_tracking_uri(tiny_cfg("log.tracking_uri=sqlite:////abs/x.db")) == "sqlite:////abs/x.db"


def test_outputs_inside_a_ray_working_dir_package_are_refused(tiny_cfg, tmp_path, monkeypatch):
    """`ray job submit --working-dir .` runs the job in <session>/runtime_resources/working_dir_files/
    _ray_pkg_<hash>, which Ray deletes: a relative output.dir or the default mlflow.db would be lost."""
    package = tmp_path / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123abcd"
    package.mkdir(parents=True)
    monkeypatch.chdir(package)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    safe_db = f"log.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(ConfigError, match=r"^output\.dir: .*_ray_pkg_0123abcd.*deletes"):
        check_persistent_outputs(tiny_cfg("output.dir=runs/tiny", safe_db), cwd=package)
    with pytest.raises(ConfigError, match=r"^log\.tracking_uri: .*_ray_pkg_0123abcd.*MLFLOW_TRACKING_URI"):
        check_persistent_outputs(tiny_cfg(f"output.dir={tmp_path / 'out'}", "log.tracking_uri="), cwd=package)
    # Absolute folders, URIs and servers outside the package are what the README's job command sets.
    check_persistent_outputs(tiny_cfg(f"output.dir={tmp_path / 'out'}", safe_db), cwd=package)
    check_persistent_outputs(tiny_cfg("output.dir=s3://bucket/run", "log.tracking_uri=http://mlflow:5000"),
                             cwd=package)
    check_persistent_outputs(tiny_cfg("output.dir=runs/tiny", "log.tracking_uri="), cwd=tmp_path)  # no job


def _rest_search(port: int, experiment_ids: list[str]) -> list[dict]:
    body = json.dumps({"experiment_ids": experiment_ids, "max_results": 100}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/api/2.0/mlflow/runs/search", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())["runs"]


def _mlflow_server_runs(db: Path) -> list[dict]:
    """Every run of the store as `mlflow ui` serves it (its REST API, on 127.0.0.1)."""
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                               "--backend-store-uri", f"sqlite:///{db}", "--workers", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5):
                    break
            except OSError:
                assert server.poll() is None and time.time() < deadline, "mlflow server did not start"
                time.sleep(1)
        exps = mlflow.MlflowClient(f"http://127.0.0.1:{port}").search_experiments()
        return _rest_search(port, [e.experiment_id for e in exps])
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.slow
def test_runs_in_two_folders_and_their_evaluation_share_one_store(tiny_overrides, tiny_world, tmp_path, monkeypatch):
    """Default tracking: mlflow.db in the working directory. Two runs with different output folders
    land in it; an evaluation started elsewhere (another directory, another MLFLOW_TRACKING_URI)
    goes to the training run's store, nested under it; --resume from elsewhere continues the run
    where run.json records it."""
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir(), elsewhere.mkdir()
    base = [o for o in tiny_overrides if not o.startswith(("output.dir=", "log.tracking_uri="))]
    common = [*base, "learner.num_workers=0", "train.max_steps=1", "train.checkpoint_every=1", "log.image_every=0",
              "log.tracking_uri="]
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(work)
    for name in ("a", "b"):
        assert train_main(["--config", TINY, *common, f"output.dir={tmp_path / name}"]) == 0
    store = work / "mlflow.db"
    assert store.is_file() and not (tmp_path / "a" / "mlflow.db").exists()
    run_a = json.loads((tmp_path / "a" / "run.json").read_text())
    assert run_a["tracking_uri"] == f"sqlite:///{store}"

    monkeypatch.chdir(elsewhere)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{elsewhere / 'other.db'}")
    prompts = tmp_path / "heldout.txt"
    prompts.write_text("a red cube on a table\n")
    assert evaluate_main(["--config", TINY, *base, f"output.dir={tmp_path / 'eval'}", f"eval.prompts={prompts}",
                          "eval.steps=2", scorers_override(tiny_world, ["clip"]), "--no-base",
                          "--weights", str(tmp_path / "a")]) == 0
    assert train_main(["--resume", str(tmp_path / "a"), "train.max_steps=2"]) == 0
    samples = tmp_path / "samples-a"
    assert sample_main(["--config", TINY, *base, "--weights", str(tmp_path / "a"), "--prompts", "a red cube",
                        "--out", str(samples), "--steps", "1"]) == 0
    assert not (elsewhere / "other.db").exists()
    logged = mlflow.MlflowClient(f"sqlite:///{store}").list_artifacts(run_a["run_id"], "samples/samples-a")
    assert sorted(Path(a.path).name for a in logged) == ["00000.png", "index.json", "prompts.txt"]

    runs = _mlflow_server_runs(store)
    tags = {r["info"]["run_id"]: {t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in runs}
    assert len(runs) == 3
    (eval_id,) = [i for i, t in tags.items() if t.get("srpo.kind") == "evaluation"]
    assert tags[eval_id]["mlflow.parentRunId"] == run_a["run_id"]
    assert tags[eval_id]["srpo.step"] == "1"
    assert tags[eval_id]["srpo.weights_file"].endswith(WEIGHTS)
    # --no-base: the trained weights' scores only, no base model sampled.
    evaluation = mlflow.MlflowClient(f"sqlite:///{store}").get_run(eval_id).data.metrics
    assert sorted(evaluation) == ["eval/clip/mean"]
    steps = [m.step for m in mlflow.MlflowClient(f"sqlite:///{store}").get_metric_history(run_a["run_id"], "loss")]
    assert steps == [0, 1]  # the resumed step went to the recorded store, same run


@pytest.mark.slow
def test_output_dir_uri_holds_run_files_checkpoints_and_export(tiny_overrides, tmp_path, monkeypatch):
    """output.dir=file://<shared>: everything goes through pyarrow's filesystem and is staged
    locally. Deleting the staging folder between commands proves resume and export read storage."""
    stage, shared = tmp_path / "stage", tmp_path / "shared"
    monkeypatch.setenv("SRPO_STAGING_DIR", str(stage))
    uri = f"file://{shared}/run"
    common = [*[o for o in tiny_overrides if not o.startswith("output.dir=")], "learner.num_workers=0",
              "train.checkpoint_every=1", "train.keep_checkpoints=2", "log.image_every=0"]
    assert train_main(["--config", TINY, *common, "train.max_steps=2", f"output.dir={uri}"]) == 0
    run = shared / "run"
    assert json.loads((run / "run.json").read_text())["output_dir"] == uri
    assert (run / "config.yaml").is_file() and (run / WEIGHTS).is_file()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["checkpoint_000001", "checkpoint_000002"]

    # A checkpoint without its state file (an upload cut short: the state file goes last) is
    # not complete: resume falls back to the one before.
    (run / "checkpoints" / "checkpoint_000002" / "srpo_state.json").unlink()
    shutil.rmtree(stage)
    assert train_main(["--resume", uri, "train.max_steps=3"]) == 0
    tracking = json.loads((run / "run.json").read_text())["tracking_uri"]
    client = mlflow.MlflowClient(tracking)
    history = client.get_metric_history(json.loads((run / "run.json").read_text())["run_id"], "loss")
    assert sorted(m.step for m in history) == [0, 1, 1, 2]  # step 1 trained again from checkpoint 1
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["checkpoint_000002", "checkpoint_000003"]

    shutil.rmtree(stage)
    out = tmp_path / "exported.safetensors"
    assert export_main([uri, "--out", str(out), "--no-mlflow"]) == 0
    exported, trained = load_file(str(out)), load_file(str(run / WEIGHTS))
    assert exported.keys() == trained.keys() and all((exported[k] == trained[k]).all() for k in trained)
