"""``srpo compare``: training runs side by side, as one picture and one table.

    RUN_OR_ID ... --resolve--> (tracking URI, run id) per run: a run folder's run.json, or a run id
                               in --tracking-uri (default: :func:`pipeline.tracking.default_tracking_uri`)
                  --read-----> metric histories and step-indexed images (:class:`pipeline.tracking.RunReader`)
                  --render---> compare.png: one panel per metric over steps, a line per run; under them
                               the same held-out prompt's image of every run (a row per run) at the
                               steps all of them logged it
                  --tabulate-> compare.md: final and best value of each metric per run
                  --log------> both files in a new MLflow run ``compare-<run>-vs-<run>`` (tag
                               ``srpo.kind=comparison``) in the first run's experiment

Why a new run rather than artifacts of the first: a comparison belongs to all its runs equally, and
a finished training run stays as it finished (tag ``srpo.compared_runs`` names the runs).
"Best" is the lowest value for losses and ``time/*``, the highest for everything else.
"""
from __future__ import annotations

import math
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image

from pipeline.checkpoint import read_run
from pipeline.config import Config
from pipeline.tracking import ClientRun, RunReader, default_tracking_uri

DEFAULT_METRICS = ("loss", "rollout/reward")
# The gold evaluation's first held-out prompt (fixed prompt and seed in every run); rollouts otherwise.
IMAGE_KEYS = ("heldout/0000", "rollouts")
RUN_ID = re.compile(r"^[0-9a-f]{32}$")


@dataclass(frozen=True)
class RunRef:
    tracking_uri: str
    run_id: str
    given: str  # what was typed on the command line


@dataclass
class ComparedRun:
    ref: RunRef
    label: str
    experiment: str
    curves: dict[str, list[tuple[int, float]]]
    image_steps: dict[int, str] = field(default_factory=dict)  # step -> artifact path
    images: dict[int, np.ndarray] = field(default_factory=dict)  # step -> HWC uint8 (the steps shown)


@dataclass
class Comparison:
    runs: list[ComparedRun]
    metrics: list[str]
    image_key: str | None
    steps: list[int]  # image steps shown
    png: Path
    table: Path
    markdown: str
    mlflow_run_id: str | None = None


# ---------------------------------------------------------------------------------------- reading


def resolve_ref(given: str, tracking_uri: str | None = None) -> RunRef:
    """A run folder (or storage URI) with run.json, else an MLflow run id in ``tracking_uri``."""
    if "://" in given or Path(given).is_dir():
        info = read_run(given)
        return RunRef(str(info["tracking_uri"]), str(info["run_id"]), given)
    if RUN_ID.match(given):
        return RunRef(tracking_uri or default_tracking_uri(Config()), given, given)
    raise ValueError(f"{given!r}: neither a run folder (with run.json) nor an MLflow run id (32 hex digits)")


def is_lower_better(metric: str) -> bool:
    return "loss" in metric.rsplit("/", 1)[-1] or metric.startswith("time/")


def _labels(names: list[str], ids: list[str]) -> list[str]:
    """Run names, with the id's first 8 characters added where two runs share a name."""
    return [f"{n} ({i[:8]})" if names.count(n) > 1 else n for n, i in zip(names, ids)]


def read_runs(refs: list[RunRef], metrics: list[str]) -> list[ComparedRun]:
    readers: dict[str, RunReader] = {}
    summaries = []
    for ref in refs:
        reader = readers.setdefault(ref.tracking_uri, RunReader(ref.tracking_uri))
        summaries.append(reader.summary(ref.run_id))
    logged = {k for s in summaries for k in s["metric_keys"]}
    missing = [m for m in metrics if m not in logged]
    if missing:
        raise ValueError(f"--metrics: {missing} logged by none of the runs; they logged "
                         f"{sorted(logged)[:30]}{' ...' if len(logged) > 30 else ''}")
    labels = _labels([s["name"] for s in summaries], [r.run_id for r in refs])
    return [ComparedRun(ref, label, s["experiment"],
                        {m: readers[ref.tracking_uri].history(ref.run_id, m) for m in metrics})
            for ref, label, s in zip(refs, labels, summaries)]


def pick_image_key(runs: list[ComparedRun], wanted: str | None) -> str | None:
    """``wanted``, else the first of :data:`IMAGE_KEYS` that some run logged; None when none did."""
    keys = {k for r in runs for k in RunReader(r.ref.tracking_uri).image_keys(r.ref.run_id)}
    if wanted is not None:
        if wanted not in keys:
            raise ValueError(f"--image-key: no run logged images under {wanted!r}; they logged {sorted(keys)}")
        return wanted
    return next((k for k in IMAGE_KEYS if k in keys), None)


def shown_steps(runs: list[ComparedRun], max_images: int) -> list[int]:
    """Up to ``max_images`` steps, evenly spread, from those at which every run logged an image."""
    common = sorted(set.intersection(*(set(r.image_steps) for r in runs))) if runs else []
    if len(common) <= max_images:
        return common
    return [common[int(i)] for i in np.unique(np.linspace(0, len(common) - 1, max_images).round())]


def read_images(runs: list[ComparedRun], key: str, max_images: int) -> list[int]:
    """The images of the shown steps, downloaded into a temporary folder and read into memory."""
    for r in runs:
        r.image_steps = RunReader(r.ref.tracking_uri).step_images(r.ref.run_id, key)
    steps = shown_steps(runs, max_images)
    with tempfile.TemporaryDirectory(prefix="srpo-compare-") as tmp:
        for j, r in enumerate(runs):
            reader = RunReader(r.ref.tracking_uri)
            for s in steps:
                path = reader.download(r.ref.run_id, r.image_steps[s], Path(tmp) / f"{j}-{s}")
                r.images[s] = np.asarray(Image.open(path).convert("RGB"))
    return steps


# ------------------------------------------------------------------------------------- the table


def final_and_best(curve: list[tuple[int, float]], lower_better: bool) -> tuple[tuple[int, float], tuple[int, float]]:
    """((step, final value), (step, best value)); the earliest step wins a tie for best."""
    finite = [(s, v) for s, v in curve if math.isfinite(v)] or curve
    best = min(finite, key=lambda sv: (sv[1] if lower_better else -sv[1], sv[0]))
    return curve[-1], best


def markdown_table(runs: list[ComparedRun], metrics: list[str]) -> str:
    lines = ["| metric | run | final | at step | best | at step | steps logged |", "|---|---|---:|---:|---:|---:|---:|"]
    for m in metrics:
        for r in runs:
            curve = r.curves[m]
            if not curve:
                lines.append(f"| {m} | {r.label} | not logged | | | | 0 |")
                continue
            (fs, fv), (bs, bv) = final_and_best(curve, is_lower_better(m))
            lines.append(f"| {m} | {r.label} | {fv:.6g} | {fs} | {bv:.6g} | {bs} | {len(curve)} |")
    return "\n".join(lines)


def report_markdown(runs: list[ComparedRun], metrics: list[str], key: str | None, steps: list[int]) -> str:
    head = ["# srpo compare", ""] + [f"- **{r.label}**: run `{r.ref.run_id}` in `{r.ref.tracking_uri}` "
                                      f"(experiment {r.experiment})" for r in runs]
    best = ", ".join(f"{m}: {'lowest' if is_lower_better(m) else 'highest'}" for m in metrics)
    notes = [f"Best = {best}. Values to 6 significant digits; steps are 0-based optimizer steps."]
    if key is None:
        notes.append("Images: no run logged step-indexed images (log.image_every=0?).")
    else:
        notes.append(f"Images: key `{key}` at steps {steps or 'none shared by every run'}.")
    return "\n".join(head + ["", markdown_table(runs, metrics), ""] + notes) + "\n"


# ------------------------------------------------------------------------------------- the figure


def render(runs: list[ComparedRun], metrics: list[str], key: str | None, steps: list[int], path: Path) -> None:
    """Metrics on top (a panel each, a line per run), images below (a row per run, a column per step)."""
    images = bool(key and steps)
    width = max(4.5 * len(metrics), 2.4 * len(steps) + 1.5 if images else 0, 6.0)
    aspect = 1.0
    if images:
        height, width_px = runs[0].images[steps[0]].shape[:2]
        aspect = height / width_px
    image_h = (width - 1.5) / max(1, len(steps)) * aspect * len(runs) if images else 0.0
    fig = Figure(figsize=(width, 3.6 + image_h), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[3.6, max(image_h, 1e-3)]) if images else (fig, None)
    for ax, m in zip(np.atleast_1d(top.subplots(1, len(metrics))), metrics):
        for i, r in enumerate(runs):
            if r.curves[m]:
                s, v = zip(*r.curves[m])
                ax.plot(s, v, marker="." if len(s) < 30 else None, color=f"C{i}", label=r.label)
        ax.set_title(m)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    np.atleast_1d(top.axes)[0].legend(fontsize="small")
    if images:
        axes = np.array(bottom.subplots(len(runs), len(steps), squeeze=False))
        for i, r in enumerate(runs):
            for j, s in enumerate(steps):
                ax = axes[i, j]
                ax.imshow(r.images[s])
                ax.set_xticks([])
                ax.set_yticks([])
                if i == 0:
                    ax.set_title(f"step {s}")
                if j == 0:
                    ax.set_ylabel(r.label, color=f"C{i}")
        bottom.suptitle(f"{key}: the same prompt and seed in every run", fontsize="medium")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


# ---------------------------------------------------------------------------------------- entry


def compare(given: list[str], out_dir: str | Path, metrics: list[str] | None = None, image_key: str | None = None,
            max_images: int = 6, tracking_uri: str | None = None, log_to_mlflow: bool = True) -> Comparison:
    """Read the runs, write ``compare.png`` and ``compare.md`` into ``out_dir``, log them to MLflow."""
    if not given:
        raise ValueError("RUN_OR_ID: expected at least one run folder or run id")
    metrics = list(metrics or DEFAULT_METRICS)
    out = Path(out_dir)
    runs = read_runs([resolve_ref(g, tracking_uri) for g in given], metrics)
    key = pick_image_key(runs, image_key)
    steps = read_images(runs, key, max_images) if key else []
    png, table = out / "compare.png", out / "compare.md"
    render(runs, metrics, key, steps, png)
    markdown = report_markdown(runs, metrics, key, steps)
    table.write_text(markdown)
    result = Comparison(runs, metrics, key, steps, png, table, markdown)
    if log_to_mlflow:
        result.mlflow_run_id = log_comparison(result)
    return result


def log_comparison(c: Comparison) -> str:
    first = c.runs[0]
    tags = {"srpo.kind": "comparison", "srpo.compared_runs": ",".join(r.ref.run_id for r in c.runs),
            "srpo.metrics": ",".join(c.metrics)}
    name = ("compare-" + "-vs-".join(r.label for r in c.runs))[:250]
    run = ClientRun.create(first.ref.tracking_uri, first.experiment, tags, name)
    status = "FAILED"
    try:
        run.log_artifact(c.png, "compare")
        run.log_artifact(c.table, "compare")
        status = "FINISHED"
    finally:
        run.end(status)
    return run.run_id
