"""Pre-flight: what the driver checks after the config is loaded and before any model loads or any Ray
worker starts (``jobs.common.prepared_config`` runs it for every command).

:func:`pipeline.config.check_paths` has already found every path. Here, reading as little as possible:

- ``model.path`` has its family's layout (the adapter's ``check_model_folder``: model_index.json, each
  component's config, weight files whose safetensors headers are complete);
- every reward checkpoint the command loads (``reward``, ``eval.scorers`` for `srpo evaluate`, ``eval.gold``
  when ``eval.every > 0``) unpickles with ``weights_only=True`` and has the keys its kind needs, from
  its keys only (``rewards.loader.check_checkpoint``: tensors mapped, never read; models on the meta
  device); tokenizer folders hold a tokenizer;
- the prompt set and, offline, the image set are not empty (decoding images only until one is usable).

Every failure is a :class:`ConfigError`: one line naming the field and what was expected. A reward
checkpoint that torch refuses to unpickle is described in our words; torch's own message (which
advises ``weights_only=False``) is never shown.
"""
from __future__ import annotations

from collections import Counter
from contextlib import contextmanager
from typing import Iterator

from pipeline.config import Config, ConfigError, RewardConfig, ScorerConfig, reward_entries
from pipeline.data import read_prompts
from pipeline.embeddings import check_compatible, read_captions
from pipeline.images import Skipped, check_images, list_images
from pipeline.models import family_class
from rewards.loader import check_arch, check_checkpoint, check_tokenizer


@contextmanager
def field(name: str, hint: str = "") -> Iterator[None]:
    """A check that fails inside becomes a ConfigError naming ``name`` (plus ``hint``), on one line, without
    the cause's traceback (a reward loader's cause may be torch's weights_only advice)."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - any failure of a pre-flight check is a bad input of this field
        text = " ".join(str(e).split()) or type(e).__name__
        if not isinstance(e, (ValueError, OSError)):
            text = f"{type(e).__name__}: {text}"
        text = text if text.startswith(f"{name}:") or isinstance(e, ConfigError) else f"{name}: {text}"
        raise ConfigError(f"{text} ({hint})" if hint else text) from None


def preflight(cfg: Config, scorers: bool = False) -> None:
    """Check the model folder, the reward checkpoints and the data of ``cfg`` (paths already absolute).

    ``scorers``: the command is `srpo evaluate` (it loads ``eval.scorers`` and the held-out prompts, not
    the training data); otherwise the training inputs are checked.
    """
    check_model_folder(cfg)
    if not (scorers and cfg.eval.scorers):  # evaluate scores with the training rewards when it has no scorers
        for where, r in reward_entries(cfg):
            check_scorer(reward_as_scorer(r), where)
    for group in (["scorers"] if scorers else []) + (["gold"] if cfg.eval.every else []):
        for i, sc in enumerate(getattr(cfg.eval, group)):
            check_scorer(sc, f"eval.{group}[{i}]")
    if scorers:
        check_heldout_prompts(cfg)
    else:
        check_training_data(cfg)


def check_model_folder(cfg: Config) -> None:
    with field("model.path"):
        family_class(cfg.model.family).check_model_folder(cfg.model.path, "model.path")


def reward_as_scorer(r: RewardConfig) -> ScorerConfig:
    return ScorerConfig(kind=r.kind, path=r.path, arch=r.arch, tokenizer_path=r.tokenizer_path)


def check_scorer(sc: ScorerConfig, where: str) -> None:
    """The files of one reward model: open_clip arch, checkpoint, CLIP folder and tokenizer as its kind needs."""
    if sc.kind == "hpsv2":
        with field(f"{where}.arch"):
            check_arch(sc.arch)
    with field(f"{where}.path"):
        check_checkpoint(sc.kind, sc.path, arch=sc.arch)
    clip_field = f"{where}.clip_path" if sc.kind == "aesthetic" else f"{where}.path"  # the CLIPModel folder
    if sc.kind == "aesthetic":
        with field(clip_field):
            check_checkpoint("clip", sc.clip_path)
    if sc.kind in ("pickscore", "clip", "aesthetic"):  # the tokenizer: tokenizer_path, else the CLIPModel folder
        hint = (f"PickScore_v1 ships no tokenizer: set {where}.tokenizer_path to the CLIP-ViT-H-14 processor folder"
                if sc.kind == "pickscore" and not sc.tokenizer_path else "")
        with field(f"{where}.tokenizer_path" if sc.tokenizer_path else clip_field, hint):
            check_tokenizer(sc.tokenizer_path or (sc.clip_path if sc.kind == "aesthetic" else sc.path))


def check_prompts(path: str, name: str) -> None:
    with field(name):
        read_prompts(path)  # ValueError "no non-empty prompt" for an empty file or one of blank lines


def check_heldout_prompts(cfg: Config) -> None:
    """The held-out prompts (`srpo evaluate`, gold evaluation): ``eval.prompts``, else ``data.heldout_prompts``."""
    if not (cfg.eval.prompts or cfg.data.heldout_prompts):
        raise ConfigError("eval.prompts: missing (and data.heldout_prompts is empty); expected a prompts file "
                          "of held-out prompts, one a line")
    name = "eval.prompts" if cfg.eval.prompts else "data.heldout_prompts"
    check_prompts(cfg.eval.prompts or cfg.data.heldout_prompts, name)


def check_training_data(cfg: Config) -> None:
    """The training prompts (online) or images (offline), and the held-out prompts gold evaluation reads."""
    if cfg.rollout.mode == "offline":
        check_image_set(cfg.data.images, cfg.data.resolution, cfg.data.min_image_size, cfg.data.max_image_pixels)
    elif cfg.data.prompt_embeddings:
        with field("data.prompt_embeddings"):
            check_compatible(cfg.data.prompt_embeddings, cfg)  # same encoder, complete
            if not read_captions(cfg.data.prompt_embeddings):
                raise ValueError(f"{cfg.data.prompt_embeddings!r} holds no caption; expected the output folder "
                                 "of `srpo preprocess` on a non-empty prompts file")
    else:
        check_prompts(cfg.data.prompts, "data.prompts")
    if cfg.eval.every:
        check_heldout_prompts(cfg)


def check_image_set(source: str, resolution: int, min_size: int, max_pixels: int) -> None:
    """At least one usable image: list them all, decode only until one passes (the full scan that the
    run logs comes later, on Ray Data for a Ray run)."""
    with field("data.images"):
        records, skipped = list_images(source)
    skipped = list(skipped)
    for r in records:
        try:
            usable, more = check_images([r], resolution, min_size, max_pixels)
        except Exception as e:  # noqa: BLE001 - a file the decoder chokes on is not usable; look further
            usable, more = [], [Skipped(r.path, "unreadable", f"{type(e).__name__}: {e}")]
        if usable:
            return
        skipped += more
    counts = dict(Counter(s.reason for s in skipped))
    raise ConfigError(f"data.images: no usable image in {source} ({len(records)} listed, {len(skipped)} skipped: "
                      f"{counts}); expected images of at least {min_size or resolution} px on the shorter side "
                      "with non-empty captions (same-named .txt files, or manifest rows with path and caption)")
