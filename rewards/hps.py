"""HPSv2.1 reward via open_clip (no dependency on the ``hpsv2`` package).

HPSv2.1 is an open_clip ``ViT-H-14`` whose weights ship as ``HPS_v2.1_compressed.pt``, a dict whose
``state_dict`` loads into the open_clip model. Its score is the plain cosine similarity between
image and text features (no logit scale), so ``score_scale`` is 1.
"""
from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rewards.base import RewardCheckpointError, RewardModel, load_tensors_only

# open_clip is imported where a model is made (as transformers in hf_clip.py): with torchvision and
# torch._dynamo it costs seconds of CPU in every process that imports this module, and most of those
# (Ray's controllers, rollout actors, the driver) never build a reward model.


def _open_clip():
    import open_clip

    return open_clip


EXPECTED_FILE = "the HPSv2.1 checkpoint HPS_v2.1_compressed.pt (a torch.save'd dict with a 'state_dict' of an open_clip model)"


def _resolve_arch(arch: str | Path) -> str:
    """Return an open_clip model name; a model-config JSON path is registered under its file stem."""
    arch_str = str(arch)
    looks_like_file = arch_str.endswith(".json") or Path(arch_str).is_file()
    if not looks_like_file:
        if arch_str not in _open_clip().list_models():
            raise ValueError(
                f"unknown open_clip architecture {arch_str!r}: give an open_clip model name "
                f"(HPSv2.1 uses 'ViT-H-14') or a path to an open_clip model-config JSON file"
            )
        return arch_str
    path = Path(arch_str)
    if not path.is_file():
        raise FileNotFoundError(
            f"open_clip model-config JSON not found: {path} (expected a file with "
            f"'embed_dim', 'vision_cfg' and 'text_cfg')"
        )
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read open_clip model-config JSON {path}: {e}") from e
    if not isinstance(cfg, dict) or not all(key in cfg for key in ("embed_dim", "vision_cfg", "text_cfg")):
        raise ValueError(
            f"{path} is not an open_clip model config: expected keys 'embed_dim', 'vision_cfg', 'text_cfg'"
        )
    _open_clip().add_model_config(path)
    # open_clip keys its registry by file stem; make sure ours is the config it will build (a later
    # registration of another file with the same stem would shadow it).
    if _open_clip().get_model_config(path.stem) != cfg:
        raise ValueError(f"open_clip registry entry {path.stem!r} does not match {path}; rename the file")
    return path.stem


@contextmanager
def _quiet_random_init_warning():
    """Drop open_clip's "Model initialized randomly" warning: we load the weights right after."""

    def keep(record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()

    root = logging.getLogger()  # open_clip logs through the root logger (logging.warning)
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def _extract_state_dict(obj: Any, path: Path) -> dict[str, Tensor]:
    if isinstance(obj, dict) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()
    ):
        raise RewardCheckpointError(
            f"{path} holds no open_clip state dict: expected {EXPECTED_FILE} or a bare state dict"
        )
    # Checkpoints saved from DDP-wrapped models carry a "module." prefix on every key.
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def _mismatch(path: Path, arch_name: str, own: dict[str, Tensor], state_dict: dict[str, Tensor]) -> str:
    """One line: how ``state_dict`` differs from the open_clip model's own (keys, then shapes)."""
    missing, unexpected = sorted(set(own) - set(state_dict)), sorted(set(state_dict) - set(own))
    shapes = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}" for k in sorted(set(own) & set(state_dict))
              if tuple(state_dict[k].shape) != tuple(own[k].shape)]
    return (f"{path} does not match the open_clip architecture {arch_name!r} "
            f"(missing keys {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected keys {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}, "
            f"shapes that differ {shapes[:3]}{'...' if len(shapes) > 3 else ''}; expected {EXPECTED_FILE})")


def check_hps_checkpoint(checkpoint: str | Path, arch: str = "ViT-H-14") -> None:
    """Pre-flight: ``checkpoint`` unpickles with weights_only=True and holds exactly the keys and shapes of
    the open_clip ``arch``, without reading its tensors (mapped) or making the model's weights (meta device).

    Raises RewardCheckpointError (or ValueError / FileNotFoundError about ``arch``) in one line.
    """
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"HPSv2.1 checkpoint not found: {path} (expected {EXPECTED_FILE})")
    arch_name = _resolve_arch(arch)
    state_dict = _extract_state_dict(load_tensors_only(path, EXPECTED_FILE, mmap=True), path)
    with _quiet_random_init_warning():
        own = _open_clip().create_model(arch_name, pretrained=None, device="meta").state_dict()
    if set(own) != set(state_dict) or any(tuple(own[k].shape) != tuple(state_dict[k].shape) for k in own):
        raise RewardCheckpointError(_mismatch(path, arch_name, own, state_dict))


class HPSv2Reward(RewardModel):
    """HPSv2.1 (open_clip CLIP) reward: score = cos(image, text)."""

    kind = "hpsv2"

    def __init__(self, model: torch.nn.Module, tokenizer: Any, arch: str) -> None:
        super().__init__()
        self.model = model  # the open_clip CLIP model
        self.tokenizer = tokenizer
        self.arch = arch
        size = getattr(getattr(model, "visual", None), "image_size", 224)
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.freeze()

    @classmethod
    def load(cls, checkpoint: str | Path, arch: str = "ViT-H-14", device: str | torch.device = "cpu") -> "HPSv2Reward":
        """Build the open_clip ``arch`` and load ``checkpoint`` into it (strict, weights_only)."""
        path = Path(checkpoint)
        if not path.is_file():
            raise FileNotFoundError(f"HPSv2.1 checkpoint not found: {path} (expected {EXPECTED_FILE})")
        arch_name = _resolve_arch(arch)
        # weights_only: a checkpoint is data, never code; refuse arbitrary pickled objects.
        state_dict = _extract_state_dict(load_tensors_only(path, EXPECTED_FILE), path)
        with _quiet_random_init_warning():
            model = _open_clip().create_model(arch_name, pretrained=None, device="cpu")
        try:
            model.load_state_dict(state_dict, strict=True)
        except RuntimeError as e:
            raise RewardCheckpointError(_mismatch(path, arch_name, model.state_dict(), state_dict)) from e
        tokenizer = _open_clip().get_tokenizer(arch_name)
        return cls(model, tokenizer, arch_name).to(device)

    def tokenize(self, texts: list[str]) -> Tensor:
        """Token ids [T, context_length] (open_clip pads with 0 after the end-of-text token)."""
        return self.tokenizer(texts)

    def _encode_text_uncached(self, texts: list[str]) -> Tensor:
        return self.model.encode_text(self.tokenize(texts).to(self.device))

    def _encode_pixels(self, pixels: Tensor) -> Tensor:
        return self.model.encode_image(pixels)

    @property
    def score_scale(self) -> float:
        return 1.0  # HPSv2.1 scores are raw cosines (SRPO_SPEC.md section 4)
