"""The CPU priority of the processes that do a run's work: learners, rollout, reward and data stages.

Ray starts every worker process at niceness 15 (its ``worker_niceness``), so that its control plane
(raylet, GCS, dashboard) wins the CPU under load, and every thread a worker starts after that, Ray
Train's training thread and torch's intra-op threads included, inherits it. Ray's job supervisor gives
a job's driver niceness 0 the same way this module does: ``RAY_worker_niceness`` in the runtime_env.
A learner or a reward worker is the work itself; at niceness 15 (weight 36 against 1024) it loses
its core to any thread at 0 that wakes (the gRPC threads of Ray Train's and Ray Data's helper actors,
started before Ray lowers the main thread), and a parallel torch kernel then waits for the preempted
thread. Measured on 2 cores, small preset: Ray Train with one worker trained at 0.89x the single
process's rate before (benchmarks/results/pipeline_niceness15.json) and 1.02x after (pipeline.json).
Ray's helpers keep their niceness 15.
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
