"""``srpo compare RUN_OR_ID [RUN_OR_ID ...] [--metrics loss,rollout/reward] [--out DIR]``.

Each RUN_OR_ID is a run folder (its output.dir: run.json names the MLflow store and run) or an
MLflow run id in --tracking-uri (default: log.tracking_uri's resolution: MLFLOW_TRACKING_URI, else
mlflow.db here). Writes DIR/compare.png (the metrics over steps side by side, and the same held-out
prompt's image of every run at matching steps) and DIR/compare.md (final and best value of each
metric per run), prints the table and logs both files to a new MLflow run ``compare-...`` in the
first run's experiment.
"""
from __future__ import annotations

import argparse
import os
import sys

from pipeline.compare import DEFAULT_METRICS, compare


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="srpo compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN_OR_ID", help="run folder (with run.json) or MLflow run id")
    p.add_argument("--metrics", default=",".join(DEFAULT_METRICS),
                   help=f"comma-separated metric keys (default: {','.join(DEFAULT_METRICS)})")
    p.add_argument("--image-key", default=None,
                   help="step-indexed image key to line up (default: heldout/0000 if logged, else rollouts)")
    p.add_argument("--max-images", type=int, default=6, help="image steps shown per run (default: 6)")
    p.add_argument("--out", default="compare", help="output folder (default: ./compare)")
    p.add_argument("--tracking-uri", default=None, help="MLflow store of run ids given on the command line")
    p.add_argument("--no-mlflow", action="store_true", help="only write the files, log no comparison run")
    args = p.parse_args(argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per downloaded image
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    if not metrics or args.max_images < 1:
        print("srpo compare: --metrics needs at least one key and --max-images at least 1", file=sys.stderr)
        return 2
    try:
        result = compare(args.runs, args.out, metrics, args.image_key, args.max_images, args.tracking_uri,
                         log_to_mlflow=not args.no_mlflow)
    except (FileNotFoundError, LookupError, ValueError) as e:
        print(f"srpo compare: {e}", file=sys.stderr)
        return 2
    print(result.markdown)
    print(f"wrote {result.png} and {result.table}")
    if result.mlflow_run_id:
        print(f"mlflow: {result.runs[0].ref.tracking_uri} run {result.mlflow_run_id}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
