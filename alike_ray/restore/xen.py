"""Full restore into a XenServer / XCP-ng pool: a new VM from any version (of a Xen VM, a KVM VM
or an image), through XenAPI.

`check()` (before any data moves, before Ray starts): logs in, finds the SR (`--sr`, a name label
or uuid; default: the pool's default SR), refuses a name that a VM of the pool already has, and
refuses when the SR has no room for the disks (SR_FULL: exit 4).
`create()`: `VM.create` with the version's recorded shape (vCPUs, memory, name, description,
boot settings; defaults for versions of other platforms), `VDI.create` on the SR for each disk,
`/import_raw_vdi?format=raw` of each restored raw file, `VBD.create` (userdevice n, the first
bootable), NICs mapped with `--network` (else left out, with a note), and `VM.start` with
`--start`. A version with a memory image (a checkpoint) comes back as a suspended VM: the VM is
sent as an XVA (`/import`, ova.xml with power_state Suspended and its suspend VDI), as XAPI
itself exports a suspended VM. Whatever fails removes what this restore made.
"""
from __future__ import annotations

import hashlib
import http.client
import os
import tarfile
import time
import xmlrpc.client
from urllib.parse import urlencode, urlparse

from storage.errors import RestoreTargetFull, StoreError

from ..sources import SourceError
from ..sources.xen import Api, _int, https_context, load_credentials

NULL = "OpaqueRef:NULL"


class XenTargetError(StoreError):
    """{detail}"""


def _h(n: int) -> str:
    from ..ui import _h as h

    return h(n)


class XenTarget:
    def __init__(self, url: str, credentials: str | None = None, ca_bundle: str | None = None):
        self.url = url.rstrip("/")
        u = urlparse(self.url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise XenTargetError(f"--to xen:{url}: give the pool master's URL, e.g. xen:https://pool-master.example")
        self.ca_bundle = ca_bundle
        self.username, self._password = load_credentials(credentials)
        self.api: Api | None = None

    def _login(self) -> Api:
        if self.api is None:
            self.api = Api(self.url, self.username, self._password, self.ca_bundle)
        return self.api

    def close(self) -> None:
        if self.api is not None:
            self.api.logout()
            self.api = None

    # -- before the restore -------------------------------------------------------------------
    def check(self, name: str, sr: str | None, sizes: list[int], networks: list[str]) -> None:
        api = self._login()
        x = api.x
        vms = x.VM.get_all_records()
        if any(v["name_label"] == name and not v.get("is_a_snapshot") and not v.get("is_a_template")
               for v in vms.values()):
            raise XenTargetError(f"the pool at {self.url} already has a VM named {name!r}: choose another --name")
        srs = x.SR.get_all_records()
        if sr:
            found = [r for r, s in srs.items() if sr in (s["name_label"], s["uuid"])]
            if not found:
                have = ", ".join(sorted(repr(s["name_label"]) for s in srs.values() if s.get("content_type") != "iso"))
                raise XenTargetError(f"the pool at {self.url} has no SR {sr!r}: use one of {have}")
            if len(found) > 1:
                raise XenTargetError(f"{len(found)} SRs are named {sr!r}: give the uuid of one with --sr")
            self.sr = found[0]
        else:
            pool = x.pool.get_all()[0]
            self.sr = x.pool.get_default_SR(pool)
            if self.sr == NULL or self.sr not in srs:
                raise XenTargetError(f"the pool at {self.url} has no default SR: choose one with --sr NAME")
        rec = srs[self.sr]
        free = _int(rec.get("physical_size")) - _int(rec.get("physical_utilisation"))
        need = sum(sizes)
        if need > free:
            raise RestoreTargetFull(f"SR {rec['name_label']!r} of {self.url}: the disks need {_h(need)}, "
                                    f"{_h(free)} are free (SR_FULL)")
        self.sr_name = rec["name_label"]
        nets = x.network.get_all_records()
        self.networks = []
        for spec in networks:
            orig, sep, want = spec.rpartition("=")
            found = [r for r, n in nets.items() if want in (n["name_label"], n["uuid"], n.get("bridge"))]
            if not found:
                raise XenTargetError(f"the pool at {self.url} has no network {want!r}: see `xe network-list`")
            self.networks.append((orig if sep else None, found[0]))

    # -- the restore ----------------------------------------------------------------------------
    def create(self, name: str, meta: dict, raws: list[tuple[dict, str]], memory: tuple[dict, str] | None,
               start: bool = False, memory_mib: int | None = None, vcpus: int | None = None) -> dict:
        """raws: [(disk entry of the version, restored raw file)]; memory: the memory image's (entry,
        raw file) to come back suspended."""
        api = self._login()
        x = api.x
        shape = meta.get("shape") or {}
        mem = memory_mib * 1024 * 1024 if memory_mib else (_int(shape.get("memory_bytes")) or 1 << 30)
        ncpu = vcpus or _int(shape.get("vcpus"), 1) or 1
        record = _vm_record(name, meta, shape, mem, ncpu)
        notes = []
        nics = shape.get("nics") or []
        vifs = []
        for i, nic in enumerate(nics):
            net = next((r for o, r in self.networks if o in (None, nic.get("network"), nic.get("device"))), None)
            if net is not None:
                vifs.append((str(nic.get("device") or i), net, nic.get("mac") or ""))
        if len(vifs) < len(nics):
            notes.append(f"{len(nics) - len(vifs)} of {len(nics)} NICs left out: connect them with --network NAME "
                         "(or ORIGINAL=NAME)")
        if memory is not None:
            return self._import_suspended(api, name, record, raws, memory, vifs, notes, start)
        made_vdis, vm = [], None
        try:
            vm = api.call(f"creating VM {name}", x.VM.create, record)
            for n, (entry, raw) in enumerate(raws):
                vdi = self._vdi(api, f"{name} {entry['name']}", entry["size"])
                made_vdis.append(vdi)
                self._put(api, vdi, raw)
                api.call("attaching a disk", x.VBD.create, _vbd_record(vm, vdi, n))
            for dev, net, mac in vifs:
                api.call("adding a NIC", x.VIF.create, _vif_record(vm, net, dev, mac))
            if start:
                api.call(f"starting VM {name}", x.VM.start, vm, False, False)
            uuid = x.VM.get_uuid(vm)
        except BaseException:
            if vm is not None:
                try:
                    x.VM.destroy(vm)
                except Exception:
                    pass
            for v in made_vdis:
                try:
                    x.VDI.destroy(v)
                except Exception:
                    pass
            raise
        return {"url": self.url, "name": name, "uuid": uuid, "sr": self.sr_name,
                "disks": len(raws), "state": "running" if start else "halted", "notes": notes}

    def _vdi(self, api: Api, label: str, size: int) -> str:
        try:
            return api.x.VDI.create({"name_label": label, "name_description": "restored by alike", "SR": self.sr,
                                     "virtual_size": str(size), "type": "user", "sharable": False,
                                     "read_only": False, "other_config": {}, "xenstore_data": {},
                                     "sm_config": {}, "tags": []})
        except api.XenAPI.Failure as e:
            if e.details[0] == "SR_FULL":
                raise RestoreTargetFull(f"SR {self.sr_name!r} of {self.url} (SR_FULL: {_h(size)} asked)") from None
            raise SourceError(f"creating a disk on SR {self.sr_name!r}: XAPI says {' '.join(map(str, e.details))}") from None

    def _conn(self, api: Api):
        u = urlparse(api.url)
        if u.scheme == "https":
            return http.client.HTTPSConnection(u.hostname, u.port or 443, blocksize=1 << 20,
                                               context=https_context(self.ca_bundle))
        return http.client.HTTPConnection(u.hostname, u.port or 80, blocksize=1 << 20)

    def _put(self, api: Api, vdi: str, raw: str) -> None:
        q = urlencode({"session_id": api.ref, "vdi": vdi, "format": "raw"})

        def pieces():
            with open(raw, "rb") as f:
                while piece := f.read(1 << 20):
                    yield piece

        self._http_put(api, f"/import_raw_vdi?{q}", pieces(), os.path.getsize(raw), "the disk import")

    def _http_put(self, api: Api, path: str, body, size: int, what: str) -> None:
        """PUT `body` (an iterable of bytes, `size` in all) to the pool master; 200 or one SourceError."""
        conn = self._conn(api)
        try:
            conn.putrequest("PUT", path)
            conn.putheader("Content-Length", str(size))
            conn.endheaders()
            for piece in body:
                conn.send(piece)
            r = conn.getresponse()
            r.read()
            if r.status != 200:
                raise SourceError(f"the pool refused {what}: HTTP {r.status} {r.reason}")
        except (OSError, http.client.HTTPException) as e:
            raise SourceError(f"{what} into {self.url} failed: {e}") from None
        finally:
            conn.close()

    # -- a suspended VM: sent as an XVA -----------------------------------------------------------
    def _import_suspended(self, api, name, record, raws, memory, vifs, notes, start) -> dict:
        x = api.x
        task = x.task.create(f"alike restore {name}", "import of a suspended VM")
        q = urlencode({"session_id": api.ref, "sr_id": self.sr, "task_id": task})
        body = XvaStream(record, raws, memory, vifs)
        self._http_put(api, f"/import?{q}", body, body.size, f"the import of suspended VM {name}")
        for _ in range(600):
            status = x.task.get_status(task)
            if status != "pending":
                break
            time.sleep(0.1)
        if status != "success":
            err = x.task.get_record(task).get("error_info") or [status]
            x.task.destroy(task)
            raise SourceError(f"the pool could not import suspended VM {name}: {' '.join(map(str, err))}")
        result = x.task.get_result(task)
        x.task.destroy(task)
        (refs,), _ = xmlrpc.client.loads(f"<params><param>{result}</param></params>")
        vm = refs[0]
        if start:
            api.call(f"resuming VM {name}", x.VM.resume, vm, False, False)
        return {"url": self.url, "name": name, "uuid": x.VM.get_uuid(vm), "sr": self.sr_name,
                "disks": len(raws), "state": "running" if start else "suspended", "notes": notes}


def _vm_record(name: str, meta: dict, shape: dict, mem: int, ncpu: int) -> dict:
    boot = shape.get("boot") or {}
    policy = boot.get("HVM_boot_policy", "BIOS order") if shape.get("platform") == "xen" else "BIOS order"
    return {
        "name_label": name,
        "name_description": shape.get("description") or f"restored by alike from {meta['vm']}@{meta['version']}",
        "user_version": "1", "is_a_template": False, "affinity": NULL,
        "memory_static_max": str(mem), "memory_dynamic_max": str(mem), "memory_dynamic_min": str(mem),
        "memory_static_min": str(min(mem, 16 << 20)), "memory_target": str(mem),
        "VCPUs_params": {}, "VCPUs_max": str(ncpu), "VCPUs_at_startup": str(ncpu),
        "actions_after_shutdown": "destroy", "actions_after_reboot": "restart", "actions_after_crash": "restart",
        "PV_bootloader": boot.get("PV_bootloader", ""), "PV_kernel": "", "PV_ramdisk": "", "PV_args": "",
        "PV_bootloader_args": "", "PV_legacy_args": "",
        "HVM_boot_policy": policy, "HVM_boot_params": boot.get("HVM_boot_params") or {"order": "cd"},
        "HVM_shadow_multiplier": 1.0,
        "platform": boot.get("platform") or {"acpi": "1", "apic": "true", "pae": "true", "viridian": "false"},
        "PCI_bus": "", "other_config": {"alike_restored_from": f"{meta['vm']}@{meta['version']}"},
        "recommendations": "", "xenstore_data": {}, "ha_always_run": False, "ha_restart_priority": "",
        "tags": [], "blocked_operations": {}, "protection_policy": NULL, "is_snapshot_from_vmpp": False,
        "appliance": NULL, "start_delay": "0", "shutdown_delay": "0", "order": "0", "suspend_SR": NULL,
        "version": "0", "generation_id": "", "hardware_platform_version": "0", "has_vendor_device": False,
        "reference_label": "", "domain_type": "hvm", "NVRAM": {},
    }


def _vbd_record(vm: str, vdi: str, n: int) -> dict:
    return {"VM": vm, "VDI": vdi, "userdevice": str(n), "bootable": n == 0, "mode": "RW", "type": "Disk",
            "empty": False, "other_config": {}, "qos_algorithm_type": "", "qos_algorithm_params": {},
            "device": "", "unpluggable": True}


def _vif_record(vm: str, net: str, dev: str, mac: str) -> dict:
    return {"device": dev, "network": net, "VM": vm, "MAC": mac, "MTU": "1500", "other_config": {},
            "qos_algorithm_type": "", "qos_algorithm_params": {}, "locking_mode": "network_default",
            "ipv4_allowed": [], "ipv6_allowed": []}


CHUNK = 1 << 20


class XvaStream:
    """An XVA (the format of XAPI's VM export) built on the fly: a tar of ova.xml (the XML-RPC
    header {version, objects}) and each VDI's data as `Ref:<id>/<8-digit chunk>` pieces of 1 MiB,
    each followed by `<chunk>.checksum` (its SHA-1 in hex); zero chunks are left out but the last
    one is always sent. `size` is known in advance (Content-Length), the data is read once."""

    def __init__(self, record: dict, raws, memory, vifs):
        vm = dict(record, power_state="Suspended", VBDs=[], VIFs=[], suspend_VDI="Ref:memory")
        objects, self.vdis = [], []
        for n, (entry, raw) in enumerate(raws):
            rid = f"Ref:{n + 1}"
            objects.append(_obj("VDI", rid, entry["size"], f"{record['name_label']} {entry['name']}", "user"))
            objects.append({"class": "VBD", "id": f"Ref:vbd{n}",
                            "snapshot": dict(_vbd_record("Ref:vm", rid, n), currently_attached=True)})
            vm["VBDs"].append(f"Ref:vbd{n}")
            self.vdis.append((rid, raw))
        entry, raw = memory
        objects.append(_obj("VDI", "Ref:memory", entry["size"], f"{record['name_label']} memory", "suspend"))
        self.vdis.append(("Ref:memory", raw))
        for i, (dev, net, mac) in enumerate(vifs):
            objects.append({"class": "VIF", "id": f"Ref:vif{i}", "snapshot": _vif_record("Ref:vm", net, dev, mac)})
            vm["VIFs"].append(f"Ref:vif{i}")
        objects.insert(0, {"class": "VM", "id": "Ref:vm", "snapshot": vm})
        header = {"version": {"hostname": "alike", "date": time.strftime("%Y-%m-%d"), "product_version": "",
                              "product_brand": "alike", "build_number": "", "xapi_major": 1, "xapi_minor": 1,
                              "export_vsn": 2},
                  "objects": objects}
        self.ova = xmlrpc.client.dumps((header,), allow_none=True)
        self.ova = self.ova[self.ova.index("<value>"):self.ova.rindex("</value>") + len("</value>")].encode()
        self.plan = []  # (tar member name, raw file, offset, length) in order; None file: ova.xml / checksum
        for rid, raw in self.vdis:
            size = os.path.getsize(raw)
            nchunks = max(1, (size + CHUNK - 1) // CHUNK)
            with open(raw, "rb") as f:
                for i in range(nchunks):
                    f.seek(i * CHUNK)
                    data = f.read(CHUNK)
                    if data.count(0) == len(data) and i != nchunks - 1:
                        continue  # a zero chunk: left out
                    self.plan.append((f"{rid}/{i:08d}", raw, i * CHUNK, len(data), hashlib.sha1(data).hexdigest()))
        self.size = _tar_size(len(self.ova)) + sum(_tar_size(p[3]) + _tar_size(40) for p in self.plan) + 1024

    def __iter__(self):
        yield _tar_member("ova.xml", self.ova)
        handles = {}
        try:
            for name, raw, off, ln, sha in self.plan:
                f = handles.get(raw) or handles.setdefault(raw, open(raw, "rb"))
                f.seek(off)
                data = f.read(ln)
                if hashlib.sha1(data).hexdigest() != sha:
                    raise SourceError(f"{raw} changed while it was sent")
                yield _tar_member(name, data)
                yield _tar_member(name + ".checksum", sha.encode())
        finally:
            for f in handles.values():
                f.close()
        yield b"\0" * 1024


def _obj(cls: str, rid: str, size: int, label: str, kind: str) -> dict:
    return {"class": cls, "id": rid, "snapshot": {
        "uuid": "", "name_label": label, "name_description": "restored by alike", "SR": "Ref:sr",
        "virtual_size": str(size), "type": kind, "sharable": False, "read_only": False, "other_config": {},
        "xenstore_data": {}, "sm_config": {}, "tags": [], "VBDs": []}}


def _tar_size(n: int) -> int:
    return 512 + (n + 511) // 512 * 512


def _tar_member(name: str, data: bytes) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = int(time.time())
    head = info.tobuf(format=tarfile.USTAR_FORMAT)
    return head + data + b"\0" * ((512 - len(data) % 512) % 512)

