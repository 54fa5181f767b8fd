"""One entry point that turns a reward config (kind, path, arch, tokenizer) into a RewardModel, and one
that checks such a config's files before anything is loaded (the driver's pre-flight)."""
from __future__ import annotations

from pathlib import Path

import torch

from rewards.aesthetic import check_aesthetic_checkpoint
from rewards.base import RewardModel
from rewards.hf_clip import HFCLIPReward, check_clip_folder, check_tokenizer_folder
from rewards.hps import HPSv2Reward, _resolve_arch, check_hps_checkpoint

REWARD_KINDS = ("hpsv2", "pickscore", "clip")
CHECKPOINT_KINDS = (*REWARD_KINDS, "aesthetic")  # what check_checkpoint knows (aesthetic: a scorer only)


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


def check_checkpoint(kind: str, path: str | Path, arch: str | None = None) -> None:
    """Check that ``path`` is a usable ``kind`` checkpoint without loading the model.

    Everything is unpickled with ``weights_only=True`` and mapped (never read): hpsv2 keys and shapes
    against the open_clip ``arch`` built on the meta device; pickscore / clip: config.json and the
    weight files' keys (both CLIP towers); aesthetic: the predictor head's keys and shapes. Raises
    RewardCheckpointError, FileNotFoundError or ValueError with a one-line message naming the file.
    """
    if kind == "hpsv2":
        check_hps_checkpoint(path, arch=arch or "ViT-H-14")
    elif kind in ("pickscore", "clip"):
        check_clip_folder(path, kind)
    elif kind == "aesthetic":
        check_aesthetic_checkpoint(path)
    else:
        raise ValueError(f"unknown reward kind {kind!r}; valid kinds: {', '.join(CHECKPOINT_KINDS)}")


def check_arch(arch: str | Path) -> None:
    """Check an hpsv2 ``arch``: an open_clip model name, or a readable open_clip model-config JSON."""
    _resolve_arch(arch)


def check_tokenizer(path: str | Path) -> None:
    """Check that ``path`` holds a CLIP tokenizer (PickScore / CLIP); one-line errors naming the folder."""
    check_tokenizer_folder(path)
