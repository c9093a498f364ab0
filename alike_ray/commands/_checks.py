"""Checks of a command's arguments that need no Ray, made before Ray starts (which takes seconds):
a typo costs a moment, and gets one `alike: error:` line and exit 2 (bad input). What only the
source or the store can say (a VM that is gone, an unreadable disk: exit 5) is left to them.
Not a command module (the leading underscore keeps it out of the registry)."""
from __future__ import annotations

import os
import stat

from storage.errors import InvalidValue


def image_path(path: str) -> None:
    """An image given on the command line must be a file or a block device that exists."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise InvalidValue(f"image {path} does not exist: check the path") from None
    except OSError as e:  # e.g. a path through a file: the source says it better
        raise InvalidValue(f"image {path} cannot be used: {e.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise InvalidValue(f"image {path} is a folder: give a disk image file or block device")
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise InvalidValue(f"image {path} is not a file or a block device: give a disk image file or block device")


def open_source(spec: str, **options):
    """open_source without a Ray node (nothing is read yet): a spec it cannot parse is bad
    input (exit 2), and the paths of an image: source are checked."""
    from ..sources import SourceError
    from ..sources import open_source as _open

    kind, sep, rest = spec.partition(":")
    try:
        src = _open(spec, **options)
    except SourceError as e:  # the spec itself: its form or its kind
        hint = f"; for a disk image write image:{spec}" if not sep and os.path.exists(spec) else ""
        raise InvalidValue(f"{e}{hint}") from None
    if kind == "image":
        for path in filter(None, rest.split(",")):
            image_path(path)
    return src


def at_least(value: int, least: int, flag: str) -> int:
    if value < least:
        raise InvalidValue(f"{flag} {value} is not allowed: give {least} or more")
    return value


def store_target(url: str, endpoint: str | None, profile: str | None):
    """The spec of a store named on the command line (--to, --vault-to...), its form checked
    (scheme, bucket) without touching it. -> the spec."""
    from storage.backend import open_backend, store_spec

    spec = store_spec(url, endpoint, profile)
    open_backend(spec)  # no I/O: parses the URL, refuses unknown schemes
    return spec


def output_file(path: str, force: bool) -> None:
    """A file a command writes: not a folder, in a folder that exists and may be written, not
    there already unless --force."""
    if os.path.isdir(path):
        raise InvalidValue(f"{path} is a folder: give the path of a file to write (e.g. {os.path.join(path, 'disk.raw')})")
    if os.path.lexists(path) and not force:
        raise InvalidValue(f"{path} exists: choose another target or pass --force to overwrite it")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise InvalidValue(f"folder {folder} does not exist: create it first")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InvalidValue(f"cannot write in folder {folder}: permission denied (choose another target)")
