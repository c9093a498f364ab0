"""Joining Ray: a running cluster when an address is given (or RAY_ADDRESS), else a local
instance sized to this machine. The same pipelines run on both."""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import warnings

from storage.errors import StoreError


FORWARDED = ("ALIKE_CRASH_AT", "ALIKE_CRASH_FLAG", "ALIKE_DEBUG", "ALIKE_PACK_TARGET", "AWS_MAX_ATTEMPTS")


def forwarded_env() -> dict:
    """The settings of this command that its Ray tasks and actors must see too (Ray's workers
    run with the environment of `ray start`): passed as the job's runtime_env."""
    return {k: os.environ[k] for k in FORWARDED if k in os.environ}


def connect(address: str | None = None, env: dict | None = None, terminal: bool = False) -> None:
    """Join the cluster at `address` (HOST:PORT, `auto`, or $RAY_ADDRESS), else start a local
    instance. Ray's own output (its C++ log lines, its Python logging, workers' prints) stays
    off our stdout and stderr unless ALIKE_DEBUG is set: while Ray starts or joins always (a
    join that fails is one ClusterError), and for the rest of the process too when `terminal`
    (the alike command and server, which then find sys.stdout and sys.stderr replaced by
    streams that write where the old ones did; not pytest, whose capture moves descriptors)."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    warnings.filterwarnings("ignore", category=FutureWarning)
    debug = bool(os.environ.get("ALIKE_DEBUG"))
    address = address or os.environ.get("RAY_ADDRESS") or None
    # workers' and raylets' log lines would land on our stdout (and break --json); Ray's Python
    # logging would print its own account of errors we report ourselves
    kwargs = dict(logging_level=logging.INFO if debug else logging.CRITICAL + 1, log_to_driver=debug,
                  configure_logging=True)
    if env:
        kwargs["runtime_env"] = {"env_vars": env}
    output = _RayOutput(enabled=not debug)
    if address:
        _check_reachable(address)
        output.divert()
        try:
            _match_auth_mode(address)
            ray.init(address=address, **kwargs)
        except ClusterError:
            output.restore()
            raise
        except Exception as e:  # ConnectionError, AuthenticationError, RuntimeError...: not joined
            with contextlib.suppress(Exception):
                ray.shutdown()
            said = output.text()
            output.restore()
            raise ClusterError(_join_failure(address, e, said)) from None
    else:
        output.divert()
        try:
            # "local": always a new instance of our own, even if `ray start` left one on this host
            with _lean_local_instance(debug):
                ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, **kwargs)
        except BaseException:
            output.restore()
            raise
    if terminal:
        output.keep()
    else:
        output.restore()


@contextlib.contextmanager
def _lean_local_instance(debug: bool):
    """A local instance of our own starts only the Ray processes a command uses. `ray.init`
    starts, besides the GCS and the raylet, an autoscaler monitor (nothing to scale on one fixed
    node), a log monitor (it forwards workers' output, which we keep off the terminal), and the
    dashboard's API server (even with include_dashboard=False: its usage-stats module), which
    ray.init waits for; and its dashboard agent listens on the fixed port 52365, so while another
    Ray instance runs on the host (an `alike server`'s, a `ray start` head) the agent retries the
    taken port for 3.3 s, and the raylet waits for it; and to choose the agent's mode the driver
    imports the dashboard's dependencies (aiohttp, grpc, opentelemetry...: 0.3 s) where looking them
    up is enough. On 2 cores all this cost a command several seconds before its first read
    (bench/startup.py). ray.init has no option for them: its RayParams, Node and that check are
    adjusted for the duration of this one call; a Ray whose internals differ gets its defaults.
    ALIKE_DEBUG keeps Ray's defaults (its logs, its tools)."""
    if debug:
        yield
        return
    try:
        from ray._private import node as ray_node
        from ray._private import parameter
        from ray._private import utils as ray_utils
    except ImportError:
        yield
        return

    params, api = parameter.RayParams.__init__, getattr(ray_node.Node, "start_api_server", None)
    deps = getattr(ray_utils, "get_dashboard_dependency_error", None)

    def dashboard_deps():  # Ray imports them all (0.3 s) to learn whether they are installed
        import importlib.util

        missing = [m for m in ("aiohttp", "aiohttp_cors", "grpc", "opencensus", "opentelemetry", "prometheus_client",
                               "pydantic") if importlib.util.find_spec(m) is None]
        return ImportError(f"No module named {missing[0]!r}") if missing else None

    def lean_params(self, *a, **kw):
        params(self, *a, **kw)
        self.no_monitor = True
        self.include_log_monitor = False
        self.dashboard_agent_listen_port = 0  # any free port

    def no_api_server(self, **kw):
        self._webui_url = None

    parameter.RayParams.__init__ = lean_params
    if api is not None:
        ray_node.Node.start_api_server = no_api_server
    if deps is not None:
        ray_utils.get_dashboard_dependency_error = dashboard_deps
    try:
        yield
    finally:
        parameter.RayParams.__init__ = params
        if api is not None:
            ray_node.Node.start_api_server = api
        if deps is not None:
            ray_utils.get_dashboard_dependency_error = deps


class ClusterError(StoreError):
    """{detail}"""


def _match_auth_mode(address: str) -> None:
    """Speak the cluster's authentication: send Ray's token to a cluster that requires one, and
    none to a cluster without authentication (its workers would call back without a token, and
    a driver in token mode refuses them: the backup's actors die).

    A cluster made by `ray start --head` (Ray >= 2.5x) requires the token of its head whenever
    the head had one (in ~/.ray/auth_token, which every local `ray.init` creates), and Ray itself
    turns token mode on only for `auto`, never for an explicit address. Which mode a cluster uses
    shows at once: a GCS client without a token is refused with AuthenticationError. Ray reads
    RAY_AUTH_MODE into its config when it is imported (every command module imports ray long
    before this), so the config is read again after setting it, as Ray's own `ray start` does."""
    try:
        from ray._raylet import AuthenticationTokenLoader, Config, GcsClient
        from ray._private.services import canonicalize_bootstrap_address
        from ray.exceptions import AuthenticationError
    except ImportError:  # a Ray without token authentication: nothing to match
        return
    if address.startswith("ray://"):
        return
    try:
        gcs = canonicalize_bootstrap_address(address)  # `auto` -> the cluster `ray start` made here
    except ConnectionError as e:
        raise ClusterError(_join_failure(address, e, "")) from None
    if not gcs:
        return
    where = gcs if gcs == address else f"{gcs} ({address})"

    def refused(mode: str) -> bool:
        os.environ["RAY_AUTH_MODE"] = mode
        Config.initialize("")
        try:
            GcsClient(address=gcs)
        except AuthenticationError:
            return True
        except Exception as e:  # a port that is not a Ray head's (GCS), or one that does not answer:
            # Ray's own join would try it again and again, 40 s each time
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ClusterError(f"cannot join the Ray cluster at {where}: {first} (is it the port `ray start "
                               "--head --port` gave? ALIKE_DEBUG=1 shows Ray's own messages)") from None
        return False

    if not refused("disabled"):
        return
    if not AuthenticationTokenLoader.instance().has_token(ignore_auth_mode=True):
        raise ClusterError(
            f"the Ray cluster at {where} requires token authentication and this host has no token: "
            "copy the head's token (`ray get-auth-token` on the head) into ~/.ray/auth_token, "
            "or set RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN")
    if refused("token"):
        raise ClusterError(
            f"the Ray cluster at {where} refused this host's authentication token: use the head's "
            "token (`ray get-auth-token` on the head) in ~/.ray/auth_token, RAY_AUTH_TOKEN_PATH "
            "or RAY_AUTH_TOKEN")


def _join_failure(address: str, e: Exception, ray_said: str) -> str:
    """One sentence for a failed join: what went wrong, and what to do about it."""
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    if "Could not find any running Ray instance" in first:
        return ("no running Ray cluster found on this host for --address auto: start one with "
                "`ray start --head`, or give its HOST:PORT with --address / RAY_ADDRESS")
    if "InvalidAuthToken" in ray_said or type(e).__name__ == "AuthenticationError":
        first = "its authentication token was refused"
    return f"cannot join the Ray cluster at {address}: {first} (ALIKE_DEBUG=1 shows Ray's own messages)"


class _RayOutput:
    """Ray's C++ core writes its log lines to file descriptor 2, whatever Python's logging says:
    before its logging is set up (a join with a refused token prints a line a second for 20 s)
    and, for errors, all along (a worker that died, a cancelled actor...). Its processes write
    there too. So descriptors 1 and 2 are pointed at a file of Ray's output while Ray starts,
    and, for a command on a terminal, for good: sys.stdout and sys.stderr then write through
    copies of the descriptors they had, so that everything Python prints goes where it went."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.saved: list[int] = []
        self.file = None

    def divert(self) -> None:
        if not self.enabled:
            return
        _flush()
        self.file = tempfile.TemporaryFile()
        self.saved = [os.dup(1), os.dup(2)]
        os.dup2(self.file.fileno(), 1)
        os.dup2(self.file.fileno(), 2)

    def text(self) -> str:
        if self.file is None:
            return ""
        self.file.seek(0)
        return self.file.read().decode(errors="replace")

    def restore(self) -> None:
        """Descriptors 1 and 2 back where they were."""
        if not self.saved:
            return
        _flush()
        for fd, old in zip((1, 2), self.saved):
            os.dup2(old, fd)
            os.close(old)
        self.saved = []
        self.file.close()
        self.file = None

    def keep(self) -> None:
        """Leave Ray's output diverted for the rest of the process, into Ray's session logs
        (alike-driver-PID.out, next to Ray's own logs of this driver) when they are here."""
        if not self.saved:
            return
        _flush()
        log = self.file
        with contextlib.suppress(Exception):
            import ray

            logs = ray._private.worker._global_node.get_logs_dir_path()
            log = open(os.path.join(logs, f"alike-driver-{os.getpid()}.out"), "ab")
            log.write(self.text().encode())
            log.flush()
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        sys.stdout = _text_stream(self.saved[0], sys.stdout)
        sys.stderr = _text_stream(self.saved[1], sys.stderr)
        self.keep_open = (log, self.file)  # the descriptors 1 and 2 now point at
        self.saved = []


def _text_stream(fd: int, like):
    return os.fdopen(fd, "w", buffering=1, encoding=getattr(like, "encoding", None) or "utf-8",
                     errors=getattr(like, "errors", None) or "backslashreplace")


def _flush() -> None:
    for f in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            f.flush()


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
