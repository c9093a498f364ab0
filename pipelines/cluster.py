"""Joining Ray: a running cluster when an address is given (or RAY_ADDRESS), else a local
instance sized to this machine. The same pipelines run on both."""
from __future__ import annotations

import logging
import os
import warnings


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
        ray.init(address=address, **kwargs)
    else:
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, **kwargs)


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
