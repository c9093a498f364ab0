"""Real libvirt + QEMU for the kvm: tests: start the daemons, define and run VMs, write into
their disks through QEMU's block layer while they run, and keep the expected disk content.

QEMU runs as the libvirt-qemu user: images live under /var/lib/libvirt/images (which that
user can traverse) and libvirt hands them to it (dynamic ownership). Domains are of type
'qemu' (TCG: no /dev/kvm needed) and no guest OS boots; a "guest write" is the monitor's
`qemu-io -d <device>/virtio-backend "write -P PATTERN OFFSET LENGTH"`, which goes through
the device's block backend, so that dirty bitmaps see it exactly as they see a guest's.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
import xml.etree.ElementTree as ET

URI = "qemu:///system"
IMAGES = "/var/lib/libvirt/images"
PREFIX = "alike-test-"
# Names carry the test process's pid: a run removes its own VMs and those of dead runs, never
# those of another run going on on the same machine.
OWN = f"{PREFIX}{os.getpid()}-"


def _stale(name: str) -> bool:
    if name.startswith(OWN):
        return True
    pid = name[len(PREFIX):].split("-", 1)[0]
    if not name.startswith(PREFIX) or not pid.isdigit():
        return False
    return not os.path.exists(f"/proc/{pid}")


def _open():
    import libvirt

    libvirt.registerErrorHandler(lambda *a: None, None)
    return libvirt.open(URI)


def kvm_device_like_udev() -> None:
    """Give /dev/kvm the owner and mode that Debian's udev rules give it (root:kvm 0660) when a
    container left it root:root 0600. Else libvirtd, which probes QEMU as root but checks KVM as
    the libvirt-qemu user, finds its capability cache outdated at every call and probes QEMU
    again: 30 s for each domain defined."""
    import grp
    import stat

    try:
        st = os.stat("/dev/kvm")
        kvm = grp.getgrnam("kvm").gr_gid
    except (OSError, KeyError):
        return
    if os.geteuid() == 0 and (st.st_gid != kvm or not st.st_mode & stat.S_IRGRP):
        os.chown("/dev/kvm", 0, kvm)
        os.chmod("/dev/kvm", 0o660)


def start_libvirt() -> tuple[object | None, str]:
    """Connect to libvirtd, starting virtlogd and libvirtd first when they are not running
    (as CI does on a fresh machine). -> (connection, "") or (None, why not)."""
    try:
        import libvirt
    except ImportError:
        return None, "the libvirt Python binding is not installed (pip install libvirt-python)"
    kvm_device_like_udev()
    try:
        return _open(), ""
    except libvirt.libvirtError:
        pass
    for tool in ("libvirtd", "virtlogd"):
        if not shutil.which(tool) and not os.path.exists(f"/usr/sbin/{tool}"):
            return None, f"{tool} is not installed (apt-get install libvirt-daemon-system qemu-system-x86)"
    if os.geteuid() != 0:
        return None, "libvirtd is not running and only root can start it here"
    for tool in ("virtlogd", "libvirtd"):
        if subprocess.run(["pgrep", "-x", tool], capture_output=True).returncode:
            path = shutil.which(tool) or f"/usr/sbin/{tool}"
            p = subprocess.run([path, "-d"], capture_output=True, text=True)
            if p.returncode:
                return None, f"{tool} does not start: {p.stderr.strip()}"
    err = ""
    for _ in range(100):
        try:
            return _open(), ""
        except libvirt.libvirtError as e:
            err = e.get_error_message()
            time.sleep(0.2)
    return None, f"libvirtd started but does not answer at {URI}: {err}"


def remove_domain(dom) -> None:
    """Stop and undefine a domain with its checkpoints' metadata, whatever state it is in."""
    import libvirt

    try:
        if dom.isActive():
            dom.destroy()
    except libvirt.libvirtError:
        pass
    try:
        for cp in dom.listAllCheckpoints(0):
            cp.delete(libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)
    except libvirt.libvirtError:
        pass
    try:
        dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA)
    except libvirt.libvirtError:
        pass


def cleanup_domains(conn) -> None:
    """Remove this run's test domains (running or not) with their checkpoints and images, and
    those left by killed runs."""
    from concurrent.futures import ThreadPoolExecutor

    doms = [dom for dom in conn.listAllDomains(0) if _stale(dom.name())]
    with ThreadPoolExecutor(8) as pool:  # each stop waits on its QEMU: all at once
        list(pool.map(remove_domain, doms))
    for name in os.listdir(IMAGES) if os.path.isdir(IMAGES) else []:
        if _stale(name):
            shutil.rmtree(os.path.join(IMAGES, name), ignore_errors=True)


def image_dir() -> str:
    d = os.path.join(IMAGES, OWN + uuid.uuid4().hex[:8])
    os.makedirs(d)
    os.chmod(d, 0o755)
    return d


# The firmware boots only from an empty CD-ROM drive (strict boot order): it finds nothing and
# halts, instead of running the boot sector of our data disks, which holds no code.
NO_BOOT = ("<disk type='file' device='cdrom'><driver name='qemu' type='raw'/><target dev='hdc' bus='ide'/>"
           "<readonly/><boot order='1'/></disk>")


def domain_xml(name: str, disks: list[str], description: str = "", metadata_tags: str = "") -> str:
    """A TCG domain with one virtio qcow2 (or raw) disk per path, vda, vdb..."""
    dev = ""
    for i, path in enumerate(disks):
        fmt = "qcow2" if path.endswith(".qcow2") else "raw"
        dev += (f"<disk type='file' device='disk'><driver name='qemu' type='{fmt}'/>"
                f"<source file='{path}'/><target dev='vd{chr(97 + i)}' bus='virtio'/></disk>")
    md = (f"<metadata><a:tags xmlns:a='https://alike-ray.example/xmlns/1'>{metadata_tags}</a:tags></metadata>"
          if metadata_tags else "")
    return (f"<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>"
            f"<description>{description}</description>{md}"
            f"<os><type arch='x86_64' machine='pc'>hvm</type></os><features><acpi/></features>"
            f"<devices>{dev}{NO_BOOT}<memballoon model='none'/></devices></domain>")


def vm_name(name: str) -> str:
    return OWN + name


def define(conn, name: str, disks: list[str], start: bool = True, **kw):
    """Define (and start) the VM `name` (a name made by vm_name())."""
    dom = conn.defineXML(domain_xml(name, disks, **kw))
    if start:
        dom.create()
    return dom


def attach_disk(dom, path: str, target: str) -> None:
    """Hot-plug a qcow2 disk into the running VM and its persistent definition."""
    import libvirt

    xml = (f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
           f"<source file='{path}'/><target dev='{target}' bus='virtio'/></disk>")
    dom.attachDeviceFlags(xml, libvirt.VIR_DOMAIN_AFFECT_LIVE | libvirt.VIR_DOMAIN_AFFECT_CONFIG)


def qdev(dom, target: str) -> str:
    """The QOM path of the block backend behind disk `target` of the running VM."""
    root = ET.fromstring(dom.XMLDesc(0))
    for d in root.findall("./devices/disk"):
        if d.find("target").get("dev") == target:
            return f"/machine/peripheral/{d.find('alias').get('name')}/virtio-backend"
    raise KeyError(target)


class Disk:
    """A VM disk and what its content must be: `expected` is a raw file that receives every
    guest write we make, so that it equals the disk at any moment; `snapshot_copy()` keeps it
    as it is now (the content a backup taken now must restore to)."""

    def __init__(self, dom, target: str, expected: str):
        self.dom, self.target, self.expected = dom, target, expected
        self.written = []

    def write(self, offset: int, length: int, pattern: int) -> None:
        import libvirt_qemu

        cmd = f'qemu-io -d {qdev(self.dom, self.target)} "write -P {pattern:#x} {offset} {length}"'
        out = libvirt_qemu.qemuMonitorCommand(self.dom, cmd, libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)
        if "error" in out.lower() or "fail" in out.lower():
            raise RuntimeError(f"guest write failed: {cmd}: {out}")
        with open(self.expected, "r+b") as f:
            f.seek(offset)
            f.write(bytes([pattern]) * length)
        self.written.append((offset, length))

    def snapshot_copy(self, path: str) -> str:
        subprocess.run(["cp", "--sparse=always", self.expected, path], check=True)
        return path
