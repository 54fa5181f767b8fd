"""Qwen-Image adapter: loading, prompt encoding, latent packing, VAE normalisation, velocity calls.

The second family behind :class:`pipeline.models.base.FlowModelAdapter`, with the real diffusers /
transformers classes (``QwenImageTransformer2DModel``, ``AutoencoderKLQwenImage``,
``Qwen2_5_VLForConditionalGeneration``) loaded from a local folder laid out as diffusers'
``QwenImagePipeline`` loads it. Each convention below is the pipeline's (diffusers 0.42):

- text: every prompt is wrapped in the pipeline's chat template, encoded by Qwen2.5-VL (last hidden
  state), and the template's first 34 tokens (the system prompt) are dropped; the batch is padded
  to its longest prompt with zeros and a 0/1 mask, which the transformer uses to mask the padding
  (None when every token of the batch is real, as the pipeline passes it);
- latents: the VAE is a causal video VAE with a frame axis: [B, 16, 1, H/8, W/8]. Normalised per
  channel from the VAE config, ``z_model = (z_vae - latents_mean) * (1 / latents_std)``; decoding
  takes frame 0. Packing is FLUX's 2x2 packing of the frame-0 latent;
- time: the transformer multiplies the timestep by 1000 itself; training and rollout pass the
  truncated ``floor(1000 sigma) / 1000`` as the SRPO authors' Qwen-Image script does (and as the
  FLUX adapter does); ``sample_images`` passes the scheduler's exact value as the pipeline does;
- guidance: true classifier-free guidance with a negative prompt (Qwen-Image has no distilled
  guidance embedding). ``guidance`` > 1 calls the transformer on the prompt and on the negative
  prompt and combines them with the pipeline's norm rescaling; ``guidance`` <= 1 is one call, no CFG.
  The SRPO recipe rolls out with CFG 4 and trains the Direct-Align branch with guidance 1
  (``srpo.train_guidance: 1.0``, the authors' ``train_cfg 1``): one forward per branch, and the
  gradient flows through the conditional velocity only.

Shapes (B batch, H = W = resolution in pixels, L <= max_sequence_length text tokens):
- packed latent ``x``: [B, (H/16)(W/16), 64]; ``img_shapes``: [[(1, H/16, W/16)]] * B;
- ``prompt_embeds`` / ``negative_embeds``: [B, L, d_qwen]; masks [B, L] (1 = token, 0 = padding).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from pipeline.models.base import token_lengths, unit_image
from pipeline.models.flux import pack_latents
from pipeline.models.flux import unpack_latents as _unpack_2d
from pipeline.models.layout import check_diffusers_folder
from pipeline.models.qwen_image_sampling import sample_batch, transformer_call, true_cfg
from pipeline.schedules import model_timestep

# QwenImagePipeline.__init__'s prompt_template_encode and prompt_template_encode_start_idx (a test
# checks both against the installed diffusers): the template's system prompt is 34 tokens, dropped.
PROMPT_TEMPLATE = ("<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, "
                   "text, spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n"
                   "{}<|im_end|>\n<|im_start|>assistant\n")
PROMPT_TEMPLATE_DROP = 34
TOKENIZER_MAX_LENGTH = 1024  # QwenImagePipeline.tokenizer_max_length: the pipeline's limit on max_sequence_length
# LoRA's default targets inside a QwenImageTransformerBlock (QwenImageAdapter.lora_target_modules).
QWEN_IMAGE_LORA_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                           "attn.add_v_proj", "attn.to_add_out", "img_mlp.net.0.proj", "img_mlp.net.2",
                           "txt_mlp.net.0.proj", "txt_mlp.net.2")
# The negative prompt of true CFG: the SRPO authors' Qwen-Image script encodes "" (diffusers' examples use " ").
NEGATIVE_PROMPT = ""


@dataclass(frozen=True)
class QwenConditioning:
    """Frozen Qwen2.5-VL outputs of a batch of prompts and of the negative prompt (one row per prompt).

    Trimmed to the batch's longest prompt (padding positions are zeros, their mask 0), as the pipeline
    pads; ``padded_length`` is the fixed length of :meth:`QwenImageAdapter.conditioning_to_arrays`.
    Build with :meth:`build`, which also notes whether any row is padded (no device sync per call).
    """

    prompt_embeds: Tensor  # [B, L, d]
    prompt_mask: Tensor  # [B, L] int64
    negative_embeds: Tensor  # [B, Ln, d]
    negative_mask: Tensor  # [B, Ln] int64
    padded_length: int
    prompt_padded: bool = True
    negative_padded: bool = True

    @staticmethod
    def build(embeds: Tensor, mask: Tensor, neg_embeds: Tensor, neg_mask: Tensor,
              padded_length: int) -> "QwenConditioning":
        """Each part trimmed to its longest real row (the transformer's output does not depend on padding)."""
        embeds, mask, padded = _trim(embeds, mask)
        neg_embeds, neg_mask, neg_padded = _trim(neg_embeds, neg_mask)
        return QwenConditioning(embeds, mask, neg_embeds, neg_mask, int(padded_length), padded, neg_padded)

    def __len__(self) -> int:
        return int(self.prompt_embeds.shape[0])

    def to(self, device: torch.device) -> "QwenConditioning":
        return QwenConditioning(self.prompt_embeds.to(device), self.prompt_mask.to(device),
                                self.negative_embeds.to(device), self.negative_mask.to(device), self.padded_length,
                                self.prompt_padded, self.negative_padded)

    def select(self, index: slice | list[int]) -> "QwenConditioning":
        return QwenConditioning.build(self.prompt_embeds[index], self.prompt_mask[index], self.negative_embeds[index],
                                      self.negative_mask[index], self.padded_length)

    def text(self, negative: bool = False) -> tuple[Tensor, Tensor | None]:
        """(embeds, mask) as the transformer takes them: mask None when no row has padding (the pipeline's
        ``encode_prompt`` drops an all-ones mask)."""
        if negative:
            return self.negative_embeds, (self.negative_mask if self.negative_padded else None)
        return self.prompt_embeds, (self.prompt_mask if self.prompt_padded else None)


def _trim(embeds: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, bool]:
    """(embeds, mask) cut to the longest real row, and whether a row is still padded."""
    if not mask.numel():
        return embeds, mask, False
    lengths = mask.sum(dim=1)
    n = max(int(lengths.max()), 1)
    return embeds[:, :n], mask[:, :n], bool((lengths < n).any())


def _pad(t: Tensor, length: int) -> Tensor:
    """Zeros appended along dim 1 up to ``length``."""
    pad = [0, 0] * (t.dim() - 2) + [0, length - t.shape[1]]
    return torch.nn.functional.pad(t, pad)


def unpack_latents(x: Tensor, h: int, w: int) -> Tensor:
    """[B, (h/2)(w/2), 4C] -> the VAE's 5-D latent [B, C, 1, h, w] (QwenImagePipeline._unpack_latents)."""
    return _unpack_2d(x, h, w).unsqueeze(2)


class QwenImageAdapter:
    """The Qwen-Image family: frozen VAE and Qwen2.5-VL text encoder plus a trainable transformer.

    The transformer is passed to :meth:`velocity` explicitly (the learner may wrap it, the rollout may
    hold another version); the adapter owns only frozen parts.
    """

    family = "qwen_image"
    transformer_class_name = "QwenImageTransformer2DModel"
    vae_scale_factor = 8  # 2 ** len(vae.temperal_downsample): three 2x spatial downsamples
    resolution_multiple = 16  # VAE /8, then 2x2 patches
    negative_prompt = NEGATIVE_PROMPT
    # The Qwen/Qwen-Image folder: component sub-folder -> its kind (pipeline.models.layout.COMPONENT_KINDS).
    components = {"transformer": "diffusers_model", "vae": "diffusers_model", "text_encoder": "transformers_model",
                  "tokenizer": "tokenizer", "scheduler": "scheduler"}

    def __init__(self, transformer, vae, text_encoder, tokenizer, max_sequence_length: int = 512,
                 device: torch.device | str = "cpu") -> None:
        if not 0 < max_sequence_length <= TOKENIZER_MAX_LENGTH:
            raise ValueError(f"model.max_sequence_length: got {max_sequence_length}, expected 1..{TOKENIZER_MAX_LENGTH}"
                             " for Qwen-Image (QwenImagePipeline's limit)")
        self.transformer = transformer
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.max_sequence_length = max_sequence_length
        self.device = torch.device(device)
        self.latent_channels = int(vae.config.z_dim)
        self._negative: tuple[Tensor, Tensor] | None = None  # the negative prompt's encoding, made once
        for frozen in (vae, text_encoder):
            if frozen is not None:
                frozen.requires_grad_(False).eval()

    # ---------------------------------------------------------------- loading
    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu", max_sequence_length: int = 512,
             load_text_encoders: bool = True, load_transformer: bool = True) -> "QwenImageAdapter":
        """Load components from a local diffusers folder (Qwen/Qwen-Image layout), fp32 weights.

        A reward worker needs only the VAE; a text-embedding worker only the text encoder and the VAE
        config (the VAE is small next to the 7B text encoder).
        """
        from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
        from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

        root = Path(path)
        if not (root / "model_index.json").is_file():
            raise FileNotFoundError(
                f"{root}: no model_index.json; expected a local diffusers folder with the Qwen-Image layout")
        for sub in (("transformer",) if load_transformer else ()) + ("vae",) + (
                ("text_encoder", "tokenizer") if load_text_encoders else ()):
            if not (root / sub).is_dir():
                raise FileNotFoundError(f"{root / sub}: missing; expected the Qwen-Image component '{sub}'")
        kw = dict(local_files_only=True, torch_dtype=torch.float32)
        transformer = None
        if load_transformer:
            transformer = QwenImageTransformer2DModel.from_pretrained(root, subfolder="transformer", **kw).to(device)
            if transformer.config.guidance_embeds:
                raise ValueError(f"{root / 'transformer'}: guidance_embeds is true; expected Qwen-Image's transformer "
                                 "without a distilled guidance embedding (this adapter guides with true CFG)")
        vae = AutoencoderKLQwenImage.from_pretrained(root, subfolder="vae", **kw).to(device)
        te = tok = None
        if load_text_encoders:
            te = Qwen2_5_VLForConditionalGeneration.from_pretrained(
                root, subfolder="text_encoder", local_files_only=True, dtype=torch.float32).to(device)
            tok = AutoTokenizer.from_pretrained(root, subfolder="tokenizer", local_files_only=True)
        return cls(transformer, vae, te, tok, max_sequence_length, device)

    # ---------------------------------------------------------------- family level (no weights loaded)
    @classmethod
    def check_model_folder(cls, path: str | Path, field: str = "model.path") -> None:
        """Pre-flight: ``path`` has the Qwen-Image layout that :meth:`load` and diffusers' QwenImagePipeline
        read (every component listed in model_index.json, configs, complete weight files, a Qwen-Image
        transformer and VAE). ConfigError naming ``field`` otherwise; no weights are read."""
        check_diffusers_folder(path, cls.components, field, {"transformer": cls.transformer_class_name,
                                                             "vae": "AutoencoderKLQwenImage"})

    @classmethod
    def parameter_template(cls, model_path: str | Path) -> dict[str, tuple[int, ...]]:
        """Parameter names and shapes of the QwenImageTransformer2DModel of ``<model_path>/transformer``
        (meta device: no memory, no weights read)."""
        from diffusers import QwenImageTransformer2DModel

        folder = Path(model_path) / "transformer"
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{folder / 'config.json'}: missing; expected the base model's transformer config")
        config = QwenImageTransformer2DModel.load_config(folder)
        with torch.device("meta"):
            model = QwenImageTransformer2DModel.from_config(config)
        return {k: tuple(v.shape) for k, v in model.state_dict().items()}

    @classmethod
    def conditioning_shapes(cls, model_path: str | Path, max_sequence_length: int) -> dict[str, list[int]]:
        """Per-prompt shapes of :meth:`conditioning_to_arrays`, from the text encoder's config (not loaded).

        Raises ValueError naming the folder when the config is missing or has no hidden_size.
        """
        f = Path(model_path) / "text_encoder" / "config.json"
        try:
            config = json.loads(f.read_text())
            d = int((config.get("text_config") or {}).get("hidden_size") or config["hidden_size"])
        except (OSError, KeyError, ValueError) as e:
            raise ValueError(f"cannot read {f} ({e}); expected the Qwen2.5-VL config with hidden_size "
                             "(top level or under text_config)") from e
        n = int(max_sequence_length)
        return {"prompt_embeds": [n, d], "prompt_mask": [n], "negative_embeds": [n, d], "negative_mask": [n]}

    @classmethod
    def load_tokenizers(cls, model_path: str | Path) -> tuple[Any]:
        """(the Qwen2 tokenizer,) as :meth:`load` reads it. Raises FileNotFoundError naming a missing folder."""
        from transformers import AutoTokenizer

        root = Path(model_path)
        if not (root / "tokenizer").is_dir():
            raise FileNotFoundError(f"{root / 'tokenizer'}: missing; expected the Qwen-Image component 'tokenizer'")
        return (AutoTokenizer.from_pretrained(root, subfolder="tokenizer", local_files_only=True),)

    @classmethod
    def truncation_flags(cls, tokenizers: tuple[Any], captions: Sequence[str],
                         max_sequence_length: int) -> tuple[np.ndarray, np.ndarray]:
        """Per caption, the tokens :meth:`encode_prompts` keeps (the templated prompt's, less the
        template's first PROMPT_TEMPLATE_DROP): (more than the tokenizer's TOKENIZER_MAX_LENGTH, more
        than max_sequence_length); the first implies the second unless max_sequence_length > 1024."""
        (tokenizer,) = tokenizers
        kept = token_lengths(tokenizer, [PROMPT_TEMPLATE.format(c) for c in captions]) - PROMPT_TEMPLATE_DROP
        return kept > TOKENIZER_MAX_LENGTH, kept > max_sequence_length

    @staticmethod
    def shard_blocks(transformer: torch.nn.Module) -> list[torch.nn.Module]:
        """The units FSDP2 shards one by one: every QwenImageTransformerBlock (the authors wrap and
        checkpoint per block); the root is sharded last by the engine."""
        blocks = list(getattr(transformer, "transformer_blocks", []))
        if not blocks or hasattr(transformer, "single_transformer_blocks"):
            raise TypeError(f"{type(transformer).__name__}: no transformer_blocks of a QwenImageTransformer2DModel "
                            "to shard")
        return blocks

    @staticmethod
    def lora_target_modules() -> tuple[str, ...]:
        """LoRA's default targets, matched inside every block of :meth:`shard_blocks` (pipeline/lora.py): the
        attention projections (image and text q/k/v, both outputs) and both feed-forwards; the
        modulation layers (``img_mod`` / ``txt_mod``) are left out, as FLUX's norms are."""
        return QWEN_IMAGE_LORA_TARGETS

    @staticmethod
    def save_lora_weights(folder: str | Path, transformer_lora_layers: dict[str, Tensor],
                          metadata: dict[str, Any]) -> None:
        """A diffusers LoRA folder that ``QwenImagePipeline.load_lora_weights(folder)`` loads."""
        from diffusers import QwenImagePipeline

        QwenImagePipeline.save_lora_weights(str(folder), transformer_lora_layers=transformer_lora_layers,
                                            transformer_lora_adapter_metadata=metadata)

    @staticmethod
    def conditioning_to_arrays(cond: QwenConditioning) -> dict[str, np.ndarray]:
        """Every part zero-padded to ``cond.padded_length``, float32 on the CPU: the fixed-shape columns of
        Ray Data batches and parquet rows (see :meth:`conditioning_shapes`)."""
        n = cond.padded_length
        parts = {"prompt_embeds": cond.prompt_embeds, "prompt_mask": cond.prompt_mask,
                 "negative_embeds": cond.negative_embeds, "negative_mask": cond.negative_mask}
        return {k: _pad(v.detach().float().cpu(), n).numpy() for k, v in parts.items()}

    @staticmethod
    def conditioning_from_arrays(batch: Mapping[str, Any], device: torch.device | str) -> QwenConditioning:
        """Inverse of :meth:`conditioning_to_arrays` (extra keys are ignored). Copied into new tensors, as
        the FLUX adapter does (a Ray Data batch may hold views at any address)."""
        def get(key: str, dtype: torch.dtype) -> Tensor:
            return torch.tensor(np.asarray(batch[key]), dtype=dtype, device=device)

        embeds = get("prompt_embeds", torch.float32)
        return QwenConditioning.build(embeds, get("prompt_mask", torch.long), get("negative_embeds", torch.float32),
                                      get("negative_mask", torch.long), embeds.shape[1])

    # ---------------------------------------------------------------- text
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> QwenConditioning:
        """QwenImagePipeline.encode_prompt for the prompts, and for the negative prompt (one row each)."""
        if self.text_encoder is None:
            raise RuntimeError("text encoders were not loaded (load_text_encoders=False)")
        embeds, mask = self._encode(prompts)
        if self._negative is None:
            self._negative = self._encode([self.negative_prompt])
        neg_embeds, neg_mask = self._negative
        b = len(prompts)
        return QwenConditioning.build(embeds, mask, neg_embeds.expand(b, -1, -1), neg_mask.expand(b, -1),
                                      self.max_sequence_length)

    def _encode(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """QwenImagePipeline._get_qwen_prompt_embeds, then encode_prompt's cut to max_sequence_length."""
        txt = [PROMPT_TEMPLATE.format(p) for p in prompts]
        tokens = self.tokenizer(txt, max_length=TOKENIZER_MAX_LENGTH + PROMPT_TEMPLATE_DROP, padding=True,
                                truncation=True, return_tensors="pt").to(self.device)
        hidden = self.text_encoder(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                                   output_hidden_states=True).hidden_states[-1]
        keep = tokens.attention_mask.bool()
        rows = [h[k][PROMPT_TEMPLATE_DROP:] for h, k in zip(hidden, keep)]  # each prompt's real tokens, template cut
        longest = max(r.shape[0] for r in rows)
        embeds = torch.stack([_pad(r[None], longest)[0] for r in rows])
        mask = torch.stack([_pad(torch.ones(1, r.shape[0], dtype=torch.long, device=r.device), longest)[0]
                            for r in rows])
        n = self.max_sequence_length
        return embeds[:, :n].float(), mask[:, :n]

    # ---------------------------------------------------------------- latents
    def latent_hw(self, resolution: int) -> tuple[int, int]:
        h = 2 * (resolution // (self.vae_scale_factor * 2))
        return h, h

    def img_shapes(self, batch: int, resolution: int) -> list[list[tuple[int, int, int]]]:
        """The transformer's RoPE layout per sample: one frame of (H/16) x (W/16) patches."""
        h, w = self.latent_hw(resolution)
        return [[(1, h // 2, w // 2)]] * batch

    def sample_noise(self, batch: int, resolution: int, generator: torch.Generator) -> Tensor:
        """eps ~ N(0, I) drawn as QwenImagePipeline.prepare_latents draws it, [B, 1, C, h, w], then packed.

        On the CPU generator so a seed gives the same noise on every device.
        """
        h, w = self.latent_hw(resolution)
        z = torch.randn(batch, 1, self.latent_channels, h, w, generator=generator, dtype=torch.float32)
        return pack_latents(z[:, 0]).to(self.device)

    # ---------------------------------------------------------------- transformer
    def velocity(self, transformer, x: Tensor, sigma: float | Tensor, cond: QwenConditioning,
                 guidance: float, resolution: int) -> Tensor:
        """v = model(x_sigma, t(sigma), text) ~ eps - x0 in packed layout [B, L, 64]; with ``guidance`` > 1
        the true-CFG combination with the negative prompt (the pipeline's, norm-rescaled)."""
        b = x.shape[0]
        t = model_timestep(sigma).to(device=x.device, dtype=torch.float32)
        t = t.expand(b) if t.dim() == 0 else t
        img_shapes = self.img_shapes(b, resolution)
        v = transformer_call(transformer, x, t, *cond.text(negative=False), img_shapes).float()
        if guidance <= 1:
            return v
        v_neg = transformer_call(transformer, x, t, *cond.text(negative=True), img_shapes).float()
        return true_cfg(v, v_neg, float(guidance))

    def sample_images(self, transformer: torch.nn.Module, prompts: list[str], seeds: list[int], steps: int,
                      guidance: float, resolution: int, scheduler_config: dict[str, Any] | None = None,
                      mixed_precision: str = "fp32") -> Tensor:
        """One batch as QwenImagePipeline samples it with ``true_cfg_scale=guidance`` and this adapter's
        negative prompt (see :mod:`pipeline.models.qwen_image_sampling`); CPU fp32 [B, 3, H, W] in [0, 1]."""
        return sample_batch(self, transformer, prompts, seeds, steps, guidance, resolution, scheduler_config,
                            mixed_precision)

    # ---------------------------------------------------------------- VAE
    def _latent_stats(self, like: Tensor) -> tuple[Tensor, Tensor]:
        """(latents_mean, 1 / latents_std) as [1, C, 1, 1, 1], computed as the pipeline computes them."""
        c = self.vae.config
        mean = torch.tensor(c.latents_mean).view(1, c.z_dim, 1, 1, 1).to(like.device, like.dtype)
        std_inv = 1.0 / torch.tensor(c.latents_std).view(1, c.z_dim, 1, 1, 1).to(like.device, like.dtype)
        return mean, std_inv

    def decode(self, x: Tensor, resolution: int, norm: str = "clamp") -> Tensor:
        """Packed model latent -> image in [0, 1], differentiable w.r.t. ``x`` (the VAE is frozen). ``norm``:
        :func:`unit_image`; "clamp" is the pipeline's VaeImageProcessor.denormalize, "minmax" the
        authors' script's reward input."""
        h, w = self.latent_hw(resolution)
        z = unpack_latents(x, h, w).to(self.vae.dtype)
        mean, std_inv = self._latent_stats(z)
        return unit_image(self.vae.decode(z / std_inv + mean, return_dict=False)[0][:, :, 0].float(), norm)

    @torch.no_grad()
    def encode_images(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Image in [0, 1], [B, 3, H, W] -> packed normalised model latent (the posterior mean, frame 0)."""
        pixels = (images * 2 - 1).to(self.device, self.vae.dtype)[:, :, None]
        z = self.vae.encode(pixels).latent_dist.mean
        mean, std_inv = self._latent_stats(z)
        return pack_latents(((z - mean) * std_inv)[:, :, 0].float())
