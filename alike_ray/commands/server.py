"""`alike server start|run|stop|status`: the long-lived alike process (alike_ray/server.py)."""
from __future__ import annotations

import json

from ..ui import _emit, out

HELP = """A long-lived alike process that joins Ray once and keeps its workers warm (a snapshot
actor, index shard actors, read-task workers). While it runs at the default socket ($ALIKE_SERVER,
else the one below), backup, restore, verify, vault, repair, gc, files and job run go to it: the
same messages, JSON and exit codes as in a process of their own, without the seconds each new
process spends starting a Ray job (--no-server, or ALIKE_SERVER=off, runs a command in its own
process; a command whose environment differs from the server's, in AWS_* or ALIKE_* settings, the
Ray cluster or the umask, runs in its own process too). On a terminal, a command that finds no
server starts one that stops after 10 min without a command ($ALIKE_SERVER_IDLE;
ALIKE_SERVER_AUTOSTART=0: never). Its socket is owner-only (mode 0600). Ctrl-C on a client
interrupts its command in the server; a client that went away otherwise leaves its command to
end there (committed or cleanly failed), its output in the server's log, next to the socket
(SOCKET without .sock + .log). Restart the server after upgrading alike."""


def register(add, sub) -> None:
    sp = sub.add_parser("server", help="a long-lived alike process with warm Ray workers (start, stop, status)",
                        description=HELP)
    ssub = sp.add_subparsers(dest="server_command", metavar="SERVERCOMMAND")

    def sadd(name, fn, help_):
        from ..server import default_socket

        p = ssub.add_parser(name, help=help_, description=help_[0].upper() + help_[1:] + ". " + HELP)
        p.add_argument("--socket", default=None,
                       help=f"the server's Unix socket (default: $ALIKE_SERVER, else {default_socket()})")
        p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
        p.set_defaults(fn=fn)
        return p

    p = sadd("start", cmd_start, "start the server in the background; returns once it is ready")
    p.add_argument("--address", help="Ray cluster the server joins (default: $RAY_ADDRESS, else a local instance "
                                     "of its own)")
    p.add_argument("--timeout", type=float, default=120, help="seconds to wait for it to get ready (default 120)")
    _idle_option(p)
    p = sadd("run", cmd_run, "run the server in the foreground (for systemd and the like); Ctrl-C or SIGTERM "
                             "stops it once its running commands end")
    p.add_argument("--address", help="Ray cluster the server joins (default: $RAY_ADDRESS, else a local instance)")
    _idle_option(p)
    sadd("stop", cmd_stop, "stop the server once its running commands end")
    sadd("status", cmd_status, "show the server's pid, Ray cluster, running commands and warm workers")
    sp.set_defaults(fn=lambda a: (sp.print_help(), 2)[1])


def _idle_option(p) -> None:
    p.add_argument("--idle-timeout", metavar="DURATION", default="0",
                   help="stop after this long without a command, e.g. 10m, 2h (default 0: never)")


def _idle(args) -> float | None:
    from .gc import parse_duration

    return parse_duration(args.idle_timeout, "--idle-timeout") or None


def _sock(args) -> str:
    from ..server import default_socket

    import os

    return os.path.abspath(args.socket) if args.socket else default_socket()


def cmd_start(args) -> int:
    from ..server import start

    st = start(_sock(args), args.address, args.timeout, idle=_idle(args))
    _emit(args, st, f"alike server ready on {st['socket']} (pid {st['pid']}, Ray at {st['ray_address']}, "
                    f"log {st['log']})")
    return 0


def cmd_run(args) -> int:
    from ..server import Server

    return Server(_sock(args), args.address, _idle(args)).serve()


def cmd_stop(args) -> int:
    from ..server import stop

    st = stop(_sock(args))
    _emit(args, {"stopped": True, "pid": st["pid"], "socket": st["socket"]},
          f"alike server (pid {st['pid']}) on {st['socket']} stopped")
    return 0


def cmd_status(args) -> int:
    from ..server import status

    st = status(_sock(args))
    if args.json:
        out(json.dumps(st))
        return 0
    w = st["warm"]
    out(f"alike server pid {st['pid']} on {st['socket']}, up {st['uptime_seconds']:.0f} s, Ray at "
        f"{st['ray_address']}{' (stopping)' if st['stopping'] else ''}")
    out(f"  commands served: {st['commands_served']}; running: {len(st['running'])}")
    for r in st["running"]:
        out(f"    [{r['id']}] {r['command']} {r['what']} (since {r['started']}, client pid {r['client_pid']})")
    out(f"  warm: {w['idle_actors']} idle snapshot actor(s), index shard sets {w['idle_indexes'] or 'none'}; "
        f"actors started {w['actors_started']}, reused {w['actors_reused']}; index sets started "
        f"{w['indexes_started']}, reused {w['indexes_reused']}")
    if st.get("idle_timeout_seconds"):
        from ..server import _say_duration

        out(f"  stops after {_say_duration(st['idle_timeout_seconds'])} without a command")
    out(f"  log: {st['log']}")
    return 0
