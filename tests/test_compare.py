"""``srpo compare``: one PNG and one Markdown table of several runs, logged to MLflow as well.

The synthetic runs are written with MLflow's own client (not the code under test), so the expected
table is computed here from the values logged; the two tiny training runs are read back with
``MlflowClient`` independently of the comparison's own reader.
"""
from __future__ import annotations

import json
import re

import mlflow
import numpy as np
import pytest
from PIL import Image

from conftest import REPO, world_overrides
from jobs.compare import main
from pipeline.compare import compare

LOSS_A = [0.9, 0.5, 0.7, 0.4, 0.45]  # step 2 is logged again below (a resumed run): 0.3 wins
LOSS_A_RELOGGED_2 = 0.3
LOSS_B = [0.8, 0.8, 0.6, 0.6, 0.65]  # best 0.6 first at step 2
REWARD_A = [0.1, 0.2, 0.25, 0.3, 0.28]
REWARD_B = [0.0, 0.05, 0.1, 0.1, 0.12]
STEPS_A, STEPS_B = (0, 2, 4), (0, 2, 3, 4)  # held-out image steps; shared: 0, 2, 4


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def picture(run: int, step: int) -> np.ndarray:
    return np.random.default_rng(100 * run + step).integers(0, 256, (16, 16, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def synthetic(tracking_uri, tmp_path_factory):
    """Run A (a run folder with run.json) and run B (an id), logged straight through MlflowClient."""
    client = mlflow.MlflowClient(tracking_uri)
    exp = client.create_experiment("compare-test")
    ids = []
    for r, (name, loss, reward, steps) in enumerate((("run-a", LOSS_A, REWARD_A, STEPS_A),
                                                     ("run-b", LOSS_B, REWARD_B, STEPS_B))):
        run_id = client.create_run(exp, run_name=name).info.run_id
        for s, (lo, rw) in enumerate(zip(loss, reward)):
            client.log_metric(run_id, "loss", lo, step=s, timestamp=1000 + s)
            client.log_metric(run_id, "rollout/reward", rw, step=s, timestamp=1000 + s)
        for s in steps:
            client.log_image(run_id, picture(r, s), key="heldout/0000", step=s, synchronous=True)
        ids.append(run_id)
    client.log_metric(ids[0], "loss", LOSS_A_RELOGGED_2, step=2, timestamp=5000)
    for run_id in ids:
        client.set_terminated(run_id)
    folder = tmp_path_factory.mktemp("run-a")
    (folder / "run.json").write_text(json.dumps({"run_id": ids[0], "tracking_uri": tracking_uri,
                                                 "experiment": "compare-test"}))
    return folder, ids


def table_rows(markdown: str) -> dict[tuple[str, str], list[str]]:
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in markdown.splitlines()
            if line.startswith("| ") and not line.startswith("| metric")]
    return {(r[0], r[1]): r[2:] for r in rows}


def test_compare_writes_png_and_table_and_logs_a_comparison_run(synthetic, tracking_uri, tmp_path, capsys,
                                                                monkeypatch):
    folder, (id_a, id_b) = synthetic
    monkeypatch.chdir(tmp_path)
    assert main([str(folder), id_b, "--tracking-uri", tracking_uri]) == 0  # no --out: ./compare
    out = tmp_path / "compare"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["compare"]
    printed = capsys.readouterr().out
    markdown = (out / "compare.md").read_text()
    assert markdown in printed
    rows = table_rows(markdown)
    # final (step), best (step), steps logged; loss: lowest is best, reward: highest
    assert rows[("loss", "run-a")] == ["0.45", "4", "0.3", "2", "5"]
    assert rows[("loss", "run-b")] == ["0.65", "4", "0.6", "2", "5"]
    assert rows[("rollout/reward", "run-a")] == ["0.28", "4", "0.3", "3", "5"]
    assert rows[("rollout/reward", "run-b")] == ["0.12", "4", "0.12", "4", "5"]
    png = Image.open(out / "compare.png")
    assert png.format == "PNG" and png.width >= 600 and png.height > 360  # curves plus an image row per run

    client = mlflow.MlflowClient(tracking_uri)
    (cmp,) = client.search_runs([client.get_experiment_by_name("compare-test").experiment_id],
                                "tags.`srpo.kind` = 'comparison'")
    assert cmp.data.tags["srpo.compared_runs"] == f"{id_a},{id_b}" and cmp.info.run_name == "compare-run-a-vs-run-b"
    assert {a.path for a in client.list_artifacts(cmp.info.run_id, "compare")} == {"compare/compare.png",
                                                                                  "compare/compare.md"}
    assert client.download_artifacts(cmp.info.run_id, "compare/compare.md", str(tmp_path / "dl")).endswith(".md")
    assert (tmp_path / "dl" / "compare.md").read_text() == markdown


def test_images_line_up_at_the_steps_every_run_logged(synthetic, tracking_uri, tmp_path):
    folder, (id_a, id_b) = synthetic
    c = compare([str(folder), id_b], tmp_path, tracking_uri=tracking_uri, log_to_mlflow=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["compare.md", "compare.png"]
    assert c.image_key == "heldout/0000" and c.steps == [0, 2, 4]
    for r, run in enumerate(c.runs):
        for s in c.steps:
            assert np.array_equal(run.images[s], picture(r, s)), (r, s)
    two = compare([str(folder), id_b], tmp_path / "two", tracking_uri=tracking_uri, max_images=2,
                  log_to_mlflow=False)
    assert two.steps == [0, 4]  # evenly spread: the first and the last shared step


@pytest.mark.parametrize("args, message", [
    (["/no/such/run"], r"'/no/such/run': neither a run folder \(with run.json\) nor an MLflow run id"),
    (["0" * 32], r"no MLflow run '0{32}' in sqlite:"),
    (["{a}", "--metrics", "loss,nope"], r"--metrics: \['nope'\] logged by none of the runs; they logged \["),
    (["{a}", "--image-key", "eval/0000"], r"--image-key: no run logged images under 'eval/0000'"),
])
def test_bad_input_is_one_line_and_exit_2(synthetic, tracking_uri, tmp_path, capsys, args, message):
    _, (id_a, _) = synthetic
    args = [a.replace("{a}", id_a) for a in args]
    assert main(args + ["--tracking-uri", tracking_uri, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("srpo compare: ") and re.search(message, err), err


def test_a_folder_without_run_json_names_the_file(tmp_path, capsys):
    assert main([str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "run.json: missing; expected a run folder" in err, err


def test_two_tiny_training_runs(tiny_world, tmp_path, tracking_uri):
    """Two real runs (different lr, gold evaluation every step): the table's numbers are the store's,
    the held-out image of each run is shown at both steps, and the runs' names tell them apart."""
    from pipeline.config import load_config
    from pipeline.runs import run_local

    gold = json.dumps([{"kind": "pickscore", "path": tiny_world["pickscore"]}])
    folders = []
    for lr in ("3e-3", "1e-2"):
        out = tmp_path / f"lr{lr}"
        run_local(load_config(REPO / "configs/tiny.yaml", world_overrides(tiny_world, out) + [
            "learner.num_workers=0", "train.max_steps=2", "train.batch_size=1", "log.image_every=1",
            f"eval.gold={gold}", "eval.every=1", "eval.num_prompts=1", f"optim.lr={lr}",
            f"log.tracking_uri={tracking_uri}"]))
        folders.append(out)
    c = compare([str(f) for f in folders], tmp_path / "cmp", metrics=["loss", "gold/score"])
    assert [r.label for r in c.runs] == ["hpsv2-reference-lr0.003", "hpsv2-reference-lr0.01"]
    assert c.image_key == "heldout/0000" and c.steps == [0, 1]
    rows = table_rows(c.markdown)
    client = mlflow.MlflowClient(tracking_uri)
    for folder, run in zip(folders, c.runs):
        run_id = json.loads((folder / "run.json").read_text())["run_id"]
        for metric, pick in (("loss", min), ("gold/score", max)):
            history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, metric))
            assert [s for s, _ in history] == [0, 1]
            best = pick(history, key=lambda sv: sv[1])
            assert rows[(metric, run.label)] == [f"{history[-1][1]:.6g}", "1", f"{best[1]:.6g}", str(best[0]), "2"]
    assert c.png.is_file() and c.mlflow_run_id
