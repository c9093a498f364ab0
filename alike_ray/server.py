"""`alike server`: a long-lived alike process that runs backups in a warm Ray job.

Every `alike backup` process starts a Ray job of its own: worker processes, a snapshot actor,
index shard actors, each importing Python, Ray, numpy and pyarrow - 2-3 s on 2 cores before the
first block is read, which is most of a changed-block-tracking backup of a quiet VM. The server
joins Ray once and keeps those processes (pipelines/service.py); `alike backup --server` sends
it the command and prints what it says, so a backup costs its own work only.

Wire protocol, on a Unix socket (mode 0600: only its owner may use it, as with the store):
the client sends one JSON line, the server answers with JSON lines.
  {"op": "run", "command": "backup", "args": {...}, "tty": bool, "pid": N}
      -> {"o": text} (stdout), {"e": text} (stderr) ... then {"exit": code}
  {"op": "status"} -> {"status": {...}}
  {"op": "stop"}   -> {"ok": true}; the server stops once running commands end
The commands it runs are those whose module in alike_ray/commands/ declares them in SERVED
(`backup`, `job run`). A command runs in the server exactly as it runs locally (same function,
same messages, same exit codes); its output is routed to the client by thread, so several clients
may run backups at once. If the client goes away, the backup still ends (commits or fails
cleanly) and its result is written to the server's log: nothing is left half-done.
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


def default_socket() -> str:
    env = os.environ.get("ALIKE_SERVER")
    if env:
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


# ---------------------------------------------------------------------------------------------
# client side: no Ray, no numpy - a request costs a connect and a few JSON lines

def _connect(sock: str, timeout: float | None = 5) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(sock)
    except FileNotFoundError:
        s.close()
        raise ServerError(f"no alike server at {sock}: start one with `alike server start --socket {sock}`, "
                          "or run without --server (and without $ALIKE_SERVER)") from None
    except (ConnectionRefusedError, OSError) as e:
        s.close()
        if isinstance(e, PermissionError):
            raise ServerError(f"not allowed to use the alike server at {sock}: it belongs to another user") from None
        raise ServerError(f"the alike server at {sock} does not answer ({e.strerror or e}): it has stopped; "
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


def run_remote(args, command: str) -> int:
    """Run a parsed command in the server at args.server; print its output here. -> exit code."""
    if getattr(args, "address", None):
        raise ServerError("--address does not go with --server: the server joined its Ray cluster when it "
                          "started (alike server start --address ...)")
    from .commands import server_command

    served = server_command(command)
    if served is None:
        raise ServerError(f"the alike server does not run {command!r}: run it without --server")
    d = {k: v for k, v in vars(args).items() if k not in ("fn", "server") and
         isinstance(v, (str, int, float, bool, list, type(None)))}
    served.client_args(d)  # paths are the client's: the server has another working folder
    req = {"op": "run", "command": command, "args": d, "tty": sys.stderr.isatty(), "pid": os.getpid()}
    code = None
    try:
        for ans in request(args.server, req, timeout=10):
            if "o" in ans:
                sys.stdout.write(ans["o"])
                sys.stdout.flush()
            elif "e" in ans:
                sys.stderr.write(ans["e"])
                sys.stderr.flush()
            elif "exit" in ans:
                code = int(ans["exit"])
    except KeyboardInterrupt:
        print(f"alike: interrupted: the {command} goes on in the server at {args.server} and ends there "
              f"(committed or not: see `alike versions`, and the server's log {log_path(args.server)})",
              file=sys.stderr)
        return 130
    except (ConnectionResetError, BrokenPipeError):
        pass
    if code is None:
        raise ServerError(f"the alike server at {args.server} closed the connection before the {command} ended "
                          f"(did it stop or crash? see {log_path(args.server)}); a backup it did not finish "
                          "committed nothing", exit_code=1)
    return code


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
        self.send({"o" if stream == "stdout" else "e": text})


class Server:
    def __init__(self, sock: str, address: str | None):
        self.sock, self.address = sock, address
        self.started = time.time()
        self.running: dict[int, dict] = {}
        self.served = 0
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.pool = None
        self.srv = None
        self.seq = 0

    def log(self, msg: str) -> None:
        self.err.write(time.strftime("%Y-%m-%d %H:%M:%S ") + msg + "\n")
        self.err.flush()

    # -- life ------------------------------------------------------------------------------------
    def serve(self) -> int:
        import socketserver

        from pipelines.cluster import connect, local_node_id, pin_here
        from pipelines.service import WarmPool, install

        self.err = sys.stderr
        self._claim_socket()
        env = {k: os.environ[k] for k in ("ALIKE_CRASH_AT", "ALIKE_CRASH_FLAG", "ALIKE_DEBUG", "ALIKE_PACK_TARGET")
               if k in os.environ}
        connect(self.address, env or None, terminal=True)  # Ray's own lines: in its session logs
        self.err = sys.stderr  # (connect gave Python a stream of its own to our log or terminal)
        self.pool = WarmPool()
        install(self.pool)
        t0 = time.monotonic()
        self.pool.prewarm(pin_here(local_node_id()), modules=("alike_ray.sources.image", "alike_ray.sources.kvm"))
        self.log(f"warm: a snapshot actor and the read-task workers are up ({time.monotonic() - t0:.1f} s)")
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
        import signal

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: threading.Thread(target=self.stop, daemon=True).start())
        self.log(f"alike server ready on {self.sock} (pid {os.getpid()})")
        try:
            self.srv.serve_forever(poll_interval=0.2)
        finally:
            self.srv.server_close()
            try:
                os.unlink(self.sock)
            except OSError:
                pass
            self.pool.shutdown()
            self.log("alike server stopped")
        return 0

    def _claim_socket(self) -> None:
        _refuse_if_running(self.sock)
        os.makedirs(os.path.dirname(self.sock) or ".", mode=0o700, exist_ok=True)
        if os.path.exists(self.sock):
            os.unlink(self.sock)  # left by a server that died

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
                "ray_address": ray.get_runtime_context().gcs_address, "stopping": self.stopping.is_set(),
                "commands_served": self.served, "running": running, "warm": self.pool.stats()}

    def run(self, conn, req) -> None:
        import argparse

        from . import cli
        from .commands import server_command

        with self.lock:
            self.seq += 1
            n = self.seq
        command = req.get("command")
        client = _Client(conn, bool(req.get("tty")), f"[{n} {command} from pid {req.get('pid')}]", self.log)
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
        args = argparse.Namespace(**req.get("args", {}))
        args.fn = entry.fn
        args.server = None
        args.address = None
        info = {"id": n, "command": command, "client_pid": req.get("pid"),
                "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "what": " ".join(getattr(args, "sources", None) or [getattr(args, "file", "")]) +
                        "".join(f" --vm {v}" for v in (getattr(args, "vm", None) or []))}
        with self.lock:
            self.running[n] = info
        self.log(f"{client.label}: {info['what']} -> store {getattr(args, 'store', None)}")
        t0 = time.monotonic()
        sys.stdout.local.sink = sys.stderr.local.sink = client
        try:
            if os.environ.get("ALIKE_PROFILE"):
                import cProfile
                import pstats

                pr = cProfile.Profile()
                code = pr.runcall(cli.run_args, args)
                pstats.Stats(pr, stream=self.err).sort_stats("cumulative").print_stats(40)
            else:
                code = cli.run_args(args)
        except BaseException as e:  # a bug: the server goes on; the client gets one line
            import traceback

            self.log(f"{client.label}: internal error:\n{traceback.format_exc()}")
            client.send({"e": f"alike: error: internal error in the alike server: {type(e).__name__}: {e} "
                              f"(see {log_path(self.sock)})\n"})
            code = 1
        finally:
            sys.stdout.local.sink = sys.stderr.local.sink = None
            with self.lock:
                self.running.pop(n, None)
                self.served += 1
        self.log(f"{client.label}: exit {code} after {time.monotonic() - t0:.2f} s")
        client.send({"exit": code})


# ---------------------------------------------------------------------------------------------
# `alike server start`: the server as a background process

def start(sock: str, address: str | None, timeout: float = START_TIMEOUT) -> dict:
    import subprocess

    _refuse_if_running(sock)
    if address or os.environ.get("RAY_ADDRESS"):
        from pipelines.cluster import _check_reachable

        _check_reachable(address or os.environ["RAY_ADDRESS"])  # at once, not after the server gave up
    os.makedirs(os.path.dirname(sock) or ".", mode=0o700, exist_ok=True)
    logp = log_path(sock)
    cmd = [sys.executable, "-m", "alike_ray.server", "--socket", sock] + (["--address", address] if address else [])
    with open(logp, "ab") as logf:
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, start_new_session=True)
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
    a = ap.parse_args(argv)
    try:
        return Server(a.socket, a.address).serve()
    except StoreError as e:  # ServerError, ClusterError (a cluster it cannot join)
        print(f"alike: error: {e.message}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
