"""The kvm: source against real libvirt and QEMU (TCG): inventory, pull-mode backups with
whitespace awareness, changed block tracking through checkpoints, restores byte-identical
to the disks at their snapshot time, broken chains, and cleanup.

Ground truth: each disk starts as a raw ext4 image that we also keep as `expected`; every
guest write goes both into the running VM (through QEMU's block layer) and into `expected`,
so a copy of `expected` taken when a backup starts is what that backup must restore to.
"""
from __future__ import annotations

import os
import subprocess

import numpy as np
import pytest

from tests import images, kvm_env

MiB = images.MiB
BS = 512 * 1024



@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    d = tmp_path_factory.mktemp("kvm-trees")
    lib = os.path.dirname(os.__file__)
    return (images.tree(str(d / "t1"), 8 * MiB, [f"{lib}/{x}" for x in ("email", "asyncio", "encodings", "xml", "unittest", "idlelib")]),
            images.tree(str(d / "t2"), 3 * MiB, [f"{lib}/{x}" for x in ("json", "logging", "http", "concurrent", "pydoc_data")]))


def make_vm(conn, name, trees, sizes=(64, 32), start=True, **kw):
    """A VM whose disks vda, vdb... are qcow2 images holding ext4 filesystems of real files.
    -> (domain, [kvm_env.Disk])."""
    d = kvm_env.image_dir()
    paths, expected = [], []
    for i, size in enumerate(sizes):
        raw = images.ext4_image(os.path.join(d, f"d{i}.raw"), size, trees[i % len(trees)], f"{name[-6:]}{i}")
        paths.append(images.to_qcow2(raw, os.path.join(d, f"d{i}.qcow2")))
        expected.append(raw)
    dom = kvm_env.define(conn, name, paths, start=start, **kw)
    return dom, [kvm_env.Disk(dom, f"vd{chr(97 + i)}", e) for i, e in enumerate(expected)]


def same(a, b) -> bool:
    return subprocess.run(["cmp", "-s", a, b]).returncode == 0


def ours(dom):
    return sorted(cp.getName() for cp in dom.listAllCheckpoints(0) if cp.getName().startswith("alike-"))


def job_running(dom) -> bool:
    try:
        dom.backupGetXMLDesc(0)
        return True
    except Exception:
        return False


def restore(store, vm, version, tmp_path, n):
    from pipelines.restore import run_restore

    out = [str(tmp_path / f"{vm}-{version}-{i}.raw") for i in range(n)]
    run_restore(store, vm, version, out)
    return out


def test_inventory(conn, trees):
    """list_vms: names, UUIDs, states, disks with their sizes, tags from metadata and description."""
    from alike_ray.sources import open_source

    web, _ = make_vm(conn, kvm_env.vm_name("inv-web"), trees, (48, 16), description="web tier\ntags: prod, web")
    db, _ = make_vm(conn, kvm_env.vm_name("inv-db"), trees, (24,), start=False, metadata_tags="db backup-nightly",
                    description="the #billing database")
    vms = {v.name: v for v in open_source("kvm:" + kvm_env.URI).list_vms()}
    w, d = vms[kvm_env.vm_name("inv-web")], vms[kvm_env.vm_name("inv-db")]
    assert w.id == web.UUIDString() and d.id == db.UUIDString()
    assert w.power_state == "running" and d.power_state == "shut off"
    assert w.disks == [("vda", 48 * MiB), ("vdb", 16 * MiB)] and d.disks == [("vda", 24 * MiB)]
    assert w.tags == ["prod", "web"] and d.tags == ["backup-nightly", "billing", "db"]
    from alike_ray.sources import SourceError

    # a shut-off VM is read from its disk files, served by qemu-nbd until release
    snap = open_source("kvm:" + kvm_env.URI).snapshot(kvm_env.vm_name("inv-db"))
    assert [(x.name, x.size) for x in snap.disks] == [("vda", 24 * MiB)]
    assert 0 < sum(n for _, n in snap.disks[0].allocated_extents()) < 24 * MiB
    assert snap.disks[0].read(MiB + 1024 + 56, 2).tobytes() == b"\x53\xef"  # the ext4 magic
    snap.release()
    db.create()  # its image is free again
    assert db.isActive()
    with pytest.raises(SourceError, match="no VM named"):
        open_source("kvm:" + kvm_env.URI).snapshot(kvm_env.vm_name("nope"))
    with pytest.raises(SourceError, match="cannot connect to libvirt"):
        open_source("kvm:qemu+unix:///system?socket=/nonexistent").list_vms()


def test_backup_cbt_restore(conn, trees, ray_address, tmp_path):
    """First backup reads only allocated data; guest writes; a CBT backup reads only the
    changed blocks; both versions restore byte-identical to the disks at snapshot time; the
    backups leave one checkpoint, no job and no scratch file. Shut off, the VM is read from
    its disk files with CBT from the same checkpoint, which goes on when it runs again."""
    from pipelines.backup import run_backup
    from storage.store import Store

    from alike_ray.sources import open_source

    store = str(tmp_path / "ads")
    Store.init(store)
    vm = kvm_env.vm_name("web")
    dom, disks = make_vm(conn, vm, trees)
    src = open_source("kvm:" + kvm_env.URI, node_id=None)
    disks[0].write(30 * MiB, 3 * MiB, 0x5A)  # before the first backup too
    v1_expected = [d.snapshot_copy(str(tmp_path / f"v1-{i}.raw")) for i, d in enumerate(disks)]

    [r1] = run_backup(store, [(src, vm)])
    assert "error" not in r1, r1
    alloc = sum(images.allocated_bytes(p) for p in v1_expected)
    assert r1["logical_bytes"] == 96 * MiB and r1["cbt"] is False
    # whitespace awareness: what is read is about what the filesystems hold, not the disks
    assert 0 < r1["read_bytes"] <= alloc + 8 * BS and r1["read_bytes"] < r1["logical_bytes"] / 2
    print(f"\nfirst backup: read {r1['read_bytes']} of {r1['logical_bytes']} bytes")
    assert len(ours(dom)) == 1 and not job_running(dom)

    # "a day later": writes in place, in free space, unaligned, on both disks
    regions = [(disks[0], 5 * MiB, 1 * MiB, 0x11), (disks[0], 50 * MiB + 12345, 70000, 0x22),
               (disks[1], 20 * MiB - 4096, 8192, 0x33)]
    for d, off, ln, pat in regions:
        d.write(off, ln, pat)
    v2_expected = [d.snapshot_copy(str(tmp_path / f"v2-{i}.raw")) for i, d in enumerate(disks)]
    [r2] = run_backup(store, [(src, vm)])
    assert "error" not in r2, r2
    changed = sum(ln for _, _, ln, _ in regions)
    assert r2["cbt"] is True
    assert 0 < r2["read_bytes"] <= changed + len(regions) * BS  # one block of slack per region
    print(f"CBT backup: read {r2['read_bytes']} bytes for {changed} changed bytes")
    assert r2["cbt_skipped_blocks"] > 0
    assert len(ours(dom)) == 1 and not job_running(dom)
    assert [d["cbt"] for d in r2["disks"]] == [ours(dom)[0]] * 2

    for version, exp in ((r1["version"], v1_expected), (r2["version"], v2_expected)):
        for got, want in zip(restore(store, vm, version, tmp_path, 2), exp):
            assert same(got, want), f"{vm}@{version}: {got} differs from {want}"
    assert not [f for f in os.listdir("/var/tmp") if f.startswith(f"alike-{dom.UUIDString()}")]

    # shut off: read from the disk files; nothing changed since the last checkpoint, nothing is read
    dom.destroy()
    [r3] = run_backup(store, [(src, vm)])
    assert "error" not in r3, r3
    assert r3["cbt"] is True and r3["read_bytes"] == 0 and r3["new_blocks"] == 0
    assert [d["cbt"] for d in r3["disks"]] == [d["cbt"] for d in r2["disks"]]
    for got, want in zip(restore(store, vm, r3["version"], tmp_path, 2), v2_expected):
        assert same(got, want)
    # running again: CBT from the same checkpoint
    dom.create()
    disks[1].write(3 * MiB, 4096, 0x44)
    [r4] = run_backup(store, [(src, vm)])
    assert r4["cbt"] is True and 0 < r4["read_bytes"] <= BS, r4
    v4_expected = [d.snapshot_copy(str(tmp_path / f"v4-{i}.raw")) for i, d in enumerate(disks)]
    for got, want in zip(restore(store, vm, r4["version"], tmp_path, 2), v4_expected):
        assert same(got, want)


def test_patched_blocks_chain(conn, trees, ray_address, tmp_path, s3_bucket):
    """CBT backups store a block with few written 64K granules as a delta over a whole base
    block, reading only those granules: a patched block patched again keeps its base and takes
    the union of the granules; past half the block it is read and stored whole again. Every
    version restores byte-identical; verify finds all intact; gc after the versions that made
    the bases are deleted keeps the bases; a vault copy on S3 (a real S3 server over HTTP)
    restores the same."""
    from pipelines.backup import run_backup
    from pipelines.gc import run_gc
    from pipelines.vault import run_vault
    from pipelines.verify import run_verify
    from storage.store import Store

    from alike_ray.sources import open_source

    G = 64 * 1024
    store = str(tmp_path / "ads")
    Store.init(store)
    vm = kvm_env.vm_name("patch")
    dom, disks = make_vm(conn, vm, trees, sizes=(64,))
    d = disks[0]
    src = open_source("kvm:" + kvm_env.URI, node_id=None)
    d.write(30 * MiB, 3 * MiB, 0x5A)  # blocks 60-65: data in the first version
    expected, results = [], []

    def backup(tag):
        [r] = run_backup(store, [(src, vm)])
        assert "error" not in r, r
        expected.append(d.snapshot_copy(str(tmp_path / f"{tag}.raw")))
        results.append(r)
        return r, Store.open(store).read_manifest(vm, r["version"], r["disks"][0]["manifest"])

    def row(m, block):
        i = int(np.searchsorted(m.blocks, block))
        assert int(m.blocks[i]) == block
        return m.hashes[i], m.bases[i], m.deltas[i], int(m.grains[i])

    r1, m1 = backup("v1")
    assert r1["cbt"] is False and r1["patched_blocks"] == 0 and not m1.patched().any()
    # day 2: one granule in blocks 60 and 62, one write across the end of block 63 into block 64
    d.write(30 * MiB + 70000, 4096, 0x11)
    d.write(31 * MiB + 4 * G + 300, 4096, 0x12)
    d.write(32 * MiB - 100, 200, 0x13)
    r2, m2 = backup("v2")
    assert r2["cbt"] is True and r2["patched_blocks"] == 4, r2
    assert r2["read_bytes"] == 4 * G, r2  # the written granules only, not their 512K blocks
    h, base, delta, grains = row(m2, 60)
    assert base == row(m1, 60)[0] and delta != b"" and grains == 0b10
    assert row(m2, 63)[3] == 1 << 7 and row(m2, 64)[3] == 1 and not row(m2, 61)[2]
    # day 3: two more granules of block 60: the same base, the union of the granules
    d.write(30 * MiB + 2 * G, 2 * G, 0x21)
    r3, m3 = backup("v3")
    assert r3["patched_blocks"] == 1 and r3["read_bytes"] == 3 * G, r3
    assert row(m3, 60)[1] == row(m1, 60)[0] and row(m3, 60)[3] == 0b1110
    assert row(m3, 62)[:3] == row(m2, 62)[:3]  # carried unchanged
    # day 4: block 60 written in more than half its granules: whole again; block 62 once more
    d.write(30 * MiB + 4 * G, 2 * G, 0x31)
    d.write(31 * MiB + 5 * G, 10, 0x32)
    r4, m4 = backup("v4")
    assert r4["patched_blocks"] == 1 and r4["read_bytes"] == BS + 2 * G, r4
    assert not row(m4, 60)[2] and row(m4, 62)[3] == 0b110000 and row(m4, 62)[1] == row(m1, 62)[0]

    def restores(spec, which):
        for n in which:
            [got] = restore(spec, vm, results[n]["version"], tmp_path, 1)
            assert same(got, expected[n]), f"version {n + 1} differs"
            os.unlink(got)

    restores(store, range(4))
    # what `alike mount`, `alike files` and `alike instant` read through: patched blocks too
    from alike_ray.restore.mount import StoreView

    view = StoreView(store)
    for n in (1, 2):
        ver = results[n]["version"]
        [disk] = view._disks(vm, ver).values()
        with open(expected[n], "rb") as f:
            f.seek(30 * MiB - 1000)
            want = f.read(3 * MiB)
        assert view.read(vm, ver, disk, 30 * MiB - 1000, 3 * MiB) == want
    rep = run_verify(store)
    assert rep["ok"], rep
    # the first two versions go; their whole blocks stay as the bases of v3 and v4
    st = Store.open(store)
    for r in results[:2]:
        st.delete_version(vm, r["version"])
    g = run_gc(store, grace=0, repack_below=0.99)
    assert g["packs_deleted"] + g["packs_repacked"] > 0, g
    restores(store, [2, 3])
    assert run_verify(store)["ok"]
    from storage.backend import store_spec

    endpoint, bucket = s3_bucket
    ods = store_spec(f"s3://{bucket}/ods", endpoint=endpoint)
    v = run_vault(store, ods)
    assert v["versions_copied"] == 2 and v["damaged_blocks"] == 0, v
    restores(ods, [2, 3])
    assert run_verify(ods)["ok"]


def test_broken_chain_and_release(conn, trees, ray_address, tmp_path):
    """A failed backup (released by hand, or failing in the pipeline) keeps the previous
    checkpoint, so CBT goes on; a killed one (no release)
    leaves a job that the next snapshot ends, and that disk is read in full; a resized disk is
    read in full and an added one too, while the others keep CBT; a lost bitmap means a full
    read; every case re-arms."""
    from pipelines.backup import run_backup
    from storage.store import Store

    from alike_ray.sources import open_source

    store = str(tmp_path / "ads")
    Store.init(store)
    vm = kvm_env.vm_name("db")
    dom, disks = make_vm(conn, vm, trees, (48, 24))
    src = open_source("kvm:" + kvm_env.URI)
    [r1] = run_backup(store, [(src, vm)])
    assert "error" not in r1, r1
    first = ours(dom)

    # a failed backup: its checkpoint goes, the previous one stays
    snap = src.snapshot(vm)
    assert job_running(dom) and len(ours(dom)) == 2
    snap.release(failed=True)
    assert ours(dom) == first and not job_running(dom)
    # a backup that fails in the pipeline (here: the store cannot be read) releases the same way
    os.rename(os.path.join(store, "versions"), os.path.join(store, "versions.away"))
    open(os.path.join(store, "versions"), "w").close()
    [bad] = run_backup(store, [(src, vm)])
    assert "error" in bad, bad
    os.unlink(os.path.join(store, "versions"))
    os.rename(os.path.join(store, "versions.away"), os.path.join(store, "versions"))
    assert ours(dom) == first and not job_running(dom)
    disks[0].write(8 * MiB, 64 * 1024, 0x44)
    [r2] = run_backup(store, [(src, vm)])
    assert r2["cbt"] is True and r2["read_bytes"] <= BS, r2

    # a killed backup: no release; the next snapshot ends its job and reads in full
    killed = src.snapshot(vm)
    del killed
    assert job_running(dom)
    disks[1].write(1 * MiB, 4096, 0x55)
    [r3] = run_backup(store, [(src, vm)])
    assert "error" not in r3, r3
    assert r3["cbt"] is False and r3["read_bytes"] >= r1["read_bytes"] - 2 * BS
    assert any("read in full" in n for n in r3["cbt_notes"]), r3.get("cbt_notes")  # the job log says why
    assert len(ours(dom)) == 1 and not job_running(dom)

    # re-armed: the next one has CBT again
    disks[1].write(2 * MiB, 4096, 0x66)
    [r4] = run_backup(store, [(src, vm)])
    assert r4["cbt"] is True and r4["read_bytes"] <= BS, r4

    # a disk added: read in full (its content), the others by CBT
    d = kvm_env.image_dir()
    raw = images.ext4_image(os.path.join(d, "added.raw"), 16, trees[1], "added")
    kvm_env.attach_disk(dom, images.to_qcow2(raw, os.path.join(d, "added.qcow2")), "vdc")
    added = kvm_env.Disk(dom, "vdc", raw)
    disks[0].write(9 * MiB, 4096, 0x77)
    [r5] = run_backup(store, [(src, vm)])
    assert "error" not in r5, r5
    assert r5["cbt"] is False and [x["name"] for x in r5["disks"]] == ["vda", "vdb", "vdc"]
    assert any(n.startswith("disk vdc: new") for n in r5["cbt_notes"]), r5.get("cbt_notes")
    assert r5["read_bytes"] <= BS + images.allocated_bytes(raw) + 2 * BS
    want = [x.snapshot_copy(str(tmp_path / f"v5-{i}.raw")) for i, x in enumerate(disks + [added])]
    for got, exp in zip(restore(store, vm, r5["version"], tmp_path, 3), want):
        assert same(got, exp)

    # a disk resized: read in full; the VM sees the new size
    dom.blockResize("vdb", 32 * MiB, 1)  # VIR_DOMAIN_BLOCK_RESIZE_BYTES
    with open(disks[1].expected, "r+b") as f:
        f.truncate(32 * MiB)
    [r6] = run_backup(store, [(src, vm)])
    assert "error" not in r6, r6
    assert r6["cbt"] is False and r6["disks"][1]["size"] == 32 * MiB
    assert [n for n in r6["cbt_notes"] if n.startswith("disk vdb")], r6.get("cbt_notes")
    assert r6["read_bytes"] <= images.allocated_bytes(disks[1].expected) + 2 * BS  # vda, vdc: by CBT
    assert len(ours(dom)) == 1 and not job_running(dom)
    want = [x.snapshot_copy(str(tmp_path / f"v6-{i}.raw")) for i, x in enumerate(disks + [added])]
    for got, exp in zip(restore(store, vm, r6["version"], tmp_path, 3), want):
        assert same(got, exp)

    # a bitmap lost while the VM was off (libvirt then refuses the incremental backup):
    # dropped checkpoints, a full read, re-armed
    dom.destroy()
    qcow2 = disks[0].expected[:-len(".raw")] + ".qcow2"
    subprocess.run(["qemu-img", "bitmap", "--remove", qcow2, ours(dom)[0]], check=True)
    dom.create()
    disks[0].write(11 * MiB, 4096, 0x88)
    [r7] = run_backup(store, [(src, vm)])
    assert "error" not in r7, r7
    assert r7["cbt"] is False and len(ours(dom)) == 1 and not job_running(dom)
    want = [x.snapshot_copy(str(tmp_path / f"v7-{i}.raw")) for i, x in enumerate(disks + [added])]
    for got, exp in zip(restore(store, vm, r7["version"], tmp_path, 3), want):
        assert same(got, exp)
    disks[0].write(12 * MiB, 4096, 0x99)
    [r8] = run_backup(store, [(src, vm)])
    assert r8["cbt"] is True and 0 < r8["read_bytes"] <= BS, r8


def test_job_on_kvm_vms(conn, trees, alike, tmp_path):
    """A job with keyword and tag selection and 2 simultaneous VMs backs up 4 of 5 libvirt VMs;
    its second run uses CBT; the history holds both runs, right."""
    tag = f"jobtag{os.getpid()}"
    # names of their own: the other tests of this module keep their VMs until the module ends
    made = {n: make_vm(conn, kvm_env.vm_name(f"job-{n}"), trees, (24,), **kw) for n, kw in (
        ("web-a", {}), ("web-b", {}), ("db", {"metadata_tags": tag}), ("cache", {"description": f"cache #{tag}"}),
        ("other", {}))}
    want = sorted(kvm_env.vm_name(f"job-{n}") for n in ("web-a", "web-b", "db", "cache"))
    store = tmp_path / "ads"
    alike.json("init", "--store", store)
    job = tmp_path / "kvm.toml"
    job.write_text(f'name = "kvmjob"\nstore = "{store}"\nsources = ["kvm:{kvm_env.URI}"]\n'
                   f'[select]\nkeyword = "{kvm_env.vm_name("job-web")}*"\ntags = ["{tag}"]\n'
                   f'[options]\nparallel = 2\n')
    assert sorted(v["vm"] for v in alike.json("job", "preview", job)["vms"]) == want
    first = alike.json("job", "run", job)
    assert first["status"] == "ok" and sorted(v["vm"] for v in first["vms"]) == want
    made["db"][1][0].write(3 * MiB, 8192, 0x42)
    second = alike.json("job", "run", job)
    assert second["status"] == "ok"
    res = {v["vm"]: v for v in second["vms"]}
    assert all(v["cbt"] is True for v in res.values()), res
    assert res[kvm_env.vm_name("job-db")]["read_bytes"] <= BS  # only the changed block
    assert all(v["read_bytes"] == 0 for n, v in res.items() if n != kvm_env.vm_name("job-db"))
    hist = alike.json("job", "history", "--store", store, "--job", "kvmjob")["runs"]
    assert [h["run_id"] for h in hist] == [second["run_id"], first["run_id"]]
    assert all(h["status"] == "ok" and len(h["vms"]) == 4 for h in hist)
    vers = alike.json("versions", "--store", store)["versions"]
    assert len(vers) == 8 and kvm_env.vm_name("job-other") not in {v["vm"] for v in vers}
