"""``srpo sample --config PRESET [key=value ...] [--weights SOURCE] --prompts FILE_OR_TEXT... --out DIR``.

The equivalent of the SRPO authors' inference script (the model family's diffusers pipeline, e.g.
FluxPipeline, from the base folder with the SRPO transformer weights loaded into it, one CPU
generator seeded per image), through
:func:`pipeline.sampling.generate`. SOURCE is anything ``srpo export`` reads (run folder,
checkpoint folder, diffusers folder, .safetensors); without it the base model samples.

Writes ``DIR/<index:05d>.png``, ``DIR/prompts.txt`` (one prompt a line, in index order) and
``DIR/index.json`` (per image: file, prompt, seed; plus the sampling settings). Prompt i uses
seed ``S + i``. Defaults come from the config's ``eval`` section: steps, guidance, seed, batch size
and resolution (``eval.resolution`` or ``data.resolution``). Put ``key=value`` overrides right
after ``--config`` (``--prompts`` takes every argument up to the next option).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from PIL import Image

from jobs.common import add_config_args, prepared_config
from jobs.export import log_to_training_run
from pipeline.data import read_prompts
from pipeline.device import resolve_device
from pipeline.export import WeightsSource, read_weights, resolve_weights
from pipeline.models import family_class, load_adapter
from pipeline.sampling import generate, load_scheduler_config, to_uint8


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="srpo sample", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    p.add_argument("--weights", help="run folder, checkpoint folder, diffusers folder or .safetensors "
                                     "(default: the base model of model.path)")
    p.add_argument("--prompts", nargs="+", required=True,
                   help="prompt files (.txt one a line, or .parquet with a caption column) or literal prompts")
    p.add_argument("--out", required=True, help="output folder for the PNGs")
    p.add_argument("--steps", type=int, help="denoising steps (default eval.steps)")
    p.add_argument("--guidance", type=float, help="the model family's guidance: FLUX's distilled guidance, "
                   "Qwen-Image's true-CFG scale (default eval.guidance)")
    p.add_argument("--resolution", type=int, help="square size in pixels (default eval.resolution or data.resolution)")
    p.add_argument("--seed", type=int, help="seed of prompt 0; prompt i uses seed + i (default eval.seed)")
    p.add_argument("--batch-size", type=int, help="images per transformer call (default eval.batch_size)")
    p.add_argument("--no-mlflow", action="store_true",
                   help="do not log the images to the training run of --weights (logged by default)")
    p.add_argument("--mixed-precision", choices=["fp32", "bf16"],
                   help="transformer compute precision (default train.mixed_precision)")
    return p


def collect_prompts(items: list[str]) -> list[str]:
    """Each item is a prompt file when such a file exists, else a literal prompt.

    A ``.txt`` / ``.parquet`` name that does not exist is an error, not a prompt: it is a typo far
    more often than a caption.
    """
    prompts: list[str] = []
    for item in items:
        path = Path(item)
        if path.is_file():
            prompts.extend(read_prompts(path))
        elif path.suffix in (".txt", ".parquet"):
            raise FileNotFoundError(f"{path}: prompts file not found; expected a .txt (one prompt a line) "
                                    "or .parquet file, or a literal prompt")
        elif item.strip():
            prompts.append(item.strip())
    if not prompts:
        raise ValueError(f"--prompts {items}: no non-empty prompt; expected at least one")
    return prompts


def load_transformer_weights(transformer, weights: str, model_path: str) -> WeightsSource:
    """Load SOURCE into the base transformer in place (strict: every diffusers key, nothing else)."""
    source = resolve_weights(weights, model_path)
    state = read_weights(source)
    try:
        transformer.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{source.path}: weights do not fit the transformer of {model_path} ({e}); "
                         "expected a state dict of that transformer config") from e
    return source


def log_samples(source: WeightsSource | None, out: Path) -> None:
    """Samples of a training run's weights go to that run in MLflow (``samples/<out>``), beside its
    metrics; a failure to log leaves the written images in place and says why."""
    if source is None or source.run_dir is None or not (source.run_dir / "run.json").is_file():
        return
    try:
        run_id = log_to_training_run(source.run_dir, out, "samples")
        print(f"mlflow: logged {out.name}/ to run {run_id} under samples/", file=sys.stderr)
    except Exception as e:  # noqa: BLE001 - the images are written; say why logging failed
        print(f"srpo sample: warning: could not log to MLflow ({type(e).__name__}: {e}); "
              f"the images are in {out}", file=sys.stderr)


def write_image(image, path: Path) -> None:
    """One [3, H, W] image in [0, 1] as PNG, quantised as diffusers' ``numpy_to_pil``."""
    tmp = path.with_name(path.name + ".tmp")
    Image.fromarray(to_uint8(image[None])[0]).save(tmp, format="PNG")
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = prepared_config(args)
    try:
        prompts = collect_prompts(args.prompts)
    except (OSError, ValueError) as e:
        print(f"srpo sample: error: {e}", file=sys.stderr)
        return 2
    steps = args.steps if args.steps is not None else cfg.eval.steps
    guidance = args.guidance if args.guidance is not None else cfg.eval.guidance
    resolution = args.resolution or cfg.eval.resolution or cfg.data.resolution
    seed = args.seed if args.seed is not None else cfg.eval.seed
    batch_size = args.batch_size or cfg.eval.batch_size
    mixed_precision = args.mixed_precision or cfg.train.mixed_precision
    multiple = family_class(cfg.model.family).resolution_multiple
    if steps < 1 or batch_size < 1 or resolution % multiple:
        print(f"srpo sample: error: steps={steps}, batch_size={batch_size}, resolution={resolution}; expected "
              f"steps >= 1, batch size >= 1 and a resolution divisible by {multiple}", file=sys.stderr)
        return 2

    device = resolve_device(cfg.train.device)
    adapter = load_adapter(cfg.model.family, cfg.model.path, device, cfg.model.max_sequence_length)
    weights, source = "base", None
    if args.weights:
        try:
            source = load_transformer_weights(adapter.transformer, args.weights, cfg.model.path)
        except (OSError, ValueError, KeyError) as e:
            print(f"srpo sample: error: {e}", file=sys.stderr)
            return 2
        weights = f"{source.kind} {source.path}"
    print(f"weights: {weights}", file=sys.stderr)
    scheduler_config = load_scheduler_config(cfg.model.path)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = [seed + i for i in range(len(prompts))]
    entries = []
    # One batch at a time straight to disk: thousands of 1024px float images would not fit in memory.
    for start in range(0, len(prompts), batch_size):
        batch = slice(start, start + batch_size)
        images = generate(adapter, adapter.transformer, prompts[batch], seeds[batch], steps, guidance, resolution,
                          batch_size, scheduler_config, mixed_precision)
        for offset, image in enumerate(images):
            i = start + offset
            write_image(image, out / f"{i:05d}.png")
            entries.append({"index": i, "file": f"{i:05d}.png", "prompt": prompts[i], "seed": seeds[i]})
        print(f"{min(start + batch_size, len(prompts))}/{len(prompts)} images", file=sys.stderr, flush=True)
    (out / "prompts.txt").write_text("".join(p.replace("\n", " ") + "\n" for p in prompts), encoding="utf-8")
    settings = {"weights": weights, "model_path": cfg.model.path, "steps": steps, "guidance": guidance,
                "resolution": resolution, "seed": seed, "batch_size": batch_size,
                "mixed_precision": mixed_precision, "max_sequence_length": cfg.model.max_sequence_length}
    (out / "index.json").write_text(json.dumps({"settings": settings, "images": entries}, indent=2), encoding="utf-8")
    print(f"wrote {len(entries)} images to {out}")
    if not args.no_mlflow:
        log_samples(source, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
