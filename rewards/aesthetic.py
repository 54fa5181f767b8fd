"""The LAION "improved aesthetic predictor" (the "Aesthetic 2.5" column of SRPO's Table 1).

It is a small MLP on the L2-normalised CLIP ViT-L/14 image embedding, released as the state dict
``sac+logos+ava1-l14-linearMSE.pth`` of a module whose ``layers`` is::

    Linear(768, 1024), Dropout(0.2), Linear(1024, 128), Dropout(0.2),
    Linear(128, 64), Dropout(0.1), Linear(64, 16), Linear(16, 1)

so its keys are ``layers.{0,2,4,6,7}.{weight,bias}`` (dropouts hold no parameters). We rebuild that
exact module so the released file loads unchanged, and infer the input width from
``layers.0.weight`` so the tiny world can pair it with a tiny CLIP (projection dim 32).
The image embedding comes from a transformers ``CLIPModel`` through :class:`HFCLIPReward`, which
already does CLIP's preprocessing differentiably on [0, 1] tensors.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from rewards.base import RewardCheckpointError, load_tensors_only
from rewards.hf_clip import HFCLIPReward

AESTHETIC_FILE_NAME = "sac+logos+ava1-l14-linearMSE.pth"
# (index in ``layers``, out_features) of the Linear layers; the first one's in_features is inferred.
_LINEARS = ((0, 1024), (2, 128), (4, 64), (6, 16), (7, 1))
EXPECTED_FILE = (
    "the LAION aesthetic predictor state dict (sac+logos+ava1-l14-linearMSE.pth) with keys "
    "layers.{0,2,4,6,7}.{weight,bias} of Linear(D,1024), Linear(1024,128), Linear(128,64), "
    "Linear(64,16), Linear(16,1)"
)


class AestheticMLP(nn.Module):
    """The released predictor head; ``input_size`` = the CLIP projection dim (768 for ViT-L/14)."""

    def __init__(self, input_size: int = 768) -> None:
        super().__init__()
        self.input_size = input_size
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeddings: Tensor) -> Tensor:
        """Scores [B] from L2-normalised image embeddings [B, input_size]."""
        return self.layers(embeddings).squeeze(-1)


def expected_shapes(input_size: int) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a predictor head with the given input width (the released layout)."""
    shapes: dict[str, tuple[int, ...]] = {}
    fan_in = input_size
    for idx, out in _LINEARS:
        shapes[f"layers.{idx}.weight"] = (out, fan_in)
        shapes[f"layers.{idx}.bias"] = (out,)
        fan_in = out
    return shapes


def _read_state_dict(path: Path, mmap: bool = False) -> dict[str, Tensor]:
    """The tensors of ``path``; ``weights_only`` so a hostile pickle cannot run code (``mmap``: mapped,
    not read, for the pre-flight check)."""
    if not path.is_file():
        raise FileNotFoundError(f"aesthetic predictor not found: {path} (expected {EXPECTED_FILE})")
    obj = load_tensors_only(path, EXPECTED_FILE, mmap=mmap)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):  # a Lightning-style wrapper
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()):
        raise RewardCheckpointError(f"{path} holds {type(obj).__name__}, not a state dict (expected {EXPECTED_FILE})")
    return obj


def check_state_dict(state: dict[str, Tensor], where: str) -> int:
    """Validate keys and shapes against the released layout; returns the inferred input width."""
    first = state.get("layers.0.weight")
    if first is None or first.ndim != 2:
        raise RewardCheckpointError(f"{where}: no 2-d 'layers.0.weight' (expected {EXPECTED_FILE})")
    want = expected_shapes(int(first.shape[1]))
    missing, unexpected = sorted(set(want) - set(state)), sorted(set(state) - set(want))
    if missing or unexpected:
        raise RewardCheckpointError(
            f"{where}: missing keys {missing}, unexpected keys {unexpected} (expected {EXPECTED_FILE})")
    for key, shape in want.items():
        if tuple(state[key].shape) != shape:
            raise RewardCheckpointError(
                f"{where}: {key} has shape {tuple(state[key].shape)}, expected {shape} (expected {EXPECTED_FILE})")
    return int(first.shape[1])


def check_aesthetic_checkpoint(path: str | Path) -> None:
    """Pre-flight: the predictor head unpickles with weights_only=True and has the released keys and
    shapes (its tensors are mapped, not read). RewardCheckpointError / FileNotFoundError in one line."""
    path = Path(path)
    check_state_dict(_read_state_dict(path, mmap=True), str(path))


def load_aesthetic_mlp(path: str | Path, device: str | torch.device = "cpu") -> AestheticMLP:
    """Load the released predictor head (or a tiny one of the same layout), frozen, eval mode."""
    path = Path(path)
    state = _read_state_dict(path)
    input_size = check_state_dict(state, str(path))
    mlp = AestheticMLP(input_size)
    mlp.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return mlp.requires_grad_(False).eval().to(device)


class AestheticPredictor(nn.Module):
    """CLIP image embedding -> L2 normalise -> MLP: the LAION aesthetic score of [0, 1] images.

    Differentiable w.r.t. the images (an image-only reward, SRPO_SPEC "paper options"); scorers wrap
    it in ``no_grad`` for evaluation.
    """

    def __init__(self, clip: nn.Module, mlp: AestheticMLP) -> None:
        super().__init__()
        dim = int(clip.model.config.projection_dim)
        if dim != mlp.input_size:
            raise RewardCheckpointError(
                f"the aesthetic predictor expects {mlp.input_size}-d CLIP embeddings but the CLIP model gives "
                f"{dim}-d ones (the released predictor needs CLIP ViT-L/14, projection dim 768)")
        self.clip = clip
        self.mlp = mlp

    @classmethod
    def load(cls, path: str | Path, clip_path: str | Path, device: str | torch.device = "cpu",
             tokenizer_path: str | Path | None = None) -> "AestheticPredictor":
        """``path``: the .pth head; ``clip_path``: a transformers CLIPModel folder (CLIP ViT-L/14)."""
        mlp = load_aesthetic_mlp(path, device)
        clip = HFCLIPReward.load(clip_path, kind="clip", tokenizer_path=tokenizer_path, device=device)
        return cls(clip, mlp).requires_grad_(False).eval()

    def train(self, mode: bool = True) -> "AestheticPredictor":
        # Always eval: dropout would make the score random.
        return super().train(False)

    def forward(self, images: Tensor) -> Tensor:
        """Aesthetic scores [B] (roughly 1..10 for the released head) of images [B, 3, H, W] in [0, 1]."""
        emb = self.clip.encode_image(images)  # already L2-normalised, fp32
        return self.mlp(emb.to(next(self.mlp.parameters()).device))
