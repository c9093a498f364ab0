"""The fault-injecting in-memory source (tests/faultsource.py) binds the source contract, so
that the pipeline tests that use it (tests/e2e/test_source_faults.py) use a source that does
what a real one does; and its faults do what they say."""
from __future__ import annotations

import numpy as np
import pytest

from alike_ray.sources.base import SourceError
from tests.faultsource import FaultSource
from tests.source_contract import Bound, SourceContract

MiB = 1024 * 1024


def disk_data(seed: int, mib: int = 8) -> np.ndarray:
    """Data with holes: random 64 KiB-aligned and odd-sized pieces, zeros elsewhere, data at the end."""
    rng = np.random.default_rng(seed)
    d = np.zeros(mib * MiB + 777, np.uint8)
    for off in rng.integers(0, len(d) - 300_000, 12):
        n = int(rng.integers(1, 300_000))
        d[off:off + n] = rng.integers(0, 256, n, np.uint8)
    d[-5000:] = rng.integers(1, 256, 5000, np.uint8)
    return d


class TestFaultSource(SourceContract):
    @pytest.fixture
    def bound(self, tmp_path):
        src = FaultSource(str(tmp_path / "state"))
        src.add_vm("mem", {"d0": disk_data(1), "d1": disk_data(2, 3)})
        src.add_vm("other", {"d0": disk_data(3, 1)})
        src.slow_reads("mem", "d1", 0, 4096, 0.01)  # slow, and still right
        return Bound(src, "mem", truth=lambda disk: src.vms["mem"].disks[disk],
                     write=lambda disk, off, n: src.write("mem", disk, off, np.random.default_rng(off).bytes(n)),
                     residue=src.open_snapshots, power_state="running")


def test_injected_read_error(tmp_path):
    src = FaultSource(str(tmp_path / "state"))
    src.add_vm("mem", {"d0": disk_data(1)})
    src.fail_reads("mem", "d0", 5 * MiB + 3)
    with src.snapshot("mem") as snap:
        d = snap.disks[0]
        d.read(5 * MiB + 4, 100)  # next to the bad byte: fine
        with pytest.raises(SourceError, match=r"offset 5242883: Input/output error"):
            d.read(5 * MiB, 4096)
        buf = np.zeros(MiB, np.uint8)
        with pytest.raises(SourceError):
            d.read_into(buf, 4 * MiB + 512 * 1024)
    assert src.open_snapshots() == []


def test_cbt_of_another_vm_is_refused(tmp_path):
    src = FaultSource(str(tmp_path / "state"))
    src.add_vm("a", {"d0": disk_data(1, 1)})
    src.add_vm("b", {"d0": disk_data(2, 1)})
    with src.snapshot("a") as s:
        marker = s.disks[0].cbt_marker
    with src.snapshot("b") as s:
        assert s.disks[0].changed_extents(marker) is None and "not a marker of ours" in s.disks[0].cbt_note
