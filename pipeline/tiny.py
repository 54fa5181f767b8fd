"""The tiny world: random, tiny instances of the real model classes, written in their real formats.

``make_tiny_world(DIR, seed)`` writes, deterministically from the seed:
  DIR/flux/        a diffusers folder with the FLUX.1-dev layout (FluxPipeline.save_pretrained):
                   FluxTransformer2DModel, AutoencoderKL, CLIPTextModel + CLIPTokenizer (open_clip's
                   BPE vocabulary), T5EncoderModel + a T5 tokenizer trained offline, the FLUX scheduler
  DIR/hps/         HPS_v2.1_compressed.pt ({"state_dict": ...}) + the open_clip model config JSON
  DIR/pickscore/   a transformers CLIPModel folder (PickScore format)
  DIR/clip/        a transformers CLIPModel folder (CLIP format)
  DIR/aesthetic/   sac+logos+ava1-l14-linearMSE.pth: a LAION aesthetic predictor head (real layout,
                   input width = the tiny CLIP's projection dim; it reads DIR/clip's embeddings)
Everything is then loaded back by the same loaders that load FLUX.1-dev and the real rewards.

Two sizes: ``tiny`` (CPU tests, the default run) and ``small`` (a ~60M-parameter FLUX transformer for
benchmarks at 256x256).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from rewards.aesthetic import AESTHETIC_FILE_NAME
from rewards.tiny import make_tiny_aesthetic, make_tiny_hf_clip, make_tiny_hps
from rewards.tiny_tokenizers import build_clip_tokenizer

SIZES = {
    # The transformer keeps FLUX's structure (double-stream + single-stream blocks, RoPE over 3 axes,
    # guidance embedding); only widths and depths shrink. axes_dims_rope must sum to the head dim.
    "tiny": dict(num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
                 joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6),
                 vae_channels=(16, 16, 16, 16), text_width=32, t5_width=32),
    "small": dict(num_layers=6, num_single_layers=12, attention_head_dim=64, num_attention_heads=6,
                  joint_attention_dim=128, pooled_projection_dim=64, axes_dims_rope=(16, 24, 24),
                  vae_channels=(32, 32, 64, 64), text_width=64, t5_width=128),
}

# A small corpus for the offline T5 tokenizer: captions like the ones we train on.
_T5_CORPUS = [
    "a photo of a cat sitting on a wooden table", "a portrait of an old man with a beard",
    "a red sports car parked on a city street at night", "a bowl of fresh fruit on a kitchen counter",
    "a mountain landscape with a lake at sunrise", "a dog running on the beach in summer",
    "a cup of coffee next to a laptop", "an astronaut riding a horse on the moon",
    "a lighthouse on a rocky coast during a storm", "a bouquet of yellow flowers in a glass vase",
    "natural lighting detail detailed real concept art painting anime flat oil",
    "a close up of a woman smiling in soft light", "a snowy forest with tall pine trees",
    "a plate of sushi on a black table", "a small boat on a calm river", "a busy market in an old town",
]


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)


def build_t5_tokenizer(out_dir: str | Path, vocab_size: int = 512):
    """A T5 (Unigram) tokenizer trained offline with the `tokenizers` library, saved for AutoTokenizer."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import T5TokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(" {2,}", " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"],
                                      unk_token="<unk>", show_progress=False)
    tok.train_from_iterator(_T5_CORPUS * 4, trainer=trainer)
    from tokenizers.processors import TemplateProcessing

    eos = tok.token_to_id("</s>")
    tok.post_processor = TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", eos)])
    # The class FLUX.1-dev ships (T5TokenizerFast); no <extra_id_*> sentinels: the encoder never sees them.
    fast = T5TokenizerFast(tokenizer_object=tok, extra_ids=0, pad_token="<pad>", eos_token="</s>",
                           unk_token="<unk>", model_max_length=512)
    fast.save_pretrained(str(out_dir))
    return fast


def make_tiny_flux(out_dir: str | Path, seed: int = 0, size: str = "tiny") -> Path:
    """Write a FLUX.1-dev-layout diffusers folder of random tiny models; returns its path."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    spec = SIZES[size]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok_tmp = out / "_tokenizers"
    clip_tok = build_clip_tokenizer(tok_tmp / "clip")
    t5_tok = build_t5_tokenizer(tok_tmp / "t5")

    _seed_everything(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=spec["num_layers"], num_single_layers=spec["num_single_layers"],
        attention_head_dim=spec["attention_head_dim"], num_attention_heads=spec["num_attention_heads"],
        joint_attention_dim=spec["joint_attention_dim"], pooled_projection_dim=spec["pooled_projection_dim"],
        guidance_embeds=True, axes_dims_rope=spec["axes_dims_rope"],
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16,
        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=spec["vae_channels"], layers_per_block=1, norm_num_groups=8,
        scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=spec["text_width"], intermediate_size=spec["text_width"] * 2,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
        projection_dim=spec["pooled_projection_dim"], bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    ))
    assert spec["text_width"] == spec["pooled_projection_dim"], "FLUX feeds the CLIP pooled output directly"
    text_encoder_2 = T5EncoderModel(T5Config(
        vocab_size=len(t5_tok), d_model=spec["t5_width"], d_ff=spec["t5_width"] * 2, d_kv=8,
        num_layers=2, num_heads=4, relative_attention_num_buckets=8, feed_forward_proj="gated-gelu",
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    ))
    assert spec["t5_width"] == spec["joint_attention_dim"], "FLUX reads T5 embeddings directly"
    # FLUX.1-dev's scheduler config (the diffusers pipeline uses it; SRPO's own sampler does not).
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=clip_tok,
                        text_encoder_2=text_encoder_2, tokenizer_2=t5_tok, transformer=transformer)
    pipe.save_pretrained(str(out), safe_serialization=True)
    shutil.rmtree(tok_tmp, ignore_errors=True)
    return out


# Bumped whenever the world gains or changes files: a WORLD.json of another version is rebuilt, so a
# world written by older code is never used with paths it lacks. 2: + aesthetic/.
WORLD_VERSION = 2


def _world_is_current(done: Path, seed: int, size: str) -> bool:
    """True when WORLD.json marks a finished world of this seed, size and version."""
    if not done.is_file():
        return False
    try:
        meta = json.loads(done.read_text())
    except (OSError, ValueError):
        return False
    return meta.get("seed") == seed and meta.get("size") == size and meta.get("version") == WORLD_VERSION


def make_tiny_world(out_dir: str | Path, seed: int = 0, size: str = "tiny") -> dict[str, str]:
    """Write the whole tiny world (idempotent: a finished world is reused); returns its paths."""
    root = Path(out_dir)
    done = root / "WORLD.json"
    paths = {
        "flux": str(root / "flux"),
        "hps_checkpoint": str(root / "hps" / "HPS_v2.1_compressed.pt"),
        "hps_arch": str(root / "hps" / "open_clip_config.json"),
        "pickscore": str(root / "pickscore"),
        "clip": str(root / "clip"),
        "aesthetic": str(root / "aesthetic" / AESTHETIC_FILE_NAME),
        "aesthetic_clip": str(root / "clip"),  # the predictor reads the tiny CLIP's image embeddings
    }
    if _world_is_current(done, seed, size):
        return paths
    root.mkdir(parents=True, exist_ok=True)
    done.unlink(missing_ok=True)  # a rebuild interrupted mid-way must not look finished
    make_tiny_flux(root / "flux", seed=seed, size=size)
    hps = make_tiny_hps(root / "hps", seed=seed)
    paths["hps_checkpoint"], paths["hps_arch"] = str(hps["checkpoint"]), str(hps["arch"])
    make_tiny_hf_clip(root / "pickscore", seed=seed + 1)
    clip = make_tiny_hf_clip(root / "clip", seed=seed + 2)
    clip_dim = int(json.loads((Path(clip) / "config.json").read_text())["projection_dim"])
    paths["aesthetic"] = str(make_tiny_aesthetic(root / "aesthetic", input_dim=clip_dim, seed=seed + 3))
    # Written last: a world interrupted mid-way is rebuilt, never half-used.
    done.write_text(json.dumps({"seed": seed, "size": size, "version": WORLD_VERSION, "paths": paths}, indent=2))
    return paths
