"""The `xen:` source binds the source contract against the protocol-level XAPI test server
(tests/xapi_server.py: XenAPI over XML-RPC, VDIs as real files, NBD by real qemu-nbd with TLS):
a running VM with two disks (ext4 with real files; the second of an odd size with data in its
last bytes) and a CD drive that is not listed; and the same with NBD off, read by one
/export_raw_vdi stream. Also: credentials, TLS, HOST_IS_SLAVE, and what the source leaves behind."""
from __future__ import annotations

import os
import subprocess

import numpy as np
import pytest

from alike_ray.sources import SourceError
from alike_ray.sources.xen import MARK, XenAuthError, XenSource, bitmap_extents
from tests import images
from tests.source_contract import Bound, SourceContract
from tests.xapi_server import XapiServer

MiB = images.MiB


@pytest.fixture(scope="module")
def disks(tmp_path_factory):
    d = tmp_path_factory.mktemp("xen-contract")
    lib = os.path.dirname(os.__file__)
    t = images.tree(str(d / "tree"), 2 * MiB, [f"{lib}/json", f"{lib}/email"])
    raw = images.ext4_image(str(d / "d0.raw"), 16, t, "xweb")
    odd = str(d / "d1.raw")
    subprocess.run(["cp", "--sparse=always", raw, odd], check=True)
    with open(odd, "r+b") as f:  # an odd size, data to the last byte
        f.truncate(12 * MiB + 4096 * 3)
        f.seek(12 * MiB + 4096 * 3 - 5000)
        f.write(os.urandom(5000))
    return [raw, odd]


@pytest.fixture(scope="module")
def server(tmp_path_factory, disks):
    root = tmp_path_factory.mktemp("xapi")
    with XapiServer(str(root)) as srv:
        srv.add_vm("web", disks=disks, tags=["prod", "web"], memory=64 * MiB, vcpus=2)
        srv.add_vm("halted-one", disks=[8 * MiB], power_state="Halted")
        srv.creds = srv.credentials_file(str(root / "xen.toml"))
        yield srv


def _bound(srv, vm="web", **opts) -> Bound:
    src = XenSource(srv.url, credentials=srv.creds, ca_bundle=srv.ca_file, **opts)
    [uuid] = [r["uuid"] for r in srv.objects("VM").values() if r["name_label"] == vm and not r["is_a_snapshot"]]

    def vdi(name):
        n = ord(name[-1]) - ord("a")
        return srv.vdi_of(uuid, n)

    def truth(name):
        return srv.export(vdi(name))

    def write(name, off, length):
        data = os.urandom(length)
        srv.guest_write(vdi(name), off, data)
        return data

    def residue():
        """What a snapshot makes and a release must remove: snapshot VMs, VDIs holding data that
        carry our mark (markers, cbt_metadata VDIs, are what CBT keeps), local stream files."""
        vms = sorted(r["uuid"] for r in srv.objects("VM").values() if r["is_a_snapshot"])
        vdis = sorted(r["uuid"] for r in srv.objects("VDI").values()
                      if MARK in r["other_config"] and r["type"] != "cbt_metadata")
        return vms, vdis

    return Bound(src, vm, truth, write if opts.get("cbt", True) else None, residue, power_state="running")


class TestXenSource(SourceContract):
    @pytest.fixture
    def bound(self, server):
        server.set_nbd("nbd")
        return _bound(server)


class TestXenSourceNoCBT(SourceContract):
    @pytest.fixture
    def bound(self, server):
        server.set_nbd("insecure_nbd")  # NBD without TLS, and no CBT asked
        return _bound(server, cbt=False)


class TestXenSourceStream(SourceContract):
    """No network has an NBD purpose: one /export_raw_vdi stream per disk into a local file."""

    @pytest.fixture
    def bound(self, server, tmp_path):
        server.set_nbd(None)
        b = _bound(server, cbt=False, scratch_dir=str(tmp_path))
        inner = b.residue
        b.residue = lambda: (inner(), sorted(os.listdir(tmp_path)))
        return b


def test_inventory_is_real_vms_only(server):
    server.set_nbd("nbd")
    vms = {v.name: v for v in XenSource(server.url, credentials=server.creds, ca_bundle=server.ca_file).list_vms()}
    assert set(vms) == {"web", "halted-one"}  # no template, no control domain, no snapshot
    web = vms["web"]
    assert [d.name for d in web.disks] == ["xvda", "xvdb"]  # the CD drive is not a disk
    assert [d.size for d in web.disks] == [16 * MiB, 12 * MiB + 4096 * 3]
    assert web.tags == ["prod", "web"] and web.power_state == "running"
    assert vms["halted-one"].power_state == "halted"
    assert web.shape["vcpus"] == 2 and web.shape["memory_bytes"] == 64 * MiB and web.shape["platform"] == "xen"


def test_stream_fallback_says_so(server, tmp_path):
    server.set_nbd(None)
    src = XenSource(server.url, credentials=server.creds, ca_bundle=server.ca_file, scratch_dir=str(tmp_path))
    with src.snapshot("web") as snap:
        assert any("NBD is not enabled" in n for n in snap.vm.notes)
        assert all(d.cbt_marker is None for d in snap.disks)
        assert snap.disks[0].node_id is None or isinstance(snap.disks[0].node_id, str)
    server.set_nbd("nbd")


def test_credentials(server, tmp_path, monkeypatch):
    loose = tmp_path / "loose.toml"
    loose.write_text('username = "root"\npassword = "secret"\n')
    os.chmod(loose, 0o644)
    with pytest.raises(XenAuthError, match="chmod 600"):
        XenSource(server.url, credentials=str(loose))
    bad = tmp_path / "bad.toml"
    bad.write_text('username = "root"\npassword = "wrong"\n')
    os.chmod(bad, 0o600)
    with pytest.raises(XenAuthError, match="SESSION_AUTHENTICATION_FAILED") as e:
        XenSource(server.url, credentials=str(bad), ca_bundle=server.ca_file).list_vms()
    assert e.value.exit_code == 2 and "wrong" not in str(e.value)
    monkeypatch.delenv("ALIKE_XEN_USERNAME", raising=False)
    monkeypatch.delenv("ALIKE_XEN_PASSWORD", raising=False)
    with pytest.raises(XenAuthError, match="ALIKE_XEN_USERNAME"):
        XenSource(server.url)
    monkeypatch.setenv("ALIKE_XEN_USERNAME", server.username)
    monkeypatch.setenv("ALIKE_XEN_PASSWORD", server.password)
    src = XenSource(server.url, ca_bundle=server.ca_file)
    assert "web" in [v.name for v in src.list_vms()]
    assert server.password not in repr(src)


def test_tls_is_verified(server):
    with pytest.raises(SourceError, match="not trusted.*--ca-bundle"):
        XenSource(server.url, credentials=server.creds).list_vms()  # the system's CAs do not know it


def test_member_sends_us_to_the_master(server, tmp_path):
    with XapiServer(str(tmp_path / "member"), slave_of=server.url) as member:
        bundle = tmp_path / "pool-ca.pem"  # the pool's certificates: the member's and the master's
        bundle.write_text(open(member.ca_file).read() + open(server.ca_file).read())
        src = XenSource(member.url, credentials=server.creds, ca_bundle=str(bundle))
        assert "web" in [v.name for v in src.list_vms()]


def test_unreachable_master(server):
    with pytest.raises(SourceError, match="cannot reach the pool master") as e:
        XenSource("https://127.0.0.1:9", credentials=server.creds).list_vms()
    assert e.value.exit_code == 5


def test_bitmap_extents():
    b = np.zeros(4, np.uint8)
    b[0] = 0b1000_0001  # blocks 0 and 7
    b[1] = 0b0000_0011  # blocks 14, 15
    import base64

    size = 20 * 65536 - 100
    ext = bitmap_extents(base64.b64encode(b.tobytes()).decode(), size)
    assert ext == [(0, 65536), (7 * 65536, 65536), (14 * 65536, 2 * 65536)]
    b[2] = 0b0000_1000  # block 20: past the end of the disk, left out; block 19 is cut at size
    b[2] |= 0b0001_0000
    ext = bitmap_extents(base64.b64encode(b.tobytes()).decode(), size)
    assert ext[-1] == (19 * 65536, size - 19 * 65536)


def test_leftovers_of_a_killed_backup_are_removed(server):
    """A backup killed between snapshot and release (no release ran): the next snapshot of that
    VM removes the snapshot VM and its data VDIs, and leaves other VMs' snapshots alone."""
    server.set_nbd("nbd")
    src = XenSource(server.url, credentials=server.creds, ca_bundle=server.ca_file)
    b = _bound(server)
    before = b.residue()
    killed = src.snapshot("web")
    killed.api.logout()  # the process died: nothing released
    other = src.snapshot("halted-one")
    left = b.residue()
    assert left != before and len(left[0]) == len(before[0]) + 2  # web's and halted-one's snapshots
    with src.snapshot("web") as snap:
        assert snap.disks[0].read(0, 4096).tobytes() == b.truth("xvda")[:4096]
    after = b.residue()
    assert len(after[0]) == len(before[0]) + 1  # halted-one's snapshot is not web's to remove
    other.release(failed=True)
    assert b.residue() == before
