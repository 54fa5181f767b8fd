"""What the MLflow UI shows of a run: a model-training experiment, step-indexed images with their
prompts, dataset inputs with content digests, system metrics on request, descriptive run names.

Expected values are derived here: digests with hashlib, the run name from the config's values,
the experiment kind from the string MLflow 3's UI bundle tests for ("custom_model_development").
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO
from pipeline.config import ScorerConfig
from pipeline.evaluation import EvalReport, log_evaluation
from pipeline.runs import run_local
from pipeline.tracking import MLflowRun, system_metrics_wanted

HELDOUT = REPO / "configs/prompts/tiny_heldout.txt"
TRAIN = REPO / "configs/prompts/tiny_train.txt"


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory) -> str:
    """One MLflow database for this module (creating a sqlite schema takes seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def sha16(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def blocks_of(image: np.ndarray, f: int) -> np.ndarray:
    """The f x f blocks' top-left pixels, after checking every block is one colour (a whole-factor
    nearest-neighbour enlargement)."""
    small = image[::f, ::f]
    assert np.array_equal(np.repeat(np.repeat(small, f, axis=0), f, axis=1), image)
    return small


@pytest.fixture(scope="module")
def tiny_run(tiny_world, tmp_path_factory, tracking_uri):
    """2 single-process steps with an image and a gold evaluation (1 held-out prompt) at every step."""
    from conftest import world_overrides
    from pipeline.config import load_config

    out = tmp_path_factory.mktemp("ui-run")
    gold = json.dumps([{"kind": "pickscore", "path": tiny_world["pickscore"]}])
    cfg = load_config(REPO / "configs/tiny.yaml", world_overrides(tiny_world, out) + [
        "learner.num_workers=0", "train.max_steps=2", "train.batch_size=2", "log.image_every=1",
        f"eval.gold={gold}", "eval.every=1", "eval.num_prompts=1", f"log.tracking_uri={tracking_uri}"])
    result = run_local(cfg)
    return cfg, result, mlflow.MlflowClient(tracking_uri)


def test_experiment_opens_as_model_training_and_run_name_says_what_it_trains(tiny_run):
    cfg, result, client = tiny_run
    run = client.get_run(result["run_id"])
    assert client.get_experiment(run.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    # configs/tiny.yaml: reward hpsv2, the reference variant, lr 3.0e-3
    assert run.info.run_name == "hpsv2-reference-lr0.003"
    assert run.data.tags["srpo.system_metrics"] == "false"  # CPU, log.system_metrics unset
    assert not any(k.startswith("system/") for k in run.data.metrics)


def test_rollout_and_heldout_images_are_step_indexed_with_their_prompts(tiny_run, tmp_path):
    cfg, result, client = tiny_run
    run_id = result["run_id"]
    names = [Path(a.path).name for a in client.list_artifacts(run_id, "images")]
    pngs = [n for n in names if n.endswith(".png")]
    # MLflow's own file naming for log_image(key=..., step=...): <key with / as ~>+step+<step>+...
    for key in ("rollouts", "heldout~0000"):
        assert sorted(int(n.split("+step+")[1].split("+")[0]) for n in pngs if n.startswith(key + "+")) == [0, 1]
    assert run_id and client.get_run(run_id).data.tags["mlflow.loggedImages"] == "True"
    # The prompts: a text file per rollout grid, lines of the training prompts file.
    prompts = set(TRAIN.read_text().splitlines())
    for step in (0, 1):
        text = Path(client.download_artifacts(run_id, f"rollouts/step_{step:05d}.txt", str(tmp_path))).read_text()
        assert len(text.splitlines()) == 2 and set(text.splitlines()) <= prompts
    # The held-out image: 64x64 enlarged 6x to 384 wide, then the prompt's text under it (not white).
    held = [n for n in pngs if n.startswith("heldout~0000+step+1+")][0]
    image = np.asarray(Image.open(client.download_artifacts(run_id, f"images/{held}", str(tmp_path))).convert("RGB"))
    assert image.shape[1] == 384 and image.shape[0] > 384
    small = blocks_of(image[:384], 6)
    assert small.shape == (64, 64, 3) and small.std() > 0  # a picture, not a blank
    assert (image[384:] < 128).any()  # black text on the white strip


def test_datasets_are_inputs_with_content_digests(tiny_run):
    cfg, result, client = tiny_run
    inputs = {(d.dataset.name, {t.key: t.value for t in d.tags}["mlflow.data.context"]): d.dataset
              for d in client.get_run(result["run_id"]).inputs.dataset_inputs}
    assert set(inputs) == {("tiny_train.txt", "training"), ("tiny_heldout.txt", "evaluation")}
    assert inputs[("tiny_train.txt", "training")].digest == sha16(TRAIN.read_bytes())
    assert inputs[("tiny_heldout.txt", "evaluation")].digest == sha16(HELDOUT.read_bytes())
    assert json.loads(inputs[("tiny_train.txt", "training")].source)["uri"] == str(TRAIN)
    assert json.loads(inputs[("tiny_train.txt", "training")].profile)["num_rows"] == \
        len([line for line in TRAIN.read_text().splitlines() if line.strip()])


def _open(tiny_cfg, tracking_uri, *extra) -> MLflowRun:
    run = MLflowRun(tiny_cfg("learner.num_workers=0", f"log.tracking_uri={tracking_uri}", *extra))
    run.end()
    return run


def _digests(client, run_id) -> dict[str, str]:
    return {d.dataset.name: d.dataset.digest for d in client.get_run(run_id).inputs.dataset_inputs}


def test_digests_differ_for_different_data_and_match_for_the_same(tiny_cfg, tracking_uri, tmp_path):
    client = mlflow.MlflowClient(tracking_uri)
    a, b, same = tmp_path / "a" / "prompts.txt", tmp_path / "b" / "prompts.txt", tmp_path / "c" / "prompts.txt"
    for p, text in ((a, "a red car\na blue bird\n"), (b, "a red car\na green bird\n"), (same, "a red car\na blue bird\n")):
        p.parent.mkdir()
        p.write_text(text)
    runs = {p: _open(tiny_cfg, tracking_uri, f"data.prompts={p}", "log.run_name=digest-test").run_id for p in (a, b, same)}
    got = {p: _digests(client, r)["prompts.txt"] for p, r in runs.items()}
    assert got[a] == got[same] == sha16(a.read_bytes()) and got[b] == sha16(b.read_bytes()) != got[a]
    assert client.get_run(runs[a]).info.run_name == "digest-test"  # log.run_name wins over the default

    # An image folder: one changed pixel changes the digest; the same files elsewhere do not.
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(2):
        Image.fromarray(np.full((40, 40, 3), 60 * i, np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"photo {i}")
    copy = tmp_path / "photos-copy"
    shutil.copytree(folder, copy)
    offline = ("rollout.mode=offline", "reward.placement=colocated")
    first = _digests(client, _open(tiny_cfg, tracking_uri, *offline, f"data.images={folder}").run_id)["photos"]
    again = _digests(client, _open(tiny_cfg, tracking_uri, *offline, f"data.images={copy}").run_id)["photos-copy"]
    Image.fromarray(np.full((40, 40, 3), 61, np.uint8)).save(copy / "1.png")
    changed = _digests(client, _open(tiny_cfg, tracking_uri, *offline, f"data.images={copy}").run_id)["photos-copy"]
    assert first == again != changed


def test_system_metrics_default_on_gpu_only_and_sampled_by_the_training_process(tiny_cfg, tracking_uri):
    from mlflow.tracking.fluent import run_id_to_system_metrics_monitor as monitors

    assert not system_metrics_wanted(tiny_cfg("learner.num_workers=0"))  # train.device=cpu
    assert system_metrics_wanted(tiny_cfg("learner.num_workers=0", "log.system_metrics=true"))
    assert system_metrics_wanted(tiny_cfg("learner.num_workers=2", "learner.use_gpu=true"))
    assert not system_metrics_wanted(tiny_cfg("learner.num_workers=2", "learner.use_gpu=true", "log.system_metrics=false"))

    # Single process: the driver trains, so it samples. One sample published by MLflow's own monitor.
    run = MLflowRun(tiny_cfg("learner.num_workers=0", "log.system_metrics=true", f"log.tracking_uri={tracking_uri}"))
    try:
        monitor = monitors[run.run_id]
        monitor.collect_metrics()
        monitor.publish_metrics(monitor.aggregate_metrics())
        monitor.mlflow_logger.flush()
    finally:
        run.end()
    logged = mlflow.MlflowClient(tracking_uri).get_run(run.run_id).data.metrics
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(logged)

    # Ray: the driver only records the decision; learner rank 0 (attach) samples on its node.
    driver = MLflowRun(tiny_cfg("learner.num_workers=2", "log.system_metrics=true", f"log.tracking_uri={tracking_uri}"))
    assert driver.run_id not in monitors
    driver.end()
    learner = MLflowRun.attach(tracking_uri, driver.run_id)
    try:
        assert learner.run_id in monitors
    finally:
        learner.end()


def test_evaluation_images_are_step_indexed_at_the_weights_step(tiny_cfg, tracking_uri, tmp_path):
    cfg = tiny_cfg(f"log.tracking_uri={tracking_uri}")
    g = torch.Generator().manual_seed(0)
    base, trained = torch.rand(2, 3, 64, 64, generator=g), torch.rand(2, 3, 64, 64, generator=g)
    prompts = ["a cat", "a dog"]
    report = EvalReport(run_id="", tracking_uri=tracking_uri, experiment="eval-ui", weights="w.safetensors",
                        prompts=prompts, seeds=[0, 1], scores={"hpsv2": [0.1, 0.2]},
                        base_scores={"hpsv2": [0.0, 0.3]}, weights_step=6)
    run_id = log_evaluation(report, cfg, [ScorerConfig(kind="hpsv2", path="x")], base, trained, None)
    client = mlflow.MlflowClient(tracking_uri)
    run = client.get_run(run_id)
    assert client.get_experiment(run.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    names = [Path(a.path).name for a in client.list_artifacts(run_id, "images") if a.path.endswith(".png")]
    assert sorted(n.split("+timestamp")[0] for n in names) == ["eval~0000+step+6", "eval~0001+step+6"]
    assert {a.path for a in client.list_artifacts(run_id, "eval/images")} == {"eval/images/0000.png",
                                                                            "eval/images/0001.png"}
    # base | 4 px gap | trained, 132 px wide, enlarged 3x to 396; its top equals the plain file's pixels.
    plain = np.asarray(Image.open(client.download_artifacts(run_id, "eval/images/0001.png", str(tmp_path))))
    stepped = [n for n in names if n.startswith("eval~0001")][0]
    image = np.asarray(Image.open(client.download_artifacts(run_id, f"images/{stepped}", str(tmp_path))).convert("RGB"))
    assert plain.shape == (64, 132, 3) and image.shape[1] == 396
    assert np.array_equal(blocks_of(image[:192], 3), plain)
    (ds,) = run.inputs.dataset_inputs
    assert ds.dataset.digest == sha16(Path(cfg.data.heldout_prompts).read_bytes())
    assert {t.key: t.value for t in ds.tags}["mlflow.data.context"] == "evaluation"
