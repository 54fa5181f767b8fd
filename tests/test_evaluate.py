"""Evaluation: the LAION aesthetic head, the plain scorers, and `srpo evaluate` on the tiny world.

Each scorer is checked against an independent computation (torchvision preprocessing, the raw
transformers / open_clip towers, a hand-built nn.Sequential), and the logged MLflow run against a
direct regeneration and scoring of the same prompts and seeds.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PROMPTS = ["a green parrot on a branch", "a fox walking through the snow"]


# ---------------------------------------------------------------------------------- helpers


def released_head(input_dim: int, seed: int) -> tuple[torch.nn.Sequential, dict[str, torch.Tensor]]:
    """An independent nn.Sequential of the released architecture and its state dict in the released keys."""
    torch.manual_seed(seed)
    seq = torch.nn.Sequential(
        torch.nn.Linear(input_dim, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128), torch.nn.Dropout(0.2),
        torch.nn.Linear(128, 64), torch.nn.Dropout(0.1), torch.nn.Linear(64, 16), torch.nn.Linear(16, 1),
    ).eval()
    return seq, {f"layers.{k}": v.clone() for k, v in seq.state_dict().items()}


def tv_pixels(images: torch.Tensor) -> torch.Tensor:
    """CLIP preprocessing through torchvision (resize 224 bicubic antialias, crop, normalise)."""
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    x = TF.resize(images, 224, interpolation=InterpolationMode.BICUBIC, antialias=True)
    return TF.normalize(TF.center_crop(x, 224), CLIP_MEAN, CLIP_STD)


def hf_clip_features(folder: str, images: torch.Tensor, captions: list[str]):
    """(image features, text features, exp(logit_scale)) from the raw CLIPModel towers."""
    from transformers import AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(folder, local_files_only=True, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    ids = tok(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        img = model.visual_projection(model.vision_model(pixel_values=tv_pixels(images)).pooler_output)
        txt = model.text_projection(model.text_model(input_ids=ids.input_ids,
                                                     attention_mask=ids.attention_mask).pooler_output)
    return img, txt, float(model.logit_scale.detach().exp())


def scorer_entries(world: dict[str, str]) -> dict[str, dict[str, str]]:
    return {
        "hpsv2": {"kind": "hpsv2", "path": world["hps_checkpoint"], "arch": world["hps_arch"]},
        "pickscore": {"kind": "pickscore", "path": world["pickscore"]},
        "clip": {"kind": "clip", "path": world["clip"]},
        "aesthetic": {"kind": "aesthetic", "path": world["aesthetic"], "clip_path": world["aesthetic_clip"]},
    }


def scorers_override(world: dict[str, str], kinds: list[str]) -> str:
    """An `eval.scorers=[...]` override pointing at the session's tiny world (JSON is YAML)."""
    entries = scorer_entries(world)
    return "eval.scorers=" + json.dumps([entries[k] for k in kinds])


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory) -> str:
    """One MLflow database for this module's runs (creating a sqlite schema takes seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture()
def images() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand(2, 3, 80, 64, generator=g)  # non-square: exercises resize + crop


# ------------------------------------------------------------------------------ aesthetic head


def test_aesthetic_head_loads_released_layout(tmp_path):
    from rewards.aesthetic import AESTHETIC_FILE_NAME, load_aesthetic_mlp

    for dim in (768, 32):  # the released CLIP ViT-L/14 width, and the tiny CLIP's (inferred)
        seq, state = released_head(dim, seed=dim)
        path = tmp_path / str(dim) / AESTHETIC_FILE_NAME
        path.parent.mkdir()
        torch.save(state, path)
        mlp = load_aesthetic_mlp(path)
        assert mlp.input_size == dim and not mlp.training
        x = F.normalize(torch.randn(5, dim, generator=torch.Generator().manual_seed(1)), dim=-1)
        with torch.no_grad():
            torch.testing.assert_close(mlp(x), seq(x).squeeze(-1), rtol=1e-6, atol=1e-6)


def test_aesthetic_bad_files_are_named(tmp_path):
    from rewards.aesthetic import load_aesthetic_mlp
    from rewards.base import RewardCheckpointError

    _, state = released_head(32, seed=0)
    missing = tmp_path / "missing.pth"
    torch.save({k: v for k, v in state.items() if k != "layers.7.bias"}, missing)
    with pytest.raises(RewardCheckpointError, match=r"missing\.pth.*missing keys \['layers\.7\.bias'\]"):
        load_aesthetic_mlp(missing)
    wrong = tmp_path / "wrong.pth"
    torch.save({**state, "layers.2.weight": torch.zeros(128, 512)}, wrong)
    with pytest.raises(RewardCheckpointError, match=r"wrong\.pth: layers\.2\.weight has shape \(128, 512\), "
                                                    r"expected \(128, 1024\)"):
        load_aesthetic_mlp(wrong)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(RewardCheckpointError, match=r"cannot load .*garbage\.pth"):
        load_aesthetic_mlp(garbage)
    with pytest.raises(FileNotFoundError, match=r"nope\.pth.*LAION aesthetic predictor"):
        load_aesthetic_mlp(tmp_path / "nope.pth")


# ------------------------------------------------------------------------------------ scorers


def test_scorers_match_independent_computation(tiny_world, images):
    import open_clip

    from pipeline.config import ScorerConfig
    from pipeline.evaluation import score_images
    from rewards.scorers import load_scorers

    captions = PROMPTS
    entries = scorer_entries(tiny_world)
    scorers = load_scorers([ScorerConfig(**entries[k]) for k in ("hpsv2", "pickscore", "clip", "aesthetic")]
                           + [ScorerConfig(**entries["clip"], name="clip_b")])
    got = score_images(scorers, images, captions, batch_size=1)
    assert list(got) == ["hpsv2", "pickscore", "clip", "aesthetic", "clip_b"]

    # HPSv2.1: the cosine of the open_clip towers (no logit scale).
    arch = Path(tiny_world["hps_arch"])
    open_clip.add_model_config(arch)
    model = open_clip.create_model(arch.stem, pretrained=None)
    model.load_state_dict(torch.load(tiny_world["hps_checkpoint"], weights_only=True)["state_dict"])
    model.eval()
    with torch.no_grad():
        f_img = model.encode_image(tv_pixels(images), normalize=True)
        f_txt = model.encode_text(open_clip.get_tokenizer(arch.stem)(captions), normalize=True)
    torch.testing.assert_close(got["hpsv2"], (f_img * f_txt).sum(-1), rtol=1e-5, atol=1e-6)

    # PickScore: exp(logit_scale) * cos; CLIP score: 100 * max(cos, 0).
    img, txt, scale = hf_clip_features(tiny_world["pickscore"], images, captions)
    torch.testing.assert_close(got["pickscore"], scale * F.cosine_similarity(img, txt), rtol=1e-5, atol=1e-5)
    img, txt, _ = hf_clip_features(tiny_world["clip"], images, captions)
    want_clip = 100 * F.cosine_similarity(img, txt).clamp(min=0)
    torch.testing.assert_close(got["clip"], want_clip, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got["clip_b"], want_clip, rtol=1e-5, atol=1e-4)

    # Aesthetic: the released head on the L2-normalised CLIP image embedding.
    seq = released_head(img.shape[-1], seed=0)[0]
    seq.load_state_dict({k.removeprefix("layers."): v
                         for k, v in torch.load(tiny_world["aesthetic"], weights_only=True).items()})
    with torch.no_grad():
        want = seq(F.normalize(img, dim=-1)).squeeze(-1)
    torch.testing.assert_close(got["aesthetic"], want, rtol=1e-5, atol=1e-6)

    with pytest.raises(ValueError, match=r"metric name 'clip' is already used by scorers\[0\]"):
        load_scorers([ScorerConfig(**entries["clip"]), ScorerConfig(**entries["clip"])])
    with pytest.raises(ValueError, match=r"expected a list of 2 captions"):
        scorers[0].score(images, ["only one"])


# --------------------------------------------------------------------------------- evaluation


def test_evaluate_logs_run_equal_to_direct_scoring(tiny_world, tiny_cfg, tracking_uri, tmp_path):
    """Perturbed weights in a run folder: metrics = direct scores of regenerated images, all artifacts."""
    import mlflow
    from safetensors.torch import load_file, save_file

    from pipeline.evaluation import evaluate, score_images
    from pipeline.models import load_adapter
    from pipeline.sampling import generate
    from rewards.scorers import load_scorers

    prompts_file = tmp_path / "heldout.txt"
    prompts_file.write_text("\n".join(PROMPTS) + "\n")
    # Two scorers keep it fast; every kind is checked against an independent computation above.
    cfg = tiny_cfg(f"eval.prompts={prompts_file}", "eval.steps=2", "eval.batch_size=2", "eval.seed=7",
                   f"log.tracking_uri={tracking_uri}", scorers_override(tiny_world, ["hpsv2", "aesthetic"]))

    # A fake training run folder whose export is the base transformer, perturbed.
    adapter = load_adapter("flux", tiny_world["flux"], "cpu", cfg.model.max_sequence_length)
    g = torch.Generator().manual_seed(3)
    trained_state = {k: v + 0.05 * torch.randn(v.shape, generator=g)
                     for k, v in adapter.transformer.state_dict().items()}
    run_dir = tmp_path / "train-run"
    (run_dir / "transformer").mkdir(parents=True)
    export = run_dir / "transformer" / "diffusion_pytorch_model.safetensors"
    save_file({k: v.contiguous() for k, v in trained_state.items()}, str(export))
    (run_dir / "run.json").write_text(json.dumps({"run_id": "train-run-123"}))

    report = evaluate(cfg, str(export), out_dir=tmp_path / "out", run_name="eval-test")

    # Regenerate both sets with the same seeds (7, 8) and batching, then score directly.
    kw = dict(steps=2, guidance=cfg.eval.guidance, resolution=64, batch_size=2,
              scheduler_config=json.loads((Path(tiny_world["flux"]) / "scheduler/scheduler_config.json").read_text()))
    base_images = generate(adapter, adapter.transformer, PROMPTS, [7, 8], **kw)
    adapter.transformer.load_state_dict(load_file(str(export)))
    trained_images = generate(adapter, adapter.transformer, PROMPTS, [7, 8], **kw)
    scorers = load_scorers(cfg.eval.scorers)
    base = {k: v.double() for k, v in score_images(scorers, base_images, PROMPTS).items()}
    trained = {k: v.double() for k, v in score_images(scorers, trained_images, PROMPTS).items()}

    client = mlflow.MlflowClient(tracking_uri=report.tracking_uri)
    run = client.get_run(report.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "eval-test"
    assert client.get_experiment(run.info.experiment_id).name == cfg.log.experiment
    assert run.data.tags["srpo.kind"] == "evaluation"
    assert run.data.tags["srpo.weights"] == str(export.resolve())
    assert run.data.tags["srpo.train_run_id"] == "train-run-123"
    assert run.data.params["steps"] == "2" and run.data.params["seed"] == "7" and run.data.params["resolution"] == "64"
    m = run.data.metrics
    for name in ("hpsv2", "aesthetic"):
        assert m[f"eval/{name}/mean"] == pytest.approx(trained[name].mean().item(), rel=1e-5, abs=1e-7), name
        assert m[f"eval/{name}/base_mean"] == pytest.approx(base[name].mean().item(), rel=1e-5, abs=1e-7), name
        assert m[f"eval/{name}/delta"] == pytest.approx(m[f"eval/{name}/mean"] - m[f"eval/{name}/base_mean"],
                                                        rel=1e-6, abs=1e-9)
    assert m["eval/hpsv2/mean"] != m["eval/hpsv2/base_mean"]  # the weights were really swapped in

    artifacts = {a.path for a in client.list_artifacts(report.run_id, "eval")}
    assert {"eval/per_prompt.json", "eval/images"} <= artifacts
    assert {a.path for a in client.list_artifacts(report.run_id, "eval/images")} == {
        "eval/images/0000.png", "eval/images/0001.png"}
    table_file = client.download_artifacts(report.run_id, "eval/per_prompt.json", str(tmp_path))
    table = json.loads(Path(table_file).read_text())
    rows = [dict(zip(table["columns"], r)) for r in table["data"]]
    assert [r["prompt"] for r in rows] == PROMPTS and [r["seed"] for r in rows] == [7, 8]
    for i, r in enumerate(rows):
        assert r["hpsv2/base"] == pytest.approx(base["hpsv2"][i].item(), rel=1e-5, abs=1e-7)
        assert r["aesthetic/trained"] == pytest.approx(trained["aesthetic"][i].item(), rel=1e-5, abs=1e-7)
    from PIL import Image

    grid = Image.open(client.download_artifacts(report.run_id, "eval/images/0000.png", str(tmp_path)))
    assert grid.size == (64 * 2 + 4, 64)  # base | gap | trained
    local = json.loads((tmp_path / "out" / "report.json").read_text())
    assert local["run_id"] == report.run_id and (tmp_path / "out" / "images" / "0001.png").is_file()


def test_cli_base_weights_give_zero_delta(tiny_world, tiny_overrides, tracking_uri, tmp_path, capsys):
    """`srpo evaluate --weights <the base diffusers folder>`: base_mean == mean, the table is printed."""
    import mlflow

    from jobs.evaluate import main

    prompts_file = tmp_path / "heldout.txt"
    prompts_file.write_text(PROMPTS[0] + "\n")
    overrides = tiny_overrides + [f"eval.prompts={prompts_file}", "eval.steps=2", f"log.tracking_uri={tracking_uri}",
                                  scorers_override(tiny_world, ["clip"])]
    # A wrong --weights fails before any model is loaded, naming the path.
    assert main(["--config", str(REPO / "configs/tiny.yaml"), *overrides, "--weights", str(tmp_path / "nope")]) == 2
    assert f"{tmp_path / 'nope'}: not found" in capsys.readouterr().err
    assert main(["--config", str(REPO / "configs/tiny.yaml"), *overrides, "--weights", tiny_world["flux"]]) == 0
    out = capsys.readouterr().out
    run_id = out.strip().splitlines()[-1].split(" run ")[-1]
    assert "clip" in out and "+0.0000" in out
    m = mlflow.MlflowClient(tracking_uri=tracking_uri).get_run(run_id).data.metrics
    assert m["eval/clip/base_mean"] == m["eval/clip/mean"]
    assert m["eval/clip/delta"] == 0.0


def test_report_without_base_has_no_deltas():
    """--no-base (or no weights): only means are reported, the table has one column per scorer."""
    from pipeline.evaluation import EvalReport

    r = EvalReport(run_id="", tracking_uri="", experiment="x", weights="/w", prompts=["a", "b"], seeds=[1, 2],
                   scores={"hpsv2": [0.25, 0.75]})
    assert r.metrics() == {"eval/hpsv2/mean": 0.5}
    assert r.table() == {"prompt": ["a", "b"], "seed": [1, 2], "hpsv2/trained": [0.25, 0.75]}
    r.base_scores = {"hpsv2": [0.5, 0.5]}
    assert r.metrics() == {"eval/hpsv2/mean": 0.5, "eval/hpsv2/base_mean": 0.5, "eval/hpsv2/delta": 0.0,
                           "eval/hpsv2/win_rate": 0.5}


def test_prompts_and_scorers_default_to_the_heldout_prompts_and_the_training_reward(tiny_world, tiny_cfg, tmp_path):
    from pipeline.config import ScorerConfig
    from pipeline.evaluation import eval_prompts, scorer_configs

    heldout = [line.strip() for line in (REPO / "configs/prompts/tiny_heldout.txt").read_text().splitlines()
               if line.strip()]
    assert eval_prompts(tiny_cfg()) == heldout  # eval.prompts unset: data.heldout_prompts
    mine = tmp_path / "mine.txt"
    mine.write_text("a lighthouse at dusk\na bowl of fruit\n")
    assert eval_prompts(tiny_cfg(f"eval.prompts={mine}")) == ["a lighthouse at dusk", "a bowl of fruit"]
    # No eval.scorers: the training reward, under its kind's name.
    assert scorer_configs(tiny_cfg("eval.scorers=[]")) == [
        ScorerConfig(kind="hpsv2", path=tiny_world["hps_checkpoint"], arch=tiny_world["hps_arch"], name="hpsv2")]
    assert [s.kind for s in scorer_configs(tiny_cfg())] == ["hpsv2", "pickscore", "clip", "aesthetic"]
