"""The held-out "gold" reward during training: best weights and early stopping.

SRPO over-trains: the authors report that longer training drifts (SRPO_SPEC section 5). A reward the
policy optimises cannot show it, so every ``eval.every`` steps the learners generate full rollouts
for held-out prompts (fixed seeds, the current policy) and score them with *other* reward models
(``eval.gold``). The first gold scorer decides:

- a new best score exports the consolidated weights to ``<output.dir>/best/`` (+ ``best.json``);
- ``eval.patience`` evaluations in a row without a new best stop the run (0 = never).

All ranks take part (the forward passes of a sharded model are collectives): the held-out prompts
are split evenly, padded so every rank runs the same number of batches, and the score sums are
all-reduced. The state (best, patience counter, history) goes into every checkpoint, so a resumed
run continues the same early-stopping decision.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from pipeline.checkpoint import write_json_atomic
from pipeline.config import Config
from pipeline.data import read_prompts
from pipeline.export import save_state_dict
from pipeline.models import load_adapter
from pipeline.rollout import sample_x0
from pipeline.sources import draw_eps
from pipeline.srpo_step import grid_from_config
from pipeline.storage import RunStorage
from rewards.scorers import load_scorers
from rewards.srp import control_words, srp_score


class GoldReward:
    def __init__(self, cfg: Config, cond, eps: torch.Tensor, captions: list[str], valid: torch.Tensor,
                 scorers: list, rank: int, world: int, saved: dict[str, Any] | None) -> None:
        self.cfg = cfg
        self.cond, self.eps, self.captions, self.valid = cond, eps, captions, valid
        self.scorers = scorers
        self.rank, self.world = rank, world
        saved = saved or {}
        self.best = float(saved.get("best", -math.inf))
        self.best_step = int(saved.get("best_step", -1))
        self.bad = int(saved.get("evals_without_improvement", 0))
        self.history: list[list[float]] = [list(h) for h in saved.get("history", [])]
        self.first_images: torch.Tensor | None = None  # [b, 3, H, W] in [0, 1] of the last evaluation

    # ------------------------------------------------------------------ construction
    @classmethod
    def create(cls, cfg: Config, adapter, device: torch.device, rank: int, world: int,
               saved: dict[str, Any] | None) -> "GoldReward | None":
        if not cfg.eval.every:
            return None
        path = cfg.eval.prompts or cfg.data.heldout_prompts
        if not path:
            raise ValueError("eval.every > 0 needs held-out prompts: set eval.prompts or data.heldout_prompts")
        prompts = read_prompts(path)
        if cfg.eval.num_prompts:
            prompts = prompts[:cfg.eval.num_prompts]
        per = math.ceil(len(prompts) / world)
        mine = [rank * per + j for j in range(per)]
        valid = torch.tensor([i < len(prompts) for i in mine], dtype=torch.float64)
        mine = [min(i, len(prompts) - 1) for i in mine]  # padding rows repeat the last prompt, weight 0
        captions = [prompts[i] for i in mine]
        # The learner holds no text encoder: load them once on the CPU, encode, drop them.
        text = load_adapter(cfg.model.family, cfg.model.path, "cpu", cfg.model.max_sequence_length,
                            load_text_encoders=True, load_transformer=False)
        cond = text.encode_prompts(captions).to(device)
        del text
        eps = draw_eps(adapter, [cfg.eval.seed + i for i in mine], cfg.data.resolution).to(device)
        return cls(cfg, cond, eps, captions, valid, load_scorers(cfg.eval.gold, device), rank, world, saved)

    # ------------------------------------------------------------------ schedule
    def due(self, step: int) -> bool:
        """After step ``step`` (0-based) is done: every eval.every optimizer steps."""
        return (step + 1) % self.cfg.eval.every == 0

    def should_stop(self) -> bool:
        return bool(self.cfg.eval.patience) and self.bad >= self.cfg.eval.patience

    def state(self) -> dict[str, Any]:
        return {"best": self.best if math.isfinite(self.best) else None, "best_step": self.best_step,
                "evals_without_improvement": self.bad, "history": self.history}

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def scores(self, adapter, transformer) -> dict[str, float]:
        """Mean gold score of each scorer over all held-out prompts (every rank gets the same)."""
        cfg = self.cfg
        was_training = transformer.training
        transformer.eval()
        b = cfg.train.batch_size
        sums = {s.name: torch.zeros((), dtype=torch.float64) for s in self.scorers}
        for i in range(0, len(self.captions), b):
            sl = slice(i, i + b)
            x0 = sample_x0(adapter, transformer, self.eps[sl], self.cond.select(sl), cfg.data.resolution,
                           cfg.rollout.steps, cfg.rollout.shift, cfg.rollout.guidance, cfg.train.mixed_precision)
            images = adapter.decode(x0, cfg.data.resolution)
            if i == 0:  # this rank's first held-out images: the learner logs rank 0's (step-indexed)
                self.first_images = images.float().cpu()
            for s in self.scorers:
                sums[s.name] += (s.score(images, self.captions[sl]).double().cpu() * self.valid[sl]).sum()
        transformer.train(was_training)
        names = sorted(sums)
        totals = torch.stack([sums[n] for n in names] + [self.valid.sum()])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            device = self.eps.device
            t = totals.to(device)
            torch.distributed.all_reduce(t)
            totals = t.cpu()
        count = float(totals[-1])
        return {n: float(totals[j]) / count for j, n in enumerate(names)}

    def evaluate(self, adapter, engine, step: int, cfg: Config) -> dict[str, float]:
        """Score, keep the best weights, update the patience counter; returns MLflow metrics."""
        means = self.scores(adapter, engine.transformer)
        primary = means[self.scorers[0].name]
        improved = primary > self.best
        self.history.append([step + 1, primary])
        if improved:
            self.best, self.best_step, self.bad = primary, step + 1, 0
            self._export_best(engine, cfg, means)
        else:
            self.bad += 1
        out = {f"gold/{n}": v for n, v in means.items()}
        out.update({"gold/score": primary, "gold/best": self.best, "gold/evals_without_improvement": float(self.bad)})
        return out

    def _export_best(self, engine, cfg: Config, means: dict[str, float]) -> None:
        state = engine.full_state_dict()  # collective
        if self.rank == 0:
            storage = RunStorage(cfg.output.dir)  # a folder, or a URI: written locally, then uploaded
            best = storage.path("best")
            save_state_dict(state, best / "diffusion_pytorch_model.safetensors", step=self.best_step)
            write_json_atomic(best / "best.json", {"step": self.best_step, "gold_score": self.best,
                                                   "scores": means, "scorer": self.scorers[0].name})
            storage.upload("best", last="best.json")


@torch.no_grad()
def heldout_srp_reward(cfg: Config, adapter, transformer, reward_model, cond, captions: list[str],
                       seed: int, image_norm: str = "clamp") -> float:
    """Mean SRP reward of full-rollout images of held-out prompts, averaged over every control-word
    pair (the learning-signal metric of the tests and benchmarks): held-out prompts and a held-out
    noise seed measure whether the policy itself improved, not just its one-step recoveries.
    ``image_norm``: the images as the pipeline returns them ("clamp"), or as a reward with
    ``reward.image_norm=minmax`` sees them in training."""
    g = torch.Generator().manual_seed(seed)
    grid = grid_from_config(cfg.srpo, cfg.rollout.shift)
    grid_k = float(grid.d_pos[grid.N // 2])
    was_training = transformer.training
    transformer.eval()
    rewards = []
    for i in range(0, len(captions), cfg.train.batch_size):
        caps, sl = captions[i:i + cfg.train.batch_size], slice(i, i + cfg.train.batch_size)
        eps = adapter.sample_noise(len(caps), cfg.data.resolution, g)
        x0 = sample_x0(adapter, transformer, eps, cond.select(sl), cfg.data.resolution, cfg.rollout.steps,
                       cfg.rollout.shift, cfg.rollout.guidance, cfg.train.mixed_precision)
        f_img = reward_model.encode_image(adapter.decode(x0, cfg.data.resolution, image_norm))
        n_pos, n_neg = len(cfg.srpo.positive_words), len(cfg.srpo.negative_words)
        for step in range(math.lcm(n_pos, n_neg)):
            pw, nw = control_words(step, tuple(cfg.srpo.positive_words), tuple(cfg.srpo.negative_words))
            f_pos = reward_model.encode_text([f"{pw}. {c}" for c in caps])
            f_neg = reward_model.encode_text([f"{nw}. {c}" for c in caps])
            k_t = torch.full((len(caps),), grid_k, device=f_img.device)
            rewards.append(srp_score(f_img, f_pos, f_neg, k_t, cfg.srpo.srp_form,
                                     reward_model.score_scale).mean().item())
    transformer.train(was_training)
    return sum(rewards) / len(rewards)
