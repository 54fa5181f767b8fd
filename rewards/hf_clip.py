"""PickScore and CLIP rewards via a transformers ``CLIPModel`` loaded from a local folder.

Their scores are ``exp(logit_scale) * cos``; dividing by 20 puts them on the HPS scale
(SRPO_SPEC.md section 4), hence ``score_scale = exp(logit_scale) / 20``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from rewards.base import RewardCheckpointError, RewardModel, describe_load_error, load_tensors_only

HF_KINDS = ("pickscore", "clip")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
EXPECTED_FOLDER = "a transformers CLIPModel folder (config.json + model.safetensors or pytorch_model.bin)"
# What AutoTokenizer reads for a CLIP tokenizer: a fast tokenizer.json, or the BPE vocab.json + merges.txt.
EXPECTED_TOKENIZER = "a CLIP tokenizer folder (tokenizer.json, or vocab.json + merges.txt)"


def _projected(out: Any, dim: int, what: str) -> Tensor:
    """The projected embedding [B, dim] from get_{image,text}_features, whatever it returns.

    transformers < 5 returns the projected tensor; transformers 5 returns a
    BaseModelOutputWithPooling whose ``pooler_output`` has been replaced by the projection.
    """
    if isinstance(out, Tensor):
        feats = out
    elif getattr(out, "pooler_output", None) is not None:
        feats = out.pooler_output
    elif isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        feats = out[0]
    else:
        raise TypeError(f"unexpected return type from CLIPModel.get_{what}_features: {type(out)!r}")
    if feats.ndim != 2 or feats.shape[-1] != dim:
        raise RuntimeError(
            f"CLIPModel.get_{what}_features gave shape {tuple(feats.shape)}, expected [B, {dim}] "
            f"(the projected embedding); the installed transformers changed its return value"
        )
    return feats


def _check_folder(path: Path, what: str, need_weights: bool) -> None:
    if not path.is_dir():
        raise FileNotFoundError(f"{what} folder not found: {path} (expected {EXPECTED_FOLDER})")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path / 'config.json'} not found (expected {EXPECTED_FOLDER})")
    if need_weights and not any((path / f).is_file() for f in WEIGHT_FILES):
        raise RewardCheckpointError(f"no weights in {path}: expected one of {', '.join(WEIGHT_FILES)}")


def _weight_keys(path: Path) -> set[str]:
    """Parameter names of the weights from_pretrained would read (its first choice of WEIGHT_FILES),
    from safetensors headers or a mapped weights_only unpickle: no tensor is read."""
    name = next(f for f in WEIGHT_FILES if (path / f).is_file())
    files = [path / name]
    if name.endswith(".index.json"):
        try:
            files = [path / s for s in sorted(set(json.loads(files[0].read_text())["weight_map"].values()))]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise RewardCheckpointError(f"{files[0]}: not a weights index ({describe_load_error(e)}); "
                                        "expected JSON with a 'weight_map' of parameter -> shard file") from None
    keys: set[str] = set()
    for f in files:
        if not f.is_file():
            raise RewardCheckpointError(f"{f}: missing, but {name} lists it; expected every shard of the index")
        if f.suffix == ".safetensors":
            try:
                with safe_open(str(f), "pt") as h:
                    keys |= set(h.keys())
            except (SafetensorError, OSError) as e:
                raise RewardCheckpointError(f"{f}: not a complete safetensors file ({describe_load_error(e)}); "
                                            f"expected {EXPECTED_FOLDER}") from None
        else:
            state = load_tensors_only(f, EXPECTED_FOLDER, mmap=True)
            if not isinstance(state, dict):
                raise RewardCheckpointError(f"{f} holds {type(state).__name__}, not a state dict "
                                            f"(expected {EXPECTED_FOLDER})")
            keys |= {str(k) for k in state}
    return keys


def check_clip_folder(path: str | Path, kind: str) -> None:
    """Pre-flight: ``path`` is a CLIPModel folder whose weights hold both towers, read from the weight
    files' keys only (safetensors headers, or a mapped weights_only unpickle). One-line errors."""
    path = Path(path)
    _check_folder(path, f"{kind} model", need_weights=True)
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise RewardCheckpointError(f"{path / 'config.json'}: not readable JSON ({describe_load_error(e)}); "
                                    f"expected {EXPECTED_FOLDER}") from None
    if not isinstance(config, dict) or config.get("model_type", "clip") != "clip":
        got = config.get("model_type") if isinstance(config, dict) else type(config).__name__
        raise RewardCheckpointError(f"{path / 'config.json'}: model_type {got!r}; expected a CLIPModel config "
                                    "(model_type 'clip')")
    keys = _weight_keys(path)
    for tower in ("text_model.", "vision_model."):
        if not any(tower in k for k in keys):
            raise RewardCheckpointError(f"{path}: its weights have no {tower}* parameters ({len(keys)} keys); "
                                        f"expected {EXPECTED_FOLDER} with both CLIP towers")


def check_tokenizer_folder(path: str | Path) -> None:
    """Pre-flight: ``path`` holds the files AutoTokenizer reads for a CLIP tokenizer."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: not a folder; expected {EXPECTED_TOKENIZER}")
    if not ((path / "tokenizer.json").is_file() or all((path / f).is_file() for f in ("vocab.json", "merges.txt"))):
        raise RewardCheckpointError(f"{path}: no tokenizer files; expected {EXPECTED_TOKENIZER}")


class HFCLIPReward(RewardModel):
    """PickScore / CLIP reward: score = exp(logit_scale) * cos(image, text), /20 for the HPS scale."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, kind: str) -> None:
        if kind not in HF_KINDS:
            raise ValueError(f"unknown kind {kind!r} for HFCLIPReward; valid kinds: {', '.join(HF_KINDS)}")
        super().__init__()
        self.kind = kind
        self.model = model  # transformers CLIPModel
        self.tokenizer = tokenizer
        self.image_size = int(model.config.vision_config.image_size)
        self.max_length = min(77, int(model.config.text_config.max_position_embeddings))
        self.freeze()

    @classmethod
    def load(
        cls,
        path: str | Path,
        kind: str,
        tokenizer_path: str | Path | None = None,
        device: str | torch.device = "cpu",
    ) -> "HFCLIPReward":
        """Load a local CLIPModel folder (never the hub); tokenizer from ``tokenizer_path`` or ``path``."""
        from transformers import AutoTokenizer, CLIPModel

        if kind not in HF_KINDS:
            raise ValueError(f"unknown kind {kind!r} for HFCLIPReward; valid kinds: {', '.join(HF_KINDS)}")
        path = Path(path)
        _check_folder(path, f"{kind} model", need_weights=True)
        tok_path = Path(tokenizer_path) if tokenizer_path else path
        if not tok_path.is_dir():
            raise FileNotFoundError(
                f"{kind} tokenizer folder not found: {tok_path} (expected a CLIP tokenizer/processor folder, "
                f"e.g. CLIP-ViT-H-14 for PickScore)"
            )
        try:
            # fp32 explicitly: transformers 5 defaults to dtype="auto" (the checkpoint's dtype).
            model, info = CLIPModel.from_pretrained(
                str(path), local_files_only=True, dtype=torch.float32, output_loading_info=True
            )
        except Exception as e:  # noqa: BLE001 - from None: a weights_only refusal's text must not be passed on
            raise RewardCheckpointError(f"cannot load a CLIPModel from {path}: {describe_load_error(e)} "
                                        f"(expected {EXPECTED_FOLDER})") from None
        # from_pretrained silently random-initialises missing weights; a reward model must not.
        bad = {k: v for k, v in info.items() if k in ("missing_keys", "mismatched_keys") and v}
        if bad:
            raise RewardCheckpointError(f"{path} does not hold a complete CLIPModel: {bad}")
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(tok_path), local_files_only=True)
        except Exception as e:  # noqa: BLE001
            raise RewardCheckpointError(f"cannot load a CLIP tokenizer from {tok_path}: {describe_load_error(e)} "
                                        f"(expected {EXPECTED_TOKENIZER})") from None
        return cls(model, tokenizer, kind).to(device)

    def tokenize(self, texts: list[str]) -> dict[str, Tensor]:
        """input_ids / attention_mask [T, 77], padded to max_length like the CLIP processor."""
        return self.tokenizer(
            texts, padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
        )

    def _encode_text_uncached(self, texts: list[str]) -> Tensor:
        tok = self.tokenize(texts)
        out = self.model.get_text_features(
            input_ids=tok["input_ids"].to(self.device), attention_mask=tok["attention_mask"].to(self.device)
        )
        return _projected(out, self.model.config.projection_dim, "text")

    def _encode_pixels(self, pixels: Tensor) -> Tensor:
        out = self.model.get_image_features(pixel_values=pixels)
        return _projected(out, self.model.config.projection_dim, "image")

    @property
    def score_scale(self) -> float:
        return float(self.model.logit_scale.detach().float().exp()) / 20.0
