"""The pieces of a single-process SRPO step, for tests that drive the step directly (no Learner loop).

Built from the same core components the Learner uses: the adapter (with text encoders, for prompts),
the single engine, the colocated reward and the training grid.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.config import Config
from pipeline.data import read_prompts
from pipeline.device import resolve_device
from pipeline.models import load_adapter
from pipeline.objective import colocated_reward
from pipeline.parallel import SingleEngine
from pipeline.rollout import sample_x0
from pipeline.srpo_step import StepBatch, grid_from_config, srpo_step


@dataclass
class Rollout:
    captions: list[str]
    cond: object
    eps: torch.Tensor
    x0: torch.Tensor


class StepHarness:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.device = resolve_device(cfg.train.device)
        self.adapter = load_adapter(cfg.model.family, cfg.model.path, self.device, cfg.model.max_sequence_length)
        self.engine = SingleEngine(self.adapter.transformer, cfg.optim, self.device,
                                   cfg.model.activation_checkpointing)
        self.transformer, self.optimizer = self.engine.transformer, self.engine.optimizer
        self.objective = colocated_reward(cfg, self.adapter, self.device)
        self.reward_model = self.objective.reward_model
        self.grid = grid_from_config(cfg.srpo, cfg.rollout.shift)
        self.prompts = read_prompts(cfg.data.prompts)
        self.noise_generator = torch.Generator().manual_seed(cfg.seed)
        self.level_generator = torch.Generator().manual_seed(cfg.seed + 1)
        self.step = 0

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

    def prompts_for(self, step: int) -> list[str]:
        """Prompts in file order, wrapping around (epochs)."""
        b, n = self.cfg.train.batch_size, len(self.prompts)
        return [self.prompts[(step * b + i) % n] for i in range(b)]

    def train_step(self, rollout: Rollout | None = None, levels: list[list[int]] | None = None):
        """The functional SRPO step (plain autograd + AdamW), independent of the engines."""
        cfg = self.cfg
        if rollout is None:
            rollout = self.rollout(self.prompts_for(self.step))
        batch = StepBatch(x0=rollout.x0, eps=rollout.eps, cond=rollout.cond, captions=rollout.captions)
        metrics = srpo_step(self.adapter, self.transformer, self.optimizer, self.objective, self.grid, cfg.srpo,
                            batch, self.step, self.level_generator, cfg.data.resolution, cfg.rollout.shift,
                            max_grad_norm=cfg.optim.max_grad_norm,
                            mixed_precision=cfg.train.mixed_precision, levels=levels)
        self.step += 1
        return metrics

    def fit(self, steps: int) -> None:
        for _ in range(steps):
            self.train_step()


def recipe_grid(**overrides):
    """The training grid of the reference recipe (the config's SRPO defaults, rollout shift 3), with
    ``TrainingGrid.build`` keyword overrides."""
    from dataclasses import asdict

    from pipeline.config import SRPOConfig
    from pipeline.schedules import TrainingGrid

    s = asdict(SRPOConfig())
    args = {"train_timestep": s["train_timestep"], "timestep_length": s["timestep_length"],
            "groundtruth_ratio": s["groundtruth_ratio"], "shift": 3.0, "base_steps": s["base_steps"],
            "d_pos": s["d_pos"], "d_inv": s["d_inv"], "margin": s["m_margin"]}
    return TrainingGrid.build(**{**args, **overrides})
