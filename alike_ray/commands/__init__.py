"""One module per CLI command family (borg's archiver/*_cmd.py shape).

Each module here defines `register(add, sub)`: `add(name, fn, help, desc)` makes a sub-command
with the common options (--store, --endpoint, --profile, --json) and returns its parser; `sub` is
the argparse sub-parsers object for commands that need another shape. `alike_ray.cli` finds the
modules by listing this package, so a new command needs no edit anywhere else. Import heavy
libraries inside the command functions: `alike --help` must stay fast.
"""
from __future__ import annotations

import importlib
import pkgutil


def register_all(add, sub) -> None:
    for m in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if not m.name.startswith("_"):
            importlib.import_module(f"{__name__}.{m.name}").register(add, sub)
