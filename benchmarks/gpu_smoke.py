"""GPU smoke test of the real bf16 learner path: FSDP2 (world size 1), bf16, activation checkpointing.

    python benchmarks/gpu_smoke.py                          # ~0.56B-parameter FLUX, 512x512, one GPU
    python benchmarks/gpu_smoke.py --layers 19 --single-layers 38 --heads 24   # FLUX.1-dev's shape (12B)
    python benchmarks/gpu_smoke.py --device cpu --tiny      # a quick check of the script on the CPU

A random FLUX transformer of the real diffusers class (``--layers`` double-stream and
``--single-layers`` single-stream blocks, ``--heads`` x ``--head-dim`` wide; FLUX.1-dev is 19 / 38 /
24 x 128) is trained with the reference recipe (configs/flux_hpsv2.yaml: lr 5e-6, clip 0.1, 25-step
rollout at guidance 1, both Direct-Align branches) against the tiny world's VAE, text encoders and
HPSv2.1-format reward, which are tiny: the learner's transformer is what is measured. Each step is a
colocated rollout with the sharded model (no grad), then ``srpo_backward`` + ``engine.step``.

Prints and saves (``--out``, JSON): median rollout / learner / total step seconds, peak accelerator
memory (``torch.cuda.max_memory_allocated``; peak RSS on the CPU), and model FLOPs utilisation:
    FLOPs per step = branches * 6 * P * T  +  rollout_steps * 2 * P * T
with P the transformer's parameters and T = batch * (image tokens + text tokens) per forward. This
is the usual 6PT convention: it counts neither activation-checkpointing recomputation nor
attention's T^2 term; ``mfu_with_attention`` adds the latter (4 * T_seq^2 * width per block and
sample forward, x3 with the backward).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

TINY = dict(layers=1, single_layers=2, heads=2, head_dim=16, resolution=64, max_sequence_length=32,
            rollout_steps=2)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=8, help="double-stream blocks (FLUX.1-dev: 19)")
    p.add_argument("--single-layers", type=int, default=16, help="single-stream blocks (FLUX.1-dev: 38)")
    p.add_argument("--heads", type=int, default=8, help="attention heads (FLUX.1-dev: 24)")
    p.add_argument("--head-dim", type=int, default=128, help="attention head dim (FLUX.1-dev: 128)")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--max-sequence-length", type=int, default=512, help="T5 text tokens (FLUX.1-dev: 512)")
    p.add_argument("--rollout-steps", type=int, default=25)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--steps", type=int, default=5, help="measured SRPO steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--strategy", default="fsdp2", choices=["fsdp2", "deepspeed", "single"])
    p.add_argument("--zero-stage", type=int, default=2, choices=[2, 3], help="deepspeed only")
    p.add_argument("--mixed-precision", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--no-activation-checkpointing", action="store_true")
    p.add_argument("--device", default="auto", help="auto (the first GPU if any), cpu, or a torch device name")
    p.add_argument("--peak-tflops", type=float, default=989.0,
                   help="the device's peak dense bf16 TFLOP/s (H100 SXM: 989; H200: 989; A100: 312)")
    p.add_argument("--tiny", action="store_true",
                   help="the tiny preset's transformer at 64x64, 2 rollout steps (overrides the size flags)")
    p.add_argument("--cache", default=str(REPO / ".cache" / "bench"), help="where the tiny world is written")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "gpu_smoke.json"))
    args = p.parse_args(argv)
    if args.tiny:
        for key, value in TINY.items():
            setattr(args, key, value)
    return args


def rope_axes(head_dim: int) -> tuple[int, int, int]:
    """FLUX's RoPE split of a head over (text/index, row, col); (16, 56, 56) for 128. Even parts."""
    half = ((head_dim - max(2, head_dim // 8)) // 2) // 2 * 2
    return head_dim - 2 * half, half, half


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flops_per_step(params: int, tokens: int, seq: int, width: int, blocks: int, batch: int, branches: int,
                   rollout_steps: int) -> tuple[float, float]:
    """(6PT-convention FLOPs, the same plus attention's T^2 term) for one rollout + SRPO step."""
    dense = branches * 6 * params * tokens + rollout_steps * 2 * params * tokens
    attn_fwd = 4 * seq * seq * width * blocks * batch  # QK^T and AV, 2 FLOPs per multiply-add
    return float(dense), float(dense + branches * 3 * attn_fwd + rollout_steps * attn_fwd)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import torch
    import torch.distributed as dist
    from diffusers import FluxTransformer2DModel

    from pipeline.config import load_config
    from pipeline.device import distributed_backend, peak_memory_bytes, reset_peak_memory, resolve_device, synchronize
    from pipeline.models import load_adapter
    from pipeline.objective import ColocatedReward
    from pipeline.parallel import build_engine
    from pipeline.rollout import sample_x0
    from pipeline.srpo_step import StepBatch, grid_from_config, srpo_backward
    from pipeline.tiny import make_tiny_world
    from rewards.loader import load_reward_model

    device = resolve_device(args.device)
    checkpointing = not args.no_activation_checkpointing
    world = make_tiny_world(Path(args.cache) / "world-tiny", seed=0, size="tiny")
    cfg = load_config(REPO / "configs/flux_hpsv2.yaml", [
        f"model.path={world['flux']}", f"reward.path={world['hps_checkpoint']}", f"reward.arch={world['hps_arch']}",
        f"data.prompts={REPO / 'configs/prompts/tiny_train.txt'}", f"data.resolution={args.resolution}",
        f"rollout.steps={args.rollout_steps}", f"model.max_sequence_length={args.max_sequence_length}",
        f"train.batch_size={args.batch_size}", f"train.mixed_precision={args.mixed_precision}",
        f"model.activation_checkpointing={str(checkpointing).lower()}"])

    # A world-size-1 process group: FSDP2 and DeepSpeed need one even on a single device.
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    dist.init_process_group(distributed_backend(device), rank=0, world_size=1)
    try:
        adapter = load_adapter(cfg.model.family, cfg.model.path, device, cfg.model.max_sequence_length,
                               load_transformer=False)
        reward = load_reward_model(cfg.reward.kind, cfg.reward.path, arch=cfg.reward.arch, device=device)
        objective = ColocatedReward(adapter, reward, cfg.data.resolution)
        grid = grid_from_config(cfg.srpo, cfg.rollout.shift)
        # The text encoders are the tiny world's: the context / pooled projections take their widths.
        te_cfg, t5_cfg = adapter.text_encoder.config, adapter.text_encoder_2.config
        torch.manual_seed(0)
        with torch.device(device):
            transformer = FluxTransformer2DModel(
                patch_size=1, in_channels=64, num_layers=args.layers, num_single_layers=args.single_layers,
                attention_head_dim=args.head_dim, num_attention_heads=args.heads,
                joint_attention_dim=t5_cfg.d_model, pooled_projection_dim=te_cfg.hidden_size,
                guidance_embeds=True, axes_dims_rope=rope_axes(args.head_dim))
        params = sum(p.numel() for p in transformer.parameters())
        engine = build_engine(args.strategy, transformer, cfg.optim, device, cfg.train.mixed_precision,
                              checkpointing, args.zero_stage, shard_blocks=adapter.shard_blocks(transformer))

        prompts = [line.strip() for line in open(cfg.data.prompts) if line.strip()]
        noise = torch.Generator().manual_seed(0)
        levels = torch.Generator().manual_seed(1)
        rollout_s, learner_s, total_s, history = [], [], [], []
        for step in range(args.warmup + args.steps):
            if step == args.warmup:
                reset_peak_memory(device)
            captions = [prompts[(step * args.batch_size + i) % len(prompts)] for i in range(args.batch_size)]
            synchronize(device)
            t0 = time.perf_counter()
            cond = adapter.encode_prompts(captions)
            eps = adapter.sample_noise(len(captions), cfg.data.resolution, noise)
            engine.transformer.eval()
            with engine.gathered_for_inference():  # FSDP2: one all-gather per rollout, not per denoising step
                x0 = sample_x0(adapter, engine.transformer, eps, cond, cfg.data.resolution, cfg.rollout.steps,
                               cfg.rollout.shift, cfg.rollout.guidance, cfg.train.mixed_precision)
            engine.transformer.train()
            synchronize(device)
            t1 = time.perf_counter()
            metrics = srpo_backward(adapter, engine.transformer, objective, grid, cfg.srpo,
                                    StepBatch(x0=x0, eps=eps, cond=cond, captions=captions), step, levels,
                                    cfg.data.resolution, cfg.rollout.shift,
                                    mixed_precision=cfg.train.mixed_precision, backward=engine.backward)
            metrics.grad_norm = engine.step(cfg.optim.max_grad_norm)
            synchronize(device)
            t2 = time.perf_counter()
            branches = len(metrics.branches)
            flat = metrics.flat()
            print(f"step {step}{' (warm-up)' if step < args.warmup else ''}: rollout {t1 - t0:.3f}s "
                  f"learner {t2 - t1:.3f}s loss {flat['loss']:.4f} grad_norm {metrics.grad_norm:.4g}", flush=True)
            if step >= args.warmup:
                rollout_s.append(t1 - t0)
                learner_s.append(t2 - t1)
                total_s.append(t2 - t0)
                history.append({k: float(v) for k, v in flat.items()})

        h, w = adapter.latent_hw(cfg.data.resolution)
        seq = (h // 2) * (w // 2) + cfg.model.max_sequence_length  # image + text tokens per sample
        tokens = args.batch_size * seq
        dense, with_attn = flops_per_step(params, tokens, seq, args.heads * args.head_dim,
                                          args.layers + args.single_layers, args.batch_size, branches,
                                          cfg.rollout.steps)
        step_time = statistics.median(total_s)
        peak = args.peak_tflops * 1e12
        result = {
            "device": str(device), "device_name": _device_name(device), "strategy": args.strategy,
            "zero_stage": args.zero_stage if args.strategy == "deepspeed" else None,
            "mixed_precision": cfg.train.mixed_precision, "activation_checkpointing": checkpointing,
            "transformer": {"layers": args.layers, "single_layers": args.single_layers, "heads": args.heads,
                            "head_dim": args.head_dim, "params": params},
            "resolution": cfg.data.resolution, "text_tokens": cfg.model.max_sequence_length,
            "tokens_per_forward": tokens, "batch_size": args.batch_size, "rollout_steps": cfg.rollout.steps,
            "branches": branches, "steps": args.steps, "warmup": args.warmup,
            "median_step_s": step_time, "median_rollout_s": statistics.median(rollout_s),
            "median_learner_s": statistics.median(learner_s),
            "peak_memory_bytes": peak_memory_bytes(device), "peak_memory_gib": peak_memory_bytes(device) / 2**30,
            "flops_per_step": dense, "flops_per_step_with_attention": with_attn, "peak_tflops": args.peak_tflops,
            "mfu": dense / step_time / peak, "mfu_with_attention": with_attn / step_time / peak,
            "learner_mfu": branches * 6 * params * tokens / statistics.median(learner_s) / peak,
            "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "torch": torch.__version__},
            "history": history,
        }
    finally:
        dist.destroy_process_group()
    summary = {k: result[k] for k in ("median_step_s", "median_rollout_s", "median_learner_s", "peak_memory_gib",
                                      "mfu", "mfu_with_attention", "learner_mfu")}
    print(f"transformer params {params / 1e9:.3f}B, {tokens} tokens/forward, {branches} branches")
    print(json.dumps(summary, indent=2))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return result


def _device_name(device) -> str:
    import torch

    if device.type == "cpu":
        return platform.processor() or platform.machine()
    return torch.cuda.get_device_name(device)


if __name__ == "__main__":
    main()
