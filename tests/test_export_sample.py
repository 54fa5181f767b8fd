"""Export and sampling: trained weights leave the trainer in the format the SRPO authors release,
load back into diffusers' FluxPipeline exactly as theirs do, and ``generate`` / ``srpo sample``
reproduce FluxPipeline's images with them.

One tiny training step (module fixture) feeds every test; everything runs on the CPU in fp32.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["a photo of a cat sitting on a wooden table", "a red sports car parked on a city street at night"]
SEED = 7  # prompt i uses SEED + i, as `srpo sample --seed 7`
STEPS, GUIDANCE, RESOLUTION, MAX_SEQ = 4, 3.5, 64, 32  # MAX_SEQ = configs/tiny.yaml model.max_sequence_length
# fp32 on the CPU with the same weights and the same ops: FluxPipeline (batch 1) and generate (batch 2)
# differ only by the rounding of batched matmuls, measured ~1.5e-6 in [0, 1] image units.
IMAGE_ATOL = 1e-5


def _overrides(world: dict[str, str], out_dir: Path) -> list[str]:
    """conftest's tiny_overrides, for the module-scoped training fixture (tiny_cfg is per test)."""
    return [
        f"tiny.dir={Path(world['flux']).parent}", f"model.path={world['flux']}",
        f"reward.path={world['hps_checkpoint']}", f"reward.arch={world['hps_arch']}",
        f"data.prompts={REPO / 'configs/prompts/tiny_train.txt'}",
        f"data.heldout_prompts={REPO / 'configs/prompts/tiny_heldout.txt'}",
        f"output.dir={out_dir}",
    ]


@pytest.fixture(scope="module")
def trained(tiny_world, tmp_path_factory):
    """One SRPO step of the single-process trainer (it must move the weights), exported in fp32."""
    from pipeline.config import load_config
    from pipeline.export import export_transformer
    from helpers import StepHarness as SRPOTrainer

    tmp = tmp_path_factory.mktemp("trained")
    cfg = load_config(REPO / "configs/tiny.yaml", _overrides(tiny_world, tmp / "run") + [
        "learner.num_workers=0", "train.batch_size=1", "rollout.steps=2"])
    torch.manual_seed(cfg.seed)
    trainer = SRPOTrainer(cfg)
    trainer.fit(1)
    export = export_transformer(trainer.transformer.state_dict(), tmp / "fp32" / "diffusion_pytorch_model.safetensors",
                                "fp32", step=trainer.step)
    return {"trainer": trainer, "cfg": cfg, "export": export, "tmp": tmp}


@pytest.fixture(scope="module")
def generated(trained):
    """generate(...) on the trained in-memory model, both prompts in one batch."""
    from pipeline.sampling import generate, load_scheduler_config

    t = trained["trainer"]
    return generate(t.adapter, t.transformer, PROMPTS, [SEED + i for i in range(len(PROMPTS))], STEPS, GUIDANCE,
                    RESOLUTION, batch_size=2, scheduler_config=load_scheduler_config(t.cfg.model.path))


def _pipeline_image(pipe, prompt: str, seed: int) -> torch.Tensor:
    """The authors' inference call (one prompt, a CPU generator seeded per image)."""
    return pipe(prompt, num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=RESOLUTION, width=RESOLUTION,
                max_sequence_length=MAX_SEQ, generator=torch.Generator("cpu").manual_seed(seed),
                output_type="pt").images


def _load_pipeline(path: str | Path):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(str(path), local_files_only=True)  # fp32, as saved
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def reference(trained, tiny_world):
    """FluxPipeline(base folder) with the exported weights loaded the authors' way, image of prompt 0."""
    from safetensors.torch import load_file

    pipe = _load_pipeline(tiny_world["flux"])
    pipe.transformer.load_state_dict(load_file(str(trained["export"])))
    return _pipeline_image(pipe, PROMPTS[0], SEED)


# ------------------------------------------------------------------------------------------ 1


def test_export_equals_trainer_and_flux_pipeline_reproduces_generate(trained, generated, reference, tiny_world):
    from safetensors.torch import load_file

    from pipeline.export import load_weights

    exported = load_file(str(trained["export"]))
    live = trained["trainer"].transformer.state_dict()
    assert set(exported) == set(live)
    for k, v in live.items():
        assert exported[k].dtype == torch.float32
        assert torch.equal(exported[k], v.detach().cpu()), k
    base = load_weights(tiny_world["flux"])  # the full diffusers folder -> transformer/
    assert set(base) == set(exported)
    moved = [k for k in base if not torch.equal(base[k], exported[k])]
    assert moved, "one SRPO step with lr 3e-3 must change the transformer"

    torch.testing.assert_close(generated[:1], reference, atol=IMAGE_ATOL, rtol=0)
    assert reference.std() > 0.01  # a real image, not a constant the comparison would trivially pass


# ------------------------------------------------------------------------------------------ 2


def test_bf16_export_is_the_fp32_export_cast(trained):
    from safetensors.torch import load_file

    from pipeline.export import export_transformer

    fp32 = load_file(str(trained["export"]))
    out = export_transformer(fp32, trained["tmp"] / "bf16" / "diffusion_pytorch_model.safetensors", "bf16")
    bf16 = load_file(str(out))
    assert set(bf16) == set(fp32)
    for k, v in fp32.items():
        assert bf16[k].dtype == torch.bfloat16, k
        assert torch.equal(bf16[k], v.to(torch.bfloat16)), k
    with pytest.raises(ValueError, match="dtype"):
        export_transformer(fp32, trained["tmp"] / "x.safetensors", "fp8")


# ------------------------------------------------------------------------------------------ 3


def test_diffusers_folder_export_loads_and_gives_the_same_image(trained, reference, tiny_world, tmp_path):
    from safetensors.torch import load_file

    from jobs.export import main
    from pipeline.export import export_diffusers_folder

    state = load_file(str(trained["export"]))
    out = tmp_path / "srpo-flux"  # through the CLI, as the README shows it
    assert main([str(trained["export"]), "--diffusers-folder", "--model-path", tiny_world["flux"],
                 "--out", str(out)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["srpo-flux"]  # no temporary folder left behind
    assert sorted(p.name for p in (out / "transformer").iterdir()) == ["config.json",
                                                                     "diffusion_pytorch_model.safetensors"]
    image = _pipeline_image(_load_pipeline(out), PROMPTS[0], SEED)
    torch.testing.assert_close(image, reference, atol=0, rtol=0)  # same weights, same pipeline: bit for bit

    with pytest.raises(KeyError, match="missing"):  # weights that would not load are refused up front
        export_diffusers_folder({k: v for k, v in list(state.items())[1:]}, tiny_world["flux"], tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_safetensors_write_interrupted_midway_leaves_the_previous_file(tmp_path, monkeypatch):
    """save_state_dict writes a temporary file and renames it: a write that dies halfway (a full disk,
    a killed process) never leaves a truncated file under the real name."""
    import safetensors.torch
    from safetensors.torch import load_file

    from pipeline.export import save_state_dict

    target = tmp_path / "diffusion_pytorch_model.safetensors"
    old = {"w": torch.arange(6, dtype=torch.float32)}
    save_state_dict(old, target, step=1)
    before = target.read_bytes()

    def dies_halfway(tensors, filename, metadata=None):
        Path(filename).write_bytes(before[: len(before) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", dies_halfway)
    with pytest.raises(OSError, match="No space left on device"):
        save_state_dict({"w": torch.zeros(6)}, target, step=2)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]  # the half-written temporary is gone
    torch.testing.assert_close(load_file(str(target))["w"], old["w"], rtol=0, atol=0)


# ------------------------------------------------------------------------------------------ 4


def _write_checkpoint(ckpt: Path, engine, step: int, model_path: str) -> None:
    """The layout of pipeline/checkpoint.py for one rank: DCP model_optim/, srpo_state.json, manifest last."""
    from pipeline.checkpoint import FORMAT, write_json_atomic

    engine.save_sharded(str(ckpt / "model_optim"))
    write_json_atomic(ckpt / "srpo_state.json", {"format": FORMAT, "step": step, "world_size": 1,
                                                 "strategy": "single", "model_path": model_path})
    files = {str(p.relative_to(ckpt)): p.stat().st_size for p in sorted(ckpt.rglob("*")) if p.is_file()}
    write_json_atomic(ckpt / "manifest" / "rank_0.json", {"files": files})


def test_load_weights_from_dcp_checkpoints_and_run_folder(tiny_world, tmp_path):
    from diffusers import FluxTransformer2DModel

    from pipeline.checkpoint import write_json_atomic
    from pipeline.config import OptimConfig
    from pipeline.export import export_transformer, load_weights
    from pipeline.parallel import SingleEngine

    flux = tiny_world["flux"]
    engine = SingleEngine(FluxTransformer2DModel.from_pretrained(flux, subfolder="transformer", local_files_only=True),
                          OptimConfig(), torch.device("cpu"), activation_checkpointing=False)
    run = tmp_path / "run"
    write_json_atomic(run / "run.json", {"run_id": "r", "tracking_uri": "", "experiment": "e", "ray_run_name": "x"})
    ckpts = [run / "ray" / "x" / f"checkpoint_{i:06d}" for i in range(3)]
    states = []
    gen = torch.Generator().manual_seed(0)
    for step, ckpt in enumerate(ckpts, start=1):
        with torch.no_grad():  # new weights per checkpoint, so we can tell which one was read
            for p in engine.transformer.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=gen))
        states.append(engine.full_state_dict())
        _write_checkpoint(ckpt, engine, step, flux)

    loaded = load_weights(ckpts[1])
    assert set(loaded) == set(states[1])
    for k, v in states[1].items():
        assert loaded[k].dtype == torch.float32 and torch.equal(loaded[k], v), k

    # An interrupted write: the newest checkpoint is refused by name, and discovery skips it.
    shard = next((ckpts[2] / "model_optim").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(ValueError, match="interrupted write"):
        load_weights(ckpts[2])
    # An older final export (step 1) loses to the newest complete checkpoint (step 2).
    export_transformer(states[0], run / "transformer" / "diffusion_pytorch_model.safetensors", step=1)
    from_run = load_weights(run)
    assert all(torch.equal(from_run[k], v) for k, v in states[1].items())

    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_weights(tmp_path / "nowhere")


# ------------------------------------------------------------------------------------------ 5


def test_srpo_sample_writes_pngs_equal_to_generate(trained, generated, tiny_overrides, tmp_path):
    from PIL import Image

    from jobs.sample import main
    from pipeline.sampling import to_uint8

    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\n".join(PROMPTS) + "\n\n")
    out = tmp_path / "samples"
    # No sampling flag: the defaults come from the eval section (configs/tiny.yaml: steps 4, guidance 3.5,
    # resolution 64; seed and batch size overridden there).
    rc = main(["--config", str(REPO / "configs/tiny.yaml"), *tiny_overrides, f"eval.seed={SEED}", "eval.batch_size=1",
               "--weights", str(trained["export"]), "--prompts", str(prompts_file), "--out", str(out)])
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == ["00000.png", "00001.png", "index.json", "prompts.txt"]
    index = json.loads((out / "index.json").read_text())
    assert {k: index["settings"][k] for k in ("steps", "guidance", "resolution", "seed", "batch_size")} == \
        {"steps": STEPS, "guidance": GUIDANCE, "resolution": RESOLUTION, "seed": SEED, "batch_size": 1}
    assert [(e["prompt"], e["seed"]) for e in index["images"]] == [(p, SEED + i) for i, p in enumerate(PROMPTS)]
    assert (out / "prompts.txt").read_text().splitlines() == PROMPTS
    png = np.asarray(Image.open(out / "00000.png").convert("RGB")).astype(int)
    expected = to_uint8(generated[:1])[0].astype(int)
    assert png.shape == (RESOLUTION, RESOLUTION, 3)
    assert np.abs(png - expected).max() <= 1  # batch 1 vs 2 rounding may flip a level


# ------------------------------------------------------------------------------------------ 6


def test_srpo_export_cli_logs_artifact_to_the_runs_mlflow_run(trained, tmp_path):
    from mlflow.tracking import MlflowClient
    from safetensors.torch import load_file

    from jobs.export import main
    from pipeline.checkpoint import write_json_atomic

    run = tmp_path / "run"
    (run / "transformer").mkdir(parents=True)
    shutil.copy(trained["export"], run / "transformer" / "diffusion_pytorch_model.safetensors")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("srpo-export-test", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(experiment).info.run_id
    client.set_terminated(run_id, "FINISHED")  # exporting after training: the run is already over
    write_json_atomic(run / "run.json", {"run_id": run_id, "tracking_uri": uri, "experiment": "srpo-export-test",
                                         "ray_run_name": ""})

    assert main([str(run), "--dtype", "bf16"]) == 0
    written = run / "export" / "diffusion_pytorch_model.safetensors"
    assert next(iter(load_file(str(written)).values())).dtype == torch.bfloat16
    logged = [a.path for a in client.list_artifacts(run_id, "export")]
    assert logged == ["export/diffusion_pytorch_model.safetensors"]
    assert client.get_run(run_id).info.status == "FINISHED"

    assert main([str(trained["export"]), "--dtype", "fp32"]) == 2  # outside a run folder: --out is required
