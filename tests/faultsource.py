"""A fault-injecting, in-memory source for the tests: VMs whose disks are numpy buffers, with
read errors at chosen offsets, slow reads, and changed block tracking of the writes made
through `write()`. It honours the source contract (alike_ray/sources/base.py) and binds
tests/source_contract.py, so that the pipeline tests that use it test what a real source does.

Picklable as a whole (the buffers travel with it), so that the snapshot actor and the Ray read
tasks use it as they would any source. What travels is the state at the time it is handed to
the backup: writes made afterwards reach the next backup.

    src = FaultSource(str(tmp_path / "fault-state"))
    src.add_vm("mem", {"d0": data})                 # data: a numpy uint8 array
    src.fail_reads("mem", "d0", 5 * MiB, 1)         # any read touching that byte fails
    src.slow_reads("mem", "d0", 0, MiB, 0.2)        # reads touching it take 0.2 s longer

Snapshots leave a file in `state_dir` until they are released (also from the Ray worker that
made them: the directory is on this machine), then a record of how (`releases()`), so a test
can see that nothing was left behind and that a failed backup said it failed.
"""
from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass, field

import numpy as np

from alike_ray.sources.base import Disk, Snapshot, Source, SourceError, VMInfo, VMNotFound

CHUNK = 64 * 1024  # allocation granularity: a chunk with a non-zero byte is allocated


@dataclass
class Fault:
    offset: int
    length: int
    delay: float | None = None  # seconds: a slow read; None: the read fails

    def hits(self, offset: int, length: int) -> bool:
        return offset < self.offset + self.length and self.offset < offset + length


@dataclass
class MemVM:
    name: str
    id: str
    disks: dict[str, np.ndarray]
    faults: dict[str, list[Fault]] = field(default_factory=dict)
    writes: list[tuple[str, int, int]] = field(default_factory=list)  # (disk, offset, length), in order


def _merge(extents) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for off, ln in sorted(extents):
        if ln <= 0:
            continue
        if out and off <= out[-1][0] + out[-1][1]:
            out[-1][1] = max(out[-1][1], off + ln - out[-1][0])
        else:
            out.append([off, ln])
    return [(o, n) for o, n in out]


class FaultDisk(Disk):
    def __init__(self, vm: MemVM, name: str, generation: int):
        self.vm_name = vm.name
        self.name = name
        self.data = vm.disks[name].copy()  # frozen: later writes do not reach this snapshot
        self.size = len(self.data)
        self.faults = list(vm.faults.get(name, []))
        self.generation = generation
        self._writes = [(o, n) for d, o, n in vm.writes if d == name]
        self._marks = [d == name for d, _, _ in vm.writes]  # which writes of the VM are ours
        self.cbt_marker = f"fault:{vm.id}:{generation}"
        self._vm_id = vm.id

    def allocated_extents(self):
        chunks = np.flatnonzero(np.add.reduceat(self.data != 0, np.arange(0, self.size, CHUNK))) \
            if self.size else np.zeros(0, np.int64)
        return _merge((int(c) * CHUNK, min(CHUNK, self.size - int(c) * CHUNK)) for c in chunks)

    def changed_extents(self, since):
        """The writes made since the snapshot whose marker is `since` (`fault:<vm id>:<number
        of writes then>`), merged; None for a marker this source did not make for this VM."""
        kind, vm_id, n = ((since or "").split(":") + ["", "", ""])[:3]
        n = int(n) if n.isdigit() else -1
        if kind != "fault" or vm_id != self._vm_id or not 0 <= n <= self.generation:
            self.cbt_note = f"disk {self.name}: no changed block tracking from {since} (not a marker of ours); read in full"
            return None
        k = sum(self._marks[:n])  # our writes before the marker
        return _merge(self._writes[k:])

    def _faults(self, offset: int, length: int) -> None:
        for f in self.faults:
            if f.hits(offset, length):
                if f.delay is None:
                    raise SourceError(f"cannot read disk {self.name} of VM {self.vm_name} at offset {f.offset}: "
                                      "Input/output error (an injected fault)")
                time.sleep(f.delay)

    def read(self, offset: int, length: int) -> np.ndarray:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise SourceError(f"read of {length} bytes at {offset} is outside disk {self.name} ({self.size} bytes)")
        self._faults(offset, length)
        return self.data[offset:offset + length].copy()


class FaultSnapshot(Snapshot):
    def __init__(self, vm: VMInfo, disks, mark: str):
        self.vm = vm
        self.disks = disks
        self._mark = mark
        self.failed = None

    def release(self, failed: bool = False) -> None:
        if self._mark is None:
            return
        self.failed = failed
        try:  # kept, renamed, as the record of how it was released
            os.rename(self._mark, self._mark.replace("snap-", "released-") + ("-failed" if failed else "-ok"))
        except FileNotFoundError:
            pass
        self._mark = None


class FaultSource(Source):
    def __init__(self, state_dir: str):
        self.state_dir = state_dir
        os.makedirs(state_dir, exist_ok=True)
        self.vms: dict[str, MemVM] = {}

    def add_vm(self, name: str, disks: dict[str, np.ndarray]) -> MemVM:
        vm = MemVM(name, f"mem-{uuid.uuid4()}", {n: np.asarray(d, np.uint8).copy() for n, d in disks.items()})
        self.vms[name] = vm
        return vm

    def write(self, vm: str, disk: str, offset: int, data: bytes) -> bytes:
        """A guest write: the disk changes and CBT records it. -> `data`"""
        v = self.vms[vm]
        v.disks[disk][offset:offset + len(data)] = np.frombuffer(data, np.uint8)
        v.writes.append((disk, offset, len(data)))
        return data

    def fail_reads(self, vm: str, disk: str, offset: int, length: int = 1) -> None:
        self.vms[vm].faults.setdefault(disk, []).append(Fault(offset, length))

    def slow_reads(self, vm: str, disk: str, offset: int, length: int, seconds: float) -> None:
        self.vms[vm].faults.setdefault(disk, []).append(Fault(offset, length, seconds))

    def open_snapshots(self) -> list[str]:
        """Snapshots made and not released (in any process of this machine)."""
        return sorted(f for f in os.listdir(self.state_dir) if f.startswith("snap-"))

    def releases(self) -> list[str]:
        """How each released snapshot was released, oldest first: "ok" or "failed"."""
        done = [os.path.join(self.state_dir, f) for f in os.listdir(self.state_dir) if f.startswith("released-")]
        return [p.rsplit("-", 1)[1] for p in sorted(done, key=os.path.getmtime)]

    def _info(self, vm: MemVM) -> VMInfo:
        return VMInfo(vm.name, vm.id, [(n, len(d)) for n, d in vm.disks.items()], power_state="running")

    def list_vms(self) -> list[VMInfo]:
        return [self._info(v) for _, v in sorted(self.vms.items())]

    def snapshot(self, vm: str) -> FaultSnapshot:
        found = self.vms.get(vm) or next((v for v in self.vms.values() if v.id == vm), None)
        if found is None:
            raise VMNotFound(f"no VM named {vm!r} in this in-memory source (it has: {', '.join(sorted(self.vms))})")
        mark = os.path.join(self.state_dir, f"snap-{found.name}-{uuid.uuid4().hex[:8]}")
        with open(mark, "w") as f:
            f.write(str(os.getpid()))
        disks = [FaultDisk(found, n, len(found.writes)) for n in found.disks]
        return FaultSnapshot(self._info(found), disks, mark)
