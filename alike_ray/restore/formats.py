"""Disk formats of restored disks, through qemu-img (never a hand-written VHD/VHDX writer).

A version is first restored to a sparse raw file; `convert()` turns it into qcow2, VHD (qemu's
`vpc`) or VHDX, then checks the result with `qemu-img check` (where the format supports it)
and `qemu-img compare` against the raw file before it takes the target's name.
"""
from __future__ import annotations

import os
import shutil
import subprocess

from storage.errors import StoreError

FORMATS = {"raw": "raw", "qcow2": "qcow2", "vhd": "vpc", "vhdx": "vhdx"}
EXTENSIONS = {"raw": ".raw", "qcow2": ".qcow2", "vhd": ".vhd", "vhdx": ".vhdx"}
CHECKABLE = {"qcow2", "vhdx"}


class FormatError(StoreError):
    """{detail}"""


def fmt_for(target: str, fmt: str | None) -> str:
    if fmt:
        if fmt not in FORMATS:
            raise FormatError(f"format {fmt!r} is not known: use one of {', '.join(FORMATS)}")
        return fmt
    ext = os.path.splitext(target)[1].lower().lstrip(".")
    return ext if ext in FORMATS else "raw"


def _run(*cmd):
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode:
        raise FormatError(f"{cmd[0]} {cmd[1]} failed: {(p.stderr or p.stdout).strip().splitlines()[-1:]}")
    return p.stdout


def convert(raw: str, target: str, fmt: str) -> dict:
    """raw -> target in `fmt`, checked. The raw file is left for the caller to remove."""
    if not shutil.which("qemu-img"):
        raise FormatError("qemu-img is not installed: install the qemu-utils package to restore to qcow2/VHD/VHDX")
    tmp = os.path.join(os.path.dirname(os.path.abspath(target)), f".{os.path.basename(target)}.alike-convert")
    try:
        opts = ["-o", "subformat=dynamic"] if fmt in ("vhd", "vhdx") else []
        _run("qemu-img", "convert", "-f", "raw", "-O", FORMATS[fmt], *opts, raw, tmp)
        checked = False
        if fmt in CHECKABLE:
            _run("qemu-img", "check", "-f", FORMATS[fmt], tmp)
            checked = True
        # VHD rounds the size up to its CHS geometry: compare in non-strict mode (the tail reads as zeros)
        _run("qemu-img", "compare", "-f", "raw", "-F", FORMATS[fmt], raw, tmp)
        os.replace(tmp, target)
        return {"format": fmt, "checked": checked, "compared": True}
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
