"""A test-only reward worker whose requests are slow on purpose: the real tiny reward underneath, plus a
sleep per request. Autoscaling tests and benchmarks/reward_serve.py need a reward bound by requests,
not by the CPU: a sleeping replica uses no CPU, so on a 2-core host N replicas really serve N
requests at once.

Set through the environment of the worker's process (the reward's ``runtime_env.env_vars``):
    SRPO_TEST_REWARD_SLEEP_S   seconds slept before each loss_grad / score request (default 0)
    SRPO_TEST_REWARD_BUSY_DIR  if set, the worker holds the file ``<dir>/busy.<pid>`` while it serves
                               a request: a test kills a replica that is in the middle of one
"""
from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import ray.cloudpickle

from actors.reward import RewardWorker

SLEEP = "SRPO_TEST_REWARD_SLEEP_S"
BUSY_DIR = "SRPO_TEST_REWARD_BUSY_DIR"

# Ray workers cannot import this file (tests/ is on the path of pytest only): ship the class by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class SleepyRewardWorker(RewardWorker):
    """RewardWorker + a fixed sleep per request; the results are RewardWorker's own."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.sleep_s = float(os.environ.get(SLEEP, "0"))
        self.busy_dir = os.environ.get(BUSY_DIR, "")

    @contextmanager
    def _busy(self) -> Iterator[None]:
        marker = Path(self.busy_dir) / f"busy.{os.getpid()}" if self.busy_dir else None
        if marker is not None:
            marker.touch()
        try:
            time.sleep(self.sleep_s)
            yield
        finally:
            if marker is not None:
                marker.unlink(missing_ok=True)

    def loss_grad(self, x0_hat, req):
        with self._busy():
            return super().loss_grad(x0_hat, req)

    def score(self, latents, captions, pos_word, neg_word, k, form="reference"):
        with self._busy():
            return super().score(latents, captions, pos_word, neg_word, k, form)
