"""Backups through the pipeline (in-process, on the session's Ray) from the fault-injecting
in-memory source (tests/faultsource.py): a read that fails gives one clear error, commits
nothing and releases the snapshot as failed, and the next backup is right; slow reads still
give a right backup."""
from __future__ import annotations

import numpy as np

from tests.faultsource import FaultSource
from tests.test_source_fault import disk_data

MiB = 1024 * 1024


def _store(tmp_path):
    from storage.store import Store

    url = str(tmp_path / "ads")
    Store.init(url)
    return url


def _restored(store, vm, version, tmp_path, n=1):
    from pipelines.restore import run_restore

    out = [str(tmp_path / f"{vm}-{version}-{i}.raw") for i in range(n)]
    run_restore(store, vm, version, out)
    return [np.fromfile(p, np.uint8) for p in out]


def test_read_error_fails_clearly_and_commits_nothing(ray_address, tmp_path):
    from pipelines.backup import run_backup
    from storage.store import Store

    store = _store(tmp_path)
    src = FaultSource(str(tmp_path / "state"))
    src.add_vm("mem", {"d0": disk_data(1), "d1": disk_data(2, 2)})
    [r1] = run_backup(store, [(src, "mem")])
    assert "error" not in r1, r1
    src.write("mem", "d0", 5 * MiB + 100, b"\x07" * 100_000)  # a day later
    src.fail_reads("mem", "d0", 5 * MiB + 3)  # ... and a bad sector under the written data

    [bad] = run_backup(store, [(src, "mem")])
    assert bad.get("exit_code") == 5, bad
    msg = bad["error"]
    print(f"\nthe error: {msg}")
    assert "cannot read disk d0 of VM mem at offset 5242883: Input/output error" in msg
    assert "\n" not in msg and "Traceback" not in msg and "RayTaskError" not in msg
    st = Store.open(store)
    assert [v for _, v in st.list_versions("mem")] == [r1["version"]]  # nothing committed
    assert src.open_snapshots() == [] and src.releases() == ["ok", "failed"]

    # the disk mended: the next backup is incremental from the last committed version, and right
    src.vms["mem"].faults.clear()
    [r2] = run_backup(store, [(src, "mem")])
    assert "error" not in r2, r2
    assert r2["cbt"] is True and r2["previous"] == r1["version"]
    got = _restored(store, "mem", r2["version"], tmp_path, 2)
    assert np.array_equal(got[0], src.vms["mem"].disks["d0"]) and np.array_equal(got[1], src.vms["mem"].disks["d1"])
    assert src.open_snapshots() == [] and src.releases() == ["ok", "failed", "ok"]


def test_slow_reads_complete_correctly(ray_address, tmp_path):
    from pipelines.backup import run_backup

    store = _store(tmp_path)
    src = FaultSource(str(tmp_path / "state"))
    data = disk_data(5, 6)
    src.add_vm("slow", {"d0": data})
    for off in (0, 2 * MiB, len(data) - 10):  # every read that touches them sleeps
        src.slow_reads("slow", "d0", off, 10, 0.3)
    [r] = run_backup(store, [(src, "slow")])
    assert "error" not in r, r
    assert r["read_bytes"] > 0 and r["logical_bytes"] == len(data)
    [got] = _restored(store, "slow", r["version"], tmp_path)
    assert np.array_equal(got, data)
    assert src.open_snapshots() == []
