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

Other families on request (``make_tiny_world(DIR, families=("qwen_image",))``, `srpo make-tiny DIR
--family qwen_image`), so the default world costs nothing more:
  DIR/qwen_image/  a diffusers folder with the Qwen-Image layout (QwenImagePipeline.save_pretrained):
                   QwenImageTransformer2DModel, AutoencoderKLQwenImage (Qwen-Image's latents mean/std),
                   Qwen2_5_VLForConditionalGeneration + a Qwen2 BPE tokenizer trained offline, Qwen-Image's
                   scheduler; finished when DIR/WORLD.qwen_image.json exists

Two sizes: ``tiny`` (CPU tests, the default run) and ``small`` (a ~60M-parameter FLUX transformer for
benchmarks at 256x256).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Sequence

import torch

from pipeline.models.qwen_image import PROMPT_TEMPLATE, PROMPT_TEMPLATE_DROP
from pipeline.models.qwen_image_sampling import QWEN_IMAGE_SCHEDULER
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


# Qwen-Image keeps its structure (double-stream MMDiT blocks, 3-axis RoPE, a causal video VAE with a
# frame axis, a Qwen2.5-VL text encoder with its vision tower and M-RoPE); only widths and depths shrink.
# axes_dims_rope sums to the head dim; the text encoder's mrope_section sums to half its head dim.
QWEN_IMAGE_SIZES = {
    "tiny": dict(num_layers=2, attention_head_dim=16, num_attention_heads=2, axes_dims_rope=(4, 6, 6),
                 text_width=32, text_layers=2, text_heads=2, mrope_section=(2, 3, 3), vae_base_dim=8),
    "small": dict(num_layers=8, attention_head_dim=64, num_attention_heads=6, axes_dims_rope=(16, 24, 24),
                  text_width=128, text_layers=4, text_heads=4, mrope_section=(4, 6, 6), vae_base_dim=32),
}
# The pre-tokenizer of Qwen2's byte-level BPE (transformers' Qwen2Tokenizer).
_QWEN_PRETOKENIZE = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
                     r"""\s*[\r\n]+|\s+(?!\S)|\s+""")


def build_qwen_tokenizer(out_dir: str | Path, vocab_size: int = 1024):
    """A Qwen2 byte-level BPE tokenizer trained offline on the prompt template and captions, saved for
    AutoTokenizer. Like the real one, it splits the template's system prompt into exactly
    PROMPT_TEMPLATE_DROP tokens (every word of it is one token), so the pipeline's drop is the same cut."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_QWEN_PRETOKENIZE), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([PROMPT_TEMPLATE.format(c) for c in _T5_CORPUS] * 4, trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split()) for m in model["merges"]]
    # The class Qwen-Image ships (pad = <|endoftext|>, right padding); chat markers are special tokens.
    qwen = Qwen2Tokenizer(vocab=model["vocab"], merges=merges, model_max_length=32768)
    qwen.add_special_tokens({"additional_special_tokens": specials[1:]})
    prefix = qwen(PROMPT_TEMPLATE.split("{}")[0]).input_ids
    if len(prefix) != PROMPT_TEMPLATE_DROP:
        raise RuntimeError(f"tiny Qwen tokenizer: the template's system prompt is {len(prefix)} tokens, "
                           f"expected {PROMPT_TEMPLATE_DROP} (QwenImagePipeline drops that many)")
    qwen.save_pretrained(str(out_dir))
    return qwen


def _tiny_qwen_text_encoder(spec: dict, tokenizer):
    """A Qwen2_5_VLForConditionalGeneration of the real class: tiny text model (M-RoPE) + tiny vision tower."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    width, heads = spec["text_width"], spec["text_heads"]
    assert 2 * sum(spec["mrope_section"]) == width // heads, "M-RoPE sections cover half the head dim"
    text = dict(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=width * 2,
                num_hidden_layers=spec["text_layers"], num_attention_heads=heads, num_key_value_heads=1,
                max_position_embeddings=2048, rms_norm_eps=1e-6, pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"), bos_token_id=None,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                 "mrope_section": list(spec["mrope_section"])})
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=width,
                  fullatt_block_indexes=[0], window_size=112)
    return Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=vision))


def make_tiny_qwen_image(out_dir: str | Path, seed: int = 0, size: str = "tiny") -> Path:
    """Write a Qwen-Image-layout diffusers folder of random tiny models (QwenImagePipeline.save_pretrained)."""
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline,
                           QwenImageTransformer2DModel)

    spec = QWEN_IMAGE_SIZES[size]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok_tmp = out / "_tokenizer"
    tokenizer = build_qwen_tokenizer(tok_tmp)
    with torch.random.fork_rng(devices=[]):  # deterministic from the seed, the caller's RNG untouched
        torch.manual_seed(seed)
        transformer = QwenImageTransformer2DModel(
            patch_size=2, in_channels=64, out_channels=16, num_layers=spec["num_layers"],
            attention_head_dim=spec["attention_head_dim"], num_attention_heads=spec["num_attention_heads"],
            joint_attention_dim=spec["text_width"], guidance_embeds=False, axes_dims_rope=spec["axes_dims_rope"])
        # Qwen-Image's per-channel latents_mean / latents_std: the class defaults are the real model's.
        vae = AutoencoderKLQwenImage(base_dim=spec["vae_base_dim"], z_dim=16, dim_mult=[1, 2, 4, 4],
                                     num_res_blocks=1, temperal_downsample=[False, True, True])
        text_encoder = _tiny_qwen_text_encoder(spec, tokenizer)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(QWEN_IMAGE_SCHEDULER)
    pipe = QwenImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                             transformer=transformer)
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


def make_tiny_world(out_dir: str | Path, seed: int = 0, size: str = "tiny",
                    families: Sequence[str] = ("flux",)) -> dict[str, str]:
    """Write the whole tiny world (idempotent: a finished world is reused); returns its paths.

    ``families``: the model families to write besides FLUX and the rewards (which every world has), e.g.
    ``("qwen_image",)`` for DIR/qwen_image/ (a preset passes its ``model.family``); each is written
    once, on first request, so the default world costs nothing more.
    """
    root = Path(out_dir)
    paths = _make_base_world(root, seed, size)
    for family in families:
        if family != "flux":
            paths[family] = str(_make_family_folder(root, family, seed, size))
    return paths


def _make_family_folder(root: Path, family: str, seed: int, size: str) -> Path:
    """DIR/<family>/ of an extra family, marked finished by DIR/WORLD.<family>.json (as WORLD.json marks the rest)."""
    if family not in TINY_FAMILY_BUILDERS:
        raise ValueError(f"model.family: no tiny world for {family!r}; expected one of "
                         f"{sorted(['flux', *TINY_FAMILY_BUILDERS])}")
    folder, done = root / family, root / f"WORLD.{family}.json"
    if not _world_is_current(done, seed, size):
        done.unlink(missing_ok=True)
        shutil.rmtree(folder, ignore_errors=True)  # a half-written folder from an interrupted build
        TINY_FAMILY_BUILDERS[family](folder, seed=seed, size=size)
        done.write_text(json.dumps({"seed": seed, "size": size, "version": WORLD_VERSION, "path": str(folder)}))
    return folder


def _make_base_world(root: Path, seed: int, size: str) -> dict[str, str]:
    """FLUX and the reward models: the default world."""
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


# Families besides FLUX that the tiny world can write (model.family -> builder of its folder).
TINY_FAMILY_BUILDERS = {"qwen_image": make_tiny_qwen_image}
