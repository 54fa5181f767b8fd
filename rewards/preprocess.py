"""Differentiable CLIP image preprocessing on [0, 1] image tensors (SRPO_SPEC.md section 4).

Mirrors torchvision's tensor path exactly (``Resize(size, BICUBIC, antialias=True)``,
``CenterCrop(size)``, ``Normalize(CLIP_MEAN, CLIP_STD)``) but stays an autograd graph, so the
reward gradient reaches the decoded image.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _resized_hw(h: int, w: int, size: int) -> tuple[int, int]:
    # torchvision's rule for an int size: the shorter side becomes `size`, the longer side is
    # truncated (int(), not rounded) from the aspect ratio.
    if w <= h:
        return int(size * h / w), size
    return size, int(size * w / h)


def clip_preprocess(images: Tensor, size: int = 224) -> Tensor:
    """Resize shorter side to ``size`` (bicubic, antialiased), center-crop ``size``, CLIP-normalise.

    images: [B, 3, H, W] (or [3, H, W]) float in [0, 1]. Returns [B, 3, size, size] in the input's
    float dtype (non fp32/fp64 inputs are computed in fp32 and cast back, like torchvision).
    """
    if images.ndim < 3 or images.shape[-3] != 3:
        raise ValueError(f"images must be [..., 3, H, W], got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise TypeError(f"images must be a float tensor in [0, 1], got {images.dtype}")
    lead = images.shape[:-3]
    h, w = images.shape[-2:]
    x = images.reshape(-1, 3, h, w)
    dtype = x.dtype
    new_h, new_w = _resized_hw(h, w, size)
    if (new_h, new_w) != (h, w):  # torchvision skips the interpolation when the size is unchanged
        need_cast = dtype not in (torch.float32, torch.float64)
        if need_cast:
            x = x.float()
        # antialias=True as torchvision passes for bicubic (it only low-pass filters when
        # downsampling, but it also selects the PIL-style cubic kernel when upsampling).
        x = F.interpolate(x, size=[new_h, new_w], mode="bicubic", align_corners=False, antialias=True)
        if need_cast:
            x = x.to(dtype)
    # Center crop, torchvision's anchor: Python round() (banker's rounding) of half the excess.
    top = int(round((new_h - size) / 2.0))
    left = int(round((new_w - size) / 2.0))
    x = x[..., top : top + size, left : left + size]
    mean = torch.tensor(CLIP_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    x = (x - mean) / std
    return x.reshape(*lead, 3, size, size)
