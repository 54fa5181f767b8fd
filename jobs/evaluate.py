"""``srpo evaluate --config PRESET [key=value ...] --weights SOURCE [--no-base] [--out DIR]``.

Samples the held-out prompts (``eval.prompts`` or ``data.heldout_prompts``) with the base model and
with SOURCE (a safetensors export, a diffusers folder, a checkpoint or a run folder), with the same
seeds, scores both with every ``eval.scorers`` (default: the training reward) and logs one MLflow
evaluation run. Without --weights the base model alone is evaluated.
"""
from __future__ import annotations

import argparse
import sys

from jobs.common import add_config_args, prepared_config
from pipeline.config import ConfigError
from pipeline.evaluation import eval_prompts, evaluate
from pipeline.export import resolve_weights


def format_table(report) -> str:
    """One line per scorer: base mean, trained mean, delta, win rate (blank when not measured)."""
    base, means, deltas, wins = report.base_means, report.means, report.deltas, report.win_rates
    label = "trained" if report.weights is not None else "base"
    lines = [f"{'scorer':<16}{'base':>12}{label:>12}{'delta':>12}{'win_rate':>10}"]
    for name, m in means.items():
        def cell(d: dict, width: int, fmt: str = ".4f") -> str:
            return format(d[name], fmt).rjust(width) if name in d else "-".rjust(width)
        lines.append(f"{name:<16}{cell(base, 12)}{m:>12.4f}{cell(deltas, 12, '+.4f')}{cell(wins, 10, '.2f')}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="srpo evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    p.add_argument("--weights", default=None,
                   help="trained weights: safetensors export, diffusers folder, checkpoint or run folder "
                        "(default: evaluate the base model alone)")
    p.add_argument("--no-base", action="store_true", help="do not sample the base model (no base_mean / delta)")
    p.add_argument("--out", default=None, help="also write report.json and the images here")
    p.add_argument("--run-name", default=None, help="MLflow run name")
    # intermixed: overrides may come before or after the options
    args = p.parse_intermixed_args(argv)
    cfg = prepared_config(args, scorers=True)  # eval.scorers are loaded here: check their paths too
    # Cheap checks first: a wrong --weights or a missing prompts file fails before any model loads.
    try:
        eval_prompts(cfg)
        if args.weights is not None:
            resolve_weights(args.weights, model_path=cfg.model.path)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as e:
        print(f"srpo evaluate: {e}", file=sys.stderr)
        return 2
    report = evaluate(cfg, args.weights, base=not args.no_base, out_dir=args.out, run_name=args.run_name)
    print(f"{len(report.prompts)} prompts, seeds {report.seeds[0]}..{report.seeds[-1]}, "
          f"weights {report.weights or 'base'}")
    print(format_table(report))
    print(f"mlflow: {report.tracking_uri} experiment {report.experiment} run {report.run_id}")
    if report.out_dir:
        print(f"wrote {report.out_dir}/report.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
