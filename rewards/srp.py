"""Semantic Relative Preference (SRPO_SPEC.md section 4).

The reward is a contrast between the image's similarity to a caption prefixed with a positive
control word and to the same caption prefixed with a negative one. Shapes: B = batch, D = feature dim.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from rewards.base import RewardModel

CONTROL_POSITIVE = ("Natural-lighting", "Detail", "Detailed", "Real")
CONTROL_NEGATIVE = ("Concept art", "Painting", "Anime", "Flat", "Oil")

SRP_FORMS = ("reference", "cfg", "plain")


def control_words(
    step: int,
    positive: tuple[str, ...] | list[str] = CONTROL_POSITIVE,
    negative: tuple[str, ...] | list[str] = CONTROL_NEGATIVE,
) -> tuple[str, str]:
    """(positive[step % len(positive)], negative[step % len(negative)]) for a global step.

    The two lists rotate independently (4 and 5 words), so the pair cycles every 20 steps; every
    rank uses the same pair in a step because it depends on the global step only.
    """
    if not positive or not negative:
        raise ValueError("control word lists must be non-empty")
    return positive[step % len(positive)], negative[step % len(negative)]


def control_prompt(word: str, caption: str) -> str:
    """The text the reward model sees: ``"<word>. <caption>"``."""
    return f"{word}. {caption}"


def srp_score(
    f_img: Tensor,
    f_pos: Tensor,
    f_neg: Tensor,
    k: Tensor | float,
    form: str = "reference",
    scale: float = 1.0,
) -> Tensor:
    """SRP reward [B] from L2-normalised features f_img, f_pos, f_neg [B, D] and k [B] (or scalar).

    - "reference" (authors' code, default): scale * f_img . ((1 + k) f_pos - f_neg)
    - "cfg" (paper's form):                  scale * f_img . ((1 - k) f_neg + k f_pos)
    - "plain":                               scale * f_img . (f_pos - f_neg)
    """
    if form not in SRP_FORMS:
        raise ValueError(f"unknown SRP form {form!r}; valid forms: {', '.join(SRP_FORMS)}")
    if f_img.ndim != 2 or f_pos.shape != f_img.shape or f_neg.shape != f_img.shape:
        raise ValueError(
            f"f_img, f_pos, f_neg must all be [B, D]; got {tuple(f_img.shape)}, "
            f"{tuple(f_pos.shape)}, {tuple(f_neg.shape)}"
        )
    k = torch.as_tensor(k, dtype=f_img.dtype, device=f_img.device)
    if k.ndim == 0:
        k = k.expand(f_img.shape[0])
    if k.shape != (f_img.shape[0],):
        raise ValueError(f"k must be a scalar or [B={f_img.shape[0]}], got {tuple(k.shape)}")
    k = k[:, None]
    if form == "reference":
        direction = (1 + k) * f_pos - f_neg
    elif form == "cfg":
        direction = (1 - k) * f_neg + k * f_pos
    else:  # plain
        direction = f_pos - f_neg
    return scale * (f_img * direction).sum(dim=-1)


@dataclass(frozen=True)
class SRPResult:
    """reward [B]; pos_score / neg_score [B] = scale * f_img . f_pos / f_neg (for logging)."""

    reward: Tensor
    pos_score: Tensor
    neg_score: Tensor


def semantic_relative_preference(
    model: RewardModel,
    images: Tensor,
    captions: list[str],
    pos_word: str,
    neg_word: str,
    k: Tensor | float,
    form: str = "reference",
) -> SRPResult:
    """SRP of images [B, 3, H, W] in [0, 1] against "<pos_word>. caption" vs "<neg_word>. caption".

    Text features come from the model's cache (no gradient); image features are differentiable,
    so ``reward`` back-propagates to ``images``. The inversion branch passes the words swapped.
    """
    if len(captions) != images.shape[0]:
        raise ValueError(f"got {len(captions)} captions for {images.shape[0]} images")
    if form not in SRP_FORMS:  # fail before running the towers
        raise ValueError(f"unknown SRP form {form!r}; valid forms: {', '.join(SRP_FORMS)}")
    f_pos = model.encode_text([control_prompt(pos_word, c) for c in captions])
    f_neg = model.encode_text([control_prompt(neg_word, c) for c in captions])
    f_img = model.encode_image(images)
    f_pos = f_pos.to(device=f_img.device, dtype=f_img.dtype)
    f_neg = f_neg.to(device=f_img.device, dtype=f_img.dtype)
    scale = model.score_scale
    reward = srp_score(f_img, f_pos, f_neg, k, form=form, scale=scale)
    pos_score = scale * (f_img * f_pos).sum(dim=-1)
    neg_score = scale * (f_img * f_neg).sum(dim=-1)
    return SRPResult(reward=reward, pos_score=pos_score, neg_score=neg_score)
