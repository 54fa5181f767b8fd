"""Time to a held-out reward: how fast each rollout budget improves the policy, for the same wall clock.

    python benchmarks/efficiency.py [--preset small|tiny] [--budget 120] [--evals 3] [--seeds 0 1]
                                    [--only NAME ...] [--out benchmarks/results/efficiency.json]

Every configuration trains the same world from the same weights, in this process (the single-process
Learner: colocated rollout and reward), for ``--budget`` seconds of training wall time per seed;
``--evals`` times along the way (evenly spaced) the clock stops and the policy is scored. The score
is the trainer test's metric: the mean SRP reward of full-rollout images of held-out prompts on
held-out noise, always with the reference's rollout (fp32, the preset's rollout.steps, no compile),
whatever the configuration trains with.

Configurations:
    reference      colocated, a rollout every step, the preset's steps (25 on small), fp32: the paper's step
    reuse-2/4      rollout.reuse=2 / 4: each x0 trains 2 / 4 steps with fresh noise and levels
    steps-12       rollout.steps=12: a cheaper rollout (a coarser Euler path to the anchor)
    compile        rollout.compile=true
    bf16           rollout.dtype=bf16 (the learner stays fp32)
    offline        rollout.mode=offline on scikit-image's sample photos (no rollout at all)
    fast           steps-12 + bf16 + compile together
    bf16-steps-12  steps-12 + bf16, without compile
    all-bf16-steps-12  steps-12 with the learner in bf16 autocast too (train.mixed_precision=bf16, the
                   precision of the GPU recipes; fp32 master weights either way)

Reported: reward against training wall time per configuration and seed; the target is the reference's
final held-out reward (mean over seeds); each configuration's time to reach it is read off its
mean-over-seeds curve (linear between evaluations; the start point is the shared initial reward), and
divided by the reference's budget. Not reached within the budget: null. Writes JSON and a PNG plot.
Rollout actors with overlap (max_staleness=1) are not among them: on a 2-core host the actors take the
learner's cores (benchmarks/pipeline.py measures that path's overhead instead).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
for _k, _v in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DIFFUSERS_VERBOSITY": "error",
               "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}.items():
    os.environ.setdefault(_k, _v)

import torch  # noqa: E402

from pipeline.checkpoint import LocalCheckpoints, write_json_atomic  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.data import read_prompts  # noqa: E402
from pipeline.gold import heldout_srp_reward  # noqa: E402
from pipeline.images import scan_images  # noqa: E402
from pipeline.learner import build_learner  # noqa: E402
from pipeline.models import load_adapter  # noqa: E402
from pipeline.sources import InProcessSource  # noqa: E402
from pipeline.tiny import make_tiny_world  # noqa: E402

PRESETS = {  # world size, overrides (the pipeline benchmark's presets), held-out prompts scored
    "small": ("small", ["data.resolution=256", "rollout.steps=25", "model.max_sequence_length=64",
                        "train.batch_size=1"], 4),
    "tiny": ("tiny", ["data.resolution=64", "rollout.steps=10", "train.batch_size=2"], 8),
}
CONFIGS = {
    "reference": [],
    "reuse-2": ["rollout.reuse=2"],
    "reuse-4": ["rollout.reuse=4"],
    "steps-12": ["rollout.steps=12"],
    "compile": ["rollout.compile=true"],
    "bf16": ["rollout.dtype=bf16"],
    "offline": ["rollout.mode=offline"],
    "fast": ["rollout.steps=12", "rollout.dtype=bf16", "rollout.compile=true"],
    "bf16-steps-12": ["rollout.steps=12", "rollout.dtype=bf16"],
    "all-bf16-steps-12": ["rollout.steps=12", "train.mixed_precision=bf16"],
}
HELDOUT_SEED = 4321  # noise never used in training
PHOTOS = {"astronaut": "an astronaut in a white suit in front of a flag",
          "coffee": "a cup of coffee on a saucer, seen from above",
          "chelsea": "a tabby cat looking to the side",
          "rocket": "a rocket on a launch pad at dusk"}


class OutOfBudget(Exception):
    """Raised between two steps once the training clock has run out."""


def photo_folder(root: Path) -> Path:
    """scikit-image's sample photographs with captions (the offline test's data, without broken files)."""
    import skimage.data
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    for name, caption in PHOTOS.items():
        Image.fromarray(getattr(skimage.data, name)()).save(root / f"{name}.png")
        (root / f"{name}.txt").write_text(caption + "\n")
    return root


class Scorer:
    """The held-out metric with the reference's rollout, on fixed prompts and noise."""

    def __init__(self, cfg, n_prompts: int) -> None:
        self.cfg = cfg
        self.captions = read_prompts(cfg.data.heldout_prompts)[:n_prompts]
        text = load_adapter(cfg.model.family, cfg.model.path, "cpu", cfg.model.max_sequence_length,
                            load_transformer=False)
        self.cond = text.encode_prompts(self.captions)

    def __call__(self, learner) -> float:
        return heldout_srp_reward(self.cfg, learner.adapter, learner.engine.transformer,
                                  learner.objective.reward_model, self.cond, self.captions, seed=HELDOUT_SEED)


def train_for(cfg, budget_s: float, evals: int, scorer: Scorer, root: Path, images) -> dict[str, Any]:
    """Train until the clock (training time only) reaches budget_s; score at each of ``evals`` points."""
    learner = build_learner(cfg, InProcessSource(cfg, images), LocalCheckpoints(root / "ckpt", 1),
                            device=torch.device("cpu"))
    points = [budget_s * (i + 1) / evals for i in range(evals)]
    curve: list[dict[str, float]] = []
    clock = {"spent": 0.0, "since": time.perf_counter()}

    def before_step(step: int) -> None:  # the clock stops while scoring
        clock["spent"] += time.perf_counter() - clock["since"]
        while points and clock["spent"] >= points[0]:
            points.pop(0)
            curve.append({"train_s": clock["spent"], "step": step, "reward": scorer(learner)})
        if not points:
            raise OutOfBudget
        clock["since"] = time.perf_counter()

    learner.before_step = before_step
    try:
        learner.run()
    except OutOfBudget:
        pass
    return {"curve": curve, "steps": curve[-1]["step"] if curve else 0}


def time_to(target: float, curve: list[tuple[float, float]]) -> float | None:
    """First training time a piecewise-linear (time, reward) curve reaches ``target``."""
    for (t0, r0), (t1, r1) in zip(curve, curve[1:]):
        if r1 >= target:
            return t1 if r1 == r0 else t0 + (t1 - t0) * max(0.0, (target - r0) / (r1 - r0))
    return None


def summarise(runs: dict[str, list[dict[str, Any]]], start: float, budget_s: float) -> dict[str, Any]:
    """Mean-over-seeds curves, the target (the reference's final mean reward) and each time to it."""
    mean = {}
    for name, seeds in runs.items():
        n = min(len(s["curve"]) for s in seeds)
        mean[name] = [(0.0, start)] + [(statistics.mean(s["curve"][i]["train_s"] for s in seeds),
                                        statistics.mean(s["curve"][i]["reward"] for s in seeds)) for i in range(n)]
    target = mean["reference"][-1][1]
    ref_s = time_to(target, mean["reference"]) or budget_s
    out = {}
    for name, curve in mean.items():
        t = time_to(target, curve)
        finals = [s["curve"][-1]["reward"] for s in runs[name]]
        out[name] = {"mean_curve": curve, "time_to_target_s": t, "ratio_to_reference": None if t is None else t / ref_s,
                     "final_reward_per_seed": finals, "steps_per_seed": [s["steps"] for s in runs[name]]}
    return {"target_reward": target, "reference_time_s": ref_s, "configs": out}


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for name, seeds in report["runs"].items():
        line = ax.plot(*zip(*report["summary"]["configs"][name]["mean_curve"]), marker="o", label=name)[0]
        for s in seeds:
            ax.plot([p["train_s"] for p in s["curve"]], [p["reward"] for p in s["curve"]], ".",
                    color=line.get_color(), alpha=0.4)
    ax.axhline(report["summary"]["target_reward"], color="gray", ls="--", lw=0.8, label="reference's final")
    ax.set_xlabel("training wall time (s)")
    ax.set_ylabel("held-out SRP reward (full rollout)")
    ax.set_title(f"{report['preset']} preset, {len(report['seeds'])} seeds (dots), mean (lines)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def previous_runs(path: Path, args) -> tuple[dict[str, list[dict[str, Any]]], float]:
    """--append: the runs of an earlier report measured the same way, and its shared initial reward."""
    old = json.loads(path.read_text())
    same = (old["preset"], old["budget_s"], old["evals"], old["seeds"]) == (args.preset, args.budget, args.evals,
                                                                            args.seeds)
    if not same:
        sys.exit(f"--append: {path} was measured with another preset, budget, evals or seeds")
    return old["runs"], old["initial_reward"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="small")
    p.add_argument("--budget", type=float, default=120.0, help="training seconds per configuration and seed")
    p.add_argument("--evals", type=int, default=3)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--only", nargs="+", choices=sorted(CONFIGS), help="configurations to run (reference is always run)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="overrides for every configuration")
    p.add_argument("--out", default=str(REPO / "benchmarks/results/efficiency.json"))
    p.add_argument("--append", action="store_true",
                   help="keep the runs already in --out (same preset, budget, evals and seeds) and add these")
    args = p.parse_args()
    size, preset, n_prompts = PRESETS[args.preset]
    world = make_tiny_world(REPO / ".cache" / "bench" / f"world-{size}", seed=0, size=size)
    root = Path(tempfile.mkdtemp(prefix="bench-efficiency-"))
    base = [f"model.path={world['flux']}", f"reward.path={world['hps_checkpoint']}",
            f"reward.arch={world['hps_arch']}", f"data.prompts={REPO / 'configs/prompts/tiny_train.txt'}",
            f"data.heldout_prompts={REPO / 'configs/prompts/tiny_heldout.txt'}", f"data.images={photo_folder(root / 'photos')}",
            "tiny.enabled=false", "train.device=cpu", "train.mixed_precision=fp32", "learner.num_workers=0",
            "rollout.placement=colocated", "reward.placement=colocated", "log.image_every=0", "eval.every=0",
            "train.checkpoint_every=0", "train.max_steps=100000", *preset, *args.set]
    reference = load_config(REPO / "configs/tiny.yaml", base + [f"output.dir={root / 'scorer'}"])
    scorer = Scorer(reference, n_prompts)
    names = ["reference"] + [n for n in (args.only or CONFIGS) if n != "reference"]
    runs: dict[str, list[dict[str, Any]]] = {}
    start = None
    if args.append:
        runs, start = previous_runs(Path(args.out), args)
        names = [n for n in runs if n not in names] + names
    for name in names:
        if name in runs:
            continue
        for seed in args.seeds:
            cfg = load_config(REPO / "configs/tiny.yaml", base + CONFIGS[name] + [
                f"seed={seed}", f"output.dir={root / name / str(seed)}"])
            images = scan_images(cfg.data.images, cfg.data.resolution).usable if cfg.rollout.mode == "offline" else None
            torch._dynamo.reset()
            if start is None:  # every configuration starts from the same weights: one initial score
                start = scorer(build_learner(cfg, InProcessSource(cfg, images), LocalCheckpoints(root / "s", 1),
                                             device=torch.device("cpu")))
            load = os.getloadavg()[0]
            result = train_for(cfg, args.budget, args.evals, scorer, root / name / str(seed), images)
            result.update(seed=seed, loadavg_before=load)
            runs.setdefault(name, []).append(result)
            last = result["curve"][-1]
            print(f"{name:>10} seed {seed}: {result['steps']} steps in {last['train_s']:.0f}s, held-out reward "
                  f"{start:.4f} -> {last['reward']:.4f}  (load before {load:.1f})", flush=True)
    commands = json.loads(Path(args.out).read_text()).get("commands", []) if args.append else []
    report = {"commands": commands + [" ".join(sys.argv)], "preset": args.preset, "budget_s": args.budget, "evals": args.evals,
              "seeds": args.seeds, "heldout_prompts": n_prompts, "initial_reward": start, "base_overrides": base,
              "configs": {n: CONFIGS[n] for n in runs}, "runs": runs,
              "summary": summarise(runs, start, args.budget),
              "host": {"cpus": os.cpu_count(), "machine": platform.machine(), "torch": torch.__version__,
                       "torch_threads": torch.get_num_threads()}}
    out = write_json_atomic(args.out, report)
    plot(report, out.with_suffix(".png"))
    print(json.dumps(report["summary"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
