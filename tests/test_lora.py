"""LoRA (lora.rank > 0) on the tiny FLUX: peft adapters, their training, checkpoints, sync and exports.

- At initialisation the LoRA model is the base model (B = 0): the same velocity, bit for bit. Only
  the adapters train; their parameter count is derived here from the base layers' shapes.
- The merge the engines and exports use equals diffusers' own ``fuse_lora`` bit for bit.
- The gradient relay gives the colocated gradients with LoRA.
- The tiny preset with LoRA learns (held-out SRP reward rises) and does not move with lr = 0.
- A LoRA run checkpoints the adapters alone, resumes exactly, and refuses other LoRA settings.
- ``srpo export --lora`` loads with ``FluxPipeline.load_lora_weights``, ``--merge`` into the base
  transformer; both reproduce the in-framework image.
- The weight sync (object store and broadcast) moves the adapters alone; a rollout actor's x0 after
  a sync equals the learner's merged model's.
(FSDP2 and DeepSpeed with LoRA against the single process: the "lora" case of tests/test_parallel.py.)
"""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from conftest import REPO, world_overrides
from pipeline.checkpoint import LocalCheckpoints, TrainingState, find_checkpoints
from pipeline.config import ConfigError, load_config
from pipeline.lora import LoraSpec, add_lora
from pipeline.models import load_adapter
from pipeline.parallel import build_engine

RANK, ALPHA = 4, 8.0
LORA = (f"lora.rank={RANK}", f"lora.alpha={ALPHA}")
# The FLUX default targets (README "LoRA"), written out here rather than read from the adapter.
DOUBLE = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
          "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
          "ff_context.net.2")
SINGLE = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out")
# Rollout images and latents, LoRA layers unmerged vs merged into the weights: W x + s B (A x) and
# (W + s B A) x round differently in float32 (measured max 2e-7 on x0, 1.2e-6 on images in [0, 1]).
X0_ATOL, IMAGE_ATOL = 1e-5, 1e-5


def _expected_layers(model) -> dict[str, torch.nn.Linear]:
    names = [f"transformer_blocks.{i}.{n}" for i in range(len(model.transformer_blocks)) for n in DOUBLE]
    names += [f"single_transformer_blocks.{i}.{n}" for i in range(len(model.single_transformer_blocks)) for n in SINGLE]
    modules = dict(model.named_modules())
    return {n: modules[n] for n in names}


def _adapter_bytes(base_model, rank: int) -> int:
    """fp32 bytes of the adapters: A [r, in] and B [out, r] per adapted Linear."""
    return sum(4 * rank * (m.in_features + m.out_features) for m in _expected_layers(base_model).values())


def _perturb_b(model, seed: int = 0) -> None:
    """Non-zero B (as after training), so the adapters change the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))


@pytest.fixture()
def lora_cfg(tiny_cfg):
    return tiny_cfg(*LORA, "learner.num_workers=0", "train.batch_size=1")


# ------------------------------------------------------------------------------------------ building


def test_lora_starts_as_the_base_and_only_the_adapters_train(lora_cfg):
    cfg = lora_cfg
    adapter = load_adapter(cfg.model.family, cfg.model.path, "cpu", cfg.model.max_sequence_length,
                           load_text_encoders=False)
    base = copy.deepcopy(adapter.transformer)
    model = adapter.transformer
    names = add_lora(model, LoraSpec.from_config(cfg), adapter, seed=cfg.seed)
    assert sorted(names) == sorted(_expected_layers(base))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert 4 * sum(p.numel() for p in trainable.values()) == _adapter_bytes(base, RANK)
    assert all(not p.any() for n, p in trainable.items() if ".lora_B." in n), "peft initialises B to zero"
    engine = build_engine("single", model, cfg.optim, torch.device("cpu"), "fp32", False, 2)
    assert {id(p) for p in engine.optimizer.param_groups[0]["params"]} == {id(p) for p in trainable.values()}

    g = torch.Generator().manual_seed(0)
    x = adapter.sample_noise(2, cfg.data.resolution, g)
    cond = adapter.conditioning_from_arrays(
        {"prompt_embeds": torch.randn(2, cfg.model.max_sequence_length, 32, generator=g).numpy(),
         "pooled": torch.randn(2, 32, generator=g).numpy()}, "cpu")
    with torch.no_grad():
        for sigma in (0.9, 0.3):
            v_base = adapter.velocity(base, x, sigma, cond, 3.5, cfg.data.resolution)
            v_lora = adapter.velocity(model, x, sigma, cond, 3.5, cfg.data.resolution)
            assert torch.equal(v_lora, v_base), sigma
            _perturb_b(model)
            assert not torch.equal(adapter.velocity(model, x, sigma, cond, 3.5, cfg.data.resolution), v_base)
            for n, p in model.named_parameters():
                if ".lora_B." in n:
                    p.zero_()


def test_frozen_base_in_bf16_trains_the_fp32_adapters_under_autocast(lora_cfg):
    """On accelerators with train.mixed_precision=bf16 the engines store a LoRA run's frozen base in
    bf16 (pipeline.lora.cast_frozen; no GPU here, so the cast is called directly): the bf16-autocast
    forward stays near the fp32 one, and the gradient reaches the fp32 adapters alone."""
    from pipeline.device import autocast
    from pipeline.lora import cast_frozen

    cfg = lora_cfg
    adapter = load_adapter(cfg.model.family, cfg.model.path, "cpu", 32, load_text_encoders=False)
    model = adapter.transformer
    add_lora(model, LoraSpec.from_config(cfg), adapter, seed=cfg.seed)
    _perturb_b(model)
    g = torch.Generator().manual_seed(0)
    x = adapter.sample_noise(1, cfg.data.resolution, g)
    arrays = {"prompt_embeds": torch.randn(1, 32, 32, generator=g).numpy(), "pooled": torch.randn(1, 32, generator=g).numpy()}
    cond = adapter.conditioning_from_arrays(arrays, "cpu")
    with torch.no_grad():
        want = adapter.velocity(model, x, 0.5, cond, 3.5, cfg.data.resolution)
    cast_frozen(model, torch.bfloat16)
    dtypes = {p.dtype for p in model.parameters() if not p.requires_grad}
    assert dtypes == {torch.bfloat16} and {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    with autocast(torch.device("cpu"), "bf16"):
        v = adapter.velocity(model, x, 0.5, cond, 3.5, cfg.data.resolution)
    assert float((v - want).norm() / want.norm()) < 0.05  # bf16 rounding, not another model
    v.square().mean().backward()
    assert all((p.grad is not None) == p.requires_grad for p in model.parameters())


def test_bad_target_modules_name_the_field(lora_cfg):
    adapter = load_adapter("flux", lora_cfg.model.path, "cpu", 32, load_text_encoders=False)
    with pytest.raises(ConfigError, match=r"lora.target_modules: \['to_nowhere'\] match no linear layer"):
        add_lora(copy.deepcopy(adapter.transformer), LoraSpec(RANK, ALPHA, 0.0, ("attn.to_q", "to_nowhere")),
                 adapter, 0)
    with pytest.raises(ConfigError, match=r"lora.target_modules: 'attn' names transformer_blocks.0.attn, a "):
        add_lora(copy.deepcopy(adapter.transformer), LoraSpec(RANK, ALPHA, 0.0, ("attn",)), adapter, 0)
    with pytest.raises(ConfigError, match=r"lora.rank: got -1, expected 0 \(full fine-tuning\) or a positive rank"):
        load_config(REPO / "configs/tiny.yaml", ["lora.rank=-1"])
    with pytest.raises(ConfigError, match=r"lora.dropout: got 1.0, expected 0 <= dropout < 1"):
        load_config(REPO / "configs/tiny.yaml", ["lora.rank=4", "lora.dropout=1.0"])


def test_engine_merge_equals_diffusers_fuse_lora(lora_cfg):
    """The merged state the engines export (W + (B @ A) * alpha / r) is what diffusers' fuse_lora
    writes into the layers, bit for bit, with the plain diffusers keys."""
    cfg = lora_cfg
    adapter = load_adapter(cfg.model.family, cfg.model.path, "cpu", 32, load_text_encoders=False)
    keys = list(adapter.transformer.state_dict())
    add_lora(adapter.transformer, LoraSpec.from_config(cfg), adapter, seed=cfg.seed)
    engine = build_engine("single", adapter.transformer, cfg.optim, torch.device("cpu"), "fp32", False, 2)
    _perturb_b(engine.transformer)
    merged = engine.full_state_dict()
    fused = copy.deepcopy(engine.transformer)
    fused.fuse_lora()
    fused.unload_lora()
    want = fused.state_dict()
    assert list(merged) == list(want) == keys
    for k, v in want.items():
        assert torch.equal(merged[k], v), k
    base = {k.replace(".base_layer.", "."): v for k, v in engine.transformer.state_dict().items()}
    changed = {k for k, v in want.items() if not torch.equal(v, base[k])}
    assert changed == {f"{n}.weight" for n in _expected_layers(fused)}, "exactly the adapted layers' weights change"


def test_lora_preset_is_the_reference_recipe_with_lora():
    lora = load_config(REPO / "configs/flux_hpsv2_lora.yaml").to_dict()
    full = load_config(REPO / "configs/flux_hpsv2.yaml").to_dict()
    assert lora.pop("lora") == {"rank": 32, "alpha": 32.0, "dropout": 0.0, "target_modules": []}
    assert full.pop("lora") == {"rank": 0, "alpha": None, "dropout": 0.0, "target_modules": []}
    assert lora["optim"].pop("lr") == 1e-4 and full["optim"].pop("lr") == 5e-6
    for d in (lora, full):
        d.pop("log"), d.pop("output")
    assert lora == full


# ------------------------------------------------------------------------------------------ training


def test_relay_gradients_equal_colocated_with_lora(lora_cfg):
    """x0_hat.backward(dLoss/dx0_hat) (the remote reward) gives the adapters the colocated gradients."""
    from helpers import StepHarness
    from pipeline.direct_align import direct_align, plan_branches
    from pipeline.objective import relay_surrogate
    from pipeline.srpo_step import StepBatch, request_for

    torch.manual_seed(0)
    tr = StepHarness(lora_cfg)
    r = tr.rollout(["a photo of a cat sitting on a wooden table"], generator=torch.Generator().manual_seed(0))
    add_lora(tr.transformer, LoraSpec.from_config(lora_cfg), tr.adapter, seed=0)
    _perturb_b(tr.transformer)  # B = 0 would leave A without gradient
    batch = StepBatch(x0=r.x0, eps=r.eps, cond=r.cond, captions=r.captions)
    results = []
    for relayed in (False, True):
        for plan in plan_branches(tr.grid, [600], "Real", "Oil"):
            vf = lambda x, s: tr.adapter.velocity(tr.transformer, x, s, batch.cond, 3.5, 64)  # noqa: E731
            x0_hat = direct_align(vf, batch.x0, batch.eps, plan)
            req = request_for(plan, batch.captions, tr.cfg.srpo)
            if relayed:
                grad, _ = tr.objective.loss_grad(x0_hat, req)  # what a reward worker returns
                relay_surrogate(x0_hat, grad).backward()
            else:
                tr.objective.surrogate(x0_hat, req)[0].backward()
        results.append({n: p.grad.clone() for n, p in tr.transformer.named_parameters() if p.grad is not None})
        tr.transformer.zero_grad(set_to_none=True)
    colocated, relayed = results
    trainable = {n for n, p in tr.transformer.named_parameters() if p.requires_grad}
    assert set(colocated) == set(relayed) == trainable, "gradients reach the adapters and nothing else"
    assert all(colocated[n].abs().sum() > 0 for n in colocated)
    for n in colocated:
        torch.testing.assert_close(relayed[n], colocated[n], rtol=1e-5, atol=1e-10)


def test_tiny_preset_with_lora_raises_heldout_reward_and_lr_zero_does_not(tiny_cfg, tmp_path):
    """As tests/test_trainer.py's learning test, with LoRA (rank 4): 30 steps at lr 1e-2. Measured
    +0.0075 on a base of 0.0316 (full fine-tuning at lr 3e-3: +0.035; LoRA saturates near +0.009)."""
    from test_trainer import _run

    common = ("learner.num_workers=0", f"lora.rank={RANK}", "train.batch_size=2")
    before, after = _run(tiny_cfg(*common, "optim.lr=1e-2"), tmp_path / "a")
    before0, after0 = _run(tiny_cfg(*common, "optim.lr=0", f"output.dir={tmp_path / 'b'}"), tmp_path / "b")
    print(f"\nLoRA held-out mean SRP reward: lr=1e-2 {before:.5f} -> {after:.5f}; lr=0 {before0:.5f} -> {after0:.5f}")
    assert before == pytest.approx(before0, abs=1e-7), "same start (B = 0: the base), same held-out noise"
    assert after - before > 0.004
    assert after0 == pytest.approx(before0, abs=1e-6)


# ------------------------------------------------------------------------------------------ runs


def _run_cfg(tiny_world, out, *extra):
    return load_config(REPO / "configs/tiny.yaml", world_overrides(tiny_world, out) + [
        *LORA, "learner.num_workers=0", "train.batch_size=2", "train.checkpoint_every=2", "train.keep_checkpoints=2",
        "log.image_every=0", *extra])


@pytest.fixture(scope="module")
def lora_run(tiny_world, tmp_path_factory):
    """4 single-process LoRA steps, checkpoints at 2 and 4, the final exports."""
    from pipeline.runs import run_local

    out = tmp_path_factory.mktemp("lora-run")
    run_local(_run_cfg(tiny_world, out, "train.max_steps=4"))
    return out


def test_checkpoint_holds_the_adapters_and_resume_is_exact(lora_run, tiny_world, tmp_path):
    from safetensors.torch import load_file
    from torch.distributed.checkpoint import FileSystemReader

    from jobs.train import main as train_main
    from pipeline.runs import run_local

    ckpt = find_checkpoints(lora_run)[-1]
    state = json.loads((ckpt / "srpo_state.json").read_text())
    assert state["step"] == 4 and state["lora"] == {"rank": RANK, "alpha": ALPHA, "dropout": 0.0, "target_modules": []}
    entries = FileSystemReader(str(ckpt / "model_optim")).read_metadata().state_dict_metadata
    model = [k for k in entries if k.startswith("model.")]
    base = load_adapter("flux", tiny_world["flux"], "cpu", 32, load_text_encoders=False).transformer
    assert len(model) == 2 * len(_expected_layers(base)) and all(".lora_A.default." in k or ".lora_B.default." in k
                                                                  for k in model)
    optim = {k.rsplit(".", 1)[-1] for k in entries if k.startswith("optim.state.")}
    assert optim == {"step", "exp_avg", "exp_avg_sq"}  # AdamW's state, of the adapters alone
    # Stopped after 2 steps and resumed to 4: the uninterrupted run exactly.
    out = tmp_path / "stopped"
    run_local(_run_cfg(tiny_world, out, "train.max_steps=2"))
    assert train_main(["--resume", str(out), "train.max_steps=4"]) == 0
    final = "transformer/diffusion_pytorch_model.safetensors"
    want, got = load_file(str(lora_run / final)), load_file(str(out / final))
    assert want.keys() == got.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("override", ["lora.rank=8", "lora.rank=0", "lora.alpha=2.0"])
def test_resume_with_other_lora_settings_is_refused(lora_run, override, capsys):
    from jobs.train import main as train_main

    assert train_main(["--resume", str(lora_run), "train.max_steps=6", override]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("config error: lora: the checkpoint in ") and "resume with the settings" in err[-1]


def test_restore_refuses_other_lora_settings_before_loading(lora_run):
    """The learner's own check (a Ray Train restart reads the checkpoint there): before any tensor loads."""
    from pipeline.checkpoint import load_training_checkpoint

    with pytest.raises(ConfigError, match=r"lora: the checkpoint in .* was trained with LoRA lora.rank=4 .* the config "
                                          r"gives full fine-tuning \(lora.rank=0\)"):
        load_training_checkpoint(find_checkpoints(lora_run)[-1], None, "single", 0, 1, None, lora=None)


# ------------------------------------------------------------------------------------------ exports

PROMPT, SEED, STEPS, GUIDANCE, RESOLUTION = "a photo of a cat sitting on a wooden table", 7, 4, 3.5, 64


def _pipeline_image(pipe):
    return pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=RESOLUTION, width=RESOLUTION,
                max_sequence_length=32, generator=torch.Generator("cpu").manual_seed(SEED), output_type="pt").images


def test_export_lora_and_merge_reproduce_the_in_framework_image(lora_run, tiny_world, tmp_path):
    """The run's policy as the Learner holds it (restored from the last checkpoint: base + peft
    adapters) generates the reference image; `srpo export --lora` loaded by FluxPipeline.load_lora_weights
    and `srpo export --merge` loaded into the base transformer give it back within IMAGE_ATOL."""
    from diffusers import FluxPipeline
    from safetensors.torch import load_file

    from jobs.export import main as export_main
    from pipeline.learner import build_learner
    from pipeline.sampling import generate, load_scheduler_config
    from pipeline.sources import InProcessSource

    cfg = load_config(lora_run / "config.yaml")
    learner = build_learner(cfg, InProcessSource(cfg), LocalCheckpoints(lora_run / "checkpoints", 1),
                            device=torch.device("cpu"))
    assert learner.restore().step == 4
    text = load_adapter(cfg.model.family, cfg.model.path, "cpu", cfg.model.max_sequence_length, load_transformer=False)
    want = generate(text, learner.engine.transformer, [PROMPT], [SEED], STEPS, GUIDANCE, RESOLUTION, batch_size=1,
                    scheduler_config=load_scheduler_config(cfg.model.path))

    assert export_main([str(lora_run), "--lora", "--out", str(tmp_path / "lora"), "--no-mlflow"]) == 0
    assert export_main([str(lora_run), "--merge", "--out", str(tmp_path / "merged.safetensors"), "--no-mlflow"]) == 0
    merged = load_file(str(tmp_path / "merged.safetensors"))
    final = load_file(str(lora_run / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert merged.keys() == final.keys() and all(torch.equal(merged[k], final[k]) for k in final), \
        "--merge equals the run's final export (merged by the engine)"
    assert set(load_file(str(lora_run / "lora" / "pytorch_lora_weights.safetensors"))) == \
        set(load_file(str(tmp_path / "lora" / "pytorch_lora_weights.safetensors")))

    pipe = FluxPipeline.from_pretrained(tiny_world["flux"], local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    base_image = _pipeline_image(pipe)
    pipe.load_lora_weights(str(tmp_path / "lora"))
    lora_image = _pipeline_image(pipe)
    pipe.unload_lora_weights()
    pipe.transformer.load_state_dict(merged, strict=True)
    merged_image = _pipeline_image(pipe)
    print(f"\nmax |image - in-framework|: --lora {float((lora_image - want).abs().max()):.2g}, "
          f"--merge {float((merged_image - want).abs().max()):.2g}; base {float((base_image - want).abs().max()):.2g}")
    assert float((base_image - want).abs().max()) > 100 * IMAGE_ATOL, "the trained adapters change the image"
    torch.testing.assert_close(lora_image, want, rtol=0, atol=IMAGE_ATOL)
    torch.testing.assert_close(merged_image, want, rtol=0, atol=IMAGE_ATOL)


# ------------------------------------------------------------------------------------------ weight sync


@pytest.mark.parametrize("weight_sync", ["object_store", "broadcast"])
def test_weight_sync_moves_the_adapters_and_the_rollout_equals_the_merged_model(tiny_cfg, ray_local, tmp_path,
                                                                               weight_sync):
    """One learner step publishes version 1 (adapters alone); a rollout actor (RolloutStage, in this
    process) pulls it and generates the next step's x0, equal to the learner's merged model's x0."""
    from actors.rollout import RolloutStage
    from actors.weights import LearnerWeightSync, WeightStore
    from pipeline.learner import build_learner
    from pipeline.rollout import sample_x0
    from pipeline.sources import InProcessSource, draw_eps

    cfg = tiny_cfg(*LORA, "learner.num_workers=0", "rollout.placement=actors", f"rollout.weight_sync={weight_sync}",
                   "rollout.num_actors=1", "rollout.max_staleness=0", "train.max_steps=3", "train.batch_size=1",
                   "reward.placement=colocated")
    store = ray_local.remote(WeightStore).remote()
    cpu = torch.device("cpu")
    sync = LearnerWeightSync(cfg, store, 0, cpu)
    learner = build_learner(cfg, InProcessSource(cfg), LocalCheckpoints(tmp_path / "ck", 1), device=cpu,
                            weight_sync=sync)
    try:
        sync.open(learner.policy_state(), 0)  # what Learner.run does first
        stage = RolloutStage(cfg.to_dict(), store)  # after the group opened (broadcast), as under Ray Data
        batches = learner.source.batches(0)
        metrics = learner.one_step(next(batches), TrainingState(), 0.0)  # publishes version 1
        base = load_adapter(cfg.model.family, cfg.model.path, "cpu", 32, load_text_encoders=False).transformer
        nbytes = _adapter_bytes(base, RANK)
        full = 4 * sum(p.numel() for p in base.parameters())
        print(f"\n{weight_sync}: {nbytes} bytes per sync (adapters), full weights {full}")
        assert metrics["weight_sync/bytes"] == nbytes
        rows = next(batches)  # step 1: the rollout waits for version >= 1
        out = stage(dict(rows))
        assert out["policy_version"].tolist() == [1] and stage.weights.last_sync_bytes == nbytes
        x0 = torch.from_numpy(out["x0"])
        base.load_state_dict(learner.engine.full_state_dict(), strict=True)  # the merged model
        eps = draw_eps(learner.adapter, [int(s) for s in rows["noise_seed"]], cfg.data.resolution)
        cond = learner.adapter.conditioning_from_arrays(rows, cpu)
        merged_x0 = sample_x0(learner.adapter, base.eval(), eps, cond, cfg.data.resolution, cfg.rollout.steps,
                              cfg.rollout.shift, cfg.rollout.guidance, cfg.train.mixed_precision)
        initial = sample_x0(learner.adapter, load_adapter("flux", cfg.model.path, "cpu", 32,
                                                          load_text_encoders=False).transformer.eval(),
                            eps, cond, cfg.data.resolution, cfg.rollout.steps, cfg.rollout.shift,
                            cfg.rollout.guidance, cfg.train.mixed_precision)
        print(f"max |actor x0 - merged x0| {float((x0 - merged_x0).abs().max()):.2g}, "
              f"vs the untrained base {float((x0 - initial).abs().max()):.2g}")
        assert float((x0 - initial).abs().max()) > 100 * X0_ATOL, "the synced adapters change the rollout"
        torch.testing.assert_close(x0, merged_x0, rtol=0, atol=X0_ATOL)
        assert torch.equal(x0, learner.rollout(eps, cond)), "the same peft model as the learner's, bit for bit"
    finally:
        sync.close()
        ray_local.kill(store)
