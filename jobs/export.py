"""``srpo export SOURCE [--out FILE_OR_DIR] [--dtype fp32|bf16|fp8] [--layout diffusers|comfyui]
[--diffusers-folder] [--model-path BASE]``.

SOURCE is a run folder (its newest complete weights), a checkpoint folder, a diffusers folder or a
.safetensors file. The result is what the SRPO authors release: ``diffusion_pytorch_model.safetensors``
with the plain diffusers keys, loaded by ``pipe.transformer.load_state_dict(load_file(path))``; with
``--diffusers-folder`` a complete diffusers folder (the base model's components + these weights)
that the family's pipeline loads (``FluxPipeline.from_pretrained(out)``, ``QwenImagePipeline`` alike).

``--dtype fp8``: float8 e4m3fn block weights with fp32 per-row scales, the rest bf16 (BFL's fp8r), which
diffusers loads with ``FluxTransformer2DModel.from_single_file(path, config=BASE, subfolder="transformer",
quantization_config=BFLQuantizationConfig())``. ``--layout comfyui``: the original (BFL) key names that
ComfyUI's diffusion-model loader reads; with fp8 its "scaled fp8" format (per-tensor scales). The base
folder (recorded or ``--model-path``) names the model family. See docs/export.md.

A LoRA run (``lora.rank > 0``) exports like any other: the base with the adapter merged. ``--lora``
writes its adapter as a diffusers LoRA folder (``pytorch_lora_weights.safetensors``) that the family's
pipeline loads with ``load_lora_weights(out)`` (default ``<run>/export/lora/``); ``--merge`` writes
the merged weights (any dtype/layout above) also from a diffusers LoRA folder given as SOURCE.

Default output (SOURCE in a run folder): ``<run>/export/diffusion_pytorch_model.safetensors`` (fp8:
``..._fp8_e4m3fn.safetensors``; comfyui: ``diffusion_model_<dtype>.safetensors``) or
``<run>/export/diffusers/``; elsewhere ``--out`` is required. When SOURCE is in a run folder with
run.json, the export is also logged to that run's MLflow run under ``export/`` (a finished run
stays finished).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.checkpoint import read_run
from pipeline.export import (LAYOUTS, WeightsSource, export_diffusers_folder, export_lora_folder, export_single_file,
                             merged_lora_weights, read_weights, resolve_lora, resolve_weights, single_file_name,
                             source_step)
from pipeline.lora import LORA_DIR
from pipeline.models import family_of
from pipeline.tracking import ClientRun


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="srpo export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="run folder, checkpoint folder, diffusers folder or .safetensors file")
    p.add_argument("--out", help="output file (.safetensors) or folder (default: <run>/export/...)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp8"], default="fp32",
                   help="weights dtype (default fp32; fp8: e4m3fn block weights + fp32 scales, the rest bf16)")
    p.add_argument("--layout", choices=list(LAYOUTS), default="diffusers",
                   help="key layout of the single file: diffusers (default) or comfyui (original key names)")
    p.add_argument("--diffusers-folder", action="store_true",
                   help="write a complete diffusers folder (base components + these weights)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--lora", action="store_true",
                      help="a LoRA run's adapter as a diffusers LoRA folder (for the pipeline's load_lora_weights)")
    mode.add_argument("--merge", action="store_true",
                      help="a LoRA adapter (run, checkpoint or LoRA folder) merged into the base: full weights")
    p.add_argument("--model-path", help="base diffusers folder (default: from the checkpoint or run config)")
    p.add_argument("--no-mlflow", action="store_true", help="do not log the export to the run's MLflow run")
    return p


def output_path(args: argparse.Namespace, source: WeightsSource) -> Path:
    """Where to write: --out (a .safetensors file, else a folder), or the run's export/ folder."""
    if args.out:
        out = Path(args.out)
        if args.diffusers_folder or out.suffix == ".safetensors":
            return out
        return out / single_file_name(args.dtype, args.layout)
    if source.run_dir is None:
        raise ValueError(f"{args.source}: not inside a run folder (no run.json above it); expected --out")
    export_dir = source.run_dir / "export"
    return export_dir / "diffusers" if args.diffusers_folder else export_dir / single_file_name(args.dtype, args.layout)


def check_options(args: argparse.Namespace) -> None:
    """Combinations no loader reads, refused before any weights are read."""
    if args.lora and (args.diffusers_folder or args.dtype != "fp32" or args.layout != "diffusers"):
        raise ValueError("--lora: writes the fp32 adapter as a diffusers LoRA folder; expected no --diffusers-folder, "
                         "--dtype or --layout with it")
    if args.diffusers_folder and (args.dtype == "fp8" or args.layout != "diffusers"):
        raise ValueError("--diffusers-folder: writes fp32/bf16 weights with the diffusers keys (diffusers reads fp8 "
                         "checkpoints through from_single_file only, not the pipeline's from_pretrained); expected "
                         "--dtype fp32|bf16 without --layout comfyui, or no --diffusers-folder")


def find_source(args: argparse.Namespace):
    """What SOURCE holds and its training step: the weights, or with --lora / --merge the LoRA adapter."""
    if args.lora or args.merge:
        source = resolve_lora(args.source, args.model_path)
        return source, source.step
    source = resolve_weights(args.source, args.model_path)
    return source, source_step(source)


def lora_output_path(args: argparse.Namespace, source) -> Path:
    """--lora: --out (a folder), or the run's export/lora/."""
    if args.out:
        return Path(args.out)
    if source.run_dir is None:
        raise ValueError(f"{args.source}: not inside a run folder (no run.json above it); expected --out")
    return source.run_dir / "export" / LORA_DIR


def base_folder(args: argparse.Namespace, source: WeightsSource) -> str:
    """The base diffusers folder: --model-path, else the one the checkpoint or run config records."""
    base = args.model_path or source.model_path
    if not base:
        raise ValueError(f"{args.source}: the base diffusers folder is unknown (not recorded in the checkpoint or "
                         "run config); expected --model-path BASE")
    return base


def log_to_training_run(run_dir: Path, path: Path, under: str) -> str:
    """Log ``path`` (file or folder) as an artifact under ``under/`` of the training run's MLflow run,
    in the store run.json records (whatever this shell's tracking URI). Through the tracking
    facade's ClientRun, which logs without reopening the run; returns the run id."""
    info = read_run(run_dir)
    for key in ("run_id", "tracking_uri"):
        if not info.get(key):
            raise ValueError(f"{run_dir / 'run.json'}: field {key!r} is missing; expected it from `srpo train`")
    ClientRun(info["tracking_uri"], info["run_id"]).log_artifact(
        path, f"{under}/{path.name}" if path.is_dir() else under)
    return info["run_id"]


def log_export(run_dir: Path, path: Path) -> str:
    return log_to_training_run(run_dir, path, "export")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_options(args)
        source, step = find_source(args)
        if args.lora:
            written = export_lora_folder(source, lora_output_path(args, source))
        else:
            out = output_path(args, source)
            needs_base = args.diffusers_folder or args.layout == "comfyui" or args.merge
            base = base_folder(args, source) if needs_base else None
            family = family_of(base) if args.layout == "comfyui" else None  # names the original key layout
            state = merged_lora_weights(source.adapter, source.spec, base, source.path) if args.merge \
                else read_weights(source)
            if args.diffusers_folder:
                written = export_diffusers_folder(state, base, out, args.dtype, step=step)
            else:
                written = export_single_file(state, out, args.dtype, args.layout, family, step=step)
    except (OSError, ValueError, KeyError) as e:
        print(f"srpo export: error: {e}", file=sys.stderr)
        return 2
    print(f"read {source.kind} {source.path}" + (f" (step {step})" if step is not None else ""))
    print(f"wrote {written}")
    if source.run_dir is not None and (source.run_dir / "run.json").is_file() and not args.no_mlflow:
        try:
            run_id = log_export(source.run_dir, written)
            print(f"mlflow: logged {written.name} to run {run_id} under export/")
        except Exception as e:  # noqa: BLE001 - the export itself is done; say why logging failed
            print(f"srpo export: warning: could not log to MLflow ({type(e).__name__}: {e}); "
                  f"the export is at {written}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
