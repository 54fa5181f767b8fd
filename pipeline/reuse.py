"""Reused rollouts (``rollout.reuse = R``): each generated x0 trains R optimizer steps.

SRPO uses a rollout only as an anchor x0: there is no importance ratio, and Direct-Align recovers x0
exactly from any injected noise (offline mode trains on real images with fresh noise for the same
reason). So an anchor can serve R consecutive steps, each with fresh noise levels m and fresh noise
eps, and the rollout (~77% of a step's FLOPs at 25 Euler steps) is paid once per R steps.

    generation g  (the rows of sample_rows, "step" = g * R)  --rollout / real image--> x0, eps_0
    step g*R + u, u = 0..R-1:  x0, cond, captions of generation g;
                               u = 0: the generation's own eps and levels (R = 1 is the reference run)
                               u > 0: eps and levels from reuse_seed(seed, u)

The buffer holds one generation of this rank's samples (a batch). Drop rule: a sample leaves after
its R uses. ``rollout.max_staleness`` bounds its age when it is *generated* (rollout actors wait for
the learner); its age at use u is that plus u, so at most max_staleness + R - 1 policy versions,
which ``policy_lag/max`` reports. A checkpoint taken between two uses holds the buffer
(``rollout_buffer/rank_<r>``): the weights that made x0 are gone by then, so it cannot be regenerated.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import load_file as load_numpy, save_file as save_numpy

BUFFER_DIR = "rollout_buffer"
_SEED_MOD = 2**63 - 1


def reuse_seed(seed: int, use: int) -> int:
    """The seed of a sample's fresh draw (noise eps or levels m) at its use ``use`` (0-based); use 0
    keeps the generation's seed, so R = 1 draws exactly what the reference run draws."""
    return int(seed) if use == 0 else (int(seed) * 6_364_136_223_846_793 + 1_442_695_040_888_963 * use) % _SEED_MOD


def generation_count(max_steps: int, reuse: int) -> int:
    """Generations a run of ``max_steps`` optimizer steps needs (the last may serve fewer than R steps)."""
    return -(-max_steps // reuse)


@dataclass
class Generation:
    """One generation of this rank's samples: the source's batch (numpy columns: seeds, captions,
    conditioning arrays, ...), its anchors x0, its rollout noise eps and the policy lag at generation."""

    first_step: int
    batch: dict[str, np.ndarray]
    x0: torch.Tensor
    eps: torch.Tensor
    lag: list[int]


class RolloutBuffer:
    """The current generation and how many of its R uses are left (R = 1: never holds anything)."""

    def __init__(self, reuse: int) -> None:
        self.reuse = reuse
        self.current: Generation | None = None

    def fill(self, step: int, batch: dict[str, np.ndarray], x0: torch.Tensor, eps: torch.Tensor,
             lag: list[int]) -> None:
        """The generation just used at ``step`` (its first use)."""
        if self.reuse > 1:
            self.current = Generation(step, batch, x0, eps, list(lag))

    def use_at(self, step: int) -> int | None:
        """The 0-based use of the held generation at ``step``; None when a new generation is due."""
        g = self.current
        if g is None or not g.first_step < step < g.first_step + self.reuse:
            return None
        return step - g.first_step

    def drop(self) -> None:
        self.current = None

    # ------------------------------------------------------------------ checkpoints
    def save(self, folder: str | Path, rank: int, next_step: int) -> None:
        """This rank's buffer into a checkpoint whose next step is ``next_step``, if uses are left."""
        g = self.current
        if g is None or self.use_at(next_step) is None:
            return
        columns = {k: np.asarray(v) for k, v in g.batch.items() if k not in ("x0", "eps")}  # saved once, below
        numeric = {k: np.ascontiguousarray(v) for k, v in columns.items() if v.dtype.kind in "biuf"}
        text = {k: [str(x) for x in v] for k, v in columns.items() if v.dtype.kind not in "biuf"}
        out = Path(folder) / BUFFER_DIR
        out.mkdir(parents=True, exist_ok=True)
        save_numpy({**{f"batch/{k}": v for k, v in numeric.items()},
                    "x0": g.x0.detach().float().cpu().numpy(), "eps": g.eps.detach().float().cpu().numpy()},
                   str(out / f"rank_{rank}.safetensors"))
        (out / f"rank_{rank}.json").write_text(json.dumps({"first_step": g.first_step, "lag": g.lag,
                                                          "reuse": self.reuse, "text": text}))

    def load(self, folder: str | Path, rank: int, device: torch.device) -> None:
        """The buffer a checkpoint holds for this rank (none: a new generation is due at its step)."""
        path = Path(folder) / BUFFER_DIR / f"rank_{rank}.json"
        self.current = None
        if not path.is_file():
            return
        meta: dict[str, Any] = json.loads(path.read_text())
        if int(meta["reuse"]) != self.reuse:
            raise ValueError(f"rollout.reuse: the checkpoint {folder} holds a generation for reuse={meta['reuse']}, "
                             f"resumed with {self.reuse}; resume with the value the run started with")
        arrays = load_numpy(str(path.with_suffix(".safetensors")))
        batch = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith("batch/")}
        batch.update({k: np.asarray(v) for k, v in meta["text"].items()})
        self.current = Generation(int(meta["first_step"]), batch, torch.tensor(arrays["x0"], device=device),
                                  torch.tensor(arrays["eps"], device=device), [int(x) for x in meta["lag"]])
