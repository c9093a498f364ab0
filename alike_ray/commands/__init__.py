"""One module per CLI command family (borg's archiver/*_cmd.py shape).

Each module here defines `register(add, sub)`: `add(name, fn, help, desc)` makes a sub-command
with the common options (--store, --endpoint, --profile, --json) and returns its parser; `sub` is
the argparse sub-parsers object for commands that need another shape. `alike_ray.cli` finds the
modules by listing this package, so a new command needs no edit anywhere else (FIRST only puts
the everyday commands first in `alike --help`). Import heavy libraries inside the command
functions: `alike --help` must stay fast.
"""
from __future__ import annotations

import importlib
import pkgutil


# the order of `alike --help`: these first, then the others by name
FIRST = ("init", "backup", "vault", "versions", "restore", "verify", "stats", "mount", "instant", "inventory", "job")


def register_all(add, sub) -> None:
    names = [m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")]
    for name in sorted(names, key=lambda n: (FIRST.index(n) if n in FIRST else len(FIRST), n)):
        importlib.import_module(f"{__name__}.{name}").register(add, sub)


# commands `alike server` runs for its clients (the rest run in the client's process):
# the command as the client typed it -> (module here, handler)
SERVED = {"backup": ("backup", "cmd_backup"), "job run": ("job", "cmd_job_run")}


def server_command(command: str):
    """The handler `alike server` runs for `command`, else None (not one the server runs)."""
    if command not in SERVED:
        return None
    module, fn = SERVED[command]
    return getattr(importlib.import_module(f"{__name__}.{module}"), fn)
