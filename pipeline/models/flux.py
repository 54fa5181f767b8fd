"""FLUX.1 adapter: loading, prompt encoding, latent packing, VAE normalisation, velocity calls.

Everything the SRPO core needs from a model family goes through the small surface of
:class:`pipeline.models.base.FlowModelAdapter`; this module implements it for FLUX with the real
diffusers / transformers classes, loaded from a local folder with the FLUX.1-dev layout
(the tiny world writes the same layout, so tests exercise this exact code).

Shapes (B batch, H = W = resolution in pixels):
- VAE latent ``z``: [B, 16, H/8, W/8]; packed latent ``x``: [B, (H/16)(W/16), 64].
- T5 ``prompt_embeds``: [B, max_sequence_length, d_t5]; CLIP ``pooled``: [B, d_clip];
  ``text_ids``: [max_sequence_length, 3] zeros; ``img_ids``: [(H/16)(W/16), 3].
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
from pipeline.models.flux_sampling import sample_batch
from pipeline.models.layout import check_diffusers_folder
from pipeline.schedules import model_timestep

# FLUX VAE latent normalisation (SRPO_SPEC notation): z_model = (z_vae - shift) * scale.
FLUX_VAE_SHIFT = 0.1159
FLUX_VAE_SCALE = 0.3611
# LoRA's default targets inside a FLUX block (FluxAdapter.lora_target_modules).
FLUX_LORA_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                     "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                     "ff_context.net.2", "proj_mlp", "proj_out")


@dataclass(frozen=True)
class TextConditioning:
    """Frozen text-encoder outputs for a batch of prompts (no gradient ever flows here)."""

    prompt_embeds: Tensor  # [B, L, d_t5]
    pooled: Tensor  # [B, d_clip]
    text_ids: Tensor  # [L, 3]

    def __len__(self) -> int:
        return int(self.prompt_embeds.shape[0])

    def to(self, device: torch.device) -> "TextConditioning":
        return TextConditioning(self.prompt_embeds.to(device), self.pooled.to(device), self.text_ids.to(device))

    def select(self, index: slice | list[int]) -> "TextConditioning":
        return TextConditioning(self.prompt_embeds[index], self.pooled[index], self.text_ids)

    @staticmethod
    def cat(items: list["TextConditioning"]) -> "TextConditioning":
        return TextConditioning(
            torch.cat([c.prompt_embeds for c in items]),
            torch.cat([c.pooled for c in items]),
            items[0].text_ids,
        )


def pack_latents(z: Tensor) -> Tensor:
    """[B, C, h, w] -> [B, (h/2)(w/2), 4C]: 2x2 patches, the layout FLUX's transformer reads."""
    b, c, h, w = z.shape
    z = z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return z.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(x: Tensor, h: int, w: int) -> Tensor:
    """Inverse of :func:`pack_latents` for a latent of h x w (VAE-latent pixels)."""
    b, _, d = x.shape
    x = x.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, h, w)


def latent_image_ids(h: int, w: int) -> Tensor:
    """RoPE position ids of the packed latent tokens: (0, row, col) per 2x2 patch."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3)


def normalize_vae_latent(z_vae: Tensor) -> Tensor:
    return (z_vae - FLUX_VAE_SHIFT) * FLUX_VAE_SCALE


def denormalize_vae_latent(z_model: Tensor) -> Tensor:
    return z_model / FLUX_VAE_SCALE + FLUX_VAE_SHIFT


class FluxAdapter:
    """The FLUX family: frozen VAE and text encoders plus a trainable transformer.

    The transformer is passed to :meth:`velocity` explicitly: the learner may wrap it (FSDP2,
    DeepSpeed) and the rollout may hold another version of it; the adapter owns only frozen parts.
    """

    family = "flux"
    transformer_class_name = "FluxTransformer2DModel"
    vae_scale_factor = 8  # three 2x downsamples in the FLUX VAE
    latent_channels = 16
    resolution_multiple = 16  # VAE /8, then 2x2 patches
    # The FLUX.1-dev folder: component sub-folder -> its kind (pipeline.models.layout.COMPONENT_KINDS).
    components = {"transformer": "diffusers_model", "vae": "diffusers_model", "text_encoder": "transformers_model",
                  "text_encoder_2": "transformers_model", "tokenizer": "tokenizer", "tokenizer_2": "tokenizer",
                  "scheduler": "scheduler"}

    def __init__(self, transformer, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2,
                 max_sequence_length: int = 512, device: torch.device | str = "cpu") -> None:
        self.transformer = transformer
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.text_encoder_2 = text_encoder_2
        self.tokenizer_2 = tokenizer_2
        self.max_sequence_length = max_sequence_length
        self.device = torch.device(device)
        for frozen in (vae, text_encoder, text_encoder_2):
            if frozen is not None:
                frozen.requires_grad_(False).eval()

    # ---------------------------------------------------------------- loading
    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu", max_sequence_length: int = 512,
             load_text_encoders: bool = True, load_transformer: bool = True) -> "FluxAdapter":
        """Load components from a local diffusers folder (FLUX.1-dev layout), fp32 weights.

        A reward worker needs only the VAE (load_transformer=False, load_text_encoders=False);
        a text-embedding worker needs only the text encoders.
        """
        from diffusers import AutoencoderKL, FluxTransformer2DModel
        from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

        root = Path(path)
        if not (root / "model_index.json").is_file():
            raise FileNotFoundError(
                f"{root}: no model_index.json; expected a local diffusers folder with the FLUX.1-dev layout")
        for sub in (("transformer",) if load_transformer else ()) + ("vae",) + (
                ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2") if load_text_encoders else ()):
            if not (root / sub).is_dir():
                raise FileNotFoundError(f"{root / sub}: missing; expected the FLUX.1-dev component '{sub}'")
        kw = dict(local_files_only=True, torch_dtype=torch.float32)
        transformer = (FluxTransformer2DModel.from_pretrained(root, subfolder="transformer", **kw).to(device)
                       if load_transformer else None)
        vae = AutoencoderKL.from_pretrained(root, subfolder="vae", **kw).to(device)
        te = tok = te2 = tok2 = None
        if load_text_encoders:
            te = CLIPTextModel.from_pretrained(root, subfolder="text_encoder", **kw).to(device)
            te2 = T5EncoderModel.from_pretrained(root, subfolder="text_encoder_2", **kw).to(device)
            tok = AutoTokenizer.from_pretrained(root, subfolder="tokenizer", local_files_only=True)
            tok2 = AutoTokenizer.from_pretrained(root, subfolder="tokenizer_2", local_files_only=True)
        return cls(transformer, vae, te, tok, te2, tok2, max_sequence_length, device)

    # ---------------------------------------------------------------- family level (no weights loaded)
    @classmethod
    def check_model_folder(cls, path: str | Path, field: str = "model.path") -> None:
        """Pre-flight: ``path`` has the FLUX.1-dev layout that :meth:`load` and diffusers' FluxPipeline read
        (every component listed in model_index.json, configs, complete weight files, a FLUX transformer).
        ConfigError naming ``field`` otherwise; no weights are read."""
        check_diffusers_folder(path, cls.components, field, {"transformer": cls.transformer_class_name})

    @classmethod
    def parameter_template(cls, model_path: str | Path) -> dict[str, tuple[int, ...]]:
        """Parameter names and shapes of the FluxTransformer2DModel of ``<model_path>/transformer``.

        Built on the meta device: no memory, no weights read (the config only); what export checks
        a state dict against before writing a diffusers folder.
        """
        from diffusers import FluxTransformer2DModel

        folder = Path(model_path) / "transformer"
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{folder / 'config.json'}: missing; expected the base model's transformer config")
        config = FluxTransformer2DModel.load_config(folder)
        with torch.device("meta"):
            model = FluxTransformer2DModel.from_config(config)
        return {k: tuple(v.shape) for k, v in model.state_dict().items()}

    @classmethod
    def conditioning_shapes(cls, model_path: str | Path, max_sequence_length: int) -> dict[str, list[int]]:
        """Per-prompt shapes of :meth:`conditioning_to_arrays`, from the text encoders' configs (none loaded).

        Raises ValueError naming the folder when a config is missing or lacks its width key.
        """
        root = Path(model_path)
        try:
            d_t5 = int(json.loads((root / "text_encoder_2" / "config.json").read_text())["d_model"])
            d_clip = int(json.loads((root / "text_encoder" / "config.json").read_text())["hidden_size"])
        except (OSError, KeyError, ValueError) as e:
            raise ValueError(f"cannot read the text encoders' config.json under {root} ({e}); expected "
                             "text_encoder/config.json (hidden_size) and text_encoder_2/config.json (d_model)") from e
        return {"prompt_embeds": [int(max_sequence_length), d_t5], "pooled": [d_clip]}

    @classmethod
    def load_tokenizers(cls, model_path: str | Path) -> tuple[Any, Any]:
        """(CLIP tokenizer, T5 tokenizer) as :meth:`load` reads them; the CLIP limit is its model_max_length,
        the T5 limit is max_sequence_length. Raises FileNotFoundError naming a missing folder."""
        from transformers import AutoTokenizer

        root = Path(model_path)
        for sub in ("tokenizer", "tokenizer_2"):
            if not (root / sub).is_dir():
                raise FileNotFoundError(f"{root / sub}: missing; expected the FLUX.1-dev component '{sub}'")
        return (AutoTokenizer.from_pretrained(root, subfolder="tokenizer", local_files_only=True),
                AutoTokenizer.from_pretrained(root, subfolder="tokenizer_2", local_files_only=True))

    @classmethod
    def truncation_flags(cls, tokenizers: tuple[Any, Any], captions: Sequence[str],
                         max_sequence_length: int) -> tuple[np.ndarray, np.ndarray]:
        """(longer than CLIP's model_max_length, 77 with specials; longer than max_sequence_length T5
        tokens) per caption: what :meth:`encode_prompts` cuts."""
        clip_tok, t5_tok = tokenizers
        return (token_lengths(clip_tok, captions) > clip_tok.model_max_length,
                token_lengths(t5_tok, captions) > max_sequence_length)

    @staticmethod
    def shard_blocks(transformer: torch.nn.Module) -> list[torch.nn.Module]:
        """The units FSDP2 shards one by one: every double-stream block, then every single-stream block
        (torchtitan's FLUX ``parallelize``); the root is sharded last by the engine."""
        blocks = [*getattr(transformer, "transformer_blocks", []), *getattr(transformer, "single_transformer_blocks", [])]
        if not blocks:
            raise TypeError(f"{type(transformer).__name__}: no transformer_blocks / single_transformer_blocks to "
                            "shard; expected a FluxTransformer2DModel")
        return blocks

    @staticmethod
    def lora_target_modules() -> tuple[str, ...]:
        """LoRA's default targets, matched inside every block of :meth:`shard_blocks` (pipeline/lora.py):
        the attention projections and feed-forward layers. Double-stream blocks: image and text q/k/v,
        both output projections, both feed-forwards; single-stream blocks: q/k/v, ``proj_mlp`` (the MLP
        input) and ``proj_out`` (attention + MLP output). The root's ``proj_out`` lies outside every block."""
        return FLUX_LORA_TARGETS

    @staticmethod
    def save_lora_weights(folder: str | Path, transformer_lora_layers: dict[str, Tensor],
                          metadata: dict[str, Any]) -> None:
        """A diffusers LoRA folder (``pytorch_lora_weights.safetensors``, peft config in its metadata)
        that ``FluxPipeline.load_lora_weights(folder)`` loads."""
        from diffusers import FluxPipeline

        FluxPipeline.save_lora_weights(str(folder), transformer_lora_layers=transformer_lora_layers,
                                       transformer_lora_adapter_metadata=metadata)

    @staticmethod
    def conditioning_to_arrays(cond: TextConditioning) -> dict[str, np.ndarray]:
        """{"prompt_embeds": [B, L, d_t5], "pooled": [B, d_clip]} float32 on the CPU (text_ids are zeros,
        rebuilt by :meth:`conditioning_from_arrays`): the columns of Ray Data batches and parquet rows."""
        return {"prompt_embeds": cond.prompt_embeds.detach().float().cpu().numpy(),
                "pooled": cond.pooled.detach().float().cpu().numpy()}

    @staticmethod
    def conditioning_from_arrays(batch: Mapping[str, Any], device: torch.device | str) -> TextConditioning:
        """Inverse of :meth:`conditioning_to_arrays` (extra keys of the batch are ignored).

        Copied into new tensors: a Ray Data batch may hold views at any address, and MKL's matmuls
        round differently with the operands' alignment (a 1-ulp difference in the rollout, measured).
        """
        embeds = torch.tensor(np.asarray(batch["prompt_embeds"]), dtype=torch.float32, device=device)
        pooled = torch.tensor(np.asarray(batch["pooled"]), dtype=torch.float32, device=device)
        return TextConditioning(embeds, pooled, torch.zeros(embeds.shape[1], 3, device=device))

    # ---------------------------------------------------------------- text
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> TextConditioning:
        """Exactly FluxPipeline.encode_prompt: CLIP pooled output + T5 sequence embeddings."""
        if self.text_encoder is None:
            raise RuntimeError("text encoders were not loaded (load_text_encoders=False)")
        clip_ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                                  truncation=True, return_tensors="pt").input_ids
        pooled = self.text_encoder(clip_ids.to(self.device), output_hidden_states=False).pooler_output
        t5_ids = self.tokenizer_2(prompts, padding="max_length", max_length=self.max_sequence_length,
                                  truncation=True, return_tensors="pt").input_ids
        embeds = self.text_encoder_2(t5_ids.to(self.device), output_hidden_states=False)[0]
        text_ids = torch.zeros(embeds.shape[1], 3, device=self.device)
        return TextConditioning(embeds.float(), pooled.float(), text_ids)

    # ---------------------------------------------------------------- latents
    def latent_hw(self, resolution: int) -> tuple[int, int]:
        h = 2 * (resolution // (self.vae_scale_factor * 2))
        return h, h

    def noise_shape(self, batch: int, resolution: int) -> tuple[int, int, int]:
        h, w = self.latent_hw(resolution)
        return batch, (h // 2) * (w // 2), self.latent_channels * 4

    def sample_noise(self, batch: int, resolution: int, generator: torch.Generator) -> Tensor:
        """eps ~ N(0, I) drawn in the VAE-latent layout then packed, as FluxPipeline.prepare_latents does.

        Drawn on the CPU generator so a seed gives the same noise on every device.
        """
        h, w = self.latent_hw(resolution)
        z = torch.randn(batch, self.latent_channels, h, w, generator=generator, dtype=torch.float32)
        return pack_latents(z).to(self.device)

    def image_ids(self, resolution: int) -> Tensor:
        h, w = self.latent_hw(resolution)
        return latent_image_ids(h, w).to(self.device)

    # ---------------------------------------------------------------- transformer
    def velocity(self, transformer, x: Tensor, sigma: float | Tensor, cond: TextConditioning,
                 guidance: float, resolution: int) -> Tensor:
        """v = model(x_sigma, t(sigma), text, guidance) ~ eps - x0, in packed layout [B, L, 64].

        The diffusers transformer multiplies timestep and guidance by 1000 internally, so we pass
        the truncated ``floor(1000 sigma) / 1000`` and the raw guidance, as FluxPipeline does.
        """
        b = x.shape[0]
        t = model_timestep(sigma).to(device=x.device, dtype=torch.float32)
        t = t.expand(b) if t.dim() == 0 else t
        g = torch.full((b,), float(guidance), device=x.device, dtype=torch.float32)
        out = transformer(
            hidden_states=x,
            timestep=t,
            guidance=g if self.uses_guidance(transformer) else None,
            pooled_projections=cond.pooled,
            encoder_hidden_states=cond.prompt_embeds,
            txt_ids=cond.text_ids,
            img_ids=self.image_ids(resolution),
            return_dict=False,
        )[0]
        return out.float()

    @staticmethod
    def uses_guidance(transformer: torch.nn.Module) -> bool:
        """Whether the transformer embeds the distilled guidance (FLUX.1-dev does, FLUX.1-schnell does not)."""
        return bool(getattr(_unwrap(transformer).config, "guidance_embeds", True))

    def sample_images(self, transformer: torch.nn.Module, prompts: list[str], seeds: list[int], steps: int,
                      guidance: float, resolution: int, scheduler_config: dict[str, Any] | None = None,
                      mixed_precision: str = "fp32") -> Tensor:
        """One batch as FluxPipeline samples it (see :mod:`pipeline.models.flux_sampling`); CPU fp32
        images [B, 3, H, W] in [0, 1]. ``scheduler_config`` None = FLUX.1-dev's."""
        return sample_batch(self, transformer, prompts, seeds, steps, guidance, resolution, scheduler_config,
                            mixed_precision)

    # ---------------------------------------------------------------- VAE
    def decode(self, x: Tensor, resolution: int, norm: str = "clamp") -> Tensor:
        """Packed model latent -> image in [0, 1] (``norm``: :func:`unit_image`; "clamp" is FluxPipeline's),
        differentiable w.r.t. ``x`` (the VAE is frozen)."""
        h, w = self.latent_hw(resolution)
        z = denormalize_vae_latent(unpack_latents(x, h, w))
        return unit_image(self.vae.decode(z.to(self.vae.dtype), return_dict=False)[0].float(), norm)

    @torch.no_grad()
    def encode_images(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Image in [0, 1], [B, 3, H, W] -> packed normalised model latent (the mean of the posterior)."""
        posterior = self.vae.encode((images * 2 - 1).to(self.device, self.vae.dtype)).latent_dist
        return pack_latents(normalize_vae_latent(posterior.mean.float()))


def _unwrap(module):
    """The plain diffusers module under DDP / DeepSpeed / compile wrappers (for reading its config).

    DeepSpeedEngine has a ``config`` of its own (a dict), so look for the diffusers config's
    ``guidance_embeds`` rather than for any ``config``.
    """
    while not hasattr(getattr(module, "config", None), "guidance_embeds"):
        inner = getattr(module, "module", None) or getattr(module, "_orig_mod", None)
        if inner is None:
            break
        module = inner
    return module
