"""Full restore into vSphere: a new VM from any version (of a vSphere, Xen or KVM VM, or an image)
through pyvmomi.

`check()` (before any data moves, before Ray starts): logs in, finds the datacenter, the
datastore (`--datastore`, default: the one with most free space), the folder (`--folder`, a path
under the datacenter's VM folder) and the resource pool (`--pool`, default: the first
host's or cluster's), refuses a name already used and a datastore without room for the disks
(exit 4). `create()`: `CreateVM_Task` with the version's shape (vCPUs, memory, guest id where
known, annotation) and one thin disk of the right size per version disk on a paravirtual SCSI
controller, each disk's data uploaded through the datastore HTTP interface (PUT of
`<disk>-flat.vmdk`), NICs on `--network` (else left out, with a note), `PowerOnVM_Task` with
`--start`. Whatever fails is destroyed.
"""
from __future__ import annotations

import http.client
import os
from urllib.parse import quote, urlencode, urlparse

from storage.errors import RestoreTargetFull, StoreError

from ..sources import SourceError
from ..sources.credentials import load_credentials
from ..sources.vmware import Conn, _fault, https_context


class VmwareTargetError(StoreError):
    """{detail}"""


def _h(n: int) -> str:
    from ..ui import _h as h

    return h(n)


class VmwareTarget:
    def __init__(self, url: str, credentials: str | None = None, ca_bundle: str | None = None):
        self.url = url.rstrip("/")
        u = urlparse(self.url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise VmwareTargetError(f"--to vmware:{url}: give the vCenter or ESXi URL, e.g. vmware:https://vcenter.example")
        self.ca_bundle = ca_bundle
        self.username, self._password = load_credentials(credentials, "VMWARE")
        self.conn: Conn | None = None

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def check(self, name: str, datastore: str | None, folder: str | None, pool: str | None, sizes: list[int],
              network: str | None) -> None:
        self.conn = c = Conn(self.url, self.username, self._password, self.ca_bundle)
        vim = c.vim
        if any(v.name == name for v in c.vms()):
            raise VmwareTargetError(f"{self.url} already has a VM named {name!r}: choose another --name")
        dcs = [e for e in c.content.rootFolder.childEntity if isinstance(e, vim.Datacenter)]
        if not dcs:
            raise VmwareTargetError(f"{self.url} has no datacenter")
        self.dc = dcs[0]
        stores = {d.name: d for d in self.dc.datastore}
        if datastore:
            if datastore not in stores:
                raise VmwareTargetError(f"{self.url} has no datastore {datastore!r}: use one of {', '.join(sorted(stores))}")
            self.ds = stores[datastore]
        else:
            self.ds = max(stores.values(), key=lambda d: d.summary.freeSpace or 0)
        need, free = sum(sizes), int(self.ds.summary.freeSpace or 0)
        if need > free:
            raise RestoreTargetFull(f"datastore {self.ds.name!r} of {self.url}: the disks need {_h(need)}, "
                                    f"{_h(free)} are free")
        self.folder = self.dc.vmFolder
        for part in filter(None, (folder or "").split("/")):
            nxt = [f for f in self.folder.childEntity if isinstance(f, vim.Folder) and f.name == part]
            if not nxt:
                raise VmwareTargetError(f"{self.url} has no VM folder {folder!r} in datacenter {self.dc.name}")
            self.folder = nxt[0]
        pools = []
        for cr in self.dc.hostFolder.childEntity:
            if isinstance(cr, vim.ComputeResource) and cr.resourcePool is not None:
                pools.append((cr.name, cr.resourcePool))
        if pool:
            pools = [(n, p) for n, p in pools if n == pool]
            if not pools:
                raise VmwareTargetError(f"{self.url} has no host or cluster {pool!r} in datacenter {self.dc.name}")
        if not pools:
            raise VmwareTargetError(f"{self.url} has no resource pool in datacenter {self.dc.name}")
        self.pool = pools[0][1]
        self.network = None
        if network:
            nets = [n for n in self.dc.network if n.name == network]
            if not nets:
                raise VmwareTargetError(f"{self.url} has no network {network!r} in datacenter {self.dc.name}")
            self.network = nets[0]

    def create(self, name: str, meta: dict, raws: list[tuple[dict, str]], memory=None, start: bool = False,
               memory_mib: int | None = None, vcpus: int | None = None) -> dict:
        """raws: [(disk entry of the version, restored raw file)]; `memory` (a Xen memory image) is
        never given: vSphere cannot resume another hypervisor's memory."""
        c, vim = self.conn, self.conn.vim
        shape = meta.get("shape") or {}
        mem = memory_mib or (int(shape.get("memory_bytes") or 0) >> 20) or 1024
        ncpu = vcpus or int(shape.get("vcpus") or 1)
        guest = shape.get("guest_id") if shape.get("platform") == "vmware" and shape.get("guest_id") else "otherGuest64"
        ds = self.ds.name
        changes = [vim.vm.device.VirtualDeviceSpec(
            operation="add", device=vim.vm.device.ParaVirtualSCSIController(key=1000, busNumber=0, sharedBus="noSharing"))]
        files = []
        for n, (entry, _) in enumerate(raws):
            fname = f"[{ds}] {name}/{name}_{n}.vmdk"
            files.append(fname)
            disk = vim.vm.device.VirtualDisk(
                key=2000 + n, controllerKey=1000, unitNumber=n if n < 7 else n + 1,
                capacityInKB=(entry["size"] + 1023) // 1024, capacityInBytes=entry["size"],
                backing=vim.vm.device.VirtualDisk.FlatVer2BackingInfo(fileName=fname, diskMode="persistent",
                                                                      thinProvisioned=True))
            changes.append(vim.vm.device.VirtualDeviceSpec(operation="add", fileOperation="create", device=disk))
        nics = shape.get("nics") or []
        notes = []
        if self.network is not None:
            for i, _ in enumerate(nics or [{}]):
                changes.append(vim.vm.device.VirtualDeviceSpec(operation="add", device=vim.vm.device.VirtualVmxnet3(
                    key=4000 + i, backing=vim.vm.device.VirtualEthernetCard.NetworkBackingInfo(
                        deviceName=self.network.name, network=self.network))))
        elif nics:
            notes.append(f"{len(nics)} NICs left out: connect them with --network NAME")
        spec = vim.vm.ConfigSpec(name=name, memoryMB=mem, numCPUs=ncpu, guestId=guest,
                                 annotation=shape.get("description") or
                                 f"restored by alike from {meta['vm']}@{meta['version']}",
                                 files=vim.vm.FileInfo(vmPathName=f"[{ds}]"), deviceChange=changes)
        vm = None
        try:
            vm = c.wait(self.folder.CreateVM_Task(config=spec, pool=self.pool), f"creating VM {name}")
            made = sorted((d for d in vm.config.hardware.device if isinstance(d, vim.vm.device.VirtualDisk)),
                          key=lambda d: d.unitNumber)
            for d, (_, raw) in zip(made, raws):
                self._put(d.backing.fileName, raw)
            if start:
                c.wait(vm.PowerOnVM_Task(), f"powering on {name}")
            uuid = vm.config.instanceUuid
        except BaseException:
            if vm is not None:
                try:
                    if str(vm.runtime.powerState) == "poweredOn":
                        c.wait(vm.PowerOffVM_Task(), "power off")
                    c.wait(vm.Destroy_Task(), f"removing the half-made VM {name}")
                except Exception:
                    pass
            raise
        return {"url": self.url, "name": name, "uuid": uuid, "datastore": ds, "disks": len(raws),
                "state": "running" if start else "off", "notes": notes}

    def _put(self, file_name: str, raw: str) -> None:
        c = self.conn
        dsname, rel = file_name[1:].split("] ", 1)
        flat = rel[:-len(".vmdk")] + "-flat.vmdk"
        path = f"/folder/{quote(flat)}?" + urlencode({"dcPath": self.dc.name, "dsName": dsname})
        conn = (http.client.HTTPSConnection(c.host, c.port, context=https_context(self.ca_bundle), blocksize=1 << 20)
                if c.scheme == "https" else http.client.HTTPConnection(c.host, c.port, blocksize=1 << 20))
        size = os.path.getsize(raw)
        try:
            with open(raw, "rb") as f:
                conn.request("PUT", path, body=f, headers={"Cookie": c.cookie, "Content-Length": str(size),
                                                           "Content-Type": "application/octet-stream"})
            r = conn.getresponse()
            r.read()
            if r.status not in (200, 201, 204):
                raise SourceError(f"the datastore refused the upload of {flat}: HTTP {r.status} {r.reason}")
        except (OSError, http.client.HTTPException) as e:
            raise SourceError(f"uploading {flat} to {self.url} failed: {e}") from None
        finally:
            conn.close()


__all__ = ["VmwareTarget", "VmwareTargetError", "_fault"]
