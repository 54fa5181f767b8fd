"""The single-process SRPO trainer: rollout -> SRPO step -> AdamW, reward colocated, one device.

It is the plain core the Ray learner wraps and the baseline the benchmarks compare against:

    prompts --encode--> cond --rollout(eps)--> x0 --srpo_step(x0, eps, m, step)--> params'
                                                         |
                                            reward: decode + SRP (colocated)

Randomness: ``seed`` gives three explicit generators (noise prior, levels m, prompt order), so a
run is reproducible and any step replays bit for bit.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from pipeline.config import Config
from pipeline.data import read_prompts
from pipeline.device import resolve_device
from pipeline.export import save_state_dict
from pipeline.models import load_adapter
from pipeline.objective import ColocatedReward
from pipeline.rollout import sample_x0
from pipeline.srpo_step import StepBatch, StepMetrics, build_optimizer, grid_from_config, srpo_step
from rewards.loader import load_reward_model
from rewards.srp import control_words, srp_score


def reward_model_from_config(cfg: Config, device: torch.device):
    return load_reward_model(cfg.reward.kind, cfg.reward.path, arch=cfg.reward.arch,
                             tokenizer_path=cfg.reward.tokenizer_path or None, device=device)


@dataclass
class Rollout:
    """A batch of anchors from the current policy: x0 and eps are [B, L, C] packed latents."""

    captions: list[str]
    cond: object
    eps: Tensor
    x0: Tensor


class SRPOTrainer:
    def __init__(self, cfg: Config, device: torch.device | None = None) -> None:
        self.cfg = cfg
        self.device = device or resolve_device(cfg.train.device)
        self.adapter = load_adapter(cfg.model.family, cfg.model.path, self.device, cfg.model.max_sequence_length)
        self.transformer = self.adapter.transformer
        self.transformer.train()
        if cfg.model.activation_checkpointing:
            self.transformer.enable_gradient_checkpointing()
        self.reward_model = reward_model_from_config(cfg, self.device)
        self.grid = grid_from_config(cfg.srpo, cfg.rollout.shift)
        self.objective = ColocatedReward(self.adapter, self.reward_model, cfg.data.resolution)
        o = cfg.optim
        self.optimizer = build_optimizer(self.transformer.parameters(), o.lr, o.betas, o.eps, o.weight_decay)
        self.prompts = read_prompts(cfg.data.prompts)
        self.noise_generator = torch.Generator().manual_seed(cfg.seed)
        self.level_generator = torch.Generator().manual_seed(cfg.seed + 1)
        self.step = 0

    # ------------------------------------------------------------------ stages
    def prompts_for(self, step: int) -> list[str]:
        """Prompts in file order, wrapping around (epochs)."""
        b, n = self.cfg.train.batch_size, len(self.prompts)
        return [self.prompts[(step * b + i) % n] for i in range(b)]

    @torch.no_grad()
    def rollout(self, captions: list[str], generator: torch.Generator | None = None) -> Rollout:
        cfg = self.cfg
        cond = self.adapter.encode_prompts(captions)
        eps = self.adapter.sample_noise(len(captions), cfg.data.resolution, generator or self.noise_generator)
        self.transformer.eval()
        x0 = sample_x0(self.adapter, self.transformer, eps, cond, cfg.data.resolution, cfg.rollout.steps,
                       cfg.rollout.shift, cfg.rollout.guidance, cfg.train.mixed_precision)
        self.transformer.train()
        return Rollout(captions, cond, eps, x0)

    def train_step(self, rollout: Rollout | None = None, levels: list[list[int]] | None = None) -> StepMetrics:
        cfg = self.cfg
        t0 = time.perf_counter()
        if rollout is None:
            rollout = self.rollout(self.prompts_for(self.step))
        t1 = time.perf_counter()
        batch = StepBatch(x0=rollout.x0, eps=rollout.eps, cond=rollout.cond, captions=rollout.captions)
        metrics = srpo_step(self.adapter, self.transformer, self.optimizer, self.objective, self.grid, cfg.srpo,
                            batch, self.step, self.level_generator, cfg.data.resolution, cfg.rollout.shift,
                            cfg.optim.max_grad_norm, cfg.train.mixed_precision, levels)
        t2 = time.perf_counter()
        metrics.timings = {"time/rollout_s": t1 - t0, "time/learner_s": t2 - t1}
        self.step += 1
        return metrics

    def fit(self, max_steps: int | None = None,
            on_step: Callable[[StepMetrics], None] | None = None) -> list[StepMetrics]:
        history = []
        for _ in range(max_steps or self.cfg.train.max_steps):
            m = self.train_step()
            history.append(m)
            if on_step is not None:
                on_step(m)
        return history

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def mean_srp_reward(self, prompts: list[str], seed: int, k: float | None = None) -> float:
        """Mean SRP reward of full-rollout images, averaged over the 20 control-word pairs.

        Held-out prompts and a held-out noise seed measure whether the policy itself improved,
        not just the one-step recoveries seen in training.
        """
        cfg = self.cfg
        g = torch.Generator().manual_seed(seed)
        k_val = float(self.grid.d_pos[self.grid.N // 2]) if k is None else k
        rewards = []
        for i in range(0, len(prompts), cfg.train.batch_size):
            caps = prompts[i:i + cfg.train.batch_size]
            r = self.rollout(caps, generator=g)
            f_img = self.reward_model.encode_image(self.adapter.decode(r.x0, cfg.data.resolution))
            scale = self.reward_model.score_scale
            n_pos, n_neg = len(cfg.srpo.positive_words), len(cfg.srpo.negative_words)
            for step in range(n_pos * n_neg // _gcd(n_pos, n_neg)):
                pw, nw = control_words(step, tuple(cfg.srpo.positive_words), tuple(cfg.srpo.negative_words))
                f_pos = self.reward_model.encode_text([f"{pw}. {c}" for c in caps])
                f_neg = self.reward_model.encode_text([f"{nw}. {c}" for c in caps])
                k_t = torch.full((len(caps),), k_val, device=f_img.device)
                rewards.append(srp_score(f_img, f_pos, f_neg, k_t, cfg.srpo.srp_form, scale).mean().item())
        return sum(rewards) / len(rewards)

    # ------------------------------------------------------------------ output
    def save_transformer(self, path: str | Path) -> Path:
        """Consolidated transformer state dict as safetensors, written atomically."""
        return save_state_dict(self.transformer.state_dict(), path, step=self.step)


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a
