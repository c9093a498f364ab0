"""The source contract suite (see alike_ray/sources/base.py). A source binds it in a few lines:

    class TestMySource(SourceContract):
        @pytest.fixture
        def bound(self, tmp_path):
            src = MySource(...)
            return Bound(src, "web", truth=lambda disk: ...bytes of that disk now...)

`truth(disk name)` gives the bytes the disk holds now (its ground truth, kept by the test: the
file an image was made from, the raw copy that receives every guest write); `write(disk name,
offset, length)` makes a guest write and returns the bytes written (a source with changed block
tracking binds it, and the CBT round trip runs);
`residue()` returns what the source has made that a released snapshot must not leave behind
(temporary files, hypervisor jobs, checkpoints, servers), compared before and after.
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest

from alike_ray.sources.base import Disk, Snapshot, Source, SourceError, VMNotFound

MISSING = "alike-contract-no-such-vm"


@dataclass
class Bound:
    source: Source
    vm: str
    truth: Callable[[str], bytes | np.ndarray]
    write: Callable[[str, int, int], bytes] | None = None  # (disk name, offset, length) -> the bytes written
    residue: Callable[[], object] = lambda: None
    power_state: str | None = None  # as listed, when the binding knows it


class Boom(Exception):
    """What the backup-like code of the release tests raises."""


def _truth(bound: Bound, disk: str) -> np.ndarray:
    return np.frombuffer(bytes(bound.truth(disk)), np.uint8)


def _well_formed(extents, size: int, what: str) -> None:
    """Sorted, non-overlapping, non-empty, inside [0, size)."""
    end = 0
    for off, ln in extents:
        assert isinstance(off, int) and isinstance(ln, int), f"{what}: ({off!r}, {ln!r}) are not ints"
        assert ln > 0, f"{what}: empty extent at {off}"
        assert off >= end, f"{what}: extent at {off} overlaps or is out of order (previous ends at {end})"
        end = off + ln
        assert end <= size, f"{what}: extent ({off}, {ln}) ends past the disk ({size} bytes)"


def _probe_ranges(disk: Disk) -> list[tuple[int, int]]:
    """Reads at odd offsets and lengths: around extent edges, across extents, at the end."""
    size = disk.size
    ext = disk.allocated_extents()
    out = [(0, 1), (1, 511), (4095, 4098), (12345, 70001)]
    for off, ln in ext[:3] + ext[-2:]:
        out += [(off - 3, 10), (off + 1, 777), (off + ln - 5, 11), (off + ln // 2 + 7, 65536 + 3)]
    out += [(size // 3 + 1, 3 * 1024 * 1024 + 13), (size - 1, 1), (size - 777, 777), (size - 4096 * 3 - 1, 4096 * 3 + 1)]
    return [(max(0, o), min(n, size - max(0, o))) for o, n in out if min(n, size - max(0, o)) > 0]


class SourceContract:
    @pytest.fixture
    def bound(self) -> Bound:
        raise NotImplementedError("a binding overrides the `bound` fixture")

    # -- listing ------------------------------------------------------------------------------
    def test_is_a_contract_source(self, bound):
        assert isinstance(bound.source, Source)
        with bound.source.snapshot(bound.vm) as snap:
            assert isinstance(snap, Snapshot)
            assert all(isinstance(d, Disk) for d in snap.disks)

    def test_list_vms(self, bound):
        vms = bound.source.list_vms()
        names = [v.name for v in vms]
        assert bound.vm in names, names
        assert len(set(names)) == len(names), f"duplicate names: {names}"
        v = vms[names.index(bound.vm)]
        assert isinstance(v.id, str) and v.id
        assert v.disks, "the VM lists no disk"
        for name, size in v.disks:
            assert size == len(_truth(bound, name)), f"disk {name}: listed size {size}"
        assert isinstance(v.power_state, str) and v.power_state
        if bound.power_state:
            assert v.power_state == bound.power_state
        assert all(isinstance(t, str) for t in v.tags) and all(isinstance(n, str) for n in v.notes)

    def test_snapshot_matches_listing(self, bound):
        [listed] = [v for v in bound.source.list_vms() if v.name == bound.vm]
        with bound.source.snapshot(bound.vm) as snap:
            assert snap.vm.name == bound.vm and snap.vm.id == listed.id
            assert [(d.name, d.size) for d in snap.disks] == [tuple(x) for x in listed.disks]
        with bound.source.snapshot(listed.id) as snap:  # by id too
            assert snap.vm.name == bound.vm

    def test_missing_vm(self, bound):
        with pytest.raises(VMNotFound) as e:
            bound.source.snapshot(MISSING)
        assert MISSING in str(e.value)
        assert isinstance(e.value, SourceError) and e.value.exit_code == 5

    # -- extents ------------------------------------------------------------------------------
    def test_allocated_extents(self, bound):
        with bound.source.snapshot(bound.vm) as snap:
            for d in snap.disks:
                ext = d.allocated_extents()
                _well_formed(ext, d.size, f"disk {d.name} allocated")
                truth = _truth(bound, d.name)
                outside = np.ones(d.size, bool)
                for off, ln in ext:
                    outside[off:off + ln] = False
                # whitespace awareness may skip only zeros: a byte of data outside is lost data
                assert not truth[outside].any(), f"disk {d.name}: data outside the allocated extents"

    def test_changed_extents_unknown_marker(self, bound):
        with bound.source.snapshot(bound.vm) as snap:
            for d in snap.disks:
                assert d.changed_extents("alike-contract-unknown-marker") is None
                assert d.cbt_note is None or isinstance(d.cbt_note, str)

    # -- reads --------------------------------------------------------------------------------
    def test_reads_at_odd_offsets_and_the_end(self, bound):
        with bound.source.snapshot(bound.vm) as snap:
            for d in snap.disks:
                truth = _truth(bound, d.name)
                for off, n in _probe_ranges(d):
                    got = d.read(off, n)
                    assert isinstance(got, np.ndarray) and got.dtype == np.uint8 and len(got) == n
                    assert np.array_equal(got, truth[off:off + n]), f"disk {d.name}: read({off}, {n}) differs"

    def test_whole_disk_read(self, bound):
        with bound.source.snapshot(bound.vm) as snap:
            for d in snap.disks:
                assert np.array_equal(d.read(0, d.size), _truth(bound, d.name)), f"disk {d.name}"

    def test_read_into_equals_read(self, bound):
        with bound.source.snapshot(bound.vm) as snap:
            for d in snap.disks:
                for off, n in _probe_ranges(d):
                    buf = np.full(n, 0xA5, np.uint8)  # not zeros: every byte must be written
                    got = d.read_into(buf, off)
                    assert 0 <= got <= n
                    assert np.array_equal(buf, d.read(off, n)), f"disk {d.name}: read_into({off}, {n})"
                    d.prefetch(off, n)  # a hint: allowed anywhere, changes nothing

    # -- release ------------------------------------------------------------------------------
    def test_release_on_failure(self, bound):
        before = bound.residue()
        with pytest.raises(Boom):
            with bound.source.snapshot(bound.vm) as snap:
                snap.disks[0].read(0, 4096)
                raise Boom()
        assert bound.residue() == before
        # as the backup does it: release in a finally, told that the backup failed; twice is harmless
        snap = bound.source.snapshot(bound.vm)
        try:
            with pytest.raises(Boom):
                try:
                    snap.disks[-1].read(snap.disks[-1].size - 512, 512)
                    raise Boom()
                finally:
                    snap.release(failed=True)
        finally:
            snap.release(failed=True)
        assert bound.residue() == before
        with bound.source.snapshot(bound.vm) as snap:  # and the next snapshot works
            assert np.array_equal(snap.disks[0].read(0, 4096), _truth(bound, snap.disks[0].name)[:4096])

    # -- Ray --------------------------------------------------------------------------------
    def test_picklable(self, bound):
        src = pickle.loads(pickle.dumps(bound.source))  # as the snapshot actor gets it
        assert bound.vm in [v.name for v in src.list_vms()]
        with bound.source.snapshot(bound.vm) as snap:
            for d in snap.disks:
                d.read(0, 512)  # a disk that has been read (open files, connections) pickles too
                copy = pickle.loads(pickle.dumps(d))  # as a read task gets it
                assert (copy.name, copy.size, copy.node_id, copy.cbt_marker) == (d.name, d.size, d.node_id, d.cbt_marker)
                assert copy.allocated_extents() == d.allocated_extents()
                truth = _truth(bound, d.name)
                for off, n in _probe_ranges(d)[:6]:
                    assert np.array_equal(copy.read(off, n), truth[off:off + n])

    # -- changed block tracking ------------------------------------------------------------
    def test_cbt_round_trip(self, bound):
        if bound.write is None:  # no CBT: no marker, and nothing claimed about changes
            with bound.source.snapshot(bound.vm) as snap:
                assert all(d.cbt_marker is None for d in snap.disks), "a marker, but no CBT bound to test it"
                assert all(d.changed_extents(None) is None for d in snap.disks)
            return
        with bound.source.snapshot(bound.vm) as snap:
            marked = [(d.name, d.size, d.cbt_marker) for d in snap.disks if d.cbt_marker]
        assert marked, "a source with CBT gives its disks a marker"
        name, size, marker = marked[0]
        off = size // 3 + 12345
        data = bound.write(name, off, 70001)
        with bound.source.snapshot(bound.vm) as snap:
            [d] = [x for x in snap.disks if x.name == name]
            changed = d.changed_extents(marker)
            assert changed is not None, f"disk {name}: no CBT from {marker}: {d.cbt_note}"
            _well_formed(changed, d.size, f"disk {name} changed")
            covered = np.zeros(d.size, bool)
            for o, n in changed:
                covered[o:o + n] = True
            assert covered[off:off + len(data)].all(), f"disk {name}: the write at {off} is not covered: {changed}"
            assert covered.sum() < d.size // 2, "CBT that says everything changed tracks nothing"
            assert d.read(off, len(data)).tobytes() == data
            assert d.cbt_marker and d.cbt_marker != marker
