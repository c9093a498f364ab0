"""Sources: where disks come from. One module per platform behind one contract (base.py).

`open_source(spec)` parses a source spec such as `image:/path/web.raw` or
`kvm:qemu:///system` (the VMs of a libvirt connection).
"""
from __future__ import annotations

from ..config import absolute_source  # noqa: F401  (here for the sources' users; it lives where a thin client can import it without numpy)
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


__all__ = ["Disk", "DiskInfo", "Snapshot", "Source", "SourceError", "VMInfo", "VMNotFound", "absolute_source",
           "open_source"]
