"""The source contract: what a backup may ask of a source, and nothing else.

A source is one platform's way to reach VMs (`image:`, `kvm:`; later `vmware:`, `xen:`,
`agent:`). The backup pipeline (pipelines/backup.py) calls exactly what the three abstract
classes below declare, never probes for anything else, and knows nothing of the platform:
a new source subclasses them, overrides the abstract methods (and the defaults it can do
better), and binds tests/source_contract.py in a few lines.

`Source` (picklable: it is handed to the snapshot actor, which may run in another process)
- `list_vms()` -> [VMInfo]: every VM it can back up (name, id, disks and their sizes, tags,
  power state, notes for the user, the shape a restore rebuilds). Cheap and side-effect free: `alike inventory` and
  `alike backup` call it before any slow work.
- `snapshot(vm)` -> Snapshot: freezes the disks of the VM named `vm` (its name or its id).
  A VM the source does not have raises `VMNotFound`, a `SourceError` whose message names it
  and says how to list what there is. Any failure leaves nothing behind.

`Snapshot` (lives where it was made, in the snapshot actor; never pickled)
- `vm`: the VMInfo of the VM at snapshot time; `vm.id` is recorded with the version.
- `disks`: [Disk], in the VM's order (a version's disk n is the snapshot's disk n).
- `release(failed)`: removes everything the snapshot made (exports, temporary files,
  hypervisor jobs), and decides which CBT state to keep: `failed=True` keeps the previous
  marker usable, `failed=False` may drop state older than this snapshot's markers. The backup
  calls it exactly once, in a `finally`: also when reading or committing failed. It must not
  raise for what is gone already, and a second call does nothing. `with snapshot:` releases
  with `failed` set from the exception.
  Leftovers of a backup killed before release are found by a mark of the source's own and
  removed by its next snapshot (kvm: exports named `alike-*`).

`Disk` (picklable: it travels to Ray read tasks, which run wherever `node_id` says)
- `name`, `size` (bytes); `role`: "disk", or "memory" for the memory image of a checkpoint
  (recorded with the version; restores into a hypervisor resume from it or leave it out).
- `node_id`: the Ray node that can read it (a local path), or None: any node that reaches the
  source (NBD, HTTP, a shared path).
- `allocated_extents()` -> sorted, non-overlapping [(offset, length)] inside [0, size) outside
  which every byte is zero (holes, unallocated or zero clusters): only these are read. When
  unsure, say allocated: an extent too many costs a read, one too few loses data.
- `changed_extents(since)` -> sorted, non-overlapping [(offset, length)] inside [0, size) that
  cover every byte written since the snapshot whose `cbt_marker` was `since`, or None when that
  is not known (no CBT, an unknown or stale marker, a resized disk): then every allocated
  extent is read and delta analysis works on hashes. Extents may be wider than what was
  written, never narrower: the pipeline turns them into the written 64 KiB granules of
  patched blocks (storage/patch.py) and reads only those, so their precision is the
  granularity of the platform's tracking (QEMU's dirty bitmaps: 64 KiB). When it returns
  None for a `since` it was given, `cbt_note` says why, in a sentence for the job log.
- `read(offset, length)` -> numpy uint8 array of exactly `length` bytes (zeros where nothing
  is allocated), for any range inside [0, size), at any alignment. A read that cannot be
  done raises `SourceError` (never returns short or wrong bytes).
- `read_into(buf, offset)` -> bytes that came from the source: fills every byte of `buf`
  (a writable uint8 array) as `read(offset, len(buf))` would. The default copies from `read`;
  sources override it to read straight into the caller's buffer and to skip holes.
- `prefetch(offset, length)`: a hint that a range will be read soon (default: nothing).
- `cbt_marker`: the platform's mark of this snapshot (a libvirt checkpoint, a vSphere
  changeId), kept with the version and handed back as `since` next time; None: no CBT.
A source knows nothing about the store.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np


class SourceError(Exception):
    """A source cannot be read: the message says what and what to do."""

    exit_code = 5


class VMNotFound(SourceError):
    """The source has no VM of that name or id: the message names it and says where to look."""


class DiskInfo(NamedTuple):
    """A disk as listed: its name and size in bytes (a tuple: `for name, size in vm.disks`)."""

    name: str
    size: int


@dataclass
class VMInfo:
    name: str
    id: str
    disks: list[DiskInfo]
    tags: list[str] = field(default_factory=list)
    power_state: str = "unknown"
    # what the user should know before trusting a backup of it (an image cut short...):
    # recorded with the version ("notes") and shown as warnings
    notes: list[str] = field(default_factory=list)
    # what a restore into a hypervisor needs to rebuild the VM (vcpus, memory_bytes, description,
    # nics, boot settings; "platform" names where it came from): recorded with the version
    shape: dict = field(default_factory=dict)
    folder: str = ""  # where the platform files it (vmware: the VM folder path under the datacenter)

    def __post_init__(self):
        self.disks = [DiskInfo(str(n), int(s)) for n, s in self.disks]


class Disk(abc.ABC):
    name: str = "disk"
    size: int = 0
    role: str = "disk"  # "memory": a memory image (a Xen checkpoint's suspend VDI), not a disk of the VM
    node_id: str | None = None
    cbt_marker: str | None = None
    cbt_note: str | None = None
    # how many read_into calls on it one read task may make at once, from threads (>1 only for a
    # disk whose reads share no state but descriptors: image files); $ALIKE_READ_THREADS overrides
    parallel_reads: int = 1

    def allocated_extents(self) -> list[tuple[int, int]]:
        """Default: the whole disk may hold data."""
        return [(0, self.size)] if self.size else []

    def changed_extents(self, since: str | None) -> list[tuple[int, int]] | None:
        """Default: no changed block tracking."""
        return None

    def _no_cbt(self, since: str | None, why: str) -> None:
        """changed_extents' answer for a broken chain: says why (cbt_note, the log); -> None."""
        import logging

        logging.getLogger("alike.sources").warning(
            "disk %s: no changed block tracking from %s: %s; reading it in full (CBT re-armed)", self.name, since, why)
        self.cbt_note = f"disk {self.name}: no changed block tracking from {since}: {why}; read in full, CBT re-armed"
        return None

    @abc.abstractmethod
    def read(self, offset: int, length: int) -> np.ndarray:
        """`length` bytes from `offset` (see the module's docstring)."""

    def read_into(self, buf: np.ndarray, offset: int) -> int:
        buf[:] = self.read(offset, len(buf))
        return len(buf)

    def prefetch(self, offset: int, length: int) -> None:
        return None


class ExtentDisk(Disk):
    """A disk whose data lies in allocated extents known when the snapshot was made (the rest
    reads as zeros): `read_into` reads only those, each piece through `_read_range(part, offset)`
    (-> bytes that came from the source), and when a piece fails with OSError (a connection cached
    from an earlier task that broke), asks `_reconnect()` whether to try once more. kvm: and xen:
    disks (NBD) are ExtentDisks."""

    _retry_on: tuple = (OSError,)  # what a broken connection raises (and NBD's errors, for NBD disks)

    def _set_extents(self, allocated) -> None:
        a = np.array(allocated, dtype=np.int64).reshape(-1, 2)
        self._off, self._len = a[:, 0].copy(), a[:, 1].copy()

    def allocated_extents(self):
        return list(zip(self._off.tolist(), self._len.tolist()))

    @abc.abstractmethod
    def _read_range(self, part: np.ndarray, offset: int) -> int:
        """Fill `part` with the disk's bytes from `offset` (inside one allocated extent)."""

    def _reconnect(self) -> bool:
        """After a failed piece: drop what failed; True to try the read once more."""
        return False

    def _read_error(self, e: Exception) -> str:
        return f"reading disk {self.name} failed: {e}"

    def read_into(self, buf: np.ndarray, offset: int) -> int:
        end = offset + len(buf)
        first = max(0, int(np.searchsorted(self._off, offset, side="right")) - 1)
        for attempt in (0, 1):
            done, pos, i = 0, offset, first
            try:
                while i < len(self._off) and self._off[i] < end:
                    s = max(int(self._off[i]), pos)
                    e = min(int(self._off[i] + self._len[i]), end)
                    if s < e:
                        if s > pos:
                            buf[pos - offset:s - offset] = 0
                        done += self._read_range(buf[s - offset:e - offset], s)
                        pos = e
                    i += 1
                break
            except self._retry_on as err:
                if attempt or not self._reconnect():
                    raise SourceError(self._read_error(err)) from None
        if pos < end:
            buf[pos - offset:] = 0
        return done

    def read(self, offset: int, length: int) -> np.ndarray:
        buf = np.zeros(length, dtype=np.uint8)
        self.read_into(buf, offset)
        return buf


class Snapshot(abc.ABC):
    vm: VMInfo
    disks: list[Disk]

    @abc.abstractmethod
    def release(self, failed: bool = False) -> None:
        """Remove what the snapshot made (see the module's docstring); idempotent."""

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        self.release(failed=exc_type is not None)


class Source(abc.ABC):
    @abc.abstractmethod
    def list_vms(self) -> list[VMInfo]:
        """Every VM of the source."""

    @abc.abstractmethod
    def snapshot(self, vm: str) -> Snapshot:
        """Freeze the disks of `vm` (a name or id); VMNotFound when there is none."""
