"""`alike server`: a long-lived alike process that runs commands in a warm Ray job.

Every new alike process that moves data starts a Ray job of its own: worker processes, a snapshot
actor, index shard actors, each importing Python, Ray, numpy and pyarrow - seconds on 2 cores
before the first block is read, which is most of a changed-block-tracking backup of a quiet VM,
and all of a verify of a small store. The server joins Ray once and keeps those processes
(pipelines/service.py); a command sent to it costs its own work only.

Which commands it runs: those whose module in alike_ray/commands/ declares them in SERVED (the
commands that move data: backup, restore, verify, vault, repair, gc, files, job run; `mount`
stays a process of its own). A command runs in the server exactly as it runs locally (same
function, same messages, same exit codes); its output is routed to the client by thread, so
several clients may run commands at once.

Where a command runs (the client decides, in route()):
- `--no-server`, or ALIKE_SERVER=off: here;
- `--server [SOCKET]`: in the server at SOCKET (default: the default socket); none there is an error;
- else, when a server answers at the default socket (default_socket(): $ALIKE_SERVER, else
  /run/alike/server.sock for root, else under $XDG_RUNTIME_DIR): there, unless the command names
  a Ray cluster (--address), or the server runs other code than this client, or its environment
  differs in what a command reads (AWS_*, ALIKE_*, the Ray cluster, umask...: env_digest): then
  here, as if no server ran (a server with other code says so in one warning line);
- a socket file nobody answers at (a server that was killed): one `alike: warning:` line, and here;
- no server: on a terminal (not under CI, not with ALIKE_SERVER_AUTOSTART=0), the command starts
  one detached (as `alike server start --idle-timeout` does; ALIKE_SERVER_IDLE, default 10 min),
  says so in one line, and runs in it; elsewhere (scripts, cron, tests) here.

Wire protocol, on a Unix socket (mode 0600: only its owner may use it, as with the store):
the client sends one JSON line, the server answers with JSON lines.
  {"op": "run", "command": "backup", "args": {...}, "tty": bool, "size": [cols, rows], "pid": N,
   "implicit": bool, "code": stamp, "env": {name: digest}, "ray": address}
      -> {"o": text} (stdout), {"e": text} (stderr) ... then {"exit": code}
      -> or, for an implicit request the server will not take: {"decline": why}
     while it runs the client may send {"op": "interrupt"} (its Ctrl-C): the command is
     interrupted in the server as Ctrl-C interrupts it locally (KeyboardInterrupt in its thread)
  {"op": "status"} -> {"status": {...}}
  {"op": "stop"}   -> {"ok": true}; the server stops once running commands end
If the client goes away without a Ctrl-C (killed, its terminal closed), the command still ends
(commits or fails cleanly) and its output is written to the server's log: nothing is left half-done.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time

from storage.errors import StoreError

START_TIMEOUT = 120
IDLE_DEFAULT = 600  # seconds an auto-started server waits for its next command
OFF = ("off", "no", "none", "0", "false")
ON = ("on", "yes", "1", "true")


def default_socket() -> str:
    env = os.environ.get("ALIKE_SERVER", "").strip()
    if env and env.lower() not in OFF:
        return os.path.abspath(env)
    if os.geteuid() == 0:
        return "/run/alike/server.sock"
    base = os.environ.get("XDG_RUNTIME_DIR") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "alike", "server.sock")


def log_path(sock: str) -> str:
    return os.path.splitext(sock)[0] + ".log"


class ServerError(StoreError):
    """{detail}"""

    def __init__(self, detail: str, exit_code: int = 2):
        super().__init__(detail)
        self.exit_code = exit_code


class ServerGone(ServerError):
    """{detail}"""  # no server answers at the socket (none there, or a dead one's socket file)


class ServerRefused(ServerError):
    """{detail}"""  # a server is there, and this user may not use it


class Declined(Exception):
    """The server will not take an implicit request (other code, another environment)."""

    def __init__(self, why: str):
        super().__init__(why)
        self.why = why


# ---------------------------------------------------------------------------------------------
# what client and server compare: no Ray, no numpy

# what a command reads from its environment: a server whose environment differs here would run it
# with other credentials or settings than the user's shell has
ENV_PREFIXES = ("ALIKE_", "AWS_", "BOTO_", "LIBVIRT_")
ENV_NAMES = ("HOME", "TMPDIR", "TZ")
ENV_IGNORED = ("ALIKE_SERVER", "ALIKE_SERVER_IDLE", "ALIKE_SERVER_AUTOSTART", "ALIKE_STORE", "ALIKE_PROFILE")


def env_digest(environ=None) -> dict[str, str]:
    """{name: short digest of its value} of the variables commands read (the values themselves,
    secrets among them, never leave the process), with the umask (files a command writes)."""
    import hashlib

    environ = os.environ if environ is None else environ
    out = {k: hashlib.sha256(v.encode()).hexdigest()[:12] for k, v in environ.items()
           if (k.startswith(ENV_PREFIXES) or k in ENV_NAMES) and k not in ENV_IGNORED}
    mask = os.umask(0o22)
    os.umask(mask)
    out["(umask)"] = oct(mask)
    return out


def code_stamp() -> str:
    """Which alike this is: the interpreter and every module file of alike_ray, pipelines and
    storage (path, size, mtime). A server started before an upgrade has another stamp."""
    import hashlib
    import importlib.util

    h = hashlib.sha256(sys.executable.encode())
    for pkg in ("alike_ray", "pipelines", "storage"):
        spec = importlib.util.find_spec(pkg)
        for root in (spec.submodule_search_locations or []) if spec else []:
            for dirpath, dirs, files in os.walk(root):
                dirs[:] = sorted(d for d in dirs if d != "__pycache__")
                for f in sorted(files):
                    if f.endswith(".py"):
                        st = os.stat(os.path.join(dirpath, f))
                        h.update(f"{dirpath}/{f}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def ray_target(address: str | None = None) -> str | None:
    """The Ray cluster a command would join: --address, $RAY_ADDRESS, else none (its own instance)."""
    return address or os.environ.get("RAY_ADDRESS") or None


def process_started() -> float:
    """When this process started (epoch seconds): the wall time a user waited counts from there
    (interpreter start and imports included). Linux: from /proc; elsewhere: now."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rpartition(")")[2].split()[19])
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
        return time.time() - max(0.0, age)
    except (OSError, ValueError, IndexError, AttributeError):
        return time.time()


# ---------------------------------------------------------------------------------------------
# client side: no Ray, no numpy - a request costs a connect and a few JSON lines

def _connect(sock: str, timeout: float | None = 5) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(sock)
    except FileNotFoundError:
        s.close()
        raise ServerGone(f"no alike server at {sock}: start one with `alike server start --socket {sock}`, "
                         "or run without --server (and without $ALIKE_SERVER)") from None
    except (ConnectionRefusedError, OSError) as e:
        s.close()
        if isinstance(e, PermissionError):
            raise ServerRefused(f"not allowed to use the alike server at {sock}: it belongs to another user") from None
        raise ServerGone(f"the alike server at {sock} does not answer ({e.strerror or e}): it has stopped; "
                         f"start it again with `alike server start --socket {sock}`") from None
    s.settimeout(None)
    return s


def request(sock: str, req: dict, timeout: float | None = 5):
    """Send one request; yield the server's answers (dicts) until it closes the connection."""
    s = _connect(sock, timeout)
    try:
        s.sendall((json.dumps(req) + "\n").encode())
        f = s.makefile("r", encoding="utf-8")
        for line in f:
            if line.strip():
                yield json.loads(line)
    finally:
        s.close()


def status(sock: str) -> dict:
    for ans in request(sock, {"op": "status"}):
        if "status" in ans:
            return ans["status"]
    raise ServerError(f"the alike server at {sock} gave no status")


def _refuse_if_running(sock: str) -> None:
    """A server that answers at `sock` keeps it; a socket file nobody answers is a dead one's."""
    if not os.path.exists(sock):
        return
    try:
        st = status(sock)
    except ServerError:
        return
    raise ServerError(f"an alike server already runs at {sock} (pid {st.get('pid')}): "
                      f"stop it first (alike server stop --socket {sock})")


def _warn(text: str) -> None:
    print(f"alike: warning: {text}", file=sys.stderr, flush=True)


def route(args, command: str) -> int | None:
    """Run the parsed `command` where it belongs (module docstring): -> its exit code when a
    server ran it, None when it is to run in this process."""
    explicit = getattr(args, "server", None)
    if getattr(args, "no_server", False):
        if explicit:
            raise ServerError("--server and --no-server contradict each other: give one")
        return None
    if explicit:
        if getattr(args, "address", None):
            raise ServerError("--address does not go with --server: the server joined its Ray cluster when it "
                              "started (alike server start --address ...)")
        return run_remote(args, command, default_socket() if explicit is True else os.path.abspath(explicit))
    named = os.environ.get("ALIKE_SERVER", "").strip()
    if named.lower() in OFF or getattr(args, "address", None):
        return None  # asked for no server; a Ray cluster named for this command is joined from here
    sock = default_socket()
    if not os.path.exists(sock) and not autostart_allowed():
        if named:
            _warn(f"no alike server at {sock} ($ALIKE_SERVER): the {command} runs here")
        return None
    try:
        if not os.path.exists(sock):
            raise ServerGone(f"no alike server at {sock}")
        return run_remote(args, command, sock, implicit=True)
    except ServerGone:
        if autostart_allowed() and autostart(sock):
            return _run_declinable(args, command, sock)
        if os.path.exists(sock):
            _warn(f"the alike server at {sock} does not answer (its socket was left by a server that was "
                  f"killed): the {command} runs here; `alike server start` starts a new one")
        return None
    except ServerRefused as e:
        _warn(f"{e.message}: the {command} runs here")
        return None
    except Declined as d:
        _declined(sock, command, d)
        return None


def _run_declinable(args, command, sock) -> int | None:
    try:
        return run_remote(args, command, sock, implicit=True)
    except Declined as d:
        _declined(sock, command, d)
        return None


def _declined(sock: str, command: str, d: Declined) -> None:
    if d.why == "code":  # the others (environment, Ray cluster) are the user's choice: silent
        _warn(f"the alike server at {sock} runs another copy of alike (started before an upgrade?): the "
              f"{command} runs here; restart the server (`alike server stop`, then start it again)")


def autostart_allowed() -> bool:
    """Start a server for the next commands? Asked for (ALIKE_SERVER_AUTOSTART=1), or, unless
    refused (=0, or ALIKE_SERVER=off), on a terminal outside CI: never in scripts, cron or tests."""
    v = os.environ.get("ALIKE_SERVER_AUTOSTART", "").strip().lower()
    if v in ON:
        return True
    if v in OFF or os.environ.get("ALIKE_SERVER", "").strip().lower() in OFF:
        return False
    if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
        return False
    return sys.stderr.isatty()


def idle_timeout() -> float:
    """ALIKE_SERVER_IDLE: how long an auto-started server waits for its next command (default 10 min)."""
    text = os.environ.get("ALIKE_SERVER_IDLE", "").strip()
    if not text:
        return IDLE_DEFAULT
    from .commands.gc import parse_duration

    return parse_duration(text, "ALIKE_SERVER_IDLE")


def _say_duration(seconds: float) -> str:
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{seconds / 3600:g} h"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{seconds / 60:g} min"
    return f"{seconds:g} s"


def autostart(sock: str) -> bool:
    """Start a detached server at `sock` that stops after idle_timeout() without commands, and
    say so in one line. -> whether one answers there now (this one, or one another command just
    started). Failing to start is one warning line: the command then runs here."""
    import fcntl

    idle = idle_timeout()
    os.makedirs(os.path.dirname(sock) or ".", mode=0o700, exist_ok=True)
    with open(sock + ".lock", "w") as lk:  # two commands at once start one server
        fcntl.flock(lk, fcntl.LOCK_EX)
        try:
            status(sock)
            return True
        except ServerError:
            pass
        try:
            start(sock, None, idle=idle)
        except ServerError as e:
            _warn(f"could not start a local alike server ({e.message}): running here")
            return False
    print(f"alike: started a local server at {sock} (stops after {_say_duration(idle)} idle; `alike server stop`)",
          file=sys.stderr, flush=True)
    return True


def run_remote(args, command: str, sock: str, implicit: bool = False) -> int:
    """Run a parsed command in the server at `sock`; print its output here. -> exit code.
    implicit: the user did not ask for this server (raises Declined if it will not take it)."""
    import signal

    from .commands import server_command

    served = server_command(command)
    if served is None:
        raise ServerError(f"the alike server does not run {command!r}: run it without --server")
    d = {k: v for k, v in vars(args).items() if k not in ("fn", "server", "no_server") and
         isinstance(v, (str, int, float, bool, list, type(None)))}
    served.client_args(d)  # paths are the client's: the server has another working folder
    size = _terminal_size()
    req = {"op": "run", "command": command, "args": d, "tty": sys.stderr.isatty(), "size": size,
           "pid": os.getpid(), "implicit": implicit}
    if implicit:
        req.update(code=code_stamp(), env=env_digest(), ray=ray_target())
    s = _connect(sock, timeout=10)
    code, first = None, True
    interrupts = []

    def on_sigint(signum, frame):  # the first Ctrl-C interrupts the command in the server
        if interrupts:
            raise KeyboardInterrupt
        interrupts.append(time.monotonic())
        try:
            s.sendall(b'{"op": "interrupt"}\n')
        except OSError:
            raise KeyboardInterrupt from None

    old = signal.signal(signal.SIGINT, on_sigint)
    try:
        s.sendall((json.dumps(req) + "\n").encode())
        for line in s.makefile("r", encoding="utf-8"):
            if not line.strip():
                continue
            ans = json.loads(line)
            if first and "decline" in ans:
                raise Declined(ans["decline"])
            first = False
            if "o" in ans:
                sys.stdout.write(ans["o"])
                sys.stdout.flush()
            elif "e" in ans:
                sys.stderr.write(ans["e"])
                sys.stderr.flush()
            elif "exit" in ans:
                code = int(ans["exit"])
                break
    except KeyboardInterrupt:  # a second Ctrl-C: leave it to end there
        print(f"alike: interrupted again: the {command} ends in the server at {sock} (its log: {log_path(sock)})",
              file=sys.stderr)
        return 130
    except (ConnectionResetError, BrokenPipeError):
        pass
    finally:
        signal.signal(signal.SIGINT, old)
        s.close()
    if code is None:
        raise ServerError(f"the alike server at {sock} closed the connection before the {command} ended "
                          f"(did it stop or crash? see {log_path(sock)}); a backup it did not finish "
                          "committed nothing", exit_code=1)
    return code


def _terminal_size() -> list[int] | None:
    try:
        sz = os.get_terminal_size(sys.stderr.fileno())
        return [sz.columns, sz.lines]
    except (OSError, ValueError, AttributeError):
        return None


# ---------------------------------------------------------------------------------------------
# server side

class _Router:
    """sys.stdout / sys.stderr of the server: text written by a thread serving a client goes to
    that client; anything else (Ray, other threads) to the server's own stream (its log)."""

    def __init__(self, name: str, fallback):
        self.name, self.fallback = name, fallback
        self.local = threading.local()

    def _sink(self):
        return getattr(self.local, "sink", None)

    def write(self, text: str) -> int:
        sink = self._sink()
        if sink is None:
            return self.fallback.write(text)
        sink(self.name, text)
        return len(text)

    def flush(self) -> None:
        if self._sink() is None:
            self.fallback.flush()

    def isatty(self) -> bool:
        sink = self._sink()
        return bool(getattr(sink, "tty", False)) if sink is not None else self.fallback.isatty()

    def client_terminal_size(self):
        """(columns, lines) of the client's terminal, for progress bars (ui.terminal_size)."""
        sink = self._sink()
        return tuple(sink.size) if sink is not None and getattr(sink, "size", None) else None

    @property
    def encoding(self):
        return "utf-8"

    def fileno(self):
        return self.fallback.fileno()


class _Client:
    """One connection's output: JSON lines, written under a lock; a client that went away makes
    the rest of the output go to the server's log (the command goes on)."""

    def __init__(self, conn: socket.socket, tty: bool, label: str, log):
        self.conn, self.tty, self.label, self.log = conn, tty, label, log
        self.size = None  # the client's terminal: [columns, lines]
        self.shown: dict[str, str] = {}  # absolute paths the client gave as relative ones
        self.lock = threading.Lock()
        self.gone = False

    def send(self, obj: dict) -> None:
        with self.lock:
            if not self.gone:
                try:
                    self.conn.sendall((json.dumps(obj) + "\n").encode())
                    return
                except OSError:
                    self.gone = True
                    self.log(f"{self.label}: the client went away; the command goes on, its output follows here")
        for k in ("o", "e"):
            if k in obj:
                self.log(f"{self.label}: {obj[k].rstrip()}")

    def __call__(self, stream: str, text: str) -> None:
        for full in sorted(self.shown, key=len, reverse=True):  # as the user wrote them
            text = text.replace(full, self.shown[full])
        self.send({"o" if stream == "stdout" else "e": text})


class Server:
    def __init__(self, sock: str, address: str | None, idle: float | None = None):
        self.sock, self.address, self.idle = sock, address, idle or None
        self.started = time.time()
        self.running: dict[int, dict] = {}
        self.served = 0
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.last_active = time.monotonic()
        self.pool = None
        self.srv = None
        self.seq = 0
        # what implicit requests are compared with: this process's code and environment as started
        self.code, self.env, self.ray = code_stamp(), env_digest(), ray_target(address)

    def log(self, msg: str) -> None:
        self.err.write(time.strftime("%Y-%m-%d %H:%M:%S ") + msg + "\n")
        self.err.flush()

    # -- life ------------------------------------------------------------------------------------
    def serve(self) -> int:
        import socketserver

        from pipelines.cluster import connect, forwarded_env, local_node_id, pin_here
        from pipelines.service import WarmPool, install

        self.err = sys.stderr
        self._claim_socket()
        env = forwarded_env()
        connect(self.address, env or None, terminal=True)  # Ray's own lines: in its session logs
        self.err = sys.stderr  # (connect gave Python a stream of its own to our log or terminal)
        self.pool = WarmPool()
        install(self.pool)
        t0 = time.monotonic()
        from pipelines.backup import index_shards
        from pipelines.cluster import cluster_cpus

        self.pool.prewarm(pin_here(local_node_id()), modules=("alike_ray.sources.image", "alike_ray.sources.kvm"),
                          index_shards=index_shards(cluster_cpus()))
        self.log(f"warm: a snapshot actor, index shards and the read-task workers are up "
                 f"({time.monotonic() - t0:.1f} s)")
        from . import ui

        ui._OUT = None  # `alike server run` guarded stdout like any command: commands' output is routed
        sys.stdout = _Router("stdout", sys.stdout)
        sys.stderr = _Router("stderr", sys.stderr)
        server = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self):
                server.handle(self.connection, self.rfile)

        class Srv(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
            daemon_threads = True

        old = os.umask(0o177)  # the socket: its owner only
        try:
            self.srv = Srv(self.sock, Handler)
        finally:
            os.umask(old)
        self.inode = os.stat(self.sock).st_ino
        import signal

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: threading.Thread(target=self.stop, daemon=True).start())
        if self.idle:
            threading.Thread(target=self._stop_when_idle, daemon=True).start()
        self.log(f"alike server ready on {self.sock} (pid {os.getpid()})"
                 + (f"; it stops after {_say_duration(self.idle)} without a command" if self.idle else ""))
        try:
            self.srv.serve_forever(poll_interval=0.2)
        finally:
            self.srv.server_close()
            self._unlink_socket()
            self.pool.shutdown()
            self.log("alike server stopped")
        return 0

    def _claim_socket(self) -> None:
        _refuse_if_running(self.sock)
        os.makedirs(os.path.dirname(self.sock) or ".", mode=0o700, exist_ok=True)
        if os.path.exists(self.sock):
            os.unlink(self.sock)  # left by a server that died

    def _unlink_socket(self) -> None:
        """Remove our socket file - not one a newer server made at the same path since."""
        try:
            if os.stat(self.sock).st_ino == getattr(self, "inode", None):
                os.unlink(self.sock)
        except OSError:
            pass

    def _stop_when_idle(self) -> None:
        """An auto-started server ends once no command ran for `idle` seconds (status requests
        do not count): it is there for the next commands of a session, not for good."""
        while not self.stopping.wait(min(1.0, self.idle / 4)):
            with self.lock:
                quiet = not self.running and time.monotonic() - self.last_active >= self.idle
            if quiet:
                self.log(f"no command for {_say_duration(self.idle)}: stopping")
                self._unlink_socket()  # from now on clients find no server (not a stopping one)
                self.stop()
                return

    def stop(self) -> None:
        """Refuse new commands, wait for running ones, then stop serving."""
        if self.stopping.is_set():
            return
        self.stopping.set()
        self.log("stopping: waiting for running commands")
        while True:
            with self.lock:
                if not self.running:
                    break
            time.sleep(0.2)
        if self.srv is not None:
            self.srv.shutdown()

    # -- requests --------------------------------------------------------------------------------
    def handle(self, conn, rfile) -> None:
        try:
            req = json.loads(rfile.readline() or b"{}")
        except ValueError:
            req = {}
        op = req.get("op")
        if op == "status":
            conn.sendall((json.dumps({"status": self.status()}) + "\n").encode())
        elif op == "stop":
            conn.sendall(b'{"ok": true}\n')
            threading.Thread(target=self.stop, daemon=True).start()
        elif op == "run":
            self.run(conn, req)
        else:
            conn.sendall((json.dumps({"e": f"alike: error: the server does not know the request {op!r}\n"}) +
                          "\n" + json.dumps({"exit": 2}) + "\n").encode())

    def status(self) -> dict:
        import ray

        with self.lock:
            running = [dict(r) for r in self.running.values()]
        return {"pid": os.getpid(), "socket": self.sock, "log": log_path(self.sock),
                "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started)),
                "uptime_seconds": round(time.time() - self.started, 1),
                "idle_timeout_seconds": self.idle,
                "ray_address": ray.get_runtime_context().gcs_address, "stopping": self.stopping.is_set(),
                "commands_served": self.served, "running": running, "warm": self.pool.stats()}

    def _declines(self, req) -> str | None:
        """Why an implicit request is better run by its client itself, else None."""
        if req.get("code") != self.code:
            return "code"
        if req.get("ray") != self.ray:
            return "ray"
        if req.get("env") != self.env:
            return "env"
        return None

    def run(self, conn, req) -> None:
        import argparse

        from .commands import server_command

        with self.lock:
            self.seq += 1
            n = self.seq
        command = req.get("command")
        client = _Client(conn, bool(req.get("tty")), f"[{n} {command} from pid {req.get('pid')}]", self.log)
        client.size = req.get("size")
        if req.get("implicit") and (self.stopping.is_set() or self._declines(req)):
            client.send({"decline": "stopping" if self.stopping.is_set() else self._declines(req)})
            return
        if self.stopping.is_set():
            client.send({"e": "alike: error: the alike server is stopping: run the command again once it is "
                              "started, or without --server\n"})
            client.send({"exit": 2})
            return
        entry = server_command(command)
        if entry is None:
            client.send({"e": f"alike: error: the server does not run {command!r}: run it without --server\n"})
            client.send({"exit": 2})
            return
        given = dict(req.get("args", {}))
        client.shown = given.pop("_shown", None) or {}
        args = argparse.Namespace(**given)
        args.fn = entry.fn
        args.server = None
        args.address = None
        args.started_at = float(getattr(args, "started_at", None) or time.time())
        info = {"id": n, "command": command, "client_pid": req.get("pid"),
                "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "what": _what(args)}
        with self.lock:
            self.running[n] = info
            self.last_active = time.monotonic()
        self.log(f"{client.label}: {info['what']} -> store {getattr(args, 'store', None)}")
        t0 = time.monotonic()
        code = self._run_command(args, client)
        with self.lock:
            self.running.pop(n, None)
            self.served += 1
            self.last_active = time.monotonic()
        self.log(f"{client.label}: exit {code} after {time.monotonic() - t0:.2f} s")
        client.send({"exit": code})
        try:
            conn.shutdown(socket.SHUT_RD)  # ends the watch of the client's lines
        except OSError:
            pass

    def _run_command(self, args, client) -> int:
        """The command in this thread, its output to `client`; the client's Ctrl-C (an
        {"op": "interrupt"} line) raises KeyboardInterrupt here, as SIGINT does in a local run."""
        from . import cli

        running = threading.Event()
        running.set()
        me = threading.get_ident()

        def watch():  # ends at the end of the connection (the client went away: the command goes on)
            buf = b""
            try:
                while True:
                    data = client.conn.recv(4096)  # not rfile: its close would wait for this read
                    if not data:
                        return
                    buf += data
                    while b"\n" in buf:
                        line, buf = buf.split(b"\n", 1)
                        try:
                            msg = json.loads(line)
                        except ValueError:
                            continue
                        if isinstance(msg, dict) and msg.get("op") == "interrupt" and running.is_set():
                            self.log(f"{client.label}: interrupted by its client (Ctrl-C)")
                            _raise_in(me, KeyboardInterrupt)
            except OSError:
                pass

        threading.Thread(target=watch, daemon=True).start()
        sys.stdout.local.sink = sys.stderr.local.sink = client
        try:
            try:
                if os.environ.get("ALIKE_PROFILE"):
                    import cProfile
                    import pstats

                    pr = cProfile.Profile()
                    code = pr.runcall(cli.run_args, args)
                    pstats.Stats(pr, stream=self.err).sort_stats("cumulative").print_stats(40)
                else:
                    code = cli.run_args(args)
            finally:
                running.clear()
        except KeyboardInterrupt:  # the client's Ctrl-C landed after the command's own handling
            code = 130
        except BaseException as e:  # a bug: the server goes on; the client gets one line
            import traceback

            self.log(f"{client.label}: internal error:\n{traceback.format_exc()}")
            client.send({"e": f"alike: error: internal error in the alike server: {type(e).__name__}: {e} "
                              f"(see {log_path(self.sock)})\n"})
            code = 1
        finally:
            sys.stdout.local.sink = sys.stderr.local.sink = None
        return code


def _what(args) -> str:
    """What a running command works on, for `alike server status` and the log."""
    words = list(getattr(args, "sources", None) or [])
    for k in ("file", "vm"):
        v = getattr(args, k, None)
        if isinstance(v, str):
            words.append(v)
    words += [f"--vm {v}" for v in (getattr(args, "vm", None) if isinstance(getattr(args, "vm", None), list) else [])]
    return " ".join(words)


def _raise_in(thread_id: int, exc) -> None:
    import ctypes

    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), ctypes.py_object(exc))


# ---------------------------------------------------------------------------------------------
# `alike server start`: the server as a background process

def start(sock: str, address: str | None, timeout: float = START_TIMEOUT, idle: float | None = None) -> dict:
    """Start `python -m alike_ray.server` detached (its own session, its output to the log next
    to the socket, working folder /: it keeps no folder of the user's busy) and wait until it
    answers. idle: seconds without a command after which it stops (None: never)."""
    import subprocess

    _refuse_if_running(sock)
    if address or os.environ.get("RAY_ADDRESS"):
        from pipelines.cluster import _check_reachable

        _check_reachable(address or os.environ["RAY_ADDRESS"])  # at once, not after the server gave up
    os.makedirs(os.path.dirname(sock) or ".", mode=0o700, exist_ok=True)
    logp = log_path(sock)
    cmd = [sys.executable, "-m", "alike_ray.server", "--socket", sock] + (["--address", address] if address else []) \
        + (["--idle-timeout", repr(float(idle))] if idle else [])
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # this alike, whatever the folder
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, (here, os.environ.get("PYTHONPATH")))))
    with open(logp, "ab") as logf:
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, start_new_session=True,
                             cwd="/", env=env)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if p.poll() is not None:
            said = _tail(logp, 1)
            if said.startswith("alike: error: "):  # its own one-line reason (a cluster it cannot join...)
                raise ServerError(f"the alike server did not start: {said[len('alike: error: '):]}",
                                  exit_code=p.returncode)
            raise ServerError(f"the alike server did not start (exit {p.returncode}): {_tail(logp)}")
        if os.path.exists(sock):
            try:
                return status(sock)
            except ServerError:
                pass
        time.sleep(0.2)
    p.terminate()
    raise ServerError(f"the alike server did not get ready within {timeout:.0f} s (see {logp}); stopped it",
                      exit_code=1)


def stop(sock: str, timeout: float = 3600) -> dict:
    st = status(sock)
    for _ in request(sock, {"op": "stop"}):
        pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(int(st["pid"]), 0)
        except ProcessLookupError:
            return st
        except PermissionError:
            pass
        time.sleep(0.2)
    raise ServerError(f"the alike server (pid {st['pid']}) did not stop within {timeout:.0f} s: its "
                      "commands still run", exit_code=1)


def _tail(path: str, lines: int = 5) -> str:
    try:
        with open(path, errors="replace") as f:
            text = [ln.strip() for ln in f.readlines()[-lines:] if ln.strip()]
        return " | ".join(text) or f"(nothing in {path})"
    except OSError:
        return f"(no log at {path})"


def main(argv=None) -> int:
    """`python -m alike_ray.server --socket PATH [--address A]`: the server in the foreground."""
    import argparse

    ap = argparse.ArgumentParser(prog="alike-server")
    ap.add_argument("--socket", default=default_socket())
    ap.add_argument("--address")
    ap.add_argument("--idle-timeout", type=float, help="stop after this many seconds without a command")
    a = ap.parse_args(argv)
    try:
        return Server(a.socket, a.address, a.idle_timeout).serve()
    except StoreError as e:  # ServerError, ClusterError (a cluster it cannot join)
        print(f"alike: error: {e.message}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
