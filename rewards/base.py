"""The reward-model interface shared by HPSv2.1 (open_clip) and PickScore / CLIP (transformers).

A reward model here is a frozen CLIP-style dual encoder. SRPO needs exactly two things from it
(SRPO_SPEC.md section 4): L2-normalised text features for the control-word prompts (no gradient)
and L2-normalised image features that stay differentiable w.r.t. the image, plus the scale that
puts its cosine similarities on the HPS scale.
"""
from __future__ import annotations

import pickle
import re
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from rewards.preprocess import clip_preprocess


class RewardCheckpointError(ValueError):
    """A reward checkpoint exists but cannot be used (unloadable, unsafe pickle, wrong keys...)."""


_UNSAFE_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")
# torch's weights_only refusal, in the words of torch 2.x ("Weights only load failed ... `weights_only` set
# to `False` ..."), also when a loader (transformers) wraps it in an error of its own.
_TORCH_REFUSAL = re.compile(r"weights only load failed|weights_only\W*(?:set to\W*)?false", re.IGNORECASE)


def describe_load_error(e: BaseException) -> str:
    """One line, in our words, of why a checkpoint did not load.

    torch's weights_only UnpicklingError advises rerunning with ``weights_only=False``, which runs
    code from the file and must never be suggested for a reward checkpoint: its text is never passed
    on (nor that of an error that wraps it, as transformers' loaders do).
    """
    chain, seen = [], e
    while seen is not None and len(chain) < 8:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    text = " ".join(str(x) for x in chain)
    if any(isinstance(x, pickle.UnpicklingError) for x in chain) or _TORCH_REFUSAL.search(text):
        found = _UNSAFE_GLOBAL.search(text)
        what = f"a pickled Python object ({found.group(1)})" if found else "pickled Python objects"
        return (f"it holds {what} besides tensors and plain containers, which torch.load(weights_only=True) "
                "refuses to unpickle (a reward checkpoint must hold tensors only)")
    first = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
    return f"{type(e).__name__}: {first[:200]}" if first else type(e).__name__


def load_tensors_only(path: str | Path, expected: str, mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU; RewardCheckpointError in one line otherwise.

    ``mmap``: map a zip checkpoint instead of reading it, so a pre-flight check sees its keys and
    shapes without reading the tensors (a legacy non-zip file cannot be mapped and is read).
    """
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
    except Exception as e:  # UnpicklingError, RuntimeError (not a zip), KeyError / EOFError (not a pickle)...
        # from None: torch's own text (the cause) advises weights_only=False; ours says what is wrong.
        raise RewardCheckpointError(f"cannot load {path} with torch.load(weights_only=True): "
                                    f"{describe_load_error(e)} (expected {expected})") from None


class RewardModel(torch.nn.Module):
    """Abstract frozen CLIP-style reward model.

    Subclasses implement :meth:`_encode_text_uncached` (token ids -> projected text features) and
    :meth:`_encode_pixels` (CLIP-normalised pixels -> projected image features); this base class adds
    normalisation, the per-text cache, preprocessing and freezing.
    """

    kind: str = ""  # "hpsv2" | "pickscore" | "clip"
    image_size: int = 224  # side of the square crop fed to the vision tower

    def __init__(self, text_cache_size: int | None = 65536) -> None:
        super().__init__()
        # Control-word prompts repeat every few steps ("<word>. caption" for 4 x 5 words), so
        # caching the frozen text features saves a text-tower pass per sample. LRU-bounded so a
        # long run over a large prompt set cannot grow it without limit (None = unbounded).
        self._text_cache: OrderedDict[str, Tensor] = OrderedDict()
        self.text_cache_size = text_cache_size

    # ---- to implement --------------------------------------------------------------------
    def _encode_text_uncached(self, texts: list[str]) -> Tensor:
        """Projected (not yet normalised) text features [T, D] for distinct texts."""
        raise NotImplementedError

    def _encode_pixels(self, pixels: Tensor) -> Tensor:
        """Projected (not yet normalised) image features [B, D] from CLIP-normalised pixels."""
        raise NotImplementedError

    @property
    def score_scale(self) -> float:
        """Multiplier on cosine similarities that puts scores on the HPS scale."""
        raise NotImplementedError

    # ---- shared behaviour ----------------------------------------------------------------
    def freeze(self) -> "RewardModel":
        """Freeze all parameters and switch to eval mode (reward models are never trained)."""
        self.requires_grad_(False)
        self.eval()
        return self

    def train(self, mode: bool = True) -> "RewardModel":
        # Always eval: dropout / patch dropout would make the reward stochastic. Callers that put
        # a whole wrapper in train() mode must not flip the frozen reward model.
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def _apply(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> "RewardModel":
        # .to() / .cuda() / .half() change device and dtype: cached features would be stale.
        self._text_cache.clear()
        return super()._apply(fn, *args, **kwargs)

    def clear_text_cache(self) -> None:
        self._text_cache.clear()

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> Tensor:
        """L2-normalised text features [T, D]; no gradient; each distinct string encoded once."""
        if isinstance(texts, str):
            raise TypeError("encode_text takes a list of strings, not a single string")
        missing = list(dict.fromkeys(t for t in texts if t not in self._text_cache))
        if missing:
            feats = self._encode_text_uncached(missing).float()
            feats = torch.nn.functional.normalize(feats, dim=-1)
            for t, f in zip(missing, feats):
                self._text_cache[t] = f
        out = torch.stack([self._text_cache[t] for t in texts]) if texts else torch.empty(0)
        for t in texts:  # LRU bookkeeping after the lookup so this call's texts stay resident
            self._text_cache.move_to_end(t)
        if self.text_cache_size is not None:
            while len(self._text_cache) > self.text_cache_size:
                self._text_cache.popitem(last=False)
        return out

    def encode_image(self, images: Tensor) -> Tensor:
        """L2-normalised image features [B, D] from images [B, 3, H, W] in [0, 1]; differentiable."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W], got {tuple(images.shape)}")
        pixels = clip_preprocess(images, size=self.image_size)
        feats = self._encode_pixels(pixels.to(device=self.device, dtype=self.dtype))
        # Normalise in fp32 so bf16/fp16 towers still give a precise cosine.
        return torch.nn.functional.normalize(feats.float(), dim=-1)
