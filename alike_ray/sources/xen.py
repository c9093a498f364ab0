"""`xen:` source: the VMs of a XenServer / XCP-ng pool, agentless, through XenAPI
(`xen:https://pool-master`, the PyPI `XenAPI` package).

Credentials never come on the command line: a TOML file (`username`, `password`; refused unless
its mode is 0600 or stricter) given with `--credentials` (or `credentials = "..."` in a job's
source table), else `ALIKE_XEN_USERNAME` / `ALIKE_XEN_PASSWORD`. TLS is verified (the system's
CAs, or `ca_bundle`); plain `http://` is accepted for labs and test servers, with a note on every
VM. A pool member that is not the master answers HOST_IS_SLAVE with the master's address: we
log in there instead.

Inventory: real VMs only (no templates, snapshots or control domains), their Disk VBDs in
`userdevice` order, named `xvda`, `xvdb`... (Xen's name for userdevice 0, 1...: stable across
backups, where VBD.device is known only while a VM runs), the VDIs' virtual sizes, the VM's tags,
its power state, its uuid as the id, and its shape (vCPUs, memory, description, NICs, boot
settings) for a restore into a pool.

Snapshot: `VM.snapshot` (or `VM.checkpoint` with `memory=True` on a running VM: its suspend VDI
is backed up as one more disk, named `memory`, with `role = "memory"`). Everything the backup
makes carries `other_config["alike_backup"]`, so that the next backup of the VM finds and
removes what a killed one left. Reads: each snapshot VDI over NBD (`VDI.get_nbd_info`, TLS with
the certificate XAPI hands out, its `subject` checked), by any Ray worker that reaches the host,
allocation-aware (`base:allocation`). A pool without an NBD network falls back to one stream of
`/export_raw_vdi?format=raw` into a sparse local file (then no CBT, no parallel reads from other
nodes: the notes say so).

Changed block tracking (`cbt=True`, the default): `VDI.enable_cbt` on a disk's first backup;
after a backup that committed, the snapshot's VDIs are kept as metadata only
(`VDI.data_destroy`) and their uuid is the disk's CBT marker; the next backup asks
`VDI.list_changed_blocks(marker, new snapshot)` (a base64 bitmap, one bit per 64 KiB, most
significant bit first) and reads only those blocks. Every broken chain (CBT disabled, marker
deleted, unrelated VDIs, resized disk, new disk) reads that disk in full, says why (`cbt_note`)
and re-arms. After a failed backup the new snapshot's VDIs are destroyed and the previous marker
stays the base; after a success older markers are destroyed.
"""
from __future__ import annotations

import base64
import logging
import os
import secrets
import socket
import ssl
import tempfile
import time
from urllib.parse import urlencode, urlparse

import numpy as np

from . import nbd
from .base import ExtentDisk, Snapshot, Source, SourceError, VMInfo, VMNotFound
from .credentials import AuthError as XenAuthError, https_context, load_credentials

log = logging.getLogger("alike.xen")

MARK = "alike_backup"      # other_config key on every snapshot VM and VDI a backup makes
PREFIX = "alike-"          # name_label of the snapshots a backup makes
NULL = "OpaqueRef:NULL"
CBT_BLOCK = 64 * 1024      # VDI.list_changed_blocks granularity
_STATES = {"Running": "running", "Halted": "halted", "Suspended": "suspended", "Paused": "paused"}


def _xenapi():
    try:
        import XenAPI
    except ImportError:
        raise SourceError("the xen: source needs the XenAPI package: pip install 'alike-ray[xen]'") from None
    return XenAPI


def _int(v, default: int = 0) -> int:
    try:
        return int(v)
    except (TypeError, ValueError):
        return default


def _disk_name(userdevice) -> str:
    n = _int(userdevice, -1)
    if n < 0:
        return f"xvd-{userdevice}"
    name, n = "", n + 1
    while n:  # 0 -> a, 25 -> z, 26 -> aa (as Linux names xvd devices)
        n, r = divmod(n - 1, 26)
        name = chr(97 + r) + name
    return "xvd" + name


def bitmap_extents(b64: str, size: int) -> list[tuple[int, int]]:
    """A list_changed_blocks bitmap -> sorted merged (offset, length) inside [0, size)."""
    bits = np.unpackbits(np.frombuffer(base64.b64decode(b64), np.uint8))  # most significant bit first
    nblocks = (size + CBT_BLOCK - 1) // CBT_BLOCK
    bits = bits[:nblocks]
    if not bits.any():
        return []
    edges = np.flatnonzero(np.diff(np.concatenate([[0], bits.astype(np.int8), [0]])))
    out = []
    for s, e in zip(edges[::2], edges[1::2]):
        off = int(s) * CBT_BLOCK
        out.append((off, min(int(e) * CBT_BLOCK, size) - off))
    return out


class Api:
    """A logged-in XenAPI session on the pool master (followed from a member on HOST_IS_SLAVE)."""

    def __init__(self, url: str, username: str, password: str, ca_bundle: str | None = None):
        XenAPI = _xenapi()
        import xmlrpc.client

        self.url = url
        for _ in range(3):  # a member names the master once; never loop
            u = urlparse(self.url)
            if u.scheme == "https":
                transport = xmlrpc.client.SafeTransport(context=https_context(ca_bundle))
            else:
                transport = xmlrpc.client.Transport()
            self.session = XenAPI.Session(self.url, transport=transport)
            try:
                self.session.xenapi.login_with_password(username, password, "2.0", "alike")
            except XenAPI.Failure as e:
                code = (e.details or [""])[0]
                if code == "HOST_IS_SLAVE" and len(e.details) > 1:
                    log.warning("%s is a pool member: logging in to the master %s", self.url, e.details[1])
                    self.url = _master_url(self.url, str(e.details[1]))
                    continue
                if code == "SESSION_AUTHENTICATION_FAILED":
                    raise XenAuthError(f"the pool master at {self.url} refused user {username!r} "
                                       "(SESSION_AUTHENTICATION_FAILED): check the credentials") from None
                raise SourceError(f"cannot log in to {self.url}: {' '.join(map(str, e.details))}") from None
            except ssl.SSLCertVerificationError as e:
                raise SourceError(f"the TLS certificate of {self.url} is not trusted ({e.verify_message}): "
                                  "pass its CA with --ca-bundle FILE (or ca_bundle in the job's source)") from None
            except (OSError, xmlrpc.client.ProtocolError) as e:
                raise SourceError(f"cannot reach the pool master at {self.url}: {getattr(e, 'strerror', None) or e} "
                                  "(is the address right, and XAPI running?)") from None
            except xmlrpc.client.Fault as e:
                raise SourceError(f"{self.url} does not answer as XAPI does: {e.faultString}") from None
            break
        else:
            raise SourceError(f"{url}: the pool members keep naming other masters; give the master's address")
        self.x = self.session.xenapi
        self.ref = self.session._session
        self.XenAPI = XenAPI

    def call(self, what: str, fn, *args):
        """fn(*args), a XenAPI failure turned into one SourceError naming `what`."""
        try:
            return fn(*args)
        except self.XenAPI.Failure as e:
            raise SourceError(f"{what}: XAPI says {' '.join(map(str, e.details))}") from None
        except OSError as e:
            raise SourceError(f"{what}: lost the connection to {self.url}: {e}") from None

    def logout(self) -> None:
        try:
            self.session.xenapi.session.logout()
        except Exception:
            pass


def _master_url(url: str, master: str) -> str:
    u = urlparse(url)
    if "://" in master:
        return master
    if master.count(":") == 1:  # host:port
        return f"{u.scheme}://{master}"
    host = f"[{master}]" if ":" in master else master
    return f"{u.scheme}://{host}" + (f":{u.port}" if u.port else "")


_CONNS: dict = {}  # (host, port, export) -> NBDClient, per worker process, reused across read tasks


def _client(d: "XenDisk") -> nbd.NBDClient:
    key = (d.host, d.port, d.export)
    c = _CONNS.get(key)
    if c is None:
        while len(_CONNS) >= 4:
            _CONNS.pop(next(iter(_CONNS))).close()
        try:
            c = nbd.NBDClient(d.host, d.port, d.export, tls=nbd.tls_context(d.cert) if d.cert else None,
                              tls_name=d.subject or None)
        except ssl.SSLError as e:
            raise SourceError(f"the NBD server of disk {d.name} at {d.host}:{d.port} failed TLS: {e}") from None
        except (OSError, nbd.NBDError) as e:
            raise SourceError(f"cannot read disk {d.name} over NBD at {d.host}:{d.port}: {e} "
                              "(has the backup ended, or is the port firewalled?)") from None
        _CONNS[key] = c
    return c


class XenDisk(ExtentDisk):
    """A snapshot VDI, read over NBD (any node) or from the local file a stream landed in."""

    def __init__(self, name, size, allocated, *, host=None, port=None, export=None, cert="", subject="",
                 path=None, node_id=None, marker=None, role="disk"):
        self.name, self.size, self.role = name, size, role
        self.host, self.port, self.export, self.cert, self.subject = host, port, export, cert, subject
        self.path = path
        self.node_id = node_id
        self.cbt_marker = marker
        self._set_extents(allocated)
        self._cbt = None  # (snapshot, live VDI record, new snapshot VDI ref): in the snapshot actor only

    def __getstate__(self):
        s = dict(self.__dict__)
        s["_cbt"] = None
        return s

    def changed_extents(self, since):
        if self._cbt is None:  # read by a stream, or CBT off for this backup
            why = ("NBD is not enabled on the pool (changed block tracking needs it)" if self.path
                   else "changed block tracking is off for this disk")
            self.cbt_note = f"disk {self.name}: no changed block tracking from {since}: {why}; read in full"
            return None
        snap, live, new_ref = self._cbt
        why = snap.chain_problem(live, since, self.size)
        if why is None:
            try:
                marker_ref = snap.api.x.VDI.get_by_uuid(since)
                bitmap = snap.api.x.VDI.list_changed_blocks(marker_ref, new_ref)
                return bitmap_extents(bitmap, self.size)
            except snap.api.XenAPI.Failure as e:
                why = f"XAPI could not compare it with the marker ({' '.join(map(str, e.details[:2]))})"
        return self._no_cbt(since, why)

    _retry_on = (OSError, nbd.NBDError)

    def _read_range(self, part: np.ndarray, offset: int) -> int:
        if not self.path:
            return _client(self).read_into(part, offset)
        with open(self.path, "rb", buffering=0) as f:  # the local copy of a streamed disk
            f.seek(offset)
            got = f.readinto(memoryview(part))
        if got != len(part):
            raise SourceError(f"disk {self.name}: the local copy {self.path} is short")
        return got

    def _reconnect(self) -> bool:  # a connection cached from before: reconnect once
        c = _CONNS.pop((self.host, self.port, self.export), None)
        if c is not None:
            c.sock.close()
        return not self.path


class XenSnapshot(Snapshot):
    def __init__(self, source: "XenSource", api: Api, vm_ref: str, info: VMInfo):
        self.source, self.api, self.vm_ref, self.vm = source, api, vm_ref, info
        self.snap_ref = None
        self.disks: list[XenDisk] = []
        self.made: list[str] = []          # VDI refs this backup made (snapshot disks, suspend image)
        self.tracked: dict[str, str] = {}  # new snapshot VDI ref -> live VDI ref, for disks with CBT
        self.files: list[str] = []
        self._released = False

    def chain_problem(self, live: dict, since: str, size: int) -> str | None:
        """Why the marker `since` cannot be the base of this disk's changes, or None."""
        x = self.api.x
        try:
            ref = x.VDI.get_by_uuid(since)
            rec = x.VDI.get_record(ref)
        except self.api.XenAPI.Failure:
            return "the marker VDI was deleted"
        if rec.get("snapshot_of") != live["ref"]:
            return "the marker is a snapshot of another VDI (unrelated)"
        if _int(rec.get("virtual_size")) != size:
            return "the disk was resized"
        if not live.get("cbt_was_enabled"):
            return "CBT was disabled on the disk"
        return None

    def release(self, failed: bool = False) -> None:
        if self._released:
            return
        self._released = True
        x = self.api.x
        try:
            if self.snap_ref:
                try:
                    x.VM.destroy(self.snap_ref)  # the record and its VBDs; its VDIs stay (as XAPI does it)
                except self.api.XenAPI.Failure as e:
                    if e.details[0] != "HANDLE_INVALID":
                        log.warning("cannot destroy snapshot of %s: %s", self.vm.name, e.details)
            for ref in self.made:
                if not failed and ref in self.tracked:
                    try:
                        x.VDI.data_destroy(ref)  # keep it as the CBT marker, metadata only
                        continue
                    except self.api.XenAPI.Failure as e:
                        log.warning("VM %s: cannot keep the snapshot as a CBT marker (%s): destroying it",
                                    self.vm.name, e.details)
                _destroy_vdi(self.api, ref)
            if not failed:  # older markers of our disks are no longer needed
                lives = set(self.tracked.values())
                keep = set(self.tracked)
                for ref, rec in _our_vdis(self.api).items():
                    if rec.get("snapshot_of") in lives and ref not in keep and rec.get("type") == "cbt_metadata":
                        _destroy_vdi(self.api, ref)
        finally:
            for p in self.files:
                try:
                    os.unlink(p)
                except OSError:
                    pass
            self.api.logout()


def _destroy_vdi(api: Api, ref: str) -> None:
    try:
        api.x.VDI.destroy(ref)
    except api.XenAPI.Failure as e:
        if e.details[0] not in ("HANDLE_INVALID", "UUID_INVALID"):
            log.warning("cannot destroy VDI %s: %s", ref, e.details)


def _our_vdis(api: Api) -> dict:
    return {r: v for r, v in api.x.VDI.get_all_records().items() if MARK in (v.get("other_config") or {})}


class XenSource(Source):
    """`xen:URL`: the VMs of the pool whose master (or member) is at URL. Picklable: it holds the
    URL and credentials, and logs in where it is used."""

    def __init__(self, url: str, credentials: str | None = None, ca_bundle: str | None = None,
                 memory: bool = False, cbt: bool = True, node_id: str | None = None,
                 scratch_dir: str | None = None, **_ignored):
        u = urlparse(url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise SourceError(f"xen:{url}: give the pool master's URL, e.g. xen:https://pool-master.example")
        self.url = url.rstrip("/")
        self.username, self._password = load_credentials(credentials)
        if ca_bundle and not os.path.isfile(ca_bundle):
            raise XenAuthError(f"CA bundle {ca_bundle} does not exist")
        self.ca_bundle = ca_bundle
        self.memory, self.cbt = memory, cbt
        self.node_id = node_id
        self.scratch_dir = scratch_dir or tempfile.gettempdir()
        self.notes = ([f"{self.url} is plain HTTP: the password and the data travel unencrypted "
                       "(use https:// outside a lab)"] if u.scheme == "http" else [])

    def __repr__(self):
        return f"XenSource({self.url!r}, user={self.username!r})"  # never the password

    def login(self) -> Api:
        return Api(self.url, self.username, self._password, self.ca_bundle)

    # -- inventory -------------------------------------------------------------------------
    def _vms(self, api: Api):
        x = api.x
        vms = api.call("listing VMs", x.VM.get_all_records)
        vbds = api.call("listing VBDs", x.VBD.get_all_records)
        vdis = api.call("listing VDIs", x.VDI.get_all_records)
        try:
            nets = x.network.get_all_records()
            vifs = x.VIF.get_all_records()
        except api.XenAPI.Failure:
            nets, vifs = {}, {}
        out = []
        for ref, vm in vms.items():
            if vm.get("is_a_template") or vm.get("is_a_snapshot") or vm.get("is_control_domain"):
                continue
            disks = []
            for b in vm.get("VBDs", []):
                vbd = vbds.get(b)
                if not vbd or vbd.get("type") != "Disk" or vbd.get("empty") or vbd.get("VDI") not in vdis:
                    continue  # CD drives, empty drives
                disks.append((_int(vbd.get("userdevice"), 99), vbd, vdis[vbd["VDI"]] | {"ref": vbd["VDI"]}))
            disks.sort(key=lambda d: d[0])
            nics = [{"device": v.get("device"), "mac": v.get("MAC"), "network": nets.get(v.get("network"), {}).get(
                "name_label")} for v in (vifs.get(r, {}) for r in vm.get("VIFs", [])) if v]
            shape = {"platform": "xen", "vcpus": _int(vm.get("VCPUs_max"), 1),
                     "vcpus_at_startup": _int(vm.get("VCPUs_at_startup"), 1),
                     "memory_bytes": _int(vm.get("memory_static_max")),
                     "description": vm.get("name_description", ""),
                     "boot": {"HVM_boot_policy": vm.get("HVM_boot_policy", ""),
                              "HVM_boot_params": vm.get("HVM_boot_params") or {},
                              "PV_bootloader": vm.get("PV_bootloader", ""),
                              "platform": vm.get("platform") or {}},
                     "nics": nics}
            out.append((ref, vm, disks, shape))
        names = [vm["name_label"] for _, vm, _, _ in out]
        infos = []
        for ref, vm, disks, shape in out:
            name = vm["name_label"]
            if names.count(name) > 1:  # name_label is not unique in a pool: tell them apart
                name = f"{name}-{vm['uuid'][:8]}"
            info = VMInfo(name, vm["uuid"], [(_disk_name(u), _int(d.get("virtual_size"))) for u, _, d in disks],
                          sorted(vm.get("tags") or []), _STATES.get(vm.get("power_state"), "unknown"),
                          list(self.notes))
            info.shape = shape
            infos.append((ref, vm, disks, info))
        return sorted(infos, key=lambda t: t[3].name)

    def list_vms(self) -> list[VMInfo]:
        api = self.login()
        try:
            return [info for *_, info in self._vms(api)]
        finally:
            api.logout()

    # -- snapshot -----------------------------------------------------------------------------
    def snapshot(self, vm: str) -> XenSnapshot:
        api = self.login()
        try:
            return self._snapshot(api, vm)
        except api.XenAPI.Failure as e:
            api.logout()
            raise SourceError(f"snapshot of VM {vm} at {self.url} failed: XAPI says {' '.join(map(str, e.details))}") from None
        except BaseException:
            api.logout()
            raise

    def _snapshot(self, api: Api, want: str) -> XenSnapshot:
        x = api.x
        found = [t for t in self._vms(api) if want in (t[3].name, t[3].id)]
        if not found:
            raise VMNotFound(f"no VM named {want!r} in the pool at {self.url}: see `alike inventory xen:{self.url}`")
        ref, vm, disks, info = found[0]
        if not disks:
            raise SourceError(f"VM {info.name} has no disks to back up")
        self._cleanup(api, ref, disks)
        notes = list(info.notes)
        live = {}
        for _, _, d in disks:
            rec = {"ref": d["ref"], "cbt_was_enabled": bool(d.get("cbt_enabled"))}
            if self.cbt and not d.get("cbt_enabled"):
                try:
                    x.VDI.enable_cbt(d["ref"])
                    rec["cbt_enabled"] = True
                except api.XenAPI.Failure as e:
                    notes.append(f"changed block tracking cannot be enabled on a disk ({e.details[0]}): "
                                 "every backup reads it in full")
            else:
                rec["cbt_enabled"] = bool(d.get("cbt_enabled"))
            live[d["ref"]] = rec
        token = f"{info.id}/{secrets.token_hex(6)}"  # whose backup made it: cleanup touches only its own VM's
        name = f"{PREFIX}{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{token[-12:]}"
        memory = self.memory and vm.get("power_state") == "Running"
        if self.memory and not memory:
            notes.append(f"no memory image: the VM is {info.power_state} (a memory checkpoint needs it running)")
        snap = XenSnapshot(self, api, ref, info)
        try:
            snap.snap_ref = api.call(f"snapshot of VM {info.name}",
                                     x.VM.checkpoint if memory else x.VM.snapshot, ref, name)
            api.call("marking the snapshot", x.VM.add_to_other_config, snap.snap_ref, MARK, token)
            srec = x.VM.get_record(snap.snap_ref)
            by_snapshot_of = {}
            for b in srec.get("VBDs", []):
                vbd = x.VBD.get_record(b)
                if vbd.get("type") == "Disk" and not vbd.get("empty"):
                    vref = vbd["VDI"]
                    x.VDI.add_to_other_config(vref, MARK, token)
                    snap.made.append(vref)
                    by_snapshot_of[x.VDI.get_snapshot_of(vref)] = vref
            pieces = []
            for u, _, d in disks:
                sref = by_snapshot_of.get(d["ref"])
                if sref is None:
                    raise SourceError(f"the snapshot of VM {info.name} lacks disk {_disk_name(u)}")
                pieces.append((_disk_name(u), sref, live[d["ref"]], "disk"))
            if memory:
                sus = srec.get("suspend_VDI")
                if sus and sus != "OpaqueRef:NULL":
                    x.VDI.add_to_other_config(sus, MARK, token)
                    snap.made.append(sus)
                    pieces.append(("memory", sus, None, "memory"))
            stream_note = False
            for dname, sref, lv, role in pieces:
                disk = self._open_disk(api, snap, dname, sref, role)
                if disk.path:
                    stream_note = True
                elif role == "disk" and self.cbt and lv and lv.get("cbt_enabled"):
                    disk.cbt_marker = x.VDI.get_uuid(sref)
                    disk._cbt = (snap, lv, sref)
                    snap.tracked[sref] = lv["ref"]
                snap.disks.append(disk)
            if stream_note:
                notes.append("NBD is not enabled on this pool (no network has purpose nbd): disks were read by "
                             "/export_raw_vdi as one stream; changed block tracking and parallel reads need NBD "
                             "(xe network-param-add uuid=... param-name=purpose param-key=nbd)")
        except BaseException:
            snap.release(failed=True)
            raise
        info.notes = notes
        snap.vm = info
        return snap

    def _cleanup(self, api: Api, vm_ref: str, disks) -> None:
        """Remove what a killed backup of this VM left: its snapshot VMs (ours by mark, or by name
        when it was killed between VM.snapshot and the mark) with their data VDIs and suspend
        image, and data VDIs with our mark. Markers (cbt_metadata VDIs) stay: they are the base of
        the next CBT backup."""
        x = api.x
        uuid = x.VM.get_uuid(vm_ref)
        for sref in x.VM.get_snapshots(vm_ref):
            try:
                rec = x.VM.get_record(sref)
            except api.XenAPI.Failure:
                continue
            if MARK not in (rec.get("other_config") or {}) and not rec.get("name_label", "").startswith(PREFIX):
                continue
            log.warning("VM %s: removing snapshot %s left by a killed backup", uuid, rec.get("name_label"))
            vdis = [rec["suspend_VDI"]] if rec.get("suspend_VDI") not in (None, "", NULL) else []
            for b in rec.get("VBDs", []):
                try:
                    vbd = x.VBD.get_record(b)
                except api.XenAPI.Failure:
                    continue
                if vbd.get("type") == "Disk" and vbd.get("VDI") not in (None, "", NULL):
                    vdis.append(vbd["VDI"])
            try:
                x.VM.destroy(sref)
            except api.XenAPI.Failure as e:
                log.warning("cannot remove snapshot %s: %s", rec.get("name_label"), e.details)
                continue
            for v in vdis:
                try:
                    if x.VDI.get_type(v) != "cbt_metadata":
                        _destroy_vdi(api, v)
                except api.XenAPI.Failure:
                    pass
        for ref, rec in _our_vdis(api).items():
            mine = str(rec["other_config"][MARK]).startswith(uuid + "/")
            if mine and rec.get("type") != "cbt_metadata" and not rec.get("VBDs"):
                _destroy_vdi(api, ref)

    def _open_disk(self, api: Api, snap: XenSnapshot, name: str, ref: str, role: str) -> XenDisk:
        x = api.x
        size = _int(x.VDI.get_virtual_size(ref))
        infos = api.call(f"NBD details of disk {name}", x.VDI.get_nbd_info, ref)
        for i in infos:
            host, port = i["address"], _int(i["port"])
            cert, subject, export = i.get("cert") or "", i.get("subject") or "", i["exportname"]
            try:
                with nbd.NBDClient(host, port, export, ("base:allocation",),
                                   tls=nbd.tls_context(cert) if cert else None, tls_name=subject or None) as c:
                    alloc = nbd.extents(c.block_status("base:allocation"), lambda f: not f & nbd.STATE_ZERO)
            except (OSError, nbd.NBDError, ssl.SSLError) as e:
                log.warning("disk %s: NBD server %s:%s unusable: %s", name, host, port, e)
                continue
            # a loopback address is reachable from this host's node only
            node = self.node_id if host in ("localhost", "::1") or host.startswith("127.") else None
            return XenDisk(name, size, alloc, host=host, port=port, export=export, cert=cert, subject=subject,
                           role=role, node_id=node)
        return self._stream(api, snap, name, ref, size, role)

    def _stream(self, api, snap, name, ref, size, role) -> XenDisk:
        """No NBD: the VDI as one /export_raw_vdi stream into a sparse local file (zero pieces not
        written), read from this node."""
        import http.client

        u = urlparse(api.url)
        q = urlencode({"session_id": api.ref, "vdi": ref, "format": "raw"})
        conn = (http.client.HTTPSConnection(u.hostname, u.port or 443,
                                            context=https_context(self.ca_bundle))
                if u.scheme == "https" else http.client.HTTPConnection(u.hostname, u.port or 80))
        fd, path = tempfile.mkstemp(prefix="alike-xen-", suffix=".raw", dir=self.scratch_dir)
        snap.files.append(path)
        alloc = []
        try:
            conn.request("GET", f"/export_raw_vdi?{q}")
            r = conn.getresponse()
            if r.status != 200:
                raise SourceError(f"export of disk {name} refused: HTTP {r.status} {r.reason}")
            os.ftruncate(fd, size)
            piece, pos = 4 << 20, 0
            buf = bytearray(piece)
            while pos < size:
                mv = memoryview(buf)[:min(piece, size - pos)]
                got = 0
                while got < len(mv):
                    k = r.readinto(mv[got:])
                    if not k:
                        raise SourceError(f"the export of disk {name} ended at {pos + got} of {size} bytes")
                    got += k
                if any(mv):
                    os.pwrite(fd, mv, pos)
                    if alloc and alloc[-1][0] + alloc[-1][1] == pos:
                        alloc[-1] = (alloc[-1][0], alloc[-1][1] + len(mv))
                    else:
                        alloc.append((pos, len(mv)))
                pos += len(mv)
        except (OSError, http.client.HTTPException) as e:
            raise SourceError(f"export of disk {name} from {api.url} failed: {e}") from None
        finally:
            os.close(fd)
            conn.close()
        node = None
        try:
            import ray

            if ray.is_initialized():
                node = ray.get_runtime_context().get_node_id()
        except Exception:
            node = None
        return XenDisk(name, size, alloc, path=path, node_id=node or self.node_id, role=role)
