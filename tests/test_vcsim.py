"""The vCenter simulator peer (tests/vcsim) through pyvmomi, as the vmware: source will use it.

The simulator's own (govmomi 0.24.2): login and InvalidLogin / NotAuthenticated, inventory,
ReconfigVM_Task (changeTrackingEnabled, disk edits), CreateSnapshot_Task, RemoveSnapshot_Task,
RevertToSnapshot_Task, CreateVM_Task, PowerOnVM_Task, /folder GET (with Range) and PUT.
Added by alike in tests/vcsim (its package comment says how): QueryChangedDiskAreas from the
real difference of contents, backing.changeId at snapshots, snapshots that freeze disk contents
(the VM moves to "<disk>-00000N.vmdk"), consolidation at snapshot removal, disk files of capacity
size, /folder authentication, and the /alike/write guest-write endpoint.
"""
from __future__ import annotations

import base64
import os
import ssl
import urllib.error
import urllib.request

import pytest

from tests.vcsim_server import Vcsim, VcsimBuildError, build

pyVmomi = pytest.importorskip("pyVmomi")
from pyVim.connect import Disconnect, SmartConnect  # noqa: E402
from pyVim.task import WaitForTask  # noqa: E402
from pyVmomi import vim, vmodl  # noqa: E402

G = 64 << 10  # the launcher's CBT granule
MIB = 1 << 20
SPAN = 16 * MIB  # one QueryChangedDiskAreas answer covers at most this (the 64 MiB disk: 4+ calls)
MAX_AREAS = 4  # and at most this many areas


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    try:
        build()
    except VcsimBuildError as e:
        pytest.skip(f"the vcsim launcher cannot be built here: {e}")
    s = Vcsim(tmp_path_factory.mktemp("vcsim"), cbt_span=SPAN, cbt_max_areas=MAX_AREAS)
    s.start()
    yield s
    s.stop()


def connect(sim, password=None):
    return SmartConnect(host=sim.host, port=sim.port, user=sim.username,
                        pwd=sim.password if password is None else password, sslContext=sim.ssl_context())


@pytest.fixture(scope="module")
def si(sim):
    si = connect(sim)
    yield si
    Disconnect(si)


def find_vm(si, name):
    content = si.RetrieveContent()
    view = content.viewManager.CreateContainerView(content.rootFolder, [vim.VirtualMachine], True)
    try:
        return next(vm for vm in view.view if vm.name == name)
    finally:
        view.Destroy()


def disks_of(config):
    return sorted((d for d in config.hardware.device if isinstance(d, vim.vm.device.VirtualDisk)),
                  key=lambda d: d.key)


def cookie(si):
    return si._stub.cookie.split(";")[0]  # "vmware_soap_session=<id>"


def ds_relpath(file_name):
    """'[LocalDS_0] VM/disk1.vmdk' -> ('LocalDS_0', 'VM/disk1-flat.vmdk')"""
    ds, rel = file_name[1:].split("] ", 1)
    return ds, rel[: -len(".vmdk")] + "-flat.vmdk"


def folder_get(sim, si, file_name, rng=None, headers=None):
    ds, rel = ds_relpath(file_name)
    h = {"Cookie": cookie(si)} if si is not None else {}
    if rng:
        h["Range"] = f"bytes={rng[0]}-{rng[1] - 1}"
    h.update(headers or {})
    req = urllib.request.Request(sim.folder_url(rel, ds), headers=h)
    with urllib.request.urlopen(req, context=sim.ssl_context(), timeout=60) as resp:
        return resp.status, dict(resp.headers), resp.read()


def query_all(vm, snap, key, change_id, capacity):
    """QueryChangedDiskAreas over the whole disk, as the API requires: answer by answer."""
    areas, off, calls = [], 0, 0
    while off < capacity:
        info = vm.QueryChangedDiskAreas(snapshot=snap, deviceKey=key, startOffset=off, changeId=change_id)
        assert info.startOffset == off and 0 < info.length <= SPAN
        for a in info.changedArea or []:
            assert off <= a.start and a.start + a.length <= off + info.length
            areas.append((a.start, a.length))
        assert len(info.changedArea or []) <= MAX_AREAS
        off += info.length
        calls += 1
    return merge(areas), calls


def merge(areas):
    out = []
    for s, n in sorted(areas):
        if out and out[-1][0] + out[-1][1] >= s:
            out[-1] = (out[-1][0], max(out[-1][0] + out[-1][1], s + n) - out[-1][0])
        else:
            out.append((s, n))
    return out


def granules_to_areas(granules, capacity):
    return merge([(g * G, min(G, capacity - g * G)) for g in granules])


def snapshot(vm, name):
    task = vm.CreateSnapshot_Task(name=name, description="", memory=False, quiesce=False)
    WaitForTask(task)
    return task.info.result


def reconfigure(vm, **spec):
    WaitForTask(vm.ReconfigVM_Task(vim.vm.ConfigSpec(**spec)))


def test_login_wrong_password_and_no_session(sim):
    si = connect(sim)
    assert si.content.about.apiType == "VirtualCenter"
    assert si.content.sessionManager.currentSession.userName == sim.username
    vm = find_vm(si, "DC0_H0_VM0")
    Disconnect(si)
    with pytest.raises(vim.fault.NotAuthenticated):
        vm.QueryChangedDiskAreas(deviceKey=disks_of(vm.config)[0].key, startOffset=0, changeId="*")
    with pytest.raises(vim.fault.InvalidLogin):
        connect(sim, password="wrong")


def test_inventory_vms_and_disks(sim, si):
    content = si.RetrieveContent()
    view = content.viewManager.CreateContainerView(content.rootFolder, [vim.VirtualMachine], True)
    vms = {vm.name: vm for vm in view.view}
    assert sorted(vms) == sorted(sim.vms) == ["DC0_C0_RP0_VM0", "DC0_C0_RP0_VM1", "DC0_H0_VM0", "DC0_H0_VM1"]
    dc = next(e for e in content.rootFolder.childEntity if isinstance(e, vim.Datacenter))
    assert dc.name == sim.datacenter
    assert [ds.name for ds in dc.datastore] == list(sim.datastores)
    for name, vm in vms.items():
        disks = disks_of(vm.config)
        assert len(disks) == (2 if name == "DC0_H0_VM0" else 1)
        for d in disks:
            assert isinstance(d.backing, vim.vm.device.VirtualDisk.FlatVer2BackingInfo)
            assert d.backing.datastore.name == "LocalDS_0"
            ds, rel = ds_relpath(d.backing.fileName)
            assert rel.startswith(name + "/disk")
            local = os.path.join(sim.datastores[ds], rel)
            assert os.path.getsize(local) == d.capacityInBytes == d.capacityInKB * 1024
        assert disks[0].capacityInBytes == 64 * MIB


def test_folder_needs_a_session_or_basic_auth(sim, si):
    disk = disks_of(find_vm(si, "DC0_H0_VM1").config)[0]
    with pytest.raises(urllib.error.HTTPError) as e:
        folder_get(sim, None, disk.backing.fileName, (0, 16))
    assert e.value.code == 401
    basic = base64.b64encode(f"{sim.username}:{sim.password}".encode()).decode()
    status, _, data = folder_get(sim, None, disk.backing.fileName, (0, 16), {"Authorization": "Basic " + basic})
    assert status == 206 and len(data) == 16


def test_cbt_snapshots_freeze_and_changed_areas_are_the_real_difference(sim, si):
    name = "DC0_H0_VM1"
    vm = find_vm(si, name)
    reconfigure(vm, changeTrackingEnabled=True)
    assert vm.config.changeTrackingEnabled
    disk = disks_of(vm.config)[0]
    key, cap, base_file = disk.key, disk.capacityInBytes, disk.backing.fileName
    assert base_file == f"[LocalDS_0] {name}/disk1.vmdk"

    s1 = snapshot(vm, "alike-1")
    d1 = disks_of(s1.config)[0]
    c1 = d1.backing.changeId
    assert d1.backing.fileName == base_file and c1
    cur = disks_of(vm.config)[0]
    assert cur.backing.fileName == f"[LocalDS_0] {name}/disk1-000001.vmdk"
    assert cur.backing.parent.fileName == base_file and cur.backing.changeId == c1
    _, _, before = folder_get(sim, si, base_file)
    assert len(before) == cap

    # guest writes into the current disk
    rnd = os.urandom
    writes = [
        (10 * G + 100, rnd(5000)),                   # inside granule 10
        (20 * G - 10, rnd(20)),                      # across granules 19|20
        (40 * G, rnd(3 * G)),                        # granules 40..42, one area
        (0, before[:2 * G]),                         # the same bytes again: no change
        (17 * MIB + 3, bytes([before[17 * MIB + 3] ^ 0xFF])),  # second span, one byte
        (32 * MIB, bytes(G)),                        # zeros over seeded data: a change
        (cap - 1, b"\x01"),                          # the last byte
    ] + [(33 * MIB + k * 2 * G + 7, rnd(9)) for k in range(6)]  # 6 areas in one span > MAX_AREAS
    for off, data in writes:
        r = sim.guest_write(name, key, off, data)
        assert r["file"] == f"[LocalDS_0] {name}/disk1-000001-flat.vmdk"
    expected_granules = sorted({g for off, data in writes for g in range(off // G, (off + len(data) - 1) // G + 1)
                                if before[off:off + len(data)] != data})

    # the snapshot's disk still has the old bytes, whole and by Range
    status, headers, part = folder_get(sim, si, base_file, (10 * G, 11 * G))
    assert status == 206 and headers["Content-Range"] == f"bytes {10 * G}-{11 * G - 1}/{cap}"
    assert part == before[10 * G:11 * G]
    assert folder_get(sim, si, base_file)[2] == before

    s2 = snapshot(vm, "alike-2")
    d2 = disks_of(s2.config)[0]
    c2 = d2.backing.changeId
    assert d2.backing.fileName == f"[LocalDS_0] {name}/disk1-000001.vmdk"
    assert c2 and c2 != c1 and c2.split("/")[0] == c1.split("/")[0]
    assert disks_of(vm.config)[0].backing.fileName == f"[LocalDS_0] {name}/disk1-000002.vmdk"
    _, _, after = folder_get(sim, si, d2.backing.fileName)

    real = [g for g in range(0, (cap + G - 1) // G) if before[g * G:(g + 1) * G] != after[g * G:(g + 1) * G]]
    assert real == expected_granules
    areas, calls = query_all(vm, s2, key, c1, cap)
    assert areas == granules_to_areas(real, cap)
    assert calls > cap // SPAN  # a loop: the span and the area cap both cut answers
    assert query_all(vm, s2, key, c2, cap)[0] == []
    assert query_all(vm, s1, key, c1, cap)[0] == []

    # "*": the allocated areas (the seeded data and what was written)
    seeded = [(0, 256 << 10), (32 * MIB, MIB)]
    assert query_all(vm, s1, key, "*", cap)[0] == merge(seeded)
    written = granules_to_areas(sorted({g for off, data in writes for g in range(off // G, (off + len(data) - 1) // G + 1)}), cap)
    assert query_all(vm, s2, key, "*", cap)[0] == merge(seeded + written)

    # a snapshot's disk is not for writing
    ds, rel = ds_relpath(d2.backing.fileName)
    req = urllib.request.Request(sim.folder_url(rel, ds), data=b"x", method="PUT", headers={"Cookie": cookie(si)})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, context=sim.ssl_context())
    assert e.value.code == 409

    # removing the snapshots consolidates; the changeIds stay good for the next snapshot
    WaitForTask(s1.RemoveSnapshot_Task(removeChildren=False))
    d2 = disks_of(s2.config)[0]
    assert d2.backing.fileName == base_file and d2.backing.changeId == c2
    assert folder_get(sim, si, base_file)[2] == after
    sim.guest_write(name, key, 50 * G, b"later")
    WaitForTask(s2.RemoveSnapshot_Task(removeChildren=False))
    assert vm.snapshot is None
    cur = disks_of(vm.config)[0]
    assert cur.backing.fileName == base_file and cur.backing.parent is None
    files = sorted(os.listdir(os.path.join(sim.datastores["LocalDS_0"], name)))
    assert [f for f in files if f.startswith("disk")] == ["disk1-flat.vmdk", "disk1.vmdk"]
    s3 = snapshot(vm, "alike-3")
    c3 = disks_of(s3.config)[0].backing.changeId
    assert int(c3.split("/")[1]) == int(c2.split("/")[1]) + 1
    assert query_all(vm, s3, key, c2, cap)[0] == [(50 * G, G)]
    assert query_all(vm, s3, key, c1, cap)[0] == granules_to_areas(sorted(set(real) | {50}), cap)
    WaitForTask(s3.RemoveSnapshot_Task(removeChildren=False))


def test_changeids_refused_after_cbt_reset_resize_and_without_cbt(sim, si):
    vm = find_vm(si, "DC0_C0_RP0_VM0")
    key = disks_of(vm.config)[0].key
    cap = disks_of(vm.config)[0].capacityInBytes

    s0 = snapshot(vm, "no-cbt")  # CBT off: no changeId, and no answer
    assert not disks_of(s0.config)[0].backing.changeId
    with pytest.raises(vim.fault.FileFault):
        vm.QueryChangedDiskAreas(snapshot=s0, deviceKey=key, startOffset=0, changeId="*")
    WaitForTask(s0.RemoveSnapshot_Task(removeChildren=False))

    reconfigure(vm, changeTrackingEnabled=True)
    s1 = snapshot(vm, "cbt-1")
    c1 = disks_of(s1.config)[0].backing.changeId
    assert query_all(vm, s1, key, c1, cap)[0] == []
    WaitForTask(s1.RemoveSnapshot_Task(removeChildren=False))
    with pytest.raises(vim.fault.InvalidPowerState):  # powered on: only a snapshot is asked about
        vm.QueryChangedDiskAreas(snapshot=None, deviceKey=key, startOffset=0, changeId=c1)

    # CBT turned off and on: the old changeId is refused
    reconfigure(vm, changeTrackingEnabled=False)
    assert not disks_of(vm.config)[0].backing.changeId
    reconfigure(vm, changeTrackingEnabled=True)
    s2 = snapshot(vm, "cbt-2")
    c2 = disks_of(s2.config)[0].backing.changeId
    assert c2.split("/")[0] != c1.split("/")[0]
    with pytest.raises(vmodl.fault.InvalidArgument) as e:
        vm.QueryChangedDiskAreas(snapshot=s2, deviceKey=key, startOffset=0, changeId=c1)
    assert e.value.invalidProperty == "changeId"
    for bad in ("nonsense", c2.split("/")[0] + "/x"):
        with pytest.raises(vmodl.fault.InvalidArgument):
            vm.QueryChangedDiskAreas(snapshot=s2, deviceKey=key, startOffset=0, changeId=bad)
    with pytest.raises(vim.fault.FileFault):  # a changeId of this epoch that never was
        vm.QueryChangedDiskAreas(snapshot=s2, deviceKey=key, startOffset=0, changeId=c2.split("/")[0] + "/99")
    with pytest.raises(vmodl.fault.InvalidArgument):
        vm.QueryChangedDiskAreas(snapshot=s2, deviceKey=key + 12345, startOffset=0, changeId=c2)
    with pytest.raises(vmodl.fault.InvalidArgument):
        vm.QueryChangedDiskAreas(snapshot=s2, deviceKey=key, startOffset=cap + 1, changeId=c2)
    WaitForTask(s2.RemoveSnapshot_Task(removeChildren=False))

    # the disk resized: the changeId is refused, and the disk file has the new size
    disk = disks_of(vm.config)[0]
    disk.capacityInKB = 96 * 1024
    disk.capacityInBytes = 96 * MIB
    reconfigure(vm, deviceChange=[vim.vm.device.VirtualDeviceSpec(operation="edit", device=disk)])
    assert disks_of(vm.config)[0].capacityInBytes == 96 * MIB
    s3 = snapshot(vm, "cbt-3")
    with pytest.raises(vmodl.fault.InvalidArgument):
        vm.QueryChangedDiskAreas(snapshot=s3, deviceKey=key, startOffset=0, changeId=c2)
    status, headers, _ = folder_get(sim, si, disks_of(s3.config)[0].backing.fileName, (96 * MIB - 1, 96 * MIB))
    assert status == 206 and headers["Content-Range"].endswith(f"/{96 * MIB}")
    WaitForTask(s3.RemoveSnapshot_Task(removeChildren=False))
    reconfigure(vm, changeTrackingEnabled=False)


def test_revert_to_snapshot_restores_contents(sim, si):
    name = "DC0_C0_RP0_VM1"
    vm = find_vm(si, name)
    key = disks_of(vm.config)[0].key
    s1 = snapshot(vm, "before")
    _, _, old = folder_get(sim, si, disks_of(s1.config)[0].backing.fileName, (0, G))
    sim.guest_write(name, key, 0, b"\0" * G)
    assert folder_get(sim, si, disks_of(vm.config)[0].backing.fileName, (0, G))[2] == b"\0" * G
    WaitForTask(s1.RevertToSnapshot_Task())
    assert folder_get(sim, si, disks_of(vm.config)[0].backing.fileName, (0, G))[2] == old
    WaitForTask(vm.RemoveAllSnapshots_Task())
    assert disks_of(vm.config)[0].backing.fileName == f"[LocalDS_0] {name}/disk1.vmdk"
    assert folder_get(sim, si, f"[LocalDS_0] {name}/disk1.vmdk", (0, G))[2] == old


def test_create_vm_then_put_and_get_its_disk(sim, si):
    content = si.RetrieveContent()
    dc = next(e for e in content.rootFolder.childEntity if isinstance(e, vim.Datacenter))
    cluster = next(e for e in dc.hostFolder.childEntity if isinstance(e, vim.ClusterComputeResource))
    size = 8 * MIB
    ctl = vim.vm.device.ParaVirtualSCSIController(key=1000, busNumber=0, sharedBus="noSharing")
    disk = vim.vm.device.VirtualDisk(
        key=-1, controllerKey=1000, unitNumber=0, capacityInKB=size // 1024, capacityInBytes=size,
        backing=vim.vm.device.VirtualDisk.FlatVer2BackingInfo(diskMode="persistent", thinProvisioned=True,
                                                              fileName="[LocalDS_0] alike-restored/alike-restored.vmdk"))
    spec = vim.vm.ConfigSpec(
        name="alike-restored", memoryMB=256, numCPUs=1, guestId="otherGuest64",
        files=vim.vm.FileInfo(vmPathName="[LocalDS_0] alike-restored/alike-restored.vmx"),
        deviceChange=[vim.vm.device.VirtualDeviceSpec(operation="add", device=ctl),
                      vim.vm.device.VirtualDeviceSpec(operation="add", fileOperation="create", device=disk)])
    task = dc.vmFolder.CreateVM_Task(config=spec, pool=cluster.resourcePool)
    WaitForTask(task)
    vm = task.info.result
    d = disks_of(vm.config)[0]
    assert d.capacityInBytes == size and d.backing.fileName == "[LocalDS_0] alike-restored/alike-restored.vmdk"

    data = os.urandom(3 * MIB) + bytes(size - 3 * MIB)
    ds, rel = ds_relpath(d.backing.fileName)
    req = urllib.request.Request(sim.folder_url(rel, ds), data=data, method="PUT",
                                 headers={"Cookie": cookie(si), "Content-Type": "application/octet-stream"})
    with urllib.request.urlopen(req, context=sim.ssl_context(), timeout=60) as resp:
        assert resp.status in (200, 201)
    assert folder_get(sim, si, d.backing.fileName)[2] == data
    assert folder_get(sim, si, d.backing.fileName, (MIB + 5, 2 * MIB))[2] == data[MIB + 5:2 * MIB]
    WaitForTask(vm.PowerOnVM_Task())
    assert vm.runtime.powerState == "poweredOn"


def test_plain_http(tmp_path):
    with Vcsim(tmp_path, http=True, second_disk_mb=0, seed=False) as s:
        assert s.url.startswith("http://") and not s.cert_file
        si = SmartConnect(protocol="http", host=s.host, port=s.port, user=s.username, pwd=s.password)
        try:
            vm = find_vm(si, "DC0_H0_VM0")
            assert len(disks_of(vm.config)) == 1
        finally:
            Disconnect(si)


def test_independent_disk_is_left_out_of_snapshots(sim, si):
    name = "DC0_H0_VM0"
    vm = find_vm(si, name)
    d1, d2 = disks_of(vm.config)
    d2.backing.diskMode = "independent_persistent"
    reconfigure(vm, deviceChange=[vim.vm.device.VirtualDeviceSpec(operation="edit", device=d2)])
    s1 = snapshot(vm, "with-independent")
    sd1, sd2 = disks_of(s1.config)
    assert sd1.backing.fileName == f"[LocalDS_0] {name}/disk1.vmdk"
    assert disks_of(vm.config)[0].backing.fileName == f"[LocalDS_0] {name}/disk1-000001.vmdk"
    assert sd2.backing.fileName == disks_of(vm.config)[1].backing.fileName == f"[LocalDS_0] {name}/disk2.vmdk"
    assert sd2.backing.diskMode == "independent_persistent"
    WaitForTask(s1.RemoveSnapshot_Task(removeChildren=False))
    assert [d.backing.fileName for d in disks_of(vm.config)] == [
        f"[LocalDS_0] {name}/disk1.vmdk", f"[LocalDS_0] {name}/disk2.vmdk"]


def test_stats_count_the_launchers_own_work(tmp_path):
    """/alike/stats: the snapshot's -flat copy and content-hash pass (bytes = the disk's data),
    the consolidation at removal and QueryChangedDiskAreas calls, each counted where it happens."""
    with Vcsim(tmp_path, second_disk_mb=0, seed=False) as s:
        name = "DC0_H0_VM1"
        path = s.disks(name)["disks"][0]["path"]
        s.guest_write(name, s.disks(name)["disks"][0]["key"], 3 * MIB, os.urandom(2 * MIB))
        with open(path, "r+b") as f:  # a write behind the launcher's back is seen too: it hashes at the snapshot
            f.seek(40 * MIB)
            f.write(os.urandom(MIB))
        si = SmartConnect(host=s.host, port=s.port, user=s.username, pwd=s.password, sslContext=s.ssl_context())
        try:
            vm = find_vm(si, name)
            before = s.stats()
            assert "snapshot_copy" not in before
            reconfigure(vm, changeTrackingEnabled=True)
            snap = snapshot(vm, "alike-stats")
            d = disks_of(snap.config)[0]
            areas, _ = query_all(vm, snap, d.key, "*", d.capacityInBytes)
            assert areas == [(3 * MIB, 2 * MIB), (40 * MIB, MIB)]
            WaitForTask(snap.RemoveSnapshot_Task(removeChildren=False))
            st = s.stats()
        finally:
            Disconnect(si)
    assert st["snapshot_copy"]["calls"] == 1 and st["snapshot_copy"]["bytes"] == 3 * MIB
    assert st["snapshot_hash"]["calls"] == 1 and st["snapshot_hash"]["bytes"] == 3 * MIB
    assert st["consolidate"]["calls"] == 1
    assert st["changed_areas"]["calls"] >= 64 * MIB // SPAN
    assert st["after_task"]["seconds"] >= st["snapshot_copy"]["seconds"] + st["snapshot_hash"]["seconds"]
    assert all(v["seconds"] >= 0 for v in st.values())
