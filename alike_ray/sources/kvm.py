"""`kvm:` source: the VMs of a libvirt connection (`kvm:qemu:///system`, any libvirt URI).

Inventory: every domain of the connection, named by its libvirt name (its UUID is the id),
with its state, its disks (device='disk', named by target: vda, sdb...) and their sizes,
and tags taken from the domain's metadata: a `<tags>` element of any namespace under
`<metadata>` and `tags: a, b` lines or `#tag` words in `<description>`.

Snapshot: libvirt's backup API in pull mode (virDomainBackupBegin). One call freezes every
disk at one point in time, creates a checkpoint (a persistent QEMU dirty bitmap in each
qcow2 disk) and serves the frozen disks over NBD while the VM runs on; QEMU keeps the
frozen view with copy-before-write into a scratch file. We chose it over external snapshots
because it leaves the VM's disk chain untouched (no overlay to block-commit afterwards, which
can fail and leave a VM on an overlay), and because the dirty bitmaps live in the disks and
are exposed by the same export (`qemu:dirty-bitmap:backup-<disk>`), next to the allocation
map (`base:allocation`) that gives whitespace awareness.

A shut-off VM (on a local URI) is read from its disk files, each served read-only by a
qemu-nbd of ours: its disks do not change, and CBT goes on from the newest checkpoint, whose
bitmap is still in the disk (exported with `qemu-nbd --bitmap`); that checkpoint stays the
marker. While it is read, QEMU's image locks keep the VM from starting. A shut-off VM of a
remote libvirt host is refused with a clear message.

Changed block tracking: the CBT marker of a disk is the name of the checkpoint made with the
backup (`alike-<time>-<random>`). A backup is incremental from the newest `alike-` checkpoint
that holds a bitmap for the disk at the disk's current size; `changed_extents(since)` gives
that checkpoint's dirty extents when `since` names it, else None (the disk is read in full:
previous backup failed or was killed, checkpoint deleted, bitmap lost, disk resized or added)
and the new checkpoint re-arms CBT. A disk without persistent bitmaps (raw) is always read
in full. If libvirt refuses the incremental backup (a broken bitmap), the backup starts
again as a full one, after dropping our checkpoints.

Release (also when the backup failed): the backup job is ended (its export closes and
libvirt deletes the scratch files), and checkpoints no longer needed are deleted: after a
success all older `alike-` checkpoints, after a failure the new one (the previous one stays
the base of the next CBT backup). A backup killed before release leaves its job running:
the next snapshot of that VM ends it (exports named `alike-*` are ours) and reads in full;
a killed backup of a shut-off VM leaves qemu-nbd servers, which the next snapshot stops
(their pid files are in /run/alike-kvm).
Checkpoints not named `alike-` are never touched.

Reads: `KvmDisk` is picklable and reads over NBD (TCP) from any Ray worker that reaches
the NBD address: `nbd_host` (default 127.0.0.1 for a local URI, the URI's host for a remote
one). On a loopback address reads are pinned to `node_id`, the node of the libvirt host.

Bindings: libvirt-python from PyPI, built against the distribution's libvirt-dev (through
pkg-config), so that it imports in the interpreter that runs the CLI and Ray workers;
Debian's python3-libvirt is built for Debian's own python3 only. NBD: our own small client
(nbd.py), as libnbd's Python bindings exist only as Debian's python3-libnbd.
"""
from __future__ import annotations

import json
import logging
import os
import re
import secrets
import socket
import sys
import time
import xml.etree.ElementTree as ET
from urllib.parse import urlparse

import numpy as np

from . import nbd
from .base import ExtentDisk, Snapshot, Source, SourceError, VMInfo, VMNotFound

log = logging.getLogger("alike.kvm")

PREFIX = "alike-"
_STATES = {0: "unknown", 1: "running", 2: "blocked", 3: "paused", 4: "shutting down", 5: "shut off",
           6: "crashed", 7: "suspended"}


def _libvirt():
    try:
        import libvirt
    except ImportError:
        raise SourceError("the kvm: source needs the libvirt Python binding: pip install 'alike-ray[kvm]' "
                          "(libvirt-python; it builds against libvirt-dev and pkg-config)") from None
    libvirt.registerErrorHandler(lambda *a: None, None)  # errors come as exceptions, not on stderr
    return libvirt


def _parse_tags(root: ET.Element) -> list[str]:
    tags: set[str] = set()
    md = root.find("metadata")
    if md is not None:
        for el in md.iter():
            if el.tag.rsplit("}", 1)[-1] == "tags" and el.text:
                tags.update(t for t in re.split(r"[,\s]+", el.text) if t)
    desc = root.findtext("description") or ""
    for line in desc.splitlines():
        m = re.match(r"\s*tags\s*[:=]\s*(.*)", line, re.I)
        if m:
            tags.update(t for t in re.split(r"[,\s]+", m.group(1)) if t)
    tags.update(re.findall(r"(?:^|\s)#([\w.-]+)", desc))
    return sorted(tags)


def _disks(root: ET.Element) -> list[dict]:
    out = []
    for d in root.findall("./devices/disk"):
        if d.get("device", "disk") != "disk":
            continue  # cdrom, floppy, lun: not the VM's data
        tgt = d.find("target")
        if tgt is None or not tgt.get("dev"):
            continue
        drv = d.find("driver")
        src = d.find("source")
        out.append({"name": tgt.get("dev"), "type": d.get("type", "file"),
                    "format": drv.get("type", "raw") if drv is not None else "raw",
                    "path": (src.get("file") or src.get("dev")) if src is not None else None,
                    "readonly": d.find("readonly") is not None})
    return out


def _free_port(host: str) -> int:
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.bind((host, 0))
            return s.getsockname()[1]
    except OSError:  # not an address of this machine (a remote libvirt host): take a high port
        return 49152 + secrets.randbelow(16000)


def _is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


_CONNS: dict = {}  # (host, port, export) -> NBDClient, per worker process: reused across read tasks


def _client(host: str, port: int, export: str) -> nbd.NBDClient:
    key = (host, port, export)
    c = _CONNS.get(key)
    if c is None:
        while len(_CONNS) >= 4:  # older backups' connections: their exports are gone
            _CONNS.pop(next(iter(_CONNS))).close()
        try:
            c = nbd.NBDClient(host, port, export)
        except (OSError, nbd.NBDError) as e:
            raise SourceError(f"cannot read disk export {export!r} at {host}:{port} over NBD: {e} "
                              "(has the backup job ended, or is the port firewalled?)") from None
        _CONNS[key] = c
    return c


def _maps(host: str, port: int, export: str, bitmap: str | None):
    """-> (size, allocated extents, dirty extents of `bitmap` or None when it is not exported).
    One connection per meta context: QEMU 7.2 answers block status on a connection that has
    negotiated both ~200x slower (0.7 s instead of 4 ms for a 16 GiB disk)."""
    with nbd.NBDClient(host, port, export, ("base:allocation",)) as c:
        alloc = nbd.extents(c.block_status("base:allocation"), lambda f: not f & nbd.STATE_ZERO)
        size = c.size
    changed = None
    if bitmap:
        ctx = "qemu:dirty-bitmap:" + bitmap
        with nbd.NBDClient(host, port, export, (ctx,)) as c:
            if ctx in c.contexts:
                changed = nbd.extents(c.block_status(ctx), lambda f: f & nbd.STATE_DIRTY)
    return size, alloc, changed


class KvmDisk(ExtentDisk):
    """One disk of a running backup job, read over NBD. Extents are computed when the snapshot
    is made (by the snapshot actor), so read tasks only read."""

    def __init__(self, name, size, host, port, export, allocated, changed, since, marker, node_id):
        self.name = name
        self.size = size
        self.host, self.port, self.export = host, port, export
        self._set_extents(allocated)
        self._changed = changed
        self._since = since  # checkpoint the dirty extents are counted from (None: full backup)
        self.cbt_marker = marker
        self.node_id = node_id

    def changed_extents(self, since):
        if since and self._since and since == self._since:
            return list(self._changed)
        why = ("this backup has no usable bitmap for it (resized, added, bitmap lost, or the last backup "
               "did not finish)" if not self._since
               else f"the last backup's checkpoint {since} is not the newest one here ({self._since})")
        return self._no_cbt(since, why)

    _retry_on = (OSError, nbd.NBDError)

    def _read_range(self, part: np.ndarray, offset: int) -> int:
        return _client(self.host, self.port, self.export).read_into(part, offset)

    def _reconnect(self) -> bool:  # a connection cached from before: reconnect once
        c = _CONNS.pop((self.host, self.port, self.export), None)
        if c is not None:
            c.sock.close()
        return True

    def _read_error(self, e) -> str:
        return f"reading disk {self.name} over NBD at {self.host}:{self.port} failed: {e}"


class KvmSnapshot(Snapshot):
    def __init__(self, source: "KvmSource", dom, vm: VMInfo, disks, checkpoint: str | None):
        self.source = source
        self._dom = dom
        self.vm = vm
        self.disks = disks
        self.checkpoint = checkpoint
        self.servers = None

    def release(self, failed: bool | None = None) -> None:
        """End the backup job and delete the checkpoints no longer needed. `failed`: whether
        the backup failed (default: whether an exception is on its way, as when called from a
        `finally`), which decides which checkpoint stays."""
        if self._dom is None:
            return
        if failed is None:
            failed = sys.exc_info()[0] is not None
        dom, self._dom = self._dom, None
        if self.servers is not None:  # a shut-off VM: our qemu-nbd servers; no checkpoint made
            _stop_servers(self.servers)
            return
        try:
            self.source._end_job(dom)
        finally:
            if self.checkpoint:
                if failed:
                    self.source._delete_checkpoints(dom, [self.checkpoint])
                else:
                    old = [n for n, _ in self.source._checkpoints(dom) if n != self.checkpoint]
                    self.source._delete_checkpoints(dom, old)


class KvmSource(Source):
    """`kvm:URI`: the VMs of libvirt connection URI. Picklable (the connection is reopened
    where it is used)."""

    def __init__(self, uri: str = "qemu:///system", node_id: str | None = None, nbd_host: str | None = None,
                 scratch_dir: str = "/var/tmp", **_ignored):
        self.uri = uri or "qemu:///system"
        host = urlparse(self.uri).hostname
        self.nbd_host = nbd_host or (host if host and not _is_loopback(host) else "127.0.0.1")
        self.node_id = node_id if _is_loopback(self.nbd_host) else None
        self.scratch_dir = scratch_dir
        self._conn = None

    def __getstate__(self):
        s = dict(self.__dict__)
        s["_conn"] = None
        return s

    # -- libvirt -------------------------------------------------------------------------
    def _connect(self):
        if self._conn is None:
            libvirt = _libvirt()
            try:
                self._conn = libvirt.open(self.uri)
            except libvirt.libvirtError as e:
                raise SourceError(f"cannot connect to libvirt at {self.uri}: {e.get_error_message()} "
                                  "(is libvirtd running, and may this user use it?)") from None
        return self._conn

    def _domain(self, vm: str):
        libvirt = _libvirt()
        conn = self._connect()
        try:
            return conn.lookupByName(vm)
        except libvirt.libvirtError:
            try:
                return conn.lookupByUUIDString(vm)
            except libvirt.libvirtError:
                raise VMNotFound(f"no VM named {vm!r} at {self.uri}: see `alike inventory kvm:{self.uri}`") from None

    def _info(self, dom) -> VMInfo:
        libvirt = _libvirt()
        root = ET.fromstring(dom.XMLDesc(0))
        disks = []
        for d in _disks(root):
            try:
                size = dom.blockInfo(d["name"])[0]
            except libvirt.libvirtError:
                size = 0  # e.g. a network disk of a shut-off VM: known when it runs
            disks.append((d["name"], int(size)))
        state = _STATES.get(dom.state()[0], "unknown")
        return VMInfo(dom.name(), dom.UUIDString(), disks, _parse_tags(root), state)

    def list_vms(self) -> list[VMInfo]:
        libvirt = _libvirt()
        try:
            doms = self._connect().listAllDomains(0)
        except libvirt.libvirtError as e:
            raise SourceError(f"cannot list the VMs at {self.uri}: {e.get_error_message()}") from None
        return sorted((self._info(d) for d in doms), key=lambda v: v.name)

    def _checkpoints(self, dom) -> list[tuple[str, dict]]:
        """Our checkpoints of `dom`, oldest first -> [(name, {"time", "sizes", "disks"})]."""
        out = []
        for cp in dom.listAllCheckpoints(0):
            name = cp.getName()
            if not name.startswith(PREFIX):
                continue
            try:
                root = ET.fromstring(cp.getXMLDesc(0))
            except Exception:
                continue
            try:
                meta = json.loads(root.findtext("description") or "{}")
            except ValueError:
                meta = {}
            bm = [d for d in root.findall("./disks/disk") if d.get("checkpoint") == "bitmap"]
            meta["disks"] = [d.get("name") for d in bm]
            meta["bitmaps"] = {d.get("name"): d.get("bitmap") or name for d in bm}
            meta["time"] = int(root.findtext("creationTime") or 0)
            out.append((name, meta))
        return sorted(out, key=lambda x: (x[1]["time"], x[1].get("seq", 0), x[0]))

    def _delete_checkpoints(self, dom, names) -> None:
        libvirt = _libvirt()
        for name in names:
            try:
                cp = dom.checkpointLookupByName(name, 0)
            except libvirt.libvirtError:
                continue
            try:
                cp.delete(0)
            except libvirt.libvirtError as e:
                try:  # its bitmap is gone or broken: forget the checkpoint at least
                    cp.delete(libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)
                except libvirt.libvirtError:
                    log.warning("cannot delete checkpoint %s of %s: %s", name, dom.name(), e.get_error_message())

    def _job_xml(self, dom):
        libvirt = _libvirt()
        try:
            return ET.fromstring(dom.backupGetXMLDesc(0))
        except libvirt.libvirtError:
            return None  # no backup job

    def _end_job(self, dom) -> None:
        libvirt = _libvirt()
        try:
            dom.abortJob()
        except libvirt.libvirtError:
            pass  # ended already (VM stopped, or a killed backup's job ended by a later one)
        # the job ends asynchronously: wait, as checkpoints cannot be deleted while it runs
        deadline = time.monotonic() + 60
        while self._job_xml(dom) is not None and dom.isActive():
            if time.monotonic() > deadline:
                raise SourceError(f"the backup job of VM {dom.name()} does not end: see `virsh domjobinfo {dom.name()}`")
            time.sleep(0.05)

    # -- snapshot ------------------------------------------------------------------------
    def snapshot(self, vm: str) -> KvmSnapshot:
        libvirt = _libvirt()
        dom = self._domain(vm)
        if not dom.isActive():
            return self._offline(dom, vm)
        job = self._job_xml(dom)
        if job is not None:
            ours = all((d.get("exportname") or "").startswith(PREFIX) for d in job.findall("./disks/disk")
                       if d.get("backup", "yes") == "yes")
            if not ours:
                raise SourceError(f"VM {vm} has a backup job of another tool running: try again when it ends")
            log.warning("VM %s: ending a backup job left by a killed backup", vm)
            self._end_job(dom)
        info = self._info(dom)
        root = ET.fromstring(dom.XMLDesc(0))
        disks = [d for d in _disks(root)]
        if not disks:
            raise SourceError(f"VM {vm} has no disks to back up")
        sizes = dict(info.disks)
        cps = self._checkpoints(dom)
        base = cps[-1] if cps else None
        # persistent dirty bitmaps live in qcow2 disks only
        tracked = [d["name"] for d in disks if d["format"] == "qcow2"]
        name = f"{PREFIX}{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{secrets.token_hex(3)}"
        seq = (base[1].get("seq", 0) + 1) if base else 1
        incr = {}
        for d in disks:
            n = d["name"]
            if base and n in base[1]["disks"] and base[1].get("sizes", {}).get(n) == sizes.get(n):
                incr[n] = base[0]
        port = _free_port(self.nbd_host)
        try:
            try:
                self._begin(dom, disks, tracked, incr, name, seq, sizes, port)
            except libvirt.libvirtError as e:
                if not incr:
                    raise
                # a broken chain that libvirt sees (bitmap missing or inconsistent): start afresh
                log.warning("VM %s: incremental backup refused (%s): dropping its checkpoints, reading in full",
                            vm, e.get_error_message())
                self._delete_checkpoints(dom, [n for n, _ in cps])
                incr = {}
                self._begin(dom, disks, tracked, incr, name, seq, sizes, port)
        except libvirt.libvirtError as e:
            raise SourceError(f"cannot start a backup of VM {vm}: {e.get_error_message()}") from None
        try:
            job = self._job_xml(dom)
            srv = job.find("server") if job is not None else None
            if srv is not None and srv.get("port"):
                port = int(srv.get("port"))
            exports = {d.get("name"): (d.get("exportname"), d.get("exportbitmap"))
                       for d in job.findall("./disks/disk")} if job is not None else {}
            out = []
            for d in disks:
                n = d["name"]
                export, bitmap = exports.get(n) or (PREFIX + n, None)
                size, alloc, changed = _maps(self.nbd_host, port, export, bitmap if n in incr else None)
                out.append(KvmDisk(n, size, self.nbd_host, port, export, alloc, changed or [],
                                   incr.get(n) if changed is not None else None,
                                   name if n in tracked else None, self.node_id))
        except BaseException as e:
            snap = KvmSnapshot(self, dom, info, [], name if tracked else None)
            snap.release(failed=True)
            if isinstance(e, (OSError, nbd.NBDError)):
                raise SourceError(f"cannot read the backup export of VM {vm} at {self.nbd_host}:{port}: {e}") from None
            raise
        return KvmSnapshot(self, dom, info, out, name if tracked else None)

    def _begin(self, dom, disks, tracked, incr, name, seq, sizes, port) -> None:
        bx = ET.Element("domainbackup", mode="pull")
        ET.SubElement(bx, "server", transport="tcp", name=self.nbd_host, port=str(port))
        bd = ET.SubElement(bx, "disks")
        stamp = f"{dom.UUIDString()}-{name}"
        for d in disks:
            n = d["name"]
            a = {"name": n, "backup": "yes", "type": "file", "exportname": PREFIX + n}
            if n in incr:
                a.update(backupmode="incremental", incremental=incr[n])
            else:
                a["backupmode"] = "full"
            el = ET.SubElement(bd, "disk", **a)
            ET.SubElement(el, "scratch", file=os.path.join(self.scratch_dir, f"alike-{stamp}-{n}.scratch"))
        cx = None
        if tracked:
            c = ET.Element("domaincheckpoint")
            ET.SubElement(c, "name").text = name
            ET.SubElement(c, "description").text = json.dumps({"sizes": {n: sizes.get(n) for n in tracked},
                                                               "seq": seq})
            cd = ET.SubElement(c, "disks")
            for d in disks:
                ET.SubElement(cd, "disk", name=d["name"], checkpoint="bitmap" if d["name"] in tracked else "no")
            cx = ET.tostring(c, encoding="unicode")
        dom.backupBegin(ET.tostring(bx, encoding="unicode"), cx, 0)

    # -- shut-off VMs ----------------------------------------------------------------------
    def _offline(self, dom, vm: str) -> KvmSnapshot:
        """A shut-off VM: its disks do not change, so they are read as they are, each served
        read-only by a qemu-nbd of ours (which also keeps the VM from starting meanwhile: QEMU's
        image locks). CBT goes on: the newest checkpoint's bitmap, still in the disk, tells
        what changed since then, and stays the marker (no new checkpoint is needed)."""
        host = urlparse(self.uri).hostname
        if host and not _is_loopback(host) or not _is_loopback(self.nbd_host):
            raise SourceError(f"VM {vm} is shut off: libvirt's backup API needs it running, and its disks "
                              f"are on another host (start it, or back up from that host)")
        import shutil
        import subprocess

        if not shutil.which("qemu-nbd"):
            raise SourceError(f"VM {vm} is shut off: reading its disks needs qemu-nbd (apt-get install qemu-utils)")
        info = self._info(dom)
        disks = _disks(ET.fromstring(dom.XMLDesc(0)))
        sizes = dict(info.disks)
        cps = self._checkpoints(dom)
        base = cps[-1] if cps else None
        os.makedirs(RUN_DIR, exist_ok=True)
        _stop_servers([p for p in _pidfiles(dom.UUIDString())])  # left by a killed backup
        servers, out = [], []
        try:
            for d in disks:
                n = d["name"]
                if not d["path"] or d["type"] not in ("file", "block"):
                    raise SourceError(f"VM {vm} is shut off and its disk {n} is not a file or block device: "
                                      f"start the VM to back it up")
                bitmap = None
                if base and n in base[1]["disks"] and base[1].get("sizes", {}).get(n) == sizes.get(n):
                    bitmap = base[1]["bitmaps"].get(n)
                export = PREFIX + n
                for bm in ([bitmap, None] if bitmap else [None]):
                    port = _free_port(self.nbd_host)
                    pidfile = os.path.join(RUN_DIR, f"{dom.UUIDString()}-{n}.pid")
                    cmd = ["qemu-nbd", "--read-only", "--persistent", "--shared=64", "--fork",
                           f"--pid-file={pidfile}", f"--bind={self.nbd_host}", f"--port={port}",
                           f"--export-name={export}", f"--format={d['format']}"]
                    if bm:
                        cmd.append(f"--bitmap={bm}")
                    p = subprocess.run(cmd + [d["path"]], capture_output=True, text=True, timeout=60)
                    if p.returncode == 0:
                        break
                    err = p.stderr.strip()
                    if bm:
                        log.warning("VM %s disk %s: bitmap %s unusable (%s): reading it in full", vm, n, bm, err)
                else:
                    if "lock" in err:
                        err += " (is the VM starting, or is another program using the disk?)"
                    raise SourceError(f"VM {vm} is shut off and its disk {n} cannot be opened: {err}")
                servers.append(pidfile)
                size, alloc, changed = _maps(self.nbd_host, port, export, bm)
                marker = base[0] if changed is not None else None
                out.append(KvmDisk(n, size, self.nbd_host, port, export, alloc, changed or [], marker, marker,
                                   self.node_id))
        except BaseException as e:
            _stop_servers(servers)
            if isinstance(e, (OSError, nbd.NBDError)):
                raise SourceError(f"cannot read the disks of VM {vm} over NBD: {e}") from None
            raise
        snap = KvmSnapshot(self, dom, info, out, None)
        snap.servers = servers
        return snap


RUN_DIR = "/run/alike-kvm" if os.geteuid() == 0 else os.path.join("/tmp", f"alike-kvm-{os.getuid()}")


def _pidfiles(uuid: str) -> list[str]:
    try:
        return [os.path.join(RUN_DIR, f) for f in os.listdir(RUN_DIR) if f.startswith(uuid + "-")]
    except OSError:
        return []


def _stop_servers(pidfiles: list[str]) -> None:
    """Stop the qemu-nbd servers we started (by the pids they wrote), and remove their pid files."""
    import signal

    for pf in pidfiles:
        try:
            with open(pf) as f:
                pid = int(f.read().strip())
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
            if b"qemu-nbd" in cmdline and pf.encode() in cmdline:  # not a recycled pid
                os.kill(pid, signal.SIGTERM)
                for _ in range(400):  # gone, or a zombie (its image lock is released then)
                    try:
                        with open(f"/proc/{pid}/stat") as f:
                            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                                break
                    except OSError:
                        break
                    time.sleep(0.025)
        except (OSError, ValueError):
            pass
        try:
            os.unlink(pf)
        except OSError:
            pass
