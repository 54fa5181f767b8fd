"""The tiny reward world: random tiny instances of the REAL reward classes, saved in the REAL formats.

Used by tests and the tiny preset (no GPU, no downloads). The files go through exactly the loaders
that read the real HPS_v2.1_compressed.pt / PickScore folders, so the tiny world exercises the real
code paths. Files are bit-identical for a given seed.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from rewards.aesthetic import AESTHETIC_FILE_NAME, AestheticMLP
from rewards.hps import _open_clip, _quiet_random_init_warning, _resolve_arch
from rewards.tiny_tokenizers import build_clip_tokenizer

# A ViT-H-14-shaped open_clip config (ViT vision tower, causal text transformer, the real CLIP vocab
# and context length, 224 px input) shrunk to width 32 / 2 layers. Patch 32 keeps it to 49 tokens.
TINY_OPEN_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 32, "head_width": 16, "patch_size": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
TINY_OPEN_CLIP_CONFIG_NAME = "open_clip_config.json"
TINY_HPS_CHECKPOINT_NAME = "HPS_v2.1_compressed.pt"


def make_tiny_hps(out_dir: str | Path, seed: int = 0) -> dict:
    """Write a tiny random open_clip model as ``HPS_v2.1_compressed.pt`` + its config JSON.

    Returns {"checkpoint": <.pt path>, "arch": <config JSON path>} (the arguments of HPSv2Reward.load).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config_path = out / TINY_OPEN_CLIP_CONFIG_NAME
    config_path.write_text(json.dumps(TINY_OPEN_CLIP_CONFIG, indent=2, sort_keys=True) + "\n")
    arch_name = _resolve_arch(config_path)  # registers the JSON with open_clip under its stem
    # fork_rng: seed the init without disturbing the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with _quiet_random_init_warning():  # random init is the point here
            model = _open_clip().create_model(arch_name, pretrained=None, device="cpu")
    ckpt_path = out / TINY_HPS_CHECKPOINT_NAME
    # Same layout as the released file: {"state_dict": open_clip CLIP state dict}.
    state_dict = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    torch.save({"state_dict": state_dict}, ckpt_path)
    return {"checkpoint": ckpt_path, "arch": config_path}


def make_tiny_hf_clip(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny random transformers CLIPModel folder (safetensors) + CLIP tokenizer; returns out_dir.

    Serves as the tiny PickScore and the tiny CLIP (both are CLIPModel folders).
    """
    from transformers import CLIPConfig, CLIPModel  # as in hf_clip.py: only where a model is made

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=49408,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            # pooling takes the first <|endoftext|> (49407); the tokenizer pads with it too
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=224,
            patch_size=32,
        ),
        projection_dim=32,
        # PickScore's learned temperature (exp = 100), so score_scale is the real one (5.0).
        logit_scale_init_value=4.6052,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config)
    model.save_pretrained(str(out), safe_serialization=True)
    build_clip_tokenizer(out)
    return out


def make_tiny_aesthetic(out_dir: str | Path, input_dim: int = 32, seed: int = 0) -> Path:
    """Write a random LAION aesthetic predictor head as ``sac+logos+ava1-l14-linearMSE.pth``.

    The real hidden sizes and key layout (``layers.{0,2,4,6,7}.*``), only the input width shrinks to
    the tiny CLIP's projection dim, so the file goes through the loader of the released one.
    Returns the file path.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mlp = AestheticMLP(input_dim)
    path = out / AESTHETIC_FILE_NAME
    # A plain state dict, as released (torch.save of model.state_dict()).
    torch.save({k: v.detach().clone().contiguous() for k, v in mlp.state_dict().items()}, path)
    return path
