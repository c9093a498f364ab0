"""The vmware: source end to end against govmomi's vCenter simulator (tests/vcsim). The
simulator's own: sessions and InvalidLogin, inventory, ReconfigVM_Task, CreateSnapshot_Task,
RemoveSnapshot_Task, CreateVM_Task, PowerOnVM_Task, /folder GET with Range and PUT. Added by
alike in tests/vcsim: QueryChangedDiskAreas from the real difference of contents, changeIds that
a CBT reset or a resize invalidates, snapshots whose base disk stays frozen while the VM writes
on in a new file, and the /alike/write guest-write endpoint.

Covered: inventory; a first backup and a CBT backup reading only the changed areas; a guest
write made while a backup runs is not in that version (the frozen base is read); restores
byte-identical, into files and into the simulator (checked through its datastore files); each
broken chain (CBT reset, resized disk, new disk); an independent disk skipped with a note;
cleanup after kill -9 of the driver; the bad inputs."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.errors import refused
from tests.vcsim_server import Vcsim, VcsimBuildError, build

VM = "DC0_H0_VM0"
MiB = 1 << 20


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    try:
        build()
    except VcsimBuildError as e:
        pytest.skip(f"the vcsim launcher cannot be built here: {e}")
    d = tmp_path_factory.mktemp("vcsim-e2e")
    with Vcsim(d) as s:
        s.creds = s.credentials_file(d / "vc.toml")
        yield s


def auth(sim) -> list[str]:
    return ["--credentials", sim.creds, "--ca-bundle", sim.cert_file]


def truth(sim, vm, tmp_path, tag) -> list[str]:
    """Copies of the VM's current disks (in key order), as of now."""
    out = []
    for i, d in enumerate(sorted(sim.disks(vm)["disks"], key=lambda d: d["key"])):
        p = tmp_path / f"{vm}-{tag}-{i}.raw"
        subprocess.run(["cp", "--sparse=always", d["path"], str(p)], check=True)
        out.append(str(p))
    return out


def write(sim, vm, n, off, length, seed):
    key = sorted(d["key"] for d in sim.disks(vm)["disks"])[n]
    sim.guest_write(vm, key, off, np.random.default_rng(seed).integers(0, 256, length, dtype=np.uint8).tobytes())


def same(a, b) -> bool:
    return subprocess.run(["cmp", "-s", a, b]).returncode == 0


def snapshots(sim, vm) -> set:
    return {s for d in sim.disks(vm)["disks"] for s in (d["snapshots"] or {})}


def restored(alike, store, vm, version, tmp_path, n) -> list[str]:
    out = tmp_path / f"r-{version}"
    alike.json("restore", "--store", store, f"{vm}@{version}", "--to", out)
    files = sorted(os.listdir(out))
    assert len(files) == n, files
    return [str(out / f) for f in files]


def test_backup_cbt_frozen_base_restore_into_vsphere(alike, sim, tmp_path):
    store = tmp_path / "ads"
    alike.json("init", "--store", store)
    inv = {v["name"]: v for v in alike.json("inventory", f"vmware:{sim.url}", *auth(sim))["vms"]}
    assert set(sim.vms) <= set(inv) and [d["size"] for d in inv[VM]["disks"]] == [64 * MiB, 16 * MiB]
    assert [d["name"] for d in inv[VM]["disks"]] == ["scsi0:0", "scsi0:1"] and inv[VM]["datacenter"] == "DC0"
    text = alike("inventory", f"vmware:{sim.url}", *auth(sim), check=True).stdout
    assert "FOLDER" in text.splitlines()[0] and any(ln.startswith(VM) and " DC0 " in ln for ln in text.splitlines())
    t1 = truth(sim, VM, tmp_path, 1)
    r1 = alike.json("backup", "--store", store, f"vmware:{sim.url}", "--vm", VM, *auth(sim))
    assert r1["cbt"] is False and 0 < r1["read_bytes"] < 8 * MiB  # allocated areas only
    regions = [(0, 10 * MiB + 4321, 200000), (1, 3 * MiB, 65536), (0, 63 * MiB, MiB)]
    for i, (n, off, ln) in enumerate(regions):
        write(sim, VM, n, off, ln, i)
    t2 = truth(sim, VM, tmp_path, 2)
    r2 = alike.json("backup", "--store", store, f"vmware:{sim.url}", "--vm", VM, *auth(sim))
    changed = sum(ln for _, _, ln in regions)
    assert r2["cbt"] is True and 0 < r2["read_bytes"] <= changed + 6 * 64 * 1024, r2
    print(f"\nvmware CBT backup: read {r2['read_bytes']} bytes for {changed} changed bytes")

    # a write while the backup runs lands after its snapshot: not in that version
    write(sim, VM, 0, 20 * MiB, 300000, 7)
    t3 = truth(sim, VM, tmp_path, 3)
    p = subprocess.Popen([sys.executable, "-m", "alike_ray.cli", "backup", "--store", str(store),
                          f"vmware:{sim.url}", "--vm", VM, *auth(sim), "--json"],
                         env=dict(os.environ, RAY_ADDRESS=alike.address), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    deadline = time.monotonic() + 120
    while not snapshots(sim, VM) and time.monotonic() < deadline and p.poll() is None:
        time.sleep(0.02)
    write(sim, VM, 0, 20 * MiB, 300000, 8)  # the guest goes on writing
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    import json

    r3 = json.loads(out)
    assert not snapshots(sim, VM)  # removed at the end
    for r, want in ((r1, t1), (r2, t2), (r3, t3)):
        for got, exp in zip(restored(alike, store, VM, r["version"], tmp_path, 2), want):
            assert same(got, exp), f"{VM}@{r['version']}: {got} != {exp}"

    made = alike.json("restore", "--store", store, f"{VM}@{r2['version']}", "--to", f"vmware:{sim.url}",
                      "--name", "vm0-copy", "--start", *auth(sim))["vm_created"]
    assert made["state"] == "running"
    copy = sorted(sim.disks("vm0-copy")["disks"], key=lambda d: d["key"])
    assert [d["capacity"] for d in copy] == [64 * MiB, 16 * MiB]
    for d, exp in zip(copy, t2):
        assert same(d["path"], exp), d
    p = alike("restore", "--store", store, VM, "--to", f"vmware:{sim.url}", "--name", "vm0-copy", *auth(sim))
    assert p.returncode == 2 and "already has a VM named 'vm0-copy'" in p.stderr and "Traceback" not in p.stderr


def test_broken_chains_and_independent_disk(sim, ray_address, tmp_path):
    from pipelines.backup import run_backup
    from pipelines.restore import run_restore
    from pyVim.task import WaitForTask
    from pyVmomi import vim
    from storage.store import Store

    from alike_ray.sources.vmware import VmwareSource

    vmname = "DC0_C0_RP0_VM0"
    store = str(tmp_path / "ads")
    Store.init(store)
    src = VmwareSource(sim.url, credentials=sim.creds, ca_bundle=sim.cert_file)
    conn = src.login()
    [vm] = [v for v in conn.vms() if v.name == vmname]

    def reconf(**spec):
        WaitForTask(vm.ReconfigVM_Task(vim.vm.ConfigSpec(**spec)))

    def backup(tag):
        want = truth(sim, vmname, tmp_path, tag)
        [r] = run_backup(store, [(src, vmname)])
        assert "error" not in r, r
        out = [str(tmp_path / f"r-{tag}-{i}.raw") for i in range(len(r["disks"]))]
        run_restore(store, vmname, r["version"], out)
        for got, exp in zip(out, want):
            assert same(got, exp), tag
        return r

    try:
        backup("a")
        write(sim, vmname, 0, 5 * MiB, 4096, 1)
        assert backup("b")["cbt"] is True
        reconf(changeTrackingEnabled=False)  # a CBT reset: the old changeId is refused
        reconf(changeTrackingEnabled=True)
        write(sim, vmname, 0, 6 * MiB, 4096, 2)
        r = backup("c")
        assert r["cbt"] is False and any("refused the changeId" in n for n in r["cbt_notes"]), r
        write(sim, vmname, 0, 7 * MiB, 4096, 3)
        assert backup("d")["cbt"] is True  # re-armed
        disk = [d for d in vm.config.hardware.device if isinstance(d, vim.vm.device.VirtualDisk)][0]
        disk.capacityInKB += 8 * 1024  # resized
        disk.capacityInBytes = disk.capacityInKB * 1024
        reconf(deviceChange=[vim.vm.device.VirtualDeviceSpec(operation="edit", device=disk)])
        r = backup("e")
        assert r["cbt"] is False and r["disks"][0]["size"] == 72 * MiB and r["cbt_notes"], r
        assert backup("f")["cbt"] is True
        # an independent disk is not in snapshots: skipped, with a note
        new = vim.vm.device.VirtualDisk(key=-1, controllerKey=disk.controllerKey, unitNumber=5, capacityInKB=4096,
                                        backing=vim.vm.device.VirtualDisk.FlatVer2BackingInfo(
                                            diskMode="independent_persistent", thinProvisioned=True,
                                            fileName=f"[LocalDS_0] {vmname}/indep.vmdk"))
        reconf(deviceChange=[vim.vm.device.VirtualDeviceSpec(operation="add", fileOperation="create", device=new)])
        [r] = run_backup(store, [(src, vmname)])
        assert "error" not in r and len(r["disks"]) == 1
        assert any("independent" in n and "skipped" in n for n in r.get("notes", [])), r
    finally:
        conn.close()


def test_killed_backup_is_cleaned_up(alike, sim, tmp_path):
    store = tmp_path / "ads"
    alike.json("init", "--store", store)
    vmname = "DC0_H0_VM1"
    p = subprocess.Popen([sys.executable, "-m", "alike_ray.cli", "backup", "--store", str(store), f"vmware:{sim.url}",
                          "--vm", vmname, *auth(sim), "--json"], env=dict(os.environ, RAY_ADDRESS=alike.address),
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not snapshots(sim, vmname) and time.monotonic() < deadline and p.poll() is None:
        time.sleep(0.01)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    time.sleep(2)
    print(f"\nafter kill -9 of the driver: snapshots {sorted(snapshots(sim, vmname))}")
    r = alike.json("backup", "--store", store, f"vmware:{sim.url}", "--vm", vmname, *auth(sim))
    assert r["vm"] == vmname and not snapshots(sim, vmname)


def test_bad_inputs(alike, sim, tmp_path):
    store = tmp_path / "ads"
    alike.json("init", "--store", store)
    url = f"vmware:{sim.url}"

    bad = tmp_path / "bad.toml"
    bad.write_text('username = "alike"\npassword = "hunter2-wrong"\n')
    os.chmod(bad, 0o600)
    assert "hunter2" not in refused(alike("inventory", url, "--credentials", bad, "--ca-bundle", sim.cert_file),
                                    2, "InvalidLogin")
    os.chmod(bad, 0o644)
    refused(alike("inventory", url, "--credentials", bad), 2, "chmod 600")
    refused(alike("inventory", "vmware:https://127.0.0.1:9", *auth(sim)), 5, "cannot reach")
    refused(alike("inventory", url, "--credentials", sim.creds), 5, "not trusted", "--ca-bundle")
    refused(alike("backup", "--store", store, url, "--vm", "nope", *auth(sim)), 2, "no VM named 'nope'")
    alike.json("backup", "--store", store, url, "--vm", "DC0_C0_RP0_VM1", *auth(sim))
    refused(alike("restore", "--store", store, "DC0_C0_RP0_VM1", "--to", url, "--datastore", "nope", *auth(sim)),
            2, "no datastore 'nope'")


def test_datastore_full_is_refused_before_any_data_moves(alike, sim, tmp_path):
    """A datastore on a real filesystem that is too small (a 40 MiB tmpfs under the simulator's
    datastore folder): the restore is refused with exit 4 before any VM or file is made."""
    if os.geteuid() != 0:
        pytest.skip("not applicable: mounting a small filesystem needs root")
    store = tmp_path / "ads"
    alike.json("init", "--store", store)
    alike.json("backup", "--store", store, f"vmware:{sim.url}", "--vm", VM, *auth(sim))  # 80 MiB of disks
    work = tmp_path / "small"
    ds = work / "state" / "datastores"
    ds.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(ds)], check=True)
    try:
        with Vcsim(work, disk_mb=4, second_disk_mb=0) as small:
            creds = small.credentials_file(tmp_path / "small.toml")
            p = alike("restore", "--store", store, VM, "--to", f"vmware:{small.url}", "--name", "too-big",
                      "--credentials", creds, "--ca-bundle", small.cert_file)
            assert p.returncode == 4, p.stderr
            [line] = [ln for ln in p.stderr.splitlines() if ln.startswith("alike: error:")]
            assert "No space left" in line and "LocalDS_0" in line and "Traceback" not in p.stderr
            assert not [v for v in os.listdir(next(iter(small.datastores.values()))) if v == "too-big"]
    finally:
        subprocess.run(["umount", "-l", str(ds)])
