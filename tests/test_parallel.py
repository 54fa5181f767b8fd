"""Learner engines (pipeline/parallel.py) against the single-process trainer.

- ``single`` is SRPOTrainer's step, bit for bit.
- FSDP2 and DeepSpeed ZeRO-2 / ZeRO-3 on 2 CPU processes (gloo) give the single-process update,
  and a save_sharded / load_sharded round trip continues it bit for bit:

      single process : batch [s0, s1], levels [[m0, m1]]  -> srpo_step (clip, AdamW)
      rank r of 2    : batch [s_r],    levels [[m_r]]     -> engine.backward per branch, engine.step

  The branch loss is a per-sample mean and both engines average gradients across ranks, so the two
  compute the same gradient, clip it with the same global norm and take the same AdamW step.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import socket
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
CAPTIONS = ["a photo of a cat sitting on a wooden table", "a red sports car parked on a city street at night"]
LEVELS = (300, 700)  # m for sample 0 (rank 0) and sample 1 (rank 1)
STEP = 3  # global step: control words "Real" / "Flat"
WORLD_SIZE = 2

# Each case runs once per strategy in the same two processes; (rtol, atol) bound the parameters
# after the step. Exact equality is not expected: each rank runs a batch of 1 where the reference
# runs a batch of 2 (other matmul blockings), the gradient mean is a cross-rank reduction instead of
# the in-batch mean, and the global norm is summed from shard pieces in another order, so gradients
# differ by float32 rounding (~1e-7 relative).
# - "default": the tiny preset's optimizer; clip 0.1 is not reached (grad norm ~0.01). AdamW's first
#   step is lr * g / (|g| + eps) with eps = 1e-8: ~lr * sign(g) for most elements, but for the few
#   with |g| ~ eps its slope is lr / eps = 3e5, so a 1e-11 rounding difference in such a gradient
#   moves the parameter by ~3e-6 (measured max 8e-6). atol 5e-5 is 1/60 of the lr-sized update
#   every other element gets: a gradient of the wrong direction still fails by ~100x. The grad
#   norm (rtol 1e-5) checks the gradient's scale.
# - "clipped": clipping active (max_grad_norm 1e-3 < norm). eps = 1e-4 exceeds every clipped
#   gradient element, so the step is ~ lr * clip * g / eps, linear in the gradient and well
#   conditioned (measured max error 1.5e-8 on updates up to 1.2e-3, median 5e-6; rtol 1e-6 allows
#   a few float32 ulps of the parameter itself): a wrong clip factor (a per-shard norm) or a sum
#   instead of a mean over ranks would show by orders of magnitude.
#   This case also starts the engine from other weights and loads the initial ones with
#   load_full_state_dict, with activation checkpointing on.
# - "relayed": as "clipped", but the ranks get the reward through the gradient relay with overlap
#   (srpo_backward runs both branches' forwards before the backwards, as with remote reward
#   workers); the reference is still the colocated single-process step.
# - "lora": peft LoRA adapters (rank 4, the family's default targets) on the frozen base, the
#   default optimizer; the reference is the single-process LoRA step, compared merged (plain keys).
#   Only the adapters train (AdamW's first step moves B by ~lr * sign(g)); the merged weights moved
#   by up to 3.9e-3 and differ from the reference by at most 1.2e-6 (measured, FSDP2 and ZeRO-2):
#   atol 1e-5. The sharded save / load round trip runs here too (the adapters and their AdamW state).
CLIPPED = dict(max_grad_norm=1e-3, eps=1e-4)
CASES = {
    "default": dict(optim={}, load=False, checkpointing=False, relay=False, rtol=1e-5, atol=5e-5),
    "clipped": dict(optim=CLIPPED, load=True, checkpointing=True, relay=False, rtol=1e-6, atol=1e-7),
    "relayed": dict(optim=CLIPPED, load=False, checkpointing=False, relay=True, rtol=1e-6, atol=1e-7),
    "lora": dict(optim={}, load=False, checkpointing=False, relay=False, lora=True, rtol=1e-5, atol=1e-5),
}
RESUMED = ("default", "lora")  # the cases that also check save_sharded -> load_sharded
LORA = dict(rank=4, alpha=8.0, dropout=0.0, target_modules=())  # pipeline.lora.LoraSpec fields
NORM_RTOL = 1e-5


# ------------------------------------------------------------------------------------------ helpers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _optim(cfg, case: str):
    return dataclasses.replace(cfg.optim, **CASES[case]["optim"])


def _reference_step(tr, batch, initial: dict, case: str) -> tuple[dict, float]:
    """The single-process step of a case from the initial weights with a fresh AdamW."""
    from pipeline.srpo_step import build_optimizer, srpo_step

    from pipeline.lora import LoraSpec, add_lora, merge_lora

    o = _optim(tr.cfg, case)
    tr.transformer.load_state_dict(initial)
    model = tr.transformer
    if CASES[case].get("lora"):
        model = copy.deepcopy(tr.transformer)
        add_lora(model, LoraSpec(**LORA), tr.adapter, seed=0)
    opt = build_optimizer([p for p in model.parameters() if p.requires_grad], o.lr, o.betas, o.eps, o.weight_decay)
    m = srpo_step(tr.adapter, model, opt, tr.objective, tr.grid, tr.cfg.srpo, batch, STEP,
                  torch.Generator(), tr.cfg.data.resolution, tr.cfg.rollout.shift, max_grad_norm=o.max_grad_norm,
                  mixed_precision=tr.cfg.train.mixed_precision, levels=[list(LEVELS)])
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return (merge_lora(state, LoraSpec(**LORA).scaling) if CASES[case].get("lora") else state), m.grad_norm


class _OverlappedRelay:
    """The remote reward's protocol in-process: ``submit`` computes dLoss/dx0_hat on a detached copy
    (what a reward worker returns), ``collect`` turns it into the relay surrogate. ``overlap = True``
    makes srpo_backward run every branch's forward before the first backward."""

    overlap = True

    def __init__(self, colocated) -> None:
        self.colocated = colocated

    def submit(self, x0_hat, req):
        return self.colocated.loss_grad(x0_hat, req)

    def collect(self, ticket, x0_hat):
        from pipeline.objective import relay_surrogate

        grad, result = ticket
        return relay_surrogate(x0_hat, grad), result


COLLECTIVES = {"all_gather_single": 0, "reduce_scatter_single": 0}


@contextlib.contextmanager
def _recorded_torch_loads():
    """The ``weights_only`` value of every ``torch.load`` call made inside (DeepSpeed's included)."""
    seen, original = [], torch.load

    def recording(*args, **kwargs):
        seen.append(kwargs.get("weights_only"))
        return original(*args, **kwargs)

    torch.load = recording
    try:
        yield seen
    finally:
        torch.load = original


def _count_collectives(dist) -> None:
    """Count FSDP2's collectives (it calls ``dist.all_gather_single`` / ``dist.reduce_scatter_single``)."""
    for name in COLLECTIVES:
        def counted(*args, _orig=getattr(dist, name), _name=name, **kwargs):
            COLLECTIVES[_name] += 1
            return _orig(*args, **kwargs)
        setattr(dist, name, counted)


def _worker(rank: int, world_size: int, port: int, job_path: str) -> None:
    """One rank: load the tiny world, then every case with every requested engine; save results."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)  # two ranks on two cores
    from pipeline.config import load_config
    from pipeline.device import distributed_backend
    from pipeline.models import TextConditioning, load_adapter
    from pipeline.objective import ColocatedReward
    from torch.distributed.fsdp import FSDPModule

    from pipeline.lora import LoraSpec, add_lora, adapter_state_dict
    from pipeline.parallel import DeepSpeedZeroEngine, build_engine
    from pipeline.srpo_step import StepBatch, grid_from_config, srpo_backward
    from pipeline.objective import reward_model_from_config
    from pipeline.rollout import sample_x0

    job = torch.load(job_path, weights_only=True)
    cfg = load_config(REPO / "configs/tiny.yaml", job["overrides"])
    device = torch.device("cpu")
    dist.init_process_group(distributed_backend(device), rank=rank, world_size=world_size)
    _count_collectives(dist)
    try:
        adapter = load_adapter(cfg.model.family, cfg.model.path, device, cfg.model.max_sequence_length,
                               load_text_encoders=False)  # the text conditioning comes with the batch
        objective = ColocatedReward(adapter, reward_model_from_config(cfg, device), cfg.data.resolution)
        grid = grid_from_config(cfg.srpo, cfg.rollout.shift)
        b = torch.load(job["batch"], weights_only=True)
        mine = slice(rank, rank + 1)  # this rank's sample
        batch = StepBatch(x0=b["x0"][mine], eps=b["eps"][mine], captions=[b["captions"][rank]],
                          cond=TextConditioning(b["prompt_embeds"][mine], b["pooled"][mine], b["text_ids"]))
        pristine = adapter.transformer
        initial = {k: v.detach().clone() for k, v in pristine.state_dict().items()}
        for strategy, zero_stage, tag in job["engines"]:
            for case, spec in CASES.items():
                model = copy.deepcopy(pristine)
                if spec.get("lora"):
                    add_lora(model, LoraSpec(**LORA), adapter, seed=0)
                if spec["load"]:
                    with torch.no_grad():
                        for p in model.parameters():
                            p.mul_(-0.5)  # other weights, so a failed load shows
                optim = dataclasses.replace(cfg.optim, **spec["optim"])
                engine = build_engine(strategy, model, optim, device, cfg.train.mixed_precision,
                                      spec["checkpointing"], zero_stage, shard_blocks=adapter.shard_blocks(model),
                                      keep_gathered=tag.endswith("gathered"))
                result = {}
                if spec["load"]:
                    engine.load_full_state_dict(initial)
                    result["loaded"] = engine.full_state_dict()
                reward = _OverlappedRelay(objective) if spec["relay"] else objective
                assert cfg.srpo.variant == "reference"  # two branches: denoise + inversion
                COLLECTIVES.update(dict.fromkeys(COLLECTIVES, 0))
                if strategy == "fsdp2":  # the colocated rollout's no-grad forwards, just before the step
                    engine.transformer.eval()
                    with torch.no_grad(), engine.gathered_for_inference():
                        result["rollout"] = sample_x0(adapter, engine.transformer, batch.eps, batch.cond,
                                                      cfg.data.resolution, 2, cfg.rollout.shift, cfg.rollout.guidance)
                    engine.transformer.train()
                with engine.step_scope(2):
                    srpo_backward(adapter, engine.transformer, reward, grid, cfg.srpo, batch, STEP, torch.Generator(),
                                  cfg.data.resolution, cfg.rollout.shift, mixed_precision=cfg.train.mixed_precision,
                                  levels=[[LEVELS[rank]]], backward=engine.backward)
                result["collectives"] = dict(COLLECTIVES)  # the step's forwards and backwards
                result["fsdp_modules"] = sum(isinstance(m, FSDPModule) for m in engine.transformer.modules())
                result["grad_norm"] = engine.step(optim.max_grad_norm)
                result["state"] = engine.full_state_dict()  # rank 0 only; {} elsewhere
                if spec.get("lora"):  # what the weight sync publishes: the adapters, gathered, in peft's keys
                    result["adapter"] = adapter_state_dict(engine.module, engine.trainable_state_dict())
                if case in RESUMED:
                    # Resume: save the sharded model + optimizer, load them into an engine built from
                    # other weights, then take one more identical step with both: bit-identical.
                    ckpt = Path(job["out"]) / f"ckpt-{tag}-{case}"
                    engine.save_sharded(str(ckpt))
                    twin_model = copy.deepcopy(pristine)
                    if spec.get("lora"):  # other adapters (another seed); the base is the checkpoint's
                        add_lora(twin_model, LoraSpec(**LORA), adapter, seed=1)
                    with torch.no_grad():
                        for p in twin_model.parameters():
                            if p.requires_grad:
                                p.mul_(-0.5)
                    twin = build_engine(strategy, twin_model, optim, device, cfg.train.mixed_precision,
                                        spec["checkpointing"], zero_stage,
                                        shard_blocks=adapter.shard_blocks(twin_model),
                                        keep_gathered=tag.endswith("gathered"))
                    with _recorded_torch_loads() as loads:
                        twin.load_sharded(str(ckpt))
                        if strategy == "deepspeed" and not spec.get("lora") and rank == 0:
                            result["ds_read"] = DeepSpeedZeroEngine.read_model_weights(ckpt)  # what export reads
                    result["torch_load_weights_only"] = sorted(set(loads))
                    for e in (engine, twin):
                        with e.step_scope(2):
                            srpo_backward(adapter, e.transformer, objective, grid, cfg.srpo, batch, STEP + 1,
                                          torch.Generator(), cfg.data.resolution, cfg.rollout.shift,
                                          mixed_precision=cfg.train.mixed_precision, levels=[[LEVELS[1 - rank]]],
                                          backward=e.backward)
                        e.step(optim.max_grad_norm)
                    result["continued"] = engine.full_state_dict()
                    result["resumed"] = twin.full_state_dict()
                    del twin, twin_model
                torch.save(result, Path(job["out"]) / f"{tag}-{case}-rank{rank}.pt")
                del engine, model
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture()
def parity(tiny_cfg, tiny_overrides, tmp_path):
    """The batch of 2 (written for the ranks), the initial weights and the reference step per case."""
    from helpers import StepHarness as SRPOTrainer
    from pipeline.rollout import sample_x0
    from pipeline.srpo_step import StepBatch

    overrides = tiny_overrides + ["train.batch_size=2"]
    torch.manual_seed(0)
    tr = SRPOTrainer(tiny_cfg("train.batch_size=2"))
    r = tr.rollout(CAPTIONS, generator=torch.Generator().manual_seed(0))
    batch_path = tmp_path / "batch.pt"
    torch.save({"x0": r.x0, "eps": r.eps, "captions": list(r.captions), "prompt_embeds": r.cond.prompt_embeds,
                "pooled": r.cond.pooled, "text_ids": r.cond.text_ids}, batch_path)
    batch = StepBatch(x0=r.x0, eps=r.eps, cond=r.cond, captions=r.captions)
    initial = {k: v.detach().clone() for k, v in tr.transformer.state_dict().items()}
    refs = {case: _reference_step(tr, batch, initial, case) for case in CASES}
    tr.transformer.load_state_dict(initial)
    with torch.no_grad():  # rank 0's 2-step rollout from the initial weights (LoRA's B starts at zero)
        cond0 = type(r.cond)(r.cond.prompt_embeds[:1], r.cond.pooled[:1], r.cond.text_ids)
        rollout = sample_x0(tr.adapter, tr.transformer, r.eps[:1], cond0, tr.cfg.data.resolution, 2,
                            tr.cfg.rollout.shift, tr.cfg.rollout.guidance)
    for case, (state, norm) in refs.items():
        moved = max(float((state[k] - initial[k]).abs().max()) for k in state)
        assert moved > 20 * CASES[case]["atol"], f"{case}: the step must move the weights far beyond the tolerance"
        if CASES[case]["optim"].get("max_grad_norm"):
            assert norm > 2 * CASES[case]["optim"]["max_grad_norm"], f"{case}: clipping must be active"
    return dict(overrides=overrides, batch=str(batch_path), initial=initial, refs=refs, rollout=rollout, out=tmp_path)


def _run_ranks(parity, engines: list[tuple[str, int, str]]) -> None:
    import torch.multiprocessing as mp

    job_path = parity["out"] / "job.pt"
    torch.save({"overrides": parity["overrides"], "batch": parity["batch"], "engines": engines,
                "out": str(parity["out"])}, job_path)
    mp.spawn(_worker, args=(WORLD_SIZE, _free_port(), str(job_path)), nprocs=WORLD_SIZE, join=True)


# ------------------------------------------------------------------------------------------ tests


def test_single_engine_is_the_trainer_step_bit_for_bit(tiny_cfg):
    from pipeline.parallel import LearnerEngine, build_engine
    from pipeline.srpo_step import StepBatch, srpo_backward
    from helpers import StepHarness as SRPOTrainer

    cfg = tiny_cfg("train.batch_size=2")
    torch.manual_seed(0)
    tr = SRPOTrainer(cfg)
    engine = build_engine("single", copy.deepcopy(tr.transformer), cfg.optim, tr.device,
                          cfg.train.mixed_precision, cfg.model.activation_checkpointing, cfg.learner.zero_stage)
    assert isinstance(engine, LearnerEngine)
    for step in range(2):  # the second step replays AdamW's state too
        r = tr.rollout(CAPTIONS, generator=torch.Generator().manual_seed(step))
        levels = [[LEVELS[0] + step, LEVELS[1] - step]]
        ref = tr.train_step(rollout=r, levels=levels)
        m = srpo_backward(tr.adapter, engine.transformer, tr.objective, tr.grid, cfg.srpo,
                          StepBatch(x0=r.x0, eps=r.eps, cond=r.cond, captions=r.captions), step,
                          torch.Generator(), cfg.data.resolution, cfg.rollout.shift,
                          mixed_precision=cfg.train.mixed_precision, levels=levels, backward=engine.backward)
        assert engine.step(cfg.optim.max_grad_norm) == ref.grad_norm
        assert [b["loss"] for b in m.branches] == [b["loss"] for b in ref.branches]
    state, want = engine.full_state_dict(), tr.transformer.state_dict()
    assert list(state) == list(want)
    for k in want:
        assert state[k].device.type == "cpu" and state[k].dtype == torch.float32
        assert torch.equal(state[k], want[k]), k


def test_single_engine_state_round_trip(tiny_cfg):
    from diffusers import FluxTransformer2DModel

    from pipeline.parallel import build_engine

    cfg = tiny_cfg()
    plain = FluxTransformer2DModel.from_pretrained(cfg.model.path, subfolder="transformer")
    engine = build_engine("single", copy.deepcopy(plain), cfg.optim, torch.device("cpu"), "fp32", False, 2)
    state = engine.full_state_dict()
    assert list(state) == list(plain.state_dict())
    zeros = {k: torch.zeros_like(v) for k, v in state.items()}
    engine.load_full_state_dict(zeros)
    assert all(not v.any() for v in engine.transformer.state_dict().values())
    state["unexpected.weight"] = torch.zeros(1)
    with pytest.raises(KeyError, match="unexpected.weight"):
        engine.load_full_state_dict(state)


@pytest.mark.parametrize("strategy,zero_stage,tag", [("fsdp2", 2, "fsdp2"), ("fsdp2", 2, "fsdp2-gathered"),
                                                      ("deepspeed", 2, "zero2"), ("deepspeed", 3, "zero3")],
                         ids=["fsdp2", "fsdp2-keep-gathered", "zero2", "zero3"])
def test_sharded_engine_matches_single_process(parity, strategy, zero_stage, tag):
    """Each sharded engine (FSDP2 also with learner.fsdp_keep_gathered: one gather and one
    reduce-scatter of the summed branch gradients per step) equals the single-process step."""
    _run_ranks(parity, [(strategy, zero_stage, tag)])
    for case in CASES:
        ranks = [torch.load(parity["out"] / f"{tag}-{case}-rank{r}.pt", weights_only=True) for r in range(WORLD_SIZE)]
        ref_state, ref_norm = parity["refs"][case]
        if CASES[case]["load"]:
            # A load followed by a gather is exact: no arithmetic happens on the way.
            loaded = ranks[0]["loaded"]
            assert list(loaded) == list(parity["initial"])
            for k, v in parity["initial"].items():
                assert torch.equal(loaded[k], v), f"{tag}/{case}: load_full_state_dict + full_state_dict changed {k}"
        if strategy == "fsdp2":  # per step, for M sharded modules (blocks + root)
            counts, m = ranks[0]["collectives"], ranks[0]["fsdp_modules"]
            g = m - 1 if CASES[case].get("lora") else m  # LoRA: the root's own parameters are frozen, no gradient
            # Both begin with a 2-step rollout in gathered_for_inference (one gather of each module).
            if tag.endswith("gathered"):  # the step reuses the rollout's gathered modules, one reduce-scatter
                assert counts == {"all_gather_single": m, "reduce_scatter_single": g}, (case, counts)
            else:  # freed after the rollout; each branch reduce-scatters, each forward and backward gathers
                assert counts["reduce_scatter_single"] == 2 * g and counts["all_gather_single"] > 3 * m, (case, counts)
            # The gathered rollout is the whole model's: the single process's rollout of rank 0's sample
            # (a batch of 1 in both; other thread counts may block the matmuls otherwise: float32 rounding).
            torch.testing.assert_close(ranks[0]["rollout"], parity["rollout"], rtol=1e-5, atol=1e-6,
                                       msg=lambda m, case=case: f"{tag}/{case} rollout: {m}")
        norms = [r["grad_norm"] for r in ranks]
        assert all(isinstance(n, float) for n in norms)
        assert norms[0] == norms[1], f"{tag}/{case}: ranks report different grad norms {norms}"
        assert norms[0] == pytest.approx(ref_norm, rel=NORM_RTOL), f"{tag}/{case}: grad norm"
        state = ranks[0]["state"]
        assert ranks[1]["state"] == {}, "full_state_dict is rank 0's by default"
        if CASES[case].get("lora"):  # the published adapters, merged into the base, are the merged state
            from pipeline.lora import LoraSpec, merge_lora

            adapter = ranks[0]["adapter"]
            assert adapter and all(".lora_A.weight" in k or ".lora_B.weight" in k for k in adapter)
            merged = merge_lora({**parity["initial"], **adapter}, LoraSpec(**LORA).scaling)
            assert merged.keys() == state.keys() and all(torch.equal(merged[k], state[k]) for k in state), tag
        assert list(state) == list(ref_state), f"{tag}/{case}: keys differ from the plain diffusers state dict"
        rtol, atol = CASES[case]["rtol"], CASES[case]["atol"]
        if case in RESUMED:  # save_sharded -> load_sharded -> one more step == the step without a break
            # Checkpoints are read with weights_only=True, DeepSpeed's own loads included.
            assert all(r["torch_load_weights_only"] in ([], [True]) for r in ranks), [r["torch_load_weights_only"] for r in ranks]
            if "ds_read" in ranks[0]:  # export's reader of a ZeRO checkpoint gives the saved weights exactly
                assert list(ranks[0]["ds_read"]) == list(state)
                assert all(torch.equal(ranks[0]["ds_read"][k], v) for k, v in state.items()), tag
            continued, resumed = ranks[0]["continued"], ranks[0]["resumed"]
            assert list(resumed) == list(continued)
            for k, v in continued.items():
                assert torch.equal(resumed[k], v), f"{tag}: resumed engine differs at {k}"
            assert any(not torch.equal(continued[k], state[k]) for k in state), f"{tag}: the extra step moved nothing"
        for k, want in ref_state.items():
            assert state[k].dtype == torch.float32 and state[k].device.type == "cpu"
            where = f"{tag}/{case}/{k}"
            torch.testing.assert_close(state[k], want, rtol=rtol, atol=atol, msg=lambda m, where=where: f"{where}: {m}")


def test_bad_strategy_and_missing_process_group(tiny_cfg):
    import torch.nn as nn

    from pipeline.parallel import build_engine

    cfg = tiny_cfg()
    with pytest.raises(ValueError, match="learner.strategy"):
        build_engine("ddp", nn.Linear(2, 2), cfg.optim, torch.device("cpu"), "fp32", False, 2)
    with pytest.raises(RuntimeError, match="process group"):
        build_engine("fsdp2", nn.Linear(2, 2), cfg.optim, torch.device("cpu"), "fp32", False, 2)
    with pytest.raises(ValueError, match="zero_stage"):
        build_engine("deepspeed", nn.Linear(2, 2), cfg.optim, torch.device("cpu"), "fp32", False, zero_stage=1)
