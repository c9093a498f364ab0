"""One module per CLI command family (borg's archiver/*_cmd.py shape).

Each module here defines `register(add, sub)`: `add(name, fn, help, desc)` makes a sub-command
with the common options (--store, --endpoint, --profile, --json) and returns its parser; `sub` is
the argparse sub-parsers object for commands that need another shape. `alike_ray.cli` finds the
modules by listing this package, so a new command needs no edit anywhere else (FIRST only puts
the everyday commands first in `alike --help`). Import heavy libraries inside the command
functions: `alike --help` must stay fast.

A module whose command may run in `alike server` declares it in SERVED (see Served); the server
finds it through server_command, never by name in cli.py. What a command does beyond parsing
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


def register_all(add, sub) -> None:
    for name in sorted(_modules(), key=lambda n: (FIRST.index(n) if n in FIRST else len(FIRST), n)):
        importlib.import_module(f"{__name__}.{name}").register(add, sub)


@dataclass(frozen=True)
class Served:
    """A command `alike server` runs for its clients (the others run in the client's process).
    A module declares its own in SERVED = {"command as typed": Served(...)}."""
    fn: Callable  # the handler, run in the server with the client's parsed arguments
    # in the client, before sending: make the arguments mean the same in the server, which has
    # another working folder and environment (relative paths, $ALIKE_STORE)
    client_args: Callable[[dict], None]


def _modules() -> list[str]:
    return [m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")]


def server_command(command: str) -> Served | None:
    """What `alike server` runs for `command` ("backup", "job run"), else None."""
    for name in _modules():
        found = getattr(importlib.import_module(f"{__name__}.{name}"), "SERVED", {}).get(command)
        if found is not None:
            return found
    return None
