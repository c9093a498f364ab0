"""The xen: source end to end, against the protocol-level XAPI test server (tests/xapi_server.py:
XenAPI over XML-RPC and HTTPS, VDIs as real files, NBD by real qemu-nbd with TLS, CBT bitmaps
from the real difference of contents): inventory, a first backup and a CBT backup reading only
what changed, every kind of broken chain, a memory checkpoint restored as a suspended VM, restore
into the pool checked byte for byte through the server's export, a job selecting by Xen tags with
parallel = 2, cleanup after a driver killed with SIGKILL mid-read, and the bad inputs.

Ground truth: the server's export of a VDI at the instant a backup snapshots it (taken in the
server's snapshot hook, where a guest write then lands too, so a backup that read the live disk
instead of the frozen snapshot would restore the wrong bytes)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests import images
from tests.errors import refused
from tests.xapi_server import XapiServer

MiB = images.MiB
BS = 512 * 1024


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    d = tmp_path_factory.mktemp("xen-e2e")
    lib = os.path.dirname(os.__file__)
    t1 = images.tree(str(d / "t1"), 6 * MiB, [f"{lib}/{x}" for x in ("email", "asyncio", "xml", "unittest")])
    t2 = images.tree(str(d / "t2"), 2 * MiB, [f"{lib}/{x}" for x in ("json", "logging", "http")])
    root = d / "pool"
    with XapiServer(str(root)) as srv:
        srv.add_vm("web", disks=[images.ext4_image(str(d / "w0.raw"), 32, t1, "w0"),
                                 images.ext4_image(str(d / "w1.raw"), 16, t2, "w1")],
                   tags=["prod", "web"], memory=32 * MiB, vcpus=2, description="the web tier")
        srv.add_vm("db", disks=[images.ext4_image(str(d / "d0.raw"), 24, t2, "d0")], tags=["prod", "db"],
                   memory=16 * MiB)
        srv.add_vm("scratch", disks=[8 * MiB], tags=["dev"], power_state="Halted")
        srv.creds = srv.credentials_file(str(d / "xen.toml"))
        yield srv


def auth(srv) -> list[str]:
    return ["--credentials", srv.creds, "--ca-bundle", srv.ca_file]


def vm_uuid(srv, name: str) -> str:
    [u] = [r["uuid"] for r in srv.objects("VM").values()
           if r["name_label"] == name and not r["is_a_snapshot"] and not r["is_a_template"]]
    return u


def live_vdis(srv, name: str) -> list[str]:
    u = vm_uuid(srv, name)
    out, n = [], 0
    while True:
        try:
            out.append(srv.vdi_of(u, n))
        except (KeyError, IndexError, LookupError):
            return out
        n += 1


def write(srv, vdi: str, off: int, n: int, seed: int) -> None:
    srv.guest_write(vdi, off, np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes())


class Truth:
    """Exports of a VM's disks at the instant of each snapshot, and a guest write right after it."""

    def __init__(self, srv, vm: str, tmp_path):
        self.srv, self.vm, self.tmp, self.snaps = srv, vm, tmp_path, []
        self.uuid = vm_uuid(srv, vm)

    def __enter__(self):
        def hook(vm_uuid):
            if vm_uuid != self.uuid:
                return
            files = []
            for i, vdi in enumerate(live_vdis(self.srv, self.vm)):
                p = self.tmp / f"{self.vm}-{len(self.snaps)}-{i}.raw"
                p.write_bytes(self.srv.export(vdi))
                files.append(str(p))
                write(self.srv, vdi, 4 * MiB + 333, 5000, len(self.snaps))  # after the snapshot: not in it
            self.snaps.append(files)

        self.srv.on_snapshot = hook
        return self

    def __exit__(self, *exc):
        self.srv.on_snapshot = None


def same(a: str, b: str) -> bool:
    return subprocess.run(["cmp", "-s", a, b]).returncode == 0


def residue(srv):
    from alike_ray.sources.xen import MARK

    snaps = [r["name_label"] for r in srv.objects("VM").values() if r["is_a_snapshot"]]
    data = [r["uuid"] for r in srv.objects("VDI").values() if MARK in r["other_config"] and r["type"] != "cbt_metadata"]
    markers = [r for r in srv.objects("VDI").values() if MARK in r["other_config"] and r["type"] == "cbt_metadata"]
    return snaps, data, markers


def test_inventory(alike, pool):
    r = alike.json("inventory", f"xen:{pool.url}", *auth(pool))
    vms = {v["name"]: v for v in r["vms"]}
    assert set(vms) == {"web", "db", "scratch"}  # no template, control domain or snapshot
    assert [d["name"] for d in vms["web"]["disks"]] == ["xvda", "xvdb"]
    assert [d["size"] for d in vms["web"]["disks"]] == [32 * MiB, 16 * MiB]
    assert vms["web"]["tags"] == ["prod", "web"] and vms["web"]["state"] == "running"
    assert vms["scratch"]["state"] == "halted" and vms["web"]["id"] == vm_uuid(pool, "web")


def test_backup_cbt_restore_into_pool(alike, pool, tmp_path):
    store = tmp_path / "ads"
    alike.json("init", "--store", store)
    with Truth(pool, "web", tmp_path) as truth:
        r1 = alike.json("backup", "--store", store, f"xen:{pool.url}", "--vm", "web", *auth(pool))
        assert r1["cbt"] is False and r1["logical_bytes"] == 48 * MiB
        assert 0 < r1["read_bytes"] < 24 * MiB  # allocation-aware: the filesystems' data, not the disks
        regions = [(0, 2 * MiB, MiB), (0, 20 * MiB + 12345, 70001), (1, 15 * MiB - 4096, 8192)]
        vdis = live_vdis(pool, "web")
        for i, (d, off, n) in enumerate(regions):
            write(pool, vdis[d], off, n, 100 + i)
        r2 = alike.json("backup", "--store", store, f"xen:{pool.url}", "--vm", "web", *auth(pool))
    changed = sum(n for _, _, n in regions) + 5000 * 2  # and the writes the hook made after snapshot 1
    assert r2["cbt"] is True, r2
    assert 0 < r2["read_bytes"] <= changed + 6 * 64 * 1024, r2  # 64 KiB granules at each edge
    print(f"\nxen CBT backup: read {r2['read_bytes']} bytes for {changed} changed bytes")
    snaps, data, markers = residue(pool)
    assert not snaps and not data, (snaps, data)
    assert len(markers) == 2 and len({m["snapshot_of"] for m in markers}) == 2  # one per disk: older ones gone
    from storage.store import Store

    v2 = Store.open(str(store)).read_version("web", r2["version"])
    assert sorted(m["uuid"] for m in markers) == sorted(d["cbt"] for d in v2["disks"])
    assert v2["shape"]["vcpus"] == 2 and v2["shape"]["description"] == "the web tier"
    assert sorted(v["version"] for v in alike.json("versions", "--store", store, "--vm", "web")["versions"]) == \
        sorted([r1["version"], r2["version"]])
    for r, files in ((r1, truth.snaps[0]), (r2, truth.snaps[1])):
        out = tmp_path / f"restore-{r['version']}"
        alike.json("restore", "--store", store, f"web@{r['version']}", "--to", out)
        for name, want in zip(("xvda", "xvdb"), files):
            assert same(str(out / f"{name}.raw"), want), f"web@{r['version']} {name}"

    # into the pool: a new VM, its disks checked through the server's export
    made = alike.json("restore", "--store", store, "web", "--to", f"xen:{pool.url}", "--sr", "Local storage",
                      "--name", "web-copy", "--start", "--network", "xenbr0", *auth(pool))["vm_created"]
    assert made["state"] == "running" and made["name"] == "web-copy" and not made["notes"]
    rec = pool.objects("VM")
    [vm] = [v for v in rec.values() if v["name_label"] == "web-copy"]
    [vif] = [pool.objects("VIF")[r] for r in vm["VIFs"]]  # the NIC, on the network asked for (by bridge)
    assert pool.objects("network")[vif["network"]]["bridge"] == "xenbr0"
    [orig] = [v for v in rec.values() if v["name_label"] == "web" and not v["is_a_snapshot"]]
    assert vif["MAC"] == pool.objects("VIF")[orig["VIFs"][0]]["MAC"]
    assert vm["power_state"] == "Running" and vm["VCPUs_max"] == "2" and vm["memory_static_max"] == str(32 * MiB)
    for n, want in enumerate(truth.snaps[1]):
        with open(want, "rb") as f:
            assert pool.export(pool.vdi_of(vm["uuid"], n)) == f.read(), f"web-copy disk {n}"
    p = alike("restore", "--store", store, "web", "--to", f"xen:{pool.url}", "--name", "web-copy", *auth(pool))
    assert p.returncode == 2 and "already has a VM named 'web-copy'" in p.stderr and "Traceback" not in p.stderr


def test_broken_chains(pool, ray_address, tmp_path):
    """Each broken chain reads that disk in full, says why, restores right, and re-arms."""
    import XenAPI
    from pipelines.backup import run_backup
    from pipelines.restore import run_restore
    from storage.store import Store

    from alike_ray.sources.xen import XenSource

    store = str(tmp_path / "ads")
    Store.init(store)
    src = XenSource(pool.url, credentials=pool.creds, ca_bundle=pool.ca_file)
    s = XenAPI.Session(pool.url, transport=__import__("xmlrpc.client").client.SafeTransport(
        context=__import__("ssl").create_default_context(cafile=pool.ca_file)))
    s.xenapi.login_with_password(pool.username, pool.password, "2.0", "test")
    x = s.xenapi

    def backup(truth):
        [r] = run_backup(store, [(src, "db")])
        assert "error" not in r, r
        out = [str(tmp_path / f"r-{r['version']}-{i}.raw") for i in range(len(r["disks"]))]
        run_restore(store, "db", r["version"], out)
        for got, want in zip(out, truth.snaps[-1]):
            assert same(got, want)
        return r

    def live():
        return x.VDI.get_by_uuid(live_vdis(pool, "db")[0])

    def marker(r):
        return x.VDI.get_by_uuid(r["disks"][0]["cbt"])

    with Truth(pool, "db", tmp_path) as truth:
        r = backup(truth)
        write(pool, live_vdis(pool, "db")[0], 3 * MiB, 4096, 1)
        r = backup(truth)
        assert r["cbt"] is True
        breaks = {
            "CBT was disabled": lambda r: x.VDI.disable_cbt(live()),
            "deleted": lambda r: x.VDI.destroy(marker(r)),
            "resized": lambda r: _offline(x, pool, "db", lambda: x.VDI.resize(live(), str(32 * MiB))),
            "unrelated": lambda r: _offline(x, pool, "db", lambda: _replace_disk(x, pool, "db")),
        }
        for why, brk in breaks.items():
            brk(r)
            write(pool, live_vdis(pool, "db")[0], 5 * MiB, 4096, 2)
            r = backup(truth)
            assert r["cbt"] is False and any(why in n for n in r.get("cbt_notes", [])), (why, r.get("cbt_notes"))
            write(pool, live_vdis(pool, "db")[0], 6 * MiB, 4096, 3)
            r = backup(truth)  # re-armed
            assert r["cbt"] is True and r["read_bytes"] <= 3 * 64 * 1024 + 2 * 5000, (why, r)
        # a new disk: read in full, the others go on with CBT
        _offline(x, pool, "db", lambda: _add_disk(x, pool, "db", 8 * MiB))
        write(pool, live_vdis(pool, "db")[1], MiB, 4096, 4)
        r = backup(truth)
        assert any("xvdb: new since the previous version" in n for n in r.get("cbt_notes", [])), r
        r = backup(truth)
        assert r["cbt"] is True
    s.xenapi.session.logout()
    snaps, data, _ = residue(pool)
    assert not snaps and not data


def _offline(x, pool, name, change):
    """A change made with the VM shut down (XAPI refuses it on a running VM's attached disks)."""
    vm = x.VM.get_by_uuid(vm_uuid(pool, name))
    x.VM.clean_shutdown(vm)
    try:
        change()
    finally:
        x.VM.start(vm, False, False)


def _replace_disk(x, pool, name):
    """The VM's first disk swapped for a copy: same contents, another VDI (no CBT relation)."""
    vm = x.VM.get_by_uuid(vm_uuid(pool, name))
    [vbd] = [b for b in x.VM.get_VBDs(vm) if x.VBD.get_userdevice(b) == "0"]
    old = x.VBD.get_VDI(vbd)
    data = pool.export(x.VDI.get_uuid(old))
    rec = x.VDI.get_record(old)
    new = x.VDI.create({"name_label": "replaced", "name_description": "", "SR": rec["SR"],
                        "virtual_size": rec["virtual_size"], "type": "user", "sharable": False, "read_only": False,
                        "other_config": {}, "xenstore_data": {}, "sm_config": {}, "tags": []})
    pool.guest_write(x.VDI.get_uuid(new), 0, data)
    x.VBD.destroy(vbd)
    x.VBD.create({"VM": vm, "VDI": new, "userdevice": "0", "bootable": True, "mode": "RW", "type": "Disk",
                  "empty": False, "other_config": {}, "qos_algorithm_type": "", "qos_algorithm_params": {}})


def _add_disk(x, pool, name, size):
    vm = x.VM.get_by_uuid(vm_uuid(pool, name))
    sr = x.SR.get_by_name_label("Local storage")[0]
    vdi = x.VDI.create({"name_label": "added", "name_description": "", "SR": sr, "virtual_size": str(size),
                        "type": "user", "sharable": False, "read_only": False, "other_config": {},
                        "xenstore_data": {}, "sm_config": {}, "tags": []})
    x.VBD.create({"VM": vm, "VDI": vdi, "userdevice": "1", "bootable": False, "mode": "RW", "type": "Disk",
                  "empty": False, "other_config": {}, "qos_algorithm_type": "", "qos_algorithm_params": {}})


def test_memory_checkpoint_restores_suspended(alike, pool, tmp_path):
    store = tmp_path / "ads"
    alike.json("init", "--store", store)
    memory = np.zeros(16 * MiB, np.uint8)
    memory[MiB:MiB + 200000] = np.random.default_rng(9).integers(0, 256, 200000, dtype=np.uint8)
    pool.set_memory(vm_uuid(pool, "db"), memory.tobytes())
    r = alike.json("backup", "--store", store, f"xen:{pool.url}", "--vm", "db", "--memory", *auth(pool))
    from storage.store import Store

    meta = Store.open(str(store)).read_version("db", r["version"])
    names = [f"xvd{chr(97 + i)}" for i in range(len(live_vdis(pool, "db")))]
    assert [(d["name"], d.get("role", "disk")) for d in meta["disks"]] == [(n, "disk") for n in names] + [("memory", "memory")]
    assert meta["disks"][-1]["size"] == 16 * MiB and meta["shape"]["memory_bytes"] == 16 * MiB
    made = alike.json("restore", "--store", store, "db", "--to", f"xen:{pool.url}", "--name", "db-suspended",
                      *auth(pool))["vm_created"]
    assert made["state"] == "suspended", made
    [vm] = [v for v in pool.objects("VM").values() if v["name_label"] == "db-suspended"]
    assert vm["power_state"] == "Suspended"
    sus = pool.objects("VDI")[vm["suspend_VDI"]]
    assert pool.export(sus["uuid"]) == memory.tobytes()
    made = alike.json("restore", "--store", store, "db", "--to", f"xen:{pool.url}", "--name", "db-resumed",
                      "--start", *auth(pool))["vm_created"]  # VM.resume of the imported suspended VM
    assert made["state"] == "running"
    assert [v["power_state"] for v in pool.objects("VM").values() if v["name_label"] == "db-resumed"] == ["Running"]
    # a halted VM has no memory to take: disks only, with a note
    p = alike("backup", "--store", store, f"xen:{pool.url}", "--vm", "scratch", "--memory", *auth(pool), "--json")
    assert p.returncode == 0, p.stderr
    assert "no memory image" in p.stderr


def test_job_by_tags_parallel(alike, pool, tmp_path):
    store = tmp_path / "ads"
    alike.json("init", "--store", store)
    job = tmp_path / "prod.toml"
    job.write_text(f'name = "prod"\nstore = "{store}"\n'
                   f'sources = [{{uri = "xen:{pool.url}", credentials = "{pool.creds}", ca_bundle = "{pool.ca_file}"}}]\n'
                   '[select]\ntags = ["prod"]\n[options]\nparallel = 2\ncbt = true\n')
    r = alike.json("job", "run", str(job))
    taken = sorted(v["vm"] for v in r["vms"])
    assert taken == ["db", "web"], r  # scratch is tagged dev
    assert all(v.get("error") is None for v in r["vms"]), r


def test_killed_backup_is_cleaned_up(alike, pool, tmp_path, ray_address):
    """kill -9 of the driver mid-read: Ray then ends the snapshot actor, whose release may or may
    not run; whatever stays on the pool the next backup of the VM removes (found by its mark or
    name), and it succeeds. (tests/test_source_xen.py leaves a snapshot unreleased on purpose.)"""
    store = tmp_path / "ads"
    alike.json("init", "--store", store)
    pool.add_vm("big", disks=[images.random_image(str(tmp_path / "big.raw"), 96)], tags=["big"])
    env = dict(os.environ, RAY_ADDRESS=ray_address)
    p = subprocess.Popen([sys.executable, "-m", "alike_ray.cli", "backup", "--store", str(store), f"xen:{pool.url}",
                          "--vm", "big", *auth(pool), "--json"], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not any(m == "VDI.get_nbd_info" for m, _ in pool.calls):
        time.sleep(0.05)
    assert p.poll() is None, p.communicate()
    time.sleep(1.0)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    time.sleep(2)
    snaps, data, _ = residue(pool)
    print(f"\nafter kill -9 of the driver: {len(snaps)} snapshot VMs, {len(data)} data VDIs of ours left")
    r = alike.json("backup", "--store", store, f"xen:{pool.url}", "--vm", "big", *auth(pool))
    assert r["cbt"] is False
    snaps, data, markers = residue(pool)
    assert not snaps and not data, (snaps, data)


def test_bad_inputs(alike, pool, tmp_path):
    store = tmp_path / "ads"
    alike.json("init", "--store", store)
    url = f"xen:{pool.url}"

    bad = tmp_path / "bad.toml"
    bad.write_text('username = "root"\npassword = "hunter2-wrong"\n')
    os.chmod(bad, 0o600)
    line = refused(alike("backup", "--store", store, url, "--vm", "web", "--credentials", bad,
                         "--ca-bundle", pool.ca_file), 2, "SESSION_AUTHENTICATION_FAILED")
    assert "hunter2" not in line
    os.chmod(bad, 0o644)
    refused(alike("inventory", url, "--credentials", bad), 2, "chmod 600")
    refused(alike("inventory", "xen:https://127.0.0.1:9", *auth(pool)), 5, "cannot reach the pool master")
    refused(alike("backup", "--store", store, url, "--vm", "nope", *auth(pool)), 2, "no VM named 'nope'")
    refused(alike("inventory", url, "--credentials", pool.creds), 5, "not trusted", "--ca-bundle")
    # a pool member sends us to the master
    with XapiServer(str(tmp_path / "member"), slave_of=pool.url) as member:
        bundle = tmp_path / "pool-ca.pem"  # the pool's certificates: the member's and the master's
        bundle.write_text(open(member.ca_file).read() + open(pool.ca_file).read())
        r = alike.json("inventory", f"xen:{member.url}", "--credentials", pool.creds, "--ca-bundle", bundle)
        assert "web" in [v["name"] for v in r["vms"]]
    # plain http: works, with a warning
    with XapiServer(str(tmp_path / "lab"), tls=False) as lab:
        lab.add_vm("tiny", disks=[4 * MiB])
        creds = lab.credentials_file(str(tmp_path / "lab.toml"))
        p = alike("inventory", f"xen:{lab.url}", "--credentials", creds, "--json")
        assert p.returncode == 0 and "plain HTTP" in p.stderr, p.stderr
    # an SR that is full: found before any data moves
    alike.json("backup", "--store", store, url, "--vm", "db", *auth(pool))
    with XapiServer(str(tmp_path / "small"), sr_size=8 * MiB) as small:
        creds = small.credentials_file(str(tmp_path / "small.toml"))
        refused(alike("restore", "--store", store, "db", "--to", f"xen:{small.url}", "--credentials", creds,
                      "--ca-bundle", small.ca_file), 4, "SR_FULL")
        assert not [v for v in small.objects("VM").values() if v["name_label"] == "db-restored"]
