"""Starting `pyllm serve --replicas N` on Ray: the session (a local Ray instance unless an address
is given; a multi-machine cluster is Ray's own `ray start`) and the N engine deployments."""

import contextlib
import logging
import socket

import ray
from ray import serve

from ..backends import CORES
from ..errors import PyllmError, first_line
from .ray_replica import EngineReplica

QUIET = {"log_level": "WARNING", "enable_access_log": False}  # Serve logs no line per call
HEALTH_CHECK_S = 1.0  # how often Serve checks that a replica's process is alive (and replaces it if not)
CONNECT_TIMEOUT_S = 5.0


def check_reachable(address: str):
    """A HOST:PORT cluster address must accept connections: Ray itself would retry it for ever."""
    host, _, port = address.rpartition(":")
    if not host or "://" in address or not port.isdigit():
        return  # "auto", ray://..., or whatever else Ray makes of it
    try:
        socket.create_connection((host, int(port)), CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise PyllmError(f"no Ray cluster at {address} ({exc.strerror or exc}); start one with `ray start --head`")


@contextlib.contextmanager
def ray_session(address: str | None, replicas: int, threads: int):
    """Ray for the server's lifetime. A local instance gets CPUs for every replica's threads (Ray
    counts CPUs to place replicas; the cores are shared either way); a cluster has its own."""
    if address:
        check_reachable(address)
    ray.init(address=address, num_cpus=None if address else max(CORES, replicas * threads),
             include_dashboard=False, logging_level=logging.WARNING)
    try:
        yield
    finally:
        serve.shutdown()
        ray.shutdown()


def deploy(model: str, replicas: int, threads: int, backend: str, dtype: str | None, quantize: str | None,
           max_running: int, max_queue: int, kv_memory_gb: float) -> list:
    """Run N engine replicas, each a deployment of one (named pyllm-I), and wait until every one
    has loaded the model -> their handles, in order."""
    serve.start(proxy_location="Disabled", logging_config=QUIET)  # the HTTP ingress is pyllm's own
    replica = serve.deployment(EngineReplica).options(
        num_replicas=1, max_ongoing_requests=max_running + max_queue,  # the scheduler queues, not Serve
        health_check_period_s=HEALTH_CHECK_S, ray_actor_options={"num_cpus": threads}, logging_config=QUIET)
    targets = [serve.RunTarget(replica.options(name=f"pyllm-{i}").bind(model, threads, backend, dtype, quantize,
                                                                       max_running, max_queue, kv_memory_gb),
                               name=f"pyllm-{i}", route_prefix=None) for i in range(replicas)]
    try:
        return serve.run_many(targets)
    except RuntimeError as exc:  # Serve's word for a replica whose constructor raised (its traceback is logged)
        raise PyllmError(f"the engine replicas did not start: {first_line(exc)}") from None
