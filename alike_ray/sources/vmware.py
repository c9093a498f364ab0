"""`vmware:` source: the VMs of a vCenter or ESXi host, agentless, through pyvmomi
(`vmware:https://vcenter.example`).

Credentials as for xen: (sources/credentials.py): `--credentials FILE` (TOML, mode 0600) or
ALIKE_VMWARE_USERNAME / ALIKE_VMWARE_PASSWORD; TLS verified (the system's CAs or `ca_bundle`);
plain `http://` for labs and simulators, with a note on every VM.

Inventory: every VM that is not a template, its virtual disks named by controller and unit
(`scsi0:0`, `ide0:1`, `sata0:0`, `nvme0:0`), sizes, tags (the custom attribute `tags`, comma
separated, where the server has no tagging API), power state, instanceUuid as the id, and its
shape (vCPUs, memory, guest id, annotation, NICs). Independent disks and physical RDMs cannot be
snapshotted: they are skipped, with a note, as a real product does.

Snapshot: `CreateSnapshot_Task` (memory off, `quiesce` from the job) named `alike-...`; the
disks read are those of the snapshot's own configuration (the frozen base files; the VM writes
on in its new delta). Reads go over the datastore HTTP interface (`/folder/<path>-flat.vmdk?
dcPath=..&dsName=..` with Range requests and the session's cookie), so any Ray worker that
reaches the host reads any range. Allocation: `QueryChangedDiskAreas(snapshot, key, 0, "*")`
where the server has it (looped over the disk, as the API requires); else the whole disk is
read (zero blocks are still never stored) and a note says what was missing.

Changed block tracking (`cbt`): `changeTrackingEnabled` is turned on with ReconfigVM_Task; each
disk's `changeId` at the snapshot is its CBT marker; the next backup reads only the areas of
`QueryChangedDiskAreas(snapshot, key, offset, changeId)`. A changeId the server refuses (CBT
reset, FileFault, a resized disk), or a server without the call, reads the disk in full, says
why (`cbt_note`) and re-arms. Release removes the snapshot (`RemoveSnapshot_Task`, consolidating)
also when the backup failed; snapshots named `alike-` that a killed backup left are removed by
the next snapshot of that VM.
"""
from __future__ import annotations

import http.client
import logging
import os
import secrets
import ssl
import time
from urllib.parse import quote, urlencode, urlparse

import numpy as np

from .base import ExtentDisk, Snapshot, Source, SourceError, VMInfo, VMNotFound
from .credentials import AuthError, https_context, load_credentials

log = logging.getLogger("alike.vmware")

PREFIX = "alike-"
_STATES = {"poweredOn": "running", "poweredOff": "off", "suspended": "suspended"}
_BUS = (("VirtualSCSIController", "scsi"), ("VirtualIDEController", "ide"), ("VirtualSATAController", "sata"),
        ("VirtualNVMEController", "nvme"))


def _pyvmomi():
    try:
        from pyVim import connect, task
        from pyVmomi import vim, vmodl
    except ImportError:
        raise SourceError("the vmware: source needs pyvmomi: pip install 'alike-ray[vmware]'") from None
    return connect, task, vim, vmodl


def _fault(e) -> str:
    msg = getattr(e, "msg", None) or str(e)
    return f"{type(e).__name__}: {msg}".strip()


class Conn:
    """A logged-in pyvmomi session."""

    def __init__(self, url: str, username: str, password: str, ca_bundle: str | None):
        connect, self.task, self.vim, self.vmodl = _pyvmomi()
        u = urlparse(url)
        self.url, self.scheme, self.host = url, u.scheme, u.hostname
        self.port = u.port or (443 if u.scheme == "https" else 80)
        self.ssl_ctx = https_context(ca_bundle) if u.scheme == "https" else None
        kw = {"sslContext": self.ssl_ctx} if self.ssl_ctx else {}
        try:
            self.si = connect.SmartConnect(protocol=u.scheme, host=self.host, port=self.port, user=username,
                                           pwd=password, **kw)
        except self.vim.fault.InvalidLogin:
            raise AuthError(f"{url} refused user {username!r} (InvalidLogin): check the credentials") from None
        except ssl.SSLCertVerificationError as e:
            raise SourceError(f"the TLS certificate of {url} is not trusted ({e.verify_message}): "
                              "pass its CA with --ca-bundle FILE (or ca_bundle in the job's source)") from None
        except OSError as e:
            raise SourceError(f"cannot reach {url}: {getattr(e, 'strerror', None) or e} "
                              "(is the address right, and vCenter up?)") from None
        except self.vmodl.MethodFault as e:
            raise SourceError(f"cannot log in to {url}: {_fault(e)}") from None
        self.content = self.si.RetrieveContent()
        self.cookie = self.si._stub.cookie.split(";")[0]

    def wait(self, task, what: str):
        try:
            self.task.WaitForTask(task)
        except self.vmodl.MethodFault as e:
            raise SourceError(f"{what} failed: {_fault(e)}") from None
        return task.info.result

    def vms(self):
        view = self.content.viewManager.CreateContainerView(self.content.rootFolder, [self.vim.VirtualMachine], True)
        try:
            return list(view.view)
        finally:
            view.Destroy()

    def close(self) -> None:
        try:
            from pyVim.connect import Disconnect

            Disconnect(self.si)
        except Exception:
            pass


def _datacenter(vm) -> str:
    from pyVmomi import vim

    p = vm.parent
    while p is not None and not isinstance(p, vim.Datacenter):
        p = p.parent
    return p.name if p is not None else "ha-datacenter"


def _disks(vim, devices) -> list[tuple[str, object, str | None]]:
    """-> [(name, VirtualDisk, why it is skipped or None)] in controller/unit order."""
    ctrl = {}
    for d in devices:
        for cls, bus in _BUS:
            if isinstance(d, getattr(vim.vm.device, cls)):
                ctrl[d.key] = f"{bus}{d.busNumber}"
    out = []
    for d in devices:
        if not isinstance(d, vim.vm.device.VirtualDisk):
            continue
        name = f"{ctrl.get(d.controllerKey, 'disk')}:{d.unitNumber}"
        mode = getattr(d.backing, "diskMode", "") or ""
        why = None
        if mode.startswith("independent"):
            why = f"disk {name} is independent ({mode}): snapshots leave it out; skipped"
        elif isinstance(d.backing, vim.vm.device.VirtualDisk.RawDiskMappingVer1BackingInfo) and \
                getattr(d.backing, "compatibilityMode", "") == "physicalMode":
            why = f"disk {name} is a physical RDM: it cannot be snapshotted; skipped"
        out.append((name, d, why))
    return sorted(out, key=lambda t: t[0])


def _folder(vm) -> str:
    """The VM's folder path under its datacenter's VM folder ("" at the top)."""
    from pyVmomi import vim

    parts, p = [], vm.parent
    while p is not None and isinstance(p, vim.Folder) and not isinstance(p.parent, vim.Datacenter):
        parts.append(p.name)
        p = p.parent
    return "/".join(reversed(parts))


def rest_tags(conn: "Conn", username: str, password: str, ids: list[str]) -> dict[str, list[str]] | None:
    """vSphere tags of the VMs `ids` (managed object ids) through the tagging REST API (/rest,
    as vCenter 6.5+ and the simulator have it) -> {id: [tag names]}, or None where the server has
    no tagging API (an ESXi host, an old vCenter): then the custom attribute `tags` is used."""
    import base64
    import json

    path_base = "/rest/com/vmware/cis"
    c = (http.client.HTTPSConnection(conn.host, conn.port, context=conn.ssl_ctx, timeout=60)
         if conn.scheme == "https" else http.client.HTTPConnection(conn.host, conn.port, timeout=60))

    def call(method, path, body=None, headers=None):
        c.request(method, path_base + path, body=json.dumps(body) if body is not None else None,
                  headers={"Content-Type": "application/json", **(headers or {})})
        r = c.getresponse()
        data = r.read()
        if r.status != 200:
            raise OSError(f"HTTP {r.status}")
        return json.loads(data)["value"] if data else None

    try:
        auth = base64.b64encode(f"{username}:{password}".encode()).decode()
        token = call("POST", "/session", headers={"Authorization": "Basic " + auth})
        h = {"vmware-api-session-id": token}
        try:
            found = call("POST", "/tagging/tag-association?~action=list-attached-tags-on-objects",
                         {"object_ids": [{"id": i, "type": "VirtualMachine"} for i in ids]}, h) or []
            names: dict[str, str] = {}
            out = {}
            for entry in found:
                for t in entry.get("tag_ids") or []:
                    if t not in names:
                        names[t] = call("GET", f"/tagging/tag/id:{t}", headers=h)["name"]
                out[entry["object_id"]["id"]] = sorted(names[t] for t in entry.get("tag_ids") or [])
            return out
        finally:
            try:
                call("DELETE", "/session", headers=h)
            except (OSError, http.client.HTTPException, ValueError):
                pass
    except (OSError, http.client.HTTPException, ValueError, KeyError, TypeError):
        return None
    finally:
        c.close()


def _tags(vm) -> list[str]:
    tags = set()
    try:
        fields = {f.key: f.name for f in (vm.availableField or [])}
        for cv in vm.customValue or []:
            if fields.get(cv.key, "").lower() in ("tags", "alike-tags") and getattr(cv, "value", ""):
                tags.update(t.strip() for t in cv.value.split(",") if t.strip())
    except Exception:
        pass
    return sorted(tags)


_CONNS: dict = {}  # (scheme, host, port) -> HTTP connection, per worker process


class VmwareDisk(ExtentDisk):
    """A snapshot's base disk, read over the datastore HTTP interface with Range requests."""

    _retry_on = (OSError, http.client.HTTPException)

    def __init__(self, name, size, allocated, *, scheme, host, port, path, cookie, ca_bundle, marker, node_id=None):
        self.name, self.size = name, size
        self.scheme, self.host, self.port, self.path = scheme, host, port, path
        self.cookie, self.ca_bundle = cookie, ca_bundle
        self.cbt_marker = marker
        self.node_id = node_id
        self._set_extents(allocated)
        self._cbt = None  # (snapshot, device key): in the snapshot actor only

    def __getstate__(self):
        s = dict(self.__dict__)
        s["_cbt"] = None
        return s

    def _conn(self):
        key = (self.scheme, self.host, self.port)
        c = _CONNS.get(key)
        if c is None:
            c = (http.client.HTTPSConnection(self.host, self.port, context=https_context(self.ca_bundle), timeout=120)
                 if self.scheme == "https" else http.client.HTTPConnection(self.host, self.port, timeout=120))
            _CONNS[key] = c
        return c

    def _read_range(self, part: np.ndarray, offset: int) -> int:
        c = self._conn()
        c.request("GET", self.path, headers={"Cookie": self.cookie,
                                             "Range": f"bytes={offset}-{offset + len(part) - 1}"})
        r = c.getresponse()
        if r.status not in (200, 206):
            r.read()
            raise SourceError(f"reading disk {self.name}: the datastore answered HTTP {r.status} {r.reason}")
        if r.status == 200 and offset:  # a server that ignores Range: refuse rather than misplace bytes
            r.read()
            raise SourceError(f"reading disk {self.name}: the datastore ignores Range requests")
        mv, got = memoryview(part), 0
        while got < len(mv):
            k = r.readinto(mv[got:])
            if not k:
                raise SourceError(f"reading disk {self.name}: the datastore sent {got} of {len(mv)} bytes at {offset}")
            got += k
        if r.status == 200:
            r.close()
            _CONNS.pop((self.scheme, self.host, self.port), None)
        return got

    def _reconnect(self) -> bool:
        c = _CONNS.pop((self.scheme, self.host, self.port), None)
        if c is not None:
            c.close()
        return True

    def changed_extents(self, since):
        if self._cbt is None:
            return self._no_cbt(since, "changed block tracking is off for this disk")
        snap, key = self._cbt
        try:
            return snap.query(key, since, self.size)
        except SourceError as e:
            return self._no_cbt(since, f"the server refused the changeId ({e})")


class VmwareSnapshot(Snapshot):
    def __init__(self, conn: Conn, vm, info: VMInfo):
        self.conn, self._vm, self.vm = conn, vm, info
        self.snap = None
        self.disks: list[VmwareDisk] = []
        self._released = False

    def query(self, key: int, change_id: str, size: int) -> list[tuple[int, int]]:
        """QueryChangedDiskAreas over the whole disk, answer by answer -> merged areas."""
        out, off = [], 0
        while off < size:
            try:
                info = self._vm.QueryChangedDiskAreas(snapshot=self.snap, deviceKey=key, startOffset=off,
                                                      changeId=change_id)
            except self.conn.vmodl.MethodFault as e:
                raise SourceError(_fault(e)) from None
            for a in info.changedArea or []:
                s, e = max(int(a.start), 0), min(int(a.start) + int(a.length), size)
                if e > s:
                    if out and out[-1][0] + out[-1][1] >= s:
                        out[-1] = (out[-1][0], max(out[-1][0] + out[-1][1], e) - out[-1][0])
                    else:
                        out.append((s, e - s))
            step = int(info.startOffset) + int(info.length) - off
            if step <= 0:
                raise SourceError("QueryChangedDiskAreas made no progress")
            off += step
        return out

    def release(self, failed: bool = False) -> None:
        if self._released:
            return
        self._released = True
        try:
            if self.snap is not None:
                try:
                    self.conn.wait(self.snap.RemoveSnapshot_Task(removeChildren=False, consolidate=True),
                                   f"removing the snapshot of {self.vm.name}")
                except SourceError as e:
                    log.warning("%s (the next backup of the VM removes it)", e)
        finally:
            self.conn.close()


class VmwareSource(Source):
    def __init__(self, url: str, credentials: str | None = None, ca_bundle: str | None = None, cbt: bool = True,
                 quiesce: bool = False, node_id: str | None = None, **_ignored):
        u = urlparse(url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise SourceError(f"vmware:{url}: give the vCenter or ESXi URL, e.g. vmware:https://vcenter.example")
        self.url = url.rstrip("/")
        self.username, self._password = load_credentials(credentials, "VMWARE")
        if ca_bundle and not os.path.isfile(ca_bundle):
            raise AuthError(f"CA bundle {ca_bundle} does not exist")
        self.ca_bundle, self.cbt, self.quiesce, self.node_id = ca_bundle, cbt, quiesce, node_id
        self.notes = ([f"{self.url} is plain HTTP: the password and the data travel unencrypted "
                       "(use https:// outside a lab)"] if u.scheme == "http" else [])

    def __repr__(self):
        return f"VmwareSource({self.url!r}, user={self.username!r})"

    def login(self) -> Conn:
        return Conn(self.url, self.username, self._password, self.ca_bundle)

    def _info(self, conn: Conn, vm, tags: list[str] | None = None) -> VMInfo:
        cfg = vm.config
        notes = list(self.notes)
        disks = []
        for name, d, why in _disks(conn.vim, cfg.hardware.device):
            if why:
                notes.append(why)
            else:
                disks.append((name, int(d.capacityInBytes or d.capacityInKB * 1024)))
        nics = [{"device": d.deviceInfo.label if d.deviceInfo else str(d.key), "mac": getattr(d, "macAddress", ""),
                 "network": getattr(getattr(d.backing, "network", None), "name", None)
                 or getattr(d.backing, "deviceName", None)}
                for d in cfg.hardware.device if isinstance(d, conn.vim.vm.device.VirtualEthernetCard)]
        info = VMInfo(vm.name, cfg.instanceUuid or cfg.uuid, disks, sorted(set(_tags(vm)) | set(tags or [])),
                      _STATES.get(str(vm.runtime.powerState), "unknown"), notes, folder=_folder(vm))
        info.shape = {"platform": "vmware", "datacenter": _datacenter(vm), "vcpus": int(cfg.hardware.numCPU or 1),
                      "memory_bytes": int(cfg.hardware.memoryMB or 0) << 20, "guest_id": cfg.guestId or "",
                      "description": cfg.annotation or "", "nics": nics}
        return info

    def _all(self, conn: Conn):
        vms = []
        for vm in conn.vms():
            try:
                cfg = vm.config
            except conn.vmodl.MethodFault:
                continue
            if cfg is not None and not cfg.template:
                vms.append(vm)
        tags = rest_tags(conn, self.username, self._password, [vm._moId for vm in vms]) or {}
        out = [(vm, self._info(conn, vm, tags.get(vm._moId))) for vm in vms]
        return sorted(out, key=lambda t: t[1].name)

    def list_vms(self) -> list[VMInfo]:
        conn = self.login()
        try:
            return [i for _, i in self._all(conn)]
        finally:
            conn.close()

    def snapshot(self, want: str) -> VmwareSnapshot:
        conn = self.login()
        try:
            return self._snapshot(conn, want)
        except conn.vmodl.MethodFault as e:
            conn.close()
            raise SourceError(f"snapshot of VM {want} at {self.url} failed: {_fault(e)}") from None
        except BaseException:
            conn.close()
            raise

    def _snapshot(self, conn: Conn, want: str) -> VmwareSnapshot:
        found = [t for t in self._all(conn) if want in (t[1].name, t[1].id)]
        if not found:
            raise VMNotFound(f"no VM named {want!r} at {self.url}: see `alike inventory vmware:{self.url}`")
        vm, info = found[0]
        if not info.disks:
            raise SourceError(f"VM {info.name} has no disk that can be backed up")
        self._cleanup(conn, vm)
        notes = list(info.notes)
        if self.cbt and not vm.config.changeTrackingEnabled:
            try:
                conn.wait(vm.ReconfigVM_Task(spec=conn.vim.vm.ConfigSpec(changeTrackingEnabled=True)),
                          f"enabling changed block tracking on {info.name}")
            except SourceError as e:
                notes.append(f"changed block tracking cannot be enabled ({e}): every backup reads in full")
        name = f"{PREFIX}{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{secrets.token_hex(3)}"
        snap = VmwareSnapshot(conn, vm, info)
        snap.snap = conn.wait(vm.CreateSnapshot_Task(name=name, description="made by alike for a backup; removed after it",
                                                     memory=False, quiesce=self.quiesce), f"snapshot of VM {info.name}")
        try:
            dc = _datacenter(vm)
            wanted = {n for n, _ in info.disks}
            missing_call = None
            for dname, d, why in _disks(conn.vim, snap.snap.config.hardware.device):
                if why or dname not in wanted:
                    continue
                size = int(d.capacityInBytes or d.capacityInKB * 1024)
                ds, rel = d.backing.fileName[1:].split("] ", 1)
                flat = rel[:-len(".vmdk")] + "-flat.vmdk" if rel.endswith(".vmdk") else rel
                path = f"/folder/{quote(flat)}?" + urlencode({"dcPath": dc, "dsName": ds})
                try:
                    alloc = snap.query(d.key, "*", size)
                except SourceError as e:
                    missing_call = missing_call or str(e)
                    alloc = [(0, size)] if size else []
                marker = getattr(d.backing, "changeId", None) if self.cbt else None
                disk = VmwareDisk(dname, size, alloc, scheme=conn.scheme, host=conn.host, port=conn.port, path=path,
                                  cookie=conn.cookie, ca_bundle=self.ca_bundle, marker=marker or None,
                                  node_id=self.node_id if conn.host in ("localhost", "::1") or
                                  conn.host.startswith("127.") else None)
                if disk.cbt_marker:
                    disk._cbt = (snap, d.key)
                snap.disks.append(disk)
            if missing_call:
                notes.append(f"the server cannot say which areas are allocated ({missing_call}): disks were read "
                             "whole (zero blocks are still not stored)")
        except BaseException:
            snap.release(failed=True)
            raise
        info.notes = notes
        snap.vm = info
        return snap

    def _cleanup(self, conn: Conn, vm) -> None:
        """Snapshots named alike- that a killed backup left: removed."""
        def walk(trees):
            for t in trees or []:
                yield t
                yield from walk(t.childSnapshotList)

        try:
            roots = vm.snapshot.rootSnapshotList if vm.snapshot else []
        except conn.vmodl.MethodFault:
            roots = []
        for t in list(walk(roots)):
            if t.name.startswith(PREFIX):
                log.warning("VM %s: removing snapshot %s left by a killed backup", vm.name, t.name)
                try:
                    conn.wait(t.snapshot.RemoveSnapshot_Task(removeChildren=False, consolidate=True),
                              f"removing snapshot {t.name}")
                except SourceError as e:
                    log.warning("%s", e)
