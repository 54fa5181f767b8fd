"""One entry point that turns a reward config (kind, path, arch, tokenizer) into a RewardModel."""
from __future__ import annotations

from pathlib import Path

import torch

from rewards.base import RewardModel
from rewards.hf_clip import HFCLIPReward
from rewards.hps import HPSv2Reward

REWARD_KINDS = ("hpsv2", "pickscore", "clip")


def load_reward_model(
    kind: str,
    path: str | Path,
    arch: str | None = None,
    tokenizer_path: str | None = None,
    device: str | torch.device = "cpu",
) -> RewardModel:
    """Load a frozen reward model from local files.

    kind "hpsv2": ``path`` is HPS_v2.1_compressed.pt, ``arch`` an open_clip name or config JSON
    (default "ViT-H-14"). kind "pickscore" / "clip": ``path`` is a CLIPModel folder, ``tokenizer_path``
    an optional separate tokenizer folder ("" or None = ``path``).
    """
    if kind == "hpsv2":
        return HPSv2Reward.load(path, arch=arch or "ViT-H-14", device=device)
    if kind in ("pickscore", "clip"):
        return HFCLIPReward.load(path, kind=kind, tokenizer_path=tokenizer_path or None, device=device)
    raise ValueError(f"unknown reward kind {kind!r}; valid kinds: {', '.join(REWARD_KINDS)}")
