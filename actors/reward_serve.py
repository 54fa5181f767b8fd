"""Reward deployments on Ray Serve: the gradient relay worker as an autoscaled Serve deployment.

    learner (Ray Train worker)                  Serve application <app> (deployment "RewardReplica")
    ServeReward.submit --DeploymentHandle-----> router: least-loaded replica, or the queue
         (no HTTP: handles call replicas         replica i: RewardWorker.loss_grad (decode, SRP, backward)
          as Ray actors)                         autoscaler: replicas in [min, max] so that requests in
    ServeReward.collect <-- (dLoss/dx0_hat, metrics)   flight + queued per replica ~ target_ongoing_requests

:class:`RewardReplica` is a thin shell around :class:`actors.reward.RewardWorker` (the same worker
as the fixed actor pool); :class:`ServeReward` is the learner-side objective: the pool client of
``actors/reward.py`` with a DeploymentHandle in place of the actor handles.

Serve runs without proxies (``proxy_location="Disabled"``): no HTTP or gRPC ingress on any
interface; DeploymentHandles need none. Ray Serve 2.60 still opens, in every replica, an
inter-deployment gRPC server on ``[::]:0`` (every interface, unauthenticated; only used when
``RAY_SERVE_USE_GRPC_BY_DEFAULT=1``). :func:`bind_replica_grpc_to_node_ip` makes the replica bind it
to the node's own address instead (127.0.0.1 on a local cluster); tests/test_reward_serve.py checks
that nothing of a run listens on any other address.

Failure handling, as observed with Ray 2.60 on a local cluster: a replica SIGKILLed mid-request
fails that request with ``ActorDiedError``; Serve's controller notices the dead actor, starts a
replacement and routes new requests to live replicas. ``ServeReward`` resubmits a request that
failed with any ``RayActorError`` through the handle (at most ``max_resubmits`` times): requests are
pure functions of their inputs, so one that ran twice changes nothing.

Applications: a run's own (``srpo-<run>-<reward name>``, deleted when the run ends) or a shared
service (``reward.service=NAME``): the first run deploys it, later runs attach after checking that it
serves the same reward; it stays up for the next run (``serve.delete(NAME)`` removes it).
"""
from __future__ import annotations

import threading
import uuid
from typing import Any

import ray
from ray import cloudpickle, serve
from ray.serve._private import replica as serve_replica
from ray.serve.handle import DeploymentHandle

from actors.priority import work_runtime_env
from actors.reward import RemoteReward, RewardTicket, RewardWorker, worker_kwargs
from pipeline.config import Config, ConfigError, RewardConfig, reward_name

DEPLOYMENT = "RewardReplica"


def bind_replica_grpc_to_node_ip() -> None:
    """Make this Serve replica bind its inter-deployment gRPC server to the node's address.

    Ray Serve 2.60 binds it to ``[::]:0`` right after the deployment's constructor returns, through
    the module-level ``add_port_to_grpc_server`` of ``ray.serve._private.replica``; replacing that
    name in this (replica) process rewrites the address. If a Ray version no longer has it, nothing
    changes here, and the listener test says so.
    """
    original = getattr(serve_replica, "add_port_to_grpc_server", None)
    if original is None or getattr(original, "srpo_bound", False):
        return
    ip = ray.util.get_node_ip_address()
    host = f"[{ip}]" if ":" in ip else ip

    def bind(server: Any, address: str) -> int:
        if address.startswith("[::]:"):
            address = f"{host}:{address.rsplit(':', 1)[1]}"
        return original(server, address)

    bind.srpo_bound = True  # type: ignore[attr-defined]
    serve_replica.add_port_to_grpc_server = bind


class RewardReplica:
    """One Serve replica: a reward worker (``worker_cls``, RewardWorker unless a test wraps it) built
    from ``kwargs`` (:func:`actors.reward.worker_kwargs`)."""

    def __init__(self, kwargs: dict[str, Any], worker_cls: type = RewardWorker) -> None:
        bind_replica_grpc_to_node_ip()
        self.kwargs = dict(kwargs)
        self.worker = worker_cls(**kwargs)
        # Serve runs up to max_ongoing_requests calls at once (threads); the worker computes one at a
        # time, and the others wait here, ready to start the moment it is free.
        self.busy = threading.Lock()

    def loss_grad(self, x0_hat, req):
        with self.busy:
            return self.worker.loss_grad(x0_hat, req)

    def score(self, latents, captions, pos_word, neg_word, k, form="reference"):
        with self.busy:
            return self.worker.score(latents, captions, pos_word, neg_word, k, form)

    def stats(self) -> dict[str, int]:
        return self.worker.stats()

    def describe(self) -> dict[str, Any]:
        """What this replica scores with: an attaching run compares it with its own reward."""
        return dict(self.kwargs)


# Serve is not thread-safe in Ray 2.60: building a deployment's configs (request router, autoscaling
# policy) registers a module in cloudpickle's process-wide pickle-by-value registry, dumps, and
# unregisters it. Two runs started from threads of one process (a sweep in a notebook, the
# shared-service test) collide there: our own deployments are made one at a time under _CLIENT, but a
# handle's router builds the same configs on Serve's event-loop thread, outside any lock of ours, and
# the second unregister of a module raised ValueError. Unregistering an absent module is made a no-op:
# the dumped classes are Ray's own, importable in every worker, so by value or by reference both load.
_CLIENT = threading.Lock()
_unregister = cloudpickle.unregister_pickle_by_value


def _unregister_if_registered(module) -> None:
    try:
        _unregister(module)
    except ValueError:  # another thread's unregister of the same module came first
        pass


cloudpickle.unregister_pickle_by_value = _unregister_if_registered


def start_serve() -> None:
    """Serve on the connected cluster without proxies (no HTTP/gRPC ingress); a Serve that already
    runs (started by an earlier run, or by the user with HTTP on purpose) is used as it is."""
    with _CLIENT:
        serve.start(proxy_location="Disabled", logging_config={"log_level": "WARNING"})


def autoscaling_config(r: RewardConfig) -> dict[str, Any]:
    a = r.autoscaling
    return dict(min_replicas=a.min_replicas, max_replicas=a.max_replicas, initial_replicas=max(1, a.min_replicas),
                target_ongoing_requests=a.target_ongoing_requests, upscale_delay_s=a.upscale_delay_s,
                downscale_delay_s=a.downscale_delay_s, metrics_interval_s=a.metrics_interval_s,
                look_back_period_s=a.look_back_period_s)


def reward_app(cfg: Config, r: RewardConfig, worker_cls: type = RewardWorker):
    """The bound Serve application of one training reward: autoscaling and per-replica resources from
    the config, and the reward's own runtime_env with the work's niceness (actors/priority.py)."""
    actor_options: dict[str, Any] = {"num_cpus": r.num_cpus, "num_gpus": r.num_gpus,
                                     "runtime_env": work_runtime_env(r.runtime_env)}
    if r.resources:
        actor_options["resources"] = dict(r.resources)
    deployment = serve.deployment(RewardReplica, name=DEPLOYMENT).options(
        max_ongoing_requests=r.max_ongoing_requests, autoscaling_config=autoscaling_config(r),
        ray_actor_options=actor_options, logging_config={"log_level": "WARNING", "enable_access_log": False})
    return deployment.bind(worker_kwargs(cfg, r), worker_cls)


def app_name(r: RewardConfig, run_tag: str) -> str:
    return r.service or f"srpo-{run_tag}-{reward_name(r)}"


class ServiceDeployer:
    """A named actor that deploys shared services one at a time, so that of two runs starting together
    exactly one deploys a service and the other attaches (Serve 2.60 gives every ``serve.run`` a new
    version: a second deploy of the same service would replace its replicas)."""

    def deploy_if_absent(self, name: str, app) -> bool:
        if name in serve.status().applications:
            return False
        serve.run(app, name=name, route_prefix=None)
        return True


def deploy_reward(cfg: Config, r: RewardConfig, where: str, run_tag: str | None = None,
                  worker_cls: type = RewardWorker) -> tuple[str, bool]:
    """Deploy the reward's Serve application, or attach to its running service (``reward.service``).

    Returns (application name, whether this run owns it and deletes it at its end). Serve must be
    started (:func:`start_serve`). A running service that scores a different reward is an error
    naming ``<where>.service``.
    """
    name = app_name(r, run_tag or uuid.uuid4().hex[:8])
    with _CLIENT:
        app = reward_app(cfg, r, worker_cls)
        if not r.service:
            serve.run(app, name=name, route_prefix=None)
            return name, True
        deployer = ray.remote(ServiceDeployer).options(name="srpo-service-deployer", namespace="srpo",
                                                       lifetime="detached", get_if_exists=True, num_cpus=0)
        deployed = ray.get(deployer.remote().deploy_if_absent.remote(name, app))
    if not deployed:
        check_service(cfg, r, where, serve.get_app_handle(name))
    return name, False


def check_service(cfg: Config, r: RewardConfig, where: str, handle: DeploymentHandle) -> None:
    running, wanted = handle.describe.remote().result(), worker_kwargs(cfg, r)
    if running != wanted:
        diff = sorted(k for k in set(running) | set(wanted) if running.get(k) != wanted.get(k))
        raise ConfigError(f"{where}.service: {r.service!r} already runs on this cluster with a different reward "
                          f"({', '.join(f'{k}={running.get(k)!r}' for k in diff)}); expected the same reward, "
                          "or another service name")


def delete_apps(names: list[str]) -> None:
    """Delete this run's own applications (best effort: the run's result does not depend on it)."""
    for name in names:
        try:
            serve.delete(name)
        except Exception:  # noqa: BLE001 - clean-up of our own application; a dead cluster has none left
            pass


class ServeReward(RemoteReward):
    """Learner-side objective that relays x0_hat to a reward deployment through a DeploymentHandle.

    Everything but the transport is the pool client's (:class:`actors.reward.RemoteReward`): the
    overlap of both branches' round trips, the wait timer and the resubmission of a request whose
    replica died. ``fanout``: requests a no-grad scoring batch is split into.
    """

    def __init__(self, handle: DeploymentHandle, max_resubmits: int = 2, fanout: int = 1) -> None:
        super().__init__([handle], max_resubmits=max_resubmits)
        self.handle, self._fanout = handle, max(1, fanout)

    @classmethod
    def for_app(cls, app: str, r: RewardConfig) -> "ServeReward":
        return cls(serve.get_app_handle(app), fanout=max(1, r.autoscaling.min_replicas))

    @property
    def fanout(self) -> int:
        return self._fanout

    def _send(self, method: str, args: tuple, actor: int | None = None) -> RewardTicket:
        # Serve routes each request to a live replica (or queues it); there is no pool index to rotate.
        return RewardTicket(ref=getattr(self.handle, method).remote(*args), actor=0, method=method, args=args)

    def _result(self, ref: Any) -> Any:
        return ref.result()
