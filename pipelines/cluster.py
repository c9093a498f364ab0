"""Joining Ray: a running cluster when an address is given (or RAY_ADDRESS), else a local
instance sized to this machine. The same pipelines run on both."""
from __future__ import annotations

import logging
import os
import warnings

from storage.errors import StoreError


def connect(address: str | None = None, env: dict | None = None) -> None:
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    warnings.filterwarnings("ignore", category=FutureWarning)
    address = address or os.environ.get("RAY_ADDRESS") or None
    # workers' and raylets' log lines would land on our stdout (and break --json): keep them
    # in Ray's session logs unless ALIKE_DEBUG asks for them
    kwargs = dict(logging_level=logging.ERROR, log_to_driver=bool(os.environ.get("ALIKE_DEBUG")),
                  configure_logging=True)
    if env:
        kwargs["runtime_env"] = {"env_vars": env}
    if address:
        _check_reachable(address)
        # clusters made by `ray start` (Ray >= 2.5x) require its token, kept in ~/.ray/auth_token;
        # token mode also joins clusters without authentication
        if not os.environ.get("RAY_AUTH_MODE") and os.path.exists(os.path.expanduser("~/.ray/auth_token")):
            os.environ["RAY_AUTH_MODE"] = "token"
        try:
            ray.init(address=address, **kwargs)
        except ConnectionError as e:
            raise ClusterError(f"cannot join the Ray cluster at {address}: {str(e).splitlines()[0]} "
                               "(if it uses token authentication, set RAY_AUTH_TOKEN or ~/.ray/auth_token)") from None
    else:
        # "local": always a new instance of our own, even if `ray start` left one on this host
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, **kwargs)


class ClusterError(StoreError):
    """{detail}"""


def _check_reachable(address: str) -> None:
    """Fail fast, with a clear message, where Ray itself would retry for minutes."""
    import socket

    if address in ("auto", "local") or address.startswith("ray://"):
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ClusterError(f"Ray address {address!r} is not HOST:PORT (or auto)")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as e:
        raise ClusterError(f"cannot reach the Ray cluster at {address} ({e.strerror or e}): start it with "
                           "`ray start --head`, or fix --address / RAY_ADDRESS") from None


def local_node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def pin_here(node_id: str | None = None):
    """A scheduling strategy that keeps a task or actor on this node (local paths live here)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(node_id or local_node_id(), soft=False)


def cluster_cpus() -> int:
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))
