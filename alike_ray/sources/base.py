"""The source protocol.

A `Source` lists VMs and makes snapshots. A `Snapshot` holds the frozen `Disk`s of one VM and
releases everything it made in `release()`, which is called also when a backup fails.

A `Disk` is picklable: it travels to Ray read tasks, which call `read()` wherever
`node_id` allows (None: any node that can reach the source). It gives
- `size`: bytes,
- `allocated_extents()`: sorted (offset, length) where data may be; holes and zero extents are
  never read (whitespace awareness),
- `changed_extents(since)`: where data changed since a CBT marker, or None when unknown
  (then every allocated block is read and delta analysis works on hashes),
- `read(offset, length)`: a numpy uint8 buffer, zeros where nothing is allocated,
- `cbt_marker`: kept with the version, handed back as `since` next time.
A source knows nothing about the store.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


class SourceError(Exception):
    """A source cannot be read: the message says what and what to do."""

    exit_code = 5


@dataclass
class VMInfo:
    name: str
    id: str
    disks: list[tuple[str, int]]
    tags: list[str] = field(default_factory=list)
    power_state: str = "unknown"


class Disk:
    name: str = "disk"
    size: int = 0
    node_id: str | None = None
    cbt_marker: str | None = None

    def allocated_extents(self) -> list[tuple[int, int]]:
        return [(0, self.size)]

    def changed_extents(self, since: str | None):
        return None

    def read(self, offset: int, length: int) -> np.ndarray:
        raise NotImplementedError


class Snapshot:
    vm: VMInfo
    disks: list[Disk]

    def release(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


class Source:
    def list_vms(self) -> list[VMInfo]:
        raise NotImplementedError

    def snapshot(self, vm: str) -> Snapshot:
        raise NotImplementedError
