"""The processes that do a run's work run at niceness 0, not at Ray's worker niceness 15 (actors/priority.py).

Ray lowers every worker process to niceness 15, and every thread the worker starts afterwards (Ray
Train's training thread, torch's intra-op threads) inherits it; the end-to-end check on a real run is in
test_ray_pipeline.py (every thread of the learners, rollout, reward and text-embedding processes).
"""
import os
import threading

import pytest

from actors.priority import work_runtime_env


def test_work_runtime_env_keeps_the_users_fields_and_env_vars():
    users = {"pip": ["x"], "env_vars": {"A": "1", "RAY_worker_niceness": "5"}}
    assert work_runtime_env(users) == {"pip": ["x"], "env_vars": {"RAY_worker_niceness": "5", "A": "1"}}
    assert users == {"pip": ["x"], "env_vars": {"A": "1", "RAY_worker_niceness": "5"}}  # not modified
    assert work_runtime_env() == {"env_vars": {"RAY_worker_niceness": "0"}}
    assert work_runtime_env({"env_vars": None, "py_executable": "/p"}) == {
        "env_vars": {"RAY_worker_niceness": "0"}, "py_executable": "/p"}


@pytest.mark.parametrize("runtime_env, expected", [
    (None, (15, 15, "1")),  # Ray's default worker niceness (the contrast that makes the other rows mean something)
    (work_runtime_env(), (0, 0, "1")),  # merged with the job's runtime_env: its env vars stay
    (work_runtime_env({"env_vars": {"RAY_worker_niceness": "5"}}), (5, 5, "1")),  # the user's own value wins
])
def test_actor_threads_run_at_the_work_niceness(ray_local, runtime_env, expected):
    actor = ray_local.remote(num_cpus=0)(_probe()).options(runtime_env=runtime_env).remote()
    try:
        assert ray_local.get(actor.niceness.remote()) == expected
    finally:
        ray_local.kill(actor)


def _probe() -> type:
    """The probe class, defined in a function so that Ray ships it by value (workers cannot import tests)."""
    class Probe:
        def niceness(self) -> tuple[int, int, str | None]:
            """(main thread, a thread started now, an env var of the job's runtime_env): getpriority of
            PRIO_PROCESS 0 is the calling thread's niceness on Linux."""
            started: dict[str, int] = {}
            t = threading.Thread(target=lambda: started.update(nice=os.getpriority(os.PRIO_PROCESS, 0)))
            t.start()
            t.join()
            return os.getpriority(os.PRIO_PROCESS, 0), started["nice"], os.environ.get("HF_HUB_OFFLINE")

    return Probe
