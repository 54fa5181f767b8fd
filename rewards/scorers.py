"""Image scorers for evaluation and the gold reward: the conventional plain scores, not SRP.

Training optimises SRP (a contrast of control-word prompts on the HPS scale); papers and leaderboards
report plain scores, so evaluation must too or its numbers are not comparable with SRPO's Table 1:

- hpsv2:     f_img . f_txt                       (what the ``hpsv2`` package reports, ~0.29 for FLUX)
- pickscore: exp(logit_scale) * f_img . f_txt    (~22.7 for FLUX)
- clip:      100 * max(f_img . f_txt, 0)         (torchmetrics CLIPScore)
- aesthetic: LAION improved aesthetic predictor  (~5.9 for FLUX; image only, captions ignored)

Every scorer maps images [B, 3, H, W] in [0, 1] and B captions to CPU fp32 scores [B], without
gradient. The metric name is ``name or kind`` of its :class:`ScorerSpec`.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from rewards.aesthetic import AestheticPredictor
from rewards.base import RewardModel
from rewards.loader import load_reward_model

SCORER_KINDS = ("hpsv2", "pickscore", "clip", "aesthetic")


class ScorerSpec(Protocol):
    """What a scorer is loaded from (``pipeline.config.ScorerConfig`` is one); rewards/ does not import
    the trainer's config, so the fields it reads are declared here."""

    kind: str
    path: str
    arch: str
    tokenizer_path: str
    clip_path: str
    name: str


@runtime_checkable
class Scorer(Protocol):
    name: str

    def score(self, images: Tensor, captions: list[str]) -> Tensor:
        """Scores [B] (CPU, fp32, no gradient) of images [B, 3, H, W] in [0, 1] for their captions."""
        ...


def _check_batch(images: Tensor, captions: list[str], name: str) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"scorer {name!r}: images must be [B, 3, H, W] in [0, 1], got {tuple(images.shape)}")
    if isinstance(captions, str) or len(captions) != images.shape[0]:
        raise ValueError(f"scorer {name!r}: expected a list of {images.shape[0]} captions (one per image), "
                         f"got {captions!r:.80}")


class TextImageScorer:
    """HPSv2.1 / PickScore / CLIP: a function of the cosine of a frozen CLIP-style reward model."""

    def __init__(self, name: str, kind: str, model: RewardModel) -> None:
        if kind not in ("hpsv2", "pickscore", "clip"):
            raise ValueError(f"TextImageScorer: kind {kind!r}, expected hpsv2, pickscore or clip")
        self.name = name
        self.kind = kind
        self.model = model

    def logit_scale(self) -> float:
        """exp(logit_scale) of a transformers CLIPModel (PickScore's score multiplier)."""
        return float(self.model.model.logit_scale.detach().float().exp())

    @torch.no_grad()
    def score(self, images: Tensor, captions: list[str]) -> Tensor:
        _check_batch(images, captions, self.name)
        f_img = self.model.encode_image(images)
        f_txt = self.model.encode_text(list(captions)).to(f_img.device)
        cos = (f_img * f_txt).sum(-1).float()
        if self.kind == "pickscore":
            out = self.logit_scale() * cos
        elif self.kind == "clip":
            out = 100.0 * cos.clamp(min=0)
        else:
            out = cos
        return out.cpu()


class AestheticScorer:
    """The LAION aesthetic predictor; captions are only checked for length (it is image-only)."""

    def __init__(self, name: str, predictor: AestheticPredictor) -> None:
        self.name = name
        self.kind = "aesthetic"
        self.predictor = predictor

    @torch.no_grad()
    def score(self, images: Tensor, captions: list[str]) -> Tensor:
        _check_batch(images, captions, self.name)
        return self.predictor(images).float().cpu()


def load_scorer(sc: ScorerSpec, device: str | torch.device = "cpu") -> Scorer:
    """A frozen scorer from a :class:`ScorerSpec` (``pipeline.config.ScorerConfig``; local files only)."""
    name = sc.name or sc.kind
    if sc.kind == "aesthetic":
        if not sc.clip_path:
            raise ValueError(f"scorer {name!r}: kind aesthetic needs clip_path, a transformers CLIPModel folder "
                             "(CLIP ViT-L/14)")
        return AestheticScorer(name, AestheticPredictor.load(sc.path, sc.clip_path, device,
                                                             tokenizer_path=sc.tokenizer_path or None))
    if sc.kind in ("hpsv2", "pickscore", "clip"):
        model = load_reward_model(sc.kind, sc.path, arch=sc.arch, tokenizer_path=sc.tokenizer_path or None,
                                  device=device)
        return TextImageScorer(name, sc.kind, model)
    raise ValueError(f"scorer kind {sc.kind!r}: expected one of {', '.join(SCORER_KINDS)}")


def load_scorers(configs: list[ScorerSpec], device: str | torch.device = "cpu") -> list[Scorer]:
    """Load several scorers; metric names must be unique or their metrics would overwrite each other."""
    seen: dict[str, int] = {}
    for i, sc in enumerate(configs):
        name = sc.name or sc.kind
        if name in seen:
            raise ValueError(f"scorers[{i}]: metric name {name!r} is already used by scorers[{seen[name]}]; "
                             "set a distinct `name` for one of them")
        seen[name] = i
    return [load_scorer(sc, device) for sc in configs]
