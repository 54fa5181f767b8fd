"""``srpo export SOURCE [--out FILE_OR_DIR] [--dtype fp32|bf16] [--diffusers-folder] [--model-path BASE]``.

SOURCE is a run folder (its newest complete weights), a checkpoint folder, a diffusers folder or a
.safetensors file. The result is what the SRPO authors release: ``diffusion_pytorch_model.safetensors``
with the plain diffusers keys, loaded by ``pipe.transformer.load_state_dict(load_file(path))``; with
``--diffusers-folder`` a complete diffusers folder (the base model's components + these weights)
that ``FluxPipeline.from_pretrained(out)`` loads.

Default output (SOURCE in a run folder): ``<run>/export/diffusion_pytorch_model.safetensors`` or
``<run>/export/diffusers/``; elsewhere ``--out`` is required. When SOURCE is in a run folder with
run.json, the export is also logged to that run's MLflow run under ``export/`` (a finished run
stays finished).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.checkpoint import read_run
from pipeline.export import (WEIGHTS_NAME, WeightsSource, export_diffusers_folder, export_transformer,
                             read_weights, resolve_weights, source_step)
from pipeline.tracking import ClientRun


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="srpo export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="run folder, checkpoint folder, diffusers folder or .safetensors file")
    p.add_argument("--out", help="output file (.safetensors) or folder (default: <run>/export/...)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="weights dtype (default fp32)")
    p.add_argument("--diffusers-folder", action="store_true",
                   help="write a complete diffusers folder (base components + these weights)")
    p.add_argument("--model-path", help="base diffusers folder (default: from the checkpoint or run config)")
    p.add_argument("--no-mlflow", action="store_true", help="do not log the export to the run's MLflow run")
    return p


def output_path(args: argparse.Namespace, source: WeightsSource) -> Path:
    """Where to write: --out (a .safetensors file, else a folder), or the run's export/ folder."""
    if args.out:
        out = Path(args.out)
        if args.diffusers_folder or out.suffix == ".safetensors":
            return out
        return out / WEIGHTS_NAME
    if source.run_dir is None:
        raise ValueError(f"{args.source}: not inside a run folder (no run.json above it); expected --out")
    export_dir = source.run_dir / "export"
    return export_dir / "diffusers" if args.diffusers_folder else export_dir / WEIGHTS_NAME


def log_export(run_dir: Path, path: Path) -> str:
    """Log ``path`` (file or folder) as an artifact under ``export/`` of the run's MLflow run.

    Through the tracking facade's ClientRun, which logs into the run without reopening it; returns the
    run id.
    """
    info = read_run(run_dir)
    for key in ("run_id", "tracking_uri"):
        if not info.get(key):
            raise ValueError(f"{run_dir / 'run.json'}: field {key!r} is missing; expected it from `srpo train`")
    ClientRun(info["tracking_uri"], info["run_id"]).log_artifact(
        path, f"export/{path.name}" if path.is_dir() else "export")
    return info["run_id"]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        source = resolve_weights(args.source, args.model_path)
        out = output_path(args, source)
        state = read_weights(source)
        step = source_step(source)
        if args.diffusers_folder:
            base = args.model_path or source.model_path
            if not base:
                raise ValueError(f"{args.source}: the base diffusers folder is unknown (not recorded in the "
                                 "checkpoint or run config); expected --model-path BASE")
            written = export_diffusers_folder(state, base, out, args.dtype, step=step)
        else:
            written = export_transformer(state, out, args.dtype, step=step)
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
