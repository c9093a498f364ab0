"""One module per CLI command family (borg's archiver/*_cmd.py shape).

Each module here defines `register(add, sub)`: `add(name, fn, help, desc)` makes a sub-command
with the common options (--store, --endpoint, --profile, --json) and returns its parser; `sub` is
the argparse sub-parsers object for commands that need another shape. `alike_ray.cli` finds the
modules by listing this package, so a new command needs no edit anywhere else (FIRST only puts
the everyday commands first in `alike --help`). Import heavy libraries inside the command
functions: `alike --help` must stay fast.

A module whose command may run in `alike server` declares it in SERVED (see Served) and gives
its parser the options --server/--no-server (add_server_options); the client and the server find
it through server_command, never by name in cli.py. What a command does beyond parsing
and printing belongs below this layer (alike_ray/jobs.py, pipelines/), where the server and a
scheduler call it directly. _checks.py holds the checks of arguments made before Ray starts.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Callable


# the order of `alike --help`: these first, then the others by name
FIRST = ("init", "backup", "vault", "versions", "restore", "verify", "stats", "mount", "instant", "inventory", "job")


def register_all(add, sub, only: str | None = None) -> None:
    """Every command module's commands; with `only`, the name of a module, that module's alone."""
    names = _modules()
    if only in names:
        names = [only]
    for name in sorted(names, key=lambda n: (FIRST.index(n) if n in FIRST else len(FIRST), n)):
        importlib.import_module(f"{__name__}.{name}").register(add, sub)


@dataclass(frozen=True)
class Served:
    """A command `alike server` runs for its clients (the others run in the client's process).
    A module declares its own in SERVED = {"command as typed": Served(...)}."""
    fn: Callable  # the handler, run in the server with the client's parsed arguments
    # in the client, before sending: make the arguments mean the same in the server, which has
    # another working folder and environment (relative paths, $ALIKE_STORE)
    client_args: Callable[[dict], None]


def add_server_options(sp, what: str) -> None:
    """--server [SOCKET] and --no-server, for a command declared in SERVED."""
    sp.add_argument("--server", nargs="?", const=True, metavar="SOCKET",
                    help=f"run the {what} in the `alike server` at SOCKET (default: $ALIKE_SERVER, else the "
                         "default socket), and fail if none runs there. Without --server, the server at the default "
                         "socket runs it when one runs there (its Ray workers are up already: the command costs "
                         "only its own work)")
    sp.add_argument("--no-server", action="store_true",
                    help=f"run the {what} in this process, with a Ray job of its own, even when a server runs "
                         "(also: ALIKE_SERVER=off)")


def absolute_args(d: dict, stores=("store",), paths=()) -> None:
    """Make a served command's arguments mean in the server what they mean here (Served.client_args):
    `stores` (local store folders; --store falls back to this shell's $ALIKE_STORE) and `paths`
    (files and folders) made absolute from this working folder."""
    import os

    from ..config import absolute_store

    for k in stores:
        v = d.get(k)
        if k == "store" and not v:
            v = os.environ.get("ALIKE_STORE")
        d[k] = absolute_store(v)
    for k in paths:
        if isinstance(d.get(k), str) and d[k]:
            d[k] = absolute_path(d, d[k])


def absolute_path(d: dict, path: str) -> str:
    """`path` made absolute for the server; a relative one is remembered in d["_shown"], so that
    the server shows it to the user as given (a message naming the file says what a local run says)."""
    import os

    if os.path.isabs(path):
        return path
    full = os.path.abspath(path)
    d.setdefault("_shown", {})[full] = path
    return full


def _modules() -> list[str]:
    return [m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")]


def server_command(command: str) -> Served | None:
    """What `alike server` runs for `command` ("backup", "job run"), else None."""
    for name in _modules():
        found = getattr(importlib.import_module(f"{__name__}.{name}"), "SERVED", {}).get(command)
        if found is not None:
            return found
    return None
