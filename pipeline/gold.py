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

from pipeline.config import Config


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

    # ------------------------------------------------------------------ construction
    @classmethod
    def create(cls, cfg: Config, adapter, device: torch.device, rank: int, world: int,
               saved: dict[str, Any] | None) -> "GoldReward | None":
        if not cfg.eval.every:
            return None
        from actors.rollout import draw_eps
        from pipeline.data import read_prompts
        from pipeline.models import load_adapter
        from rewards.scorers import load_scorers

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
        from pipeline.rollout import sample_x0

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
        from pipeline.checkpoint import write_json_atomic
        from pipeline.export import save_state_dict

        state = engine.full_state_dict()  # collective
        if self.rank == 0:
            best = Path(cfg.output.dir) / "best"
            save_state_dict(state, best / "diffusion_pytorch_model.safetensors", step=self.best_step)
            write_json_atomic(best / "best.json", {"step": self.best_step, "gold_score": self.best,
                                                   "scores": means, "scorer": self.scorers[0].name})
