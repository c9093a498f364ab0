"""Sources: where disks come from. One module per platform behind one contract (base.py).

`open_source(spec)` parses a source spec such as `image:/path/web.raw` or
`kvm:qemu:///system` (the VMs of a libvirt connection).
"""
from __future__ import annotations

from .base import Disk, DiskInfo, Snapshot, Source, SourceError, VMInfo, VMNotFound


def open_source(spec: str, **options) -> Source:
    kind, sep, rest = spec.partition(":")
    if not sep or not rest:
        raise SourceError(f"source {spec!r} is not of the form KIND:WHAT (for example image:/path/disk.raw)")
    if kind == "image":
        from .image import ImageSource

        return ImageSource(rest, **options)
    if kind == "kvm":
        from .kvm import KvmSource

        return KvmSource(rest, **options)
    if kind == "xen":
        from .xen import XenSource

        return XenSource(rest, **options)
    if kind == "vmware":
        from .vmware import VmwareSource

        return VmwareSource(rest, **options)
    raise SourceError(f"source kind {kind!r} is not supported: use image:PATH, kvm:LIBVIRT-URI, xen:POOL-URL "
                      "or vmware:VCENTER-URL")


def absolute_source(spec: str, base: str | None = None) -> str:
    """`image:` paths made absolute (from `base`, else the working folder); other sources as they are."""
    import os

    kind, sep, rest = spec.partition(":")
    if kind != "image" or not sep or not rest:
        return spec
    return "image:" + ",".join(os.path.abspath(os.path.join(base, p) if base else p) for p in rest.split(","))


__all__ = ["Disk", "DiskInfo", "Snapshot", "Source", "SourceError", "VMInfo", "VMNotFound", "absolute_source",
           "open_source"]
