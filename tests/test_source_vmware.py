"""The `vmware:` source binds the source contract against govmomi's vCenter simulator
(tests/vcsim: the simulator's own inventory, sessions, snapshots, ReconfigVM and /folder with
Range; added by alike: QueryChangedDiskAreas from the real difference of contents, changeIds,
snapshots that freeze the disk). A VM with two disks (64 MiB and 16 MiB, data written at their
start, middle and last bytes), with CBT; and the same VM read with CBT off. Also: credentials,
TLS, a simulator without QueryChangedDiskAreas, and leftovers of a killed backup."""
from __future__ import annotations

import os

import pytest

from alike_ray.sources import SourceError
from alike_ray.sources.credentials import AuthError
from tests.source_contract import Bound, SourceContract
from tests.vcsim_server import Vcsim, VcsimBuildError, build

VM = "DC0_H0_VM0"


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    try:
        build()
    except VcsimBuildError as e:
        pytest.skip(f"the vcsim launcher cannot be built here: {e}")
    d = tmp_path_factory.mktemp("vcsim-contract")
    s = Vcsim(d)
    s.start()
    s.creds = s.credentials_file(d / "vc.toml")
    for disk in s.disks(VM)["disks"]:  # data to the very last byte
        s.guest_write(VM, disk["key"], disk["capacity"] - 3000, os.urandom(3000))
    yield s
    s.stop()


def _keys(sim) -> dict[str, int]:
    from alike_ray.sources.vmware import VmwareSource, _disks

    conn = VmwareSource(sim.url, credentials=sim.creds, ca_bundle=sim.cert_file).login()
    try:
        [vm] = [v for v in conn.vms() if v.name == VM]
        return {n: d.key for n, d, _ in _disks(conn.vim, vm.config.hardware.device)}
    finally:
        conn.close()


def _bound(sim, cbt=True) -> Bound:
    from alike_ray.sources.vmware import VmwareSource

    keys = _keys(sim)
    src = VmwareSource(sim.url, credentials=sim.creds, ca_bundle=sim.cert_file, cbt=cbt)

    def current(name):
        [d] = [d for d in sim.disks(VM)["disks"] if d["key"] == keys[name]]
        return d

    def truth(name):
        with open(current(name)["path"], "rb") as f:
            return f.read()

    def write(name, off, length):
        data = os.urandom(length)
        sim.guest_write(VM, keys[name], off, data)
        return data

    def residue():
        return sorted((d["key"], tuple(d["chain"]), tuple(sorted(d["snapshots"] or {}))) for d in sim.disks(VM)["disks"])

    return Bound(src, VM, truth, write if cbt else None, residue)


class TestVmwareSource(SourceContract):
    @pytest.fixture
    def bound(self, sim):
        return _bound(sim)


class TestVmwareSourceNoCBT(SourceContract):
    @pytest.fixture
    def bound(self, sim):
        return _bound(sim, cbt=False)


def test_inventory(sim):
    from alike_ray.sources.vmware import VmwareSource

    vms = {v.name: v for v in VmwareSource(sim.url, credentials=sim.creds, ca_bundle=sim.cert_file).list_vms()}
    assert set(sim.vms) <= set(vms)
    v = vms[VM]
    assert [d.name for d in v.disks] == sorted(d.name for d in v.disks) and len(v.disks) == 2
    assert sorted(d.size for d in v.disks) == [16 << 20, 64 << 20]
    assert v.power_state == "running" and v.shape["platform"] == "vmware" and v.shape["memory_bytes"] > 0


def test_credentials_and_tls(sim, tmp_path):
    from alike_ray.sources.vmware import VmwareSource

    bad = tmp_path / "bad.toml"
    bad.write_text('username = "alike"\npassword = "nope-wrong"\n')
    os.chmod(bad, 0o600)
    with pytest.raises(AuthError, match="InvalidLogin") as e:
        VmwareSource(sim.url, credentials=str(bad), ca_bundle=sim.cert_file).list_vms()
    assert e.value.exit_code == 2 and "nope-wrong" not in str(e.value)
    with pytest.raises(SourceError, match="not trusted"):
        VmwareSource(sim.url, credentials=sim.creds).list_vms()
    with pytest.raises(SourceError, match="cannot reach"):
        VmwareSource("https://127.0.0.1:9", credentials=sim.creds).list_vms()


def test_leftover_snapshot_removed(sim):
    """A backup killed after its snapshot (no release): the next snapshot of the VM removes it."""
    b = _bound(sim)
    before = b.residue()
    killed = b.source.snapshot(VM)
    killed.conn.close()  # the process died
    assert b.residue() != before
    with b.source.snapshot(VM) as snap:
        assert len(snap.disks) == 2
    assert b.residue() == before


def test_older_server_without_changed_areas(tmp_path):
    """A simulator as govmomi ships it (no QueryChangedDiskAreas, MethodNotFound): still a
    working snapshot and a whole read, with a note saying what was missing; no CBT claimed."""
    from alike_ray.sources.vmware import VmwareSource

    with Vcsim(tmp_path / "plain", extra_args=("-no-changed-areas",)) as s:
        creds = s.credentials_file(tmp_path / "vc.toml")
        src = VmwareSource(s.url, credentials=str(creds), ca_bundle=s.cert_file)
        with src.snapshot(VM) as snap:
            assert any("cannot say which areas are allocated" in n and "MethodNotFound" in n for n in snap.vm.notes), \
                snap.vm.notes
            d = snap.disks[0]
            assert d.allocated_extents() == [(0, d.size)]
            [cur] = [x for x in s.disks(VM)["disks"] if x["capacity"] == d.size]  # 64 MiB and 16 MiB: one each
            with open(cur["path"], "rb") as f:  # the VM's current disk: nothing written since the snapshot
                head = f.read(1 << 20)
            assert d.read(0, 1 << 20).tobytes() == head and any(head)
            if d.cbt_marker:
                assert d.changed_extents(d.cbt_marker) is None and "refused the changeId" in d.cbt_note


def test_tags_and_folders(sim):
    """vSphere tags through the tagging REST API (the simulator's own /rest), and the VM's folder."""
    import base64
    import json
    import urllib.request

    from alike_ray.sources.vmware import VmwareSource

    def req(method, path, data=None, headers=None):
        r = urllib.request.Request(sim.base_url + "/rest/com/vmware/cis" + path, method=method,
                                   data=json.dumps(data).encode() if data is not None else None,
                                   headers={"Content-Type": "application/json", **(headers or {})})
        with urllib.request.urlopen(r, context=sim.ssl_context()) as resp:
            body = resp.read()
            return json.loads(body)["value"] if body else None

    auth = base64.b64encode(f"{sim.username}:{sim.password}".encode()).decode()
    h = {"vmware-api-session-id": req("POST", "/session", headers={"Authorization": "Basic " + auth})}
    cat = req("POST", "/tagging/category", {"create_spec": {"name": "env", "description": "", "cardinality": "MULTIPLE",
                                                           "associable_types": []}}, h)
    src = VmwareSource(sim.url, credentials=sim.creds, ca_bundle=sim.cert_file)
    conn = src.login()
    try:
        [vm] = [v for v in conn.vms() if v.name == "DC0_C0_RP0_VM1"]
        for name in ("prod", "db"):
            tag = req("POST", "/tagging/tag", {"create_spec": {"name": name, "description": "", "category_id": cat}}, h)
            req("POST", f"/tagging/tag-association/id:{tag}?~action=attach",
                {"object_id": {"id": vm._moId, "type": "VirtualMachine"}}, h)
        from pyVim.task import WaitForTask

        dc = conn.content.rootFolder.childEntity[0]
        web = dc.vmFolder.CreateFolder("Prod").CreateFolder("Web")
        WaitForTask(web.MoveIntoFolder_Task([vm]))
    finally:
        conn.close()
    vms = {v.name: v for v in src.list_vms()}
    assert vms["DC0_C0_RP0_VM1"].tags == ["db", "prod"]
    assert vms[VM].tags == []
    assert vms["DC0_C0_RP0_VM1"].folder == "Prod/Web" and vms[VM].folder == ""
    from alike_ray.jobs import Job

    job = Job(path="j.toml", name="j", sources=[], folders=["Prod"])
    assert [n for n, v in sorted(vms.items()) if job.selects(n, v.tags, v.folder)] == ["DC0_C0_RP0_VM1"]
    assert not Job(path="j.toml", name="j", sources=[], folders=["Pro"]).selects("x", [], "Prod/Web")


def test_plain_http_works_with_a_note(tmp_path):
    from alike_ray.sources.vmware import VmwareSource

    with Vcsim(tmp_path / "http", http=True) as s:
        assert s.url.startswith("http://")
        creds = s.credentials_file(tmp_path / "vc.toml")
        src = VmwareSource(s.url, credentials=str(creds))
        with src.snapshot(VM) as snap:
            assert any("plain HTTP" in n for n in snap.vm.notes)
            assert len(snap.disks[0].read(0, 65536)) == 65536


def test_changeid_refused_with_a_filefault(sim):
    """A changeId of this disk's epoch that the server never gave (FileFault): read in full, why said."""
    b = _bound(sim)
    with b.source.snapshot(VM) as snap:
        d = snap.disks[0]
        assert d.cbt_marker and "/" in d.cbt_marker
        bogus = d.cbt_marker.split("/")[0] + "/99"
        assert d.changed_extents(bogus) is None
        assert "refused the changeId" in d.cbt_note and "FileFault" in d.cbt_note, d.cbt_note
        assert d.changed_extents(d.cbt_marker) == []  # its own changeId: nothing changed since
