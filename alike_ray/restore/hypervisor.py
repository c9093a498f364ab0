"""Full restore into a hypervisor: a new KVM/libvirt VM from any version, whatever platform the
version came from. Its disks are restored into the host's image folder as qcow2 (through
qemu-img, checked), then a domain is defined with them (virtio disks, no NIC: connect it as your
network needs), and started when asked. A failure removes what it made. VMware and Xen targets
come with their source issues.
"""
from __future__ import annotations

import os
import uuid
from xml.sax.saxutils import escape

from storage.errors import StoreError

DEFAULT_POOL = "/var/lib/libvirt/images"


class HypervisorError(StoreError):
    """{detail}"""


def _connect(uri: str):
    try:
        import libvirt
    except ImportError:
        raise HypervisorError("libvirt-python is not installed: pip install 'alike-ray[kvm]' (needs libvirt-dev)") from None
    libvirt.registerErrorHandler(lambda *a: None, None)
    try:
        return libvirt, libvirt.open(uri)
    except libvirt.libvirtError as e:
        raise HypervisorError(f"cannot connect to {uri}: {e.get_error_message()}") from None


def check_target(uri: str, name: str, pool: str) -> None:
    libvirt, conn = _connect(uri)
    try:
        try:
            conn.lookupByName(name)
            raise HypervisorError(f"{uri} already has a VM named {name!r}: choose another --name")
        except libvirt.libvirtError:
            pass
    finally:
        conn.close()
    if not uri.startswith(("qemu:///", "qemu+unix:///")):
        raise HypervisorError(f"restoring into a remote host ({uri}) needs its storage: not supported yet; "
                              "restore the disks with --to FOLDER and copy them there")
    if not os.path.isdir(pool):
        raise HypervisorError(f"image folder {pool} does not exist: create it or pass --pool-dir")


def domain_xml(name: str, disks: list[str], memory_mib: int, vcpus: int) -> str:
    kind = "kvm" if os.access("/dev/kvm", os.R_OK | os.W_OK) else "qemu"
    disk_xml = "".join(
        f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
        f"<source file='{escape(p)}'/><target dev='vd{chr(ord('a') + i)}' bus='virtio'/></disk>"
        for i, p in enumerate(disks))
    return (f"<domain type='{kind}'><name>{escape(name)}</name><uuid>{uuid.uuid4()}</uuid>"
            f"<description>restored by alike</description>"
            f"<memory unit='MiB'>{memory_mib}</memory><vcpu>{vcpus}</vcpu>"
            f"<os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>"
            f"<features><acpi/></features><devices>{disk_xml}<graphics type='vnc' autoport='yes'/></devices>"
            f"</domain>")


def define(uri: str, name: str, disks: list[str], memory_mib: int = 1024, vcpus: int = 1,
           start: bool = False) -> dict:
    libvirt, conn = _connect(uri)
    try:
        try:
            dom = conn.defineXML(domain_xml(name, disks, memory_mib, vcpus))
        except libvirt.libvirtError as e:
            raise HypervisorError(f"libvirt refused the new VM {name!r}: {e.get_error_message()}") from None
        if start:
            try:
                dom.create()
            except libvirt.libvirtError as e:
                dom.undefine()
                raise HypervisorError(f"VM {name!r} was defined but did not start: {e.get_error_message()}") from None
        return {"uri": uri, "name": name, "uuid": dom.UUIDString(), "disks": disks,
                "state": "running" if start else "shut off"}
    finally:
        conn.close()
