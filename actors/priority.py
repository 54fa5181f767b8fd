"""The CPU priority of the processes that do a run's work: learners, rollout, reward and data stages.

Ray starts every worker process at niceness 15 (its ``worker_niceness``), so that its control plane
(raylet, GCS, dashboard) wins the CPU under load, and every thread a worker starts after that, Ray
Train's training thread and torch's intra-op threads included, inherits it. The single-process
learner runs in the driver at niceness 0; so that the Learner runs at the same priority in every
placement, the work's processes start with ``RAY_worker_niceness=0`` in their runtime_env, the way
Ray's job supervisor starts a job's driver. Ray's helpers keep their niceness 15. Measured in
alternation on 2 cores (benchmarks/ray_niceness.py), it changes neither the step time nor how often
the learner's threads are preempted beyond the host's drift: parity, not speed (docs/benchmarks.md).
"""
from __future__ import annotations

from typing import Any

WORK_NICENESS = {"RAY_worker_niceness": "0"}


def work_runtime_env(runtime_env: dict[str, Any] | None = None) -> dict[str, Any]:
    """``runtime_env`` (a reward's own, or none) with the work's niceness. Ray merges it with the job's
    runtime_env (env_vars key by key); env_vars the user set here win."""
    env = dict(runtime_env or {})
    env["env_vars"] = {**WORK_NICENESS, **(env.get("env_vars") or {})}
    return env
