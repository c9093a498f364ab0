"""The protocol-level XAPI test server (tests/xapi_server.py), driven through the real XenAPI package:
sessions and errors, records, snapshots and checkpoints of real files, CBT bitmaps from real
contents, NBD over TLS from real qemu-nbd processes, the raw and XVA HTTP handlers, and a clean stop."""
from __future__ import annotations

import base64
import http.client
import io
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import xmlrpc.client

import numpy as np
import pytest

XenAPI = pytest.importorskip("XenAPI")

from alike_ray.sources import nbd  # noqa: E402
from tests.xapi_server import ERR_460, XapiServer, _alive, _parse_xmlrpc_value, write_xva  # noqa: E402

MiB = 1 << 20
BLK = 64 * 1024


def _transport(srv):
    if srv.url.startswith("https"):
        return xmlrpc.client.SafeTransport(context=ssl.create_default_context(cafile=srv.ca_file))
    return xmlrpc.client.Transport()


def _session(srv, user="root", pw="secret"):
    s = XenAPI.Session(srv.url, transport=_transport(srv))
    s.xenapi.login_with_password(user, pw, "2.0", "alike-test")
    return s


def _details(excinfo):
    return list(excinfo.value.details)


@pytest.fixture
def srv(tmp_path):
    with XapiServer(tmp_path / "xapi", sr_size=1 << 30) as s:
        yield s


@pytest.fixture
def x(srv):
    s = _session(srv)
    yield s.xenapi
    try:
        s.xenapi.session.logout()
    except Exception:
        pass


def _bits(b64: str, nblocks: int) -> set[int]:
    raw = np.frombuffer(base64.b64decode(b64), dtype=np.uint8)
    assert len(raw) == -(-nblocks // 8), "one bit per 64 KiB block, padded to whole bytes"
    bits = np.unpackbits(raw)  # MSB first
    assert not bits[nblocks:].any(), "padding bits are zero"
    return set(np.flatnonzero(bits[:nblocks]).tolist())


def _http(srv, method, path, body=None, headers=None, chunked=False):
    u = srv.url.split("://", 1)[1]
    host, port = u.split(":")
    if srv.url.startswith("https"):
        c = http.client.HTTPSConnection(host, int(port), context=ssl.create_default_context(cafile=srv.ca_file),
                                        timeout=30)
    else:
        c = http.client.HTTPConnection(host, int(port), timeout=30)
    c.request(method, path, body=body, headers=headers or {}, encode_chunked=chunked)
    r = c.getresponse()
    data = r.read()
    c.close()
    return r.status, data


# -- sessions and errors ------------------------------------------------------------------------

def test_login_errors_and_sessions(srv, tmp_path):
    s = _session(srv)
    ref = s._session
    assert ref.startswith("OpaqueRef:")
    assert s.xenapi.session.get_this_host(ref) == s.xenapi.pool.get_master(s.xenapi.pool.get_all()[0])

    bad = XenAPI.Session(srv.url, transport=_transport(srv))
    with pytest.raises(XenAPI.Failure) as e:
        bad.xenapi.login_with_password("root", "wrong", "2.0", "t")
    assert _details(e) == ["SESSION_AUTHENTICATION_FAILED", "root", "Authentication failure"]
    with pytest.raises(XenAPI.Failure) as e:
        bad.xenapi.login_with_password("admin", "secret", "2.0", "t")
    assert _details(e)[0] == "SESSION_AUTHENTICATION_FAILED"

    # the raw protocol: envelopes, a logged-out session, method and parameter errors
    raw = xmlrpc.client.ServerProxy(srv.url, transport=_transport(srv), allow_none=True)
    r = raw.session.login_with_password("root", "secret", "2.0", "raw")
    assert r["Status"] == "Success" and r["Value"].startswith("OpaqueRef:")
    sess = r["Value"]
    assert raw.VM.get_all(sess)["Status"] == "Success"
    assert raw.session.logout(sess) == {"Status": "Success", "Value": ""}
    assert raw.VM.get_all(sess) == {"Status": "Failure", "ErrorDescription": ["SESSION_INVALID", sess]}
    assert raw.VM.get_all("OpaqueRef:nope")["ErrorDescription"] == ["SESSION_INVALID", "OpaqueRef:nope"]
    assert raw.VM.no_such_call(ref)["ErrorDescription"] == ["MESSAGE_METHOD_UNKNOWN", "VM.no_such_call"]
    assert raw.Frob.get_all(ref)["ErrorDescription"] == ["MESSAGE_METHOD_UNKNOWN", "Frob.get_all"]
    assert raw.VM.get_record(ref)["ErrorDescription"] == ["MESSAGE_PARAMETER_COUNT_MISMATCH", "VM.get_record", "2", "1"]
    sr = s.xenapi.SR.get_all()[0]
    assert raw.VM.get_record(ref, sr)["ErrorDescription"] == ["HANDLE_INVALID", "VM", sr]
    assert raw.VM.get_by_uuid(ref, "0000")["ErrorDescription"] == ["UUID_INVALID", "VM", "0000"]

    # XenAPI.Session logs in again on SESSION_INVALID: the call still succeeds, with a new session
    assert raw.session.logout(ref)["Status"] == "Success"
    n_logins = sum(1 for m, _ in srv.calls if m == "session.login_with_password")
    assert s.xenapi.VM.get_all()
    assert s._session != ref
    assert sum(1 for m, _ in srv.calls if m == "session.login_with_password") == n_logins + 1
    assert ("session.login_with_password", ("root", "***", "2.0", "alike-test")) in srv.calls

    # a pool member that is not the master names the master
    with XapiServer(tmp_path / "slave", slave_of=srv.url) as slave:
        with pytest.raises(XenAPI.Failure) as e:
            _session(slave)
        assert _details(e) == ["HOST_IS_SLAVE", srv.url]
    with XapiServer(tmp_path / "slave2", slave_of="192.0.2.7", tls=False) as slave:
        assert slave.url.startswith("http://")
        with pytest.raises(XenAPI.Failure) as e:
            _session(slave)
        assert _details(e) == ["HOST_IS_SLAVE", "192.0.2.7"]


def test_credentials_file_and_plain_http(tmp_path):
    with XapiServer(tmp_path / "x", tls=False, username="backup", password="p@ss \"w\"") as srv:
        path = srv.credentials_file()
        assert os.stat(path).st_mode & 0o777 == 0o600
        import tomllib
        with open(path, "rb") as f:
            creds = tomllib.load(f)
        assert creds == {"username": "backup", "password": "p@ss \"w\""}
        s = _session(srv, creds["username"], creds["password"])
        assert len(s.xenapi.host.get_all()) == 1


# -- records ------------------------------------------------------------------------------------

def test_inventory_records(srv, x):
    vm_uuid = srv.add_vm("web", disks=[4 * MiB, b"boot" * 256], tags=["prod"], memory=512 * MiB, vcpus=2,
                         description="the web server")
    recs = x.VM.get_all_records()
    names = {r["name_label"]: r for r in recs.values()}
    dom0 = [r for r in recs.values() if r["is_control_domain"]]
    assert len(dom0) == 1 and dom0[0]["name_label"].startswith("Control domain on host: ")
    assert any(r["is_a_template"] and not r["is_a_snapshot"] for r in recs.values())
    web = names["web"]
    assert web["uuid"] == vm_uuid and web["power_state"] == "Running" and not web["is_a_template"]
    assert web["memory_static_max"] == "536870912" and web["VCPUs_max"] == "2" and web["VCPUs_at_startup"] == "2"
    assert web["tags"] == ["prod"] and web["name_description"] == "the web server"
    assert isinstance(web["snapshot_time"], xmlrpc.client.DateTime)
    assert web["resident_on"] == x.pool.get_master(x.pool.get_all()[0])
    vm_ref = x.VM.get_by_uuid(vm_uuid)
    assert x.VM.get_by_name_label("web") == [vm_ref]
    assert x.VM.get_power_state(vm_ref) == "Running"
    assert sorted(x.VM.get_VBDs(vm_ref)) == sorted(web["VBDs"])
    vbds = [x.VBD.get_record(b) for b in web["VBDs"]]
    disks = sorted((b for b in vbds if b["type"] == "Disk"), key=lambda b: int(b["userdevice"]))
    cds = [b for b in vbds if b["type"] == "CD"]
    assert [b["userdevice"] for b in disks] == ["0", "1"] and all(b["currently_attached"] for b in disks)
    assert len(cds) == 1 and cds[0]["empty"] and cds[0]["VDI"] == "OpaqueRef:NULL"
    vdis = [x.VDI.get_record(b["VDI"]) for b in disks]
    assert [v["virtual_size"] for v in vdis] == [str(4 * MiB), "1024"]
    assert all(v["type"] == "user" and not v["is_a_snapshot"] and not v["cbt_enabled"] for v in vdis)
    assert vdis[0]["uuid"] == srv.vdi_of(vm_uuid, 0) and vdis[1]["uuid"] == srv.vdi_of(vm_uuid, 1)
    assert x.VDI.get_virtual_size(disks[0]["VDI"]) == str(4 * MiB)
    sr = x.SR.get_record(vdis[0]["SR"])
    assert sr["name_label"] == "Local storage" and sr["type"] == "ext"
    assert sr["physical_size"] == str(1 << 30) and sr["physical_utilisation"] == str(4 * MiB + 1024)
    assert set(b["VDI"] for b in disks) <= set(sr["VDIs"])
    assert x.SR.get_by_name_label("Local storage") == [vdis[0]["SR"]]
    net = x.network.get_all_records()
    assert [n["purpose"] for n in net.values()] == [["nbd"]]
    vif = x.VIF.get_record(web["VIFs"][0])
    assert vif["network"] in net and vif["VM"] == vm_ref
    host = x.host.get_record(x.host.get_all()[0])
    assert host["address"] == "127.0.0.1" and host["API_version_major"] == "2"
    assert x.pool.get_record(x.pool.get_all()[0])["master"] == x.host.get_all()[0]
    # other_config and tags
    x.VM.add_to_other_config(vm_ref, "alike", "1")
    with pytest.raises(XenAPI.Failure) as e:
        x.VM.add_to_other_config(vm_ref, "alike", "2")
    assert _details(e) == ["MAP_DUPLICATE_KEY", "VM", "other_config", vm_ref, "alike"]
    assert x.VM.get_other_config(vm_ref) == {"alike": "1"}
    x.VM.remove_from_other_config(vm_ref, "alike")
    assert x.VM.get_other_config(vm_ref) == {}
    x.VM.add_tags(vm_ref, "backup")
    x.VM.remove_tags(vm_ref, "prod")
    assert x.VM.get_tags(vm_ref) == ["backup"]
    x.VDI.add_to_other_config(disks[0]["VDI"], "k", "v")
    assert x.VDI.get_other_config(disks[0]["VDI"]) == {"k": "v"}


# -- snapshots ----------------------------------------------------------------------------------

def test_snapshot_freezes_data_and_destroy_keeps_vdis(srv, x):
    data = os.urandom(2 * MiB)
    vm = srv.add_vm("db", disks=[data])
    vm_ref = x.VM.get_by_uuid(vm)
    live = srv.vdi_of(vm, 0)
    snap = x.VM.snapshot(vm_ref, "before")
    rec = x.VM.get_record(snap)
    assert rec["is_a_snapshot"] and rec["snapshot_of"] == vm_ref and rec["name_label"] == "before"
    assert rec["power_state"] == "Halted" and rec["memory_static_max"] == x.VM.get_memory_static_max(vm_ref)
    assert x.VM.get_snapshots(vm_ref) == [snap]
    vbds = [x.VBD.get_record(b) for b in rec["VBDs"]]
    assert not any(b["currently_attached"] for b in vbds)
    assert sorted(b["type"] for b in vbds) == ["CD", "Disk"]
    svdi_ref = next(b["VDI"] for b in vbds if b["type"] == "Disk")
    svdi = x.VDI.get_record(svdi_ref)
    live_ref = x.VDI.get_by_uuid(live)
    assert svdi["is_a_snapshot"] and svdi["snapshot_of"] == live_ref and x.VDI.get_snapshots(live_ref) == [svdi_ref]
    assert srv.vdi_path(svdi["uuid"]) != srv.vdi_path(live)

    srv.guest_write(live, 12345, b"after the snapshot")
    assert srv.export(live)[12345:12345 + 18] == b"after the snapshot"
    assert srv.export(svdi["uuid"]) == data
    status, got = _http(srv, "GET", f"/export_raw_vdi?session_id={x_session(x)}&vdi={svdi_ref}&format=raw")
    assert status == 200 and got == data

    x.VM.destroy(snap)  # a snapshot: its VBDs go, its VDIs stay, as XAPI does
    assert snap not in x.VM.get_all()
    assert not [b for b in srv.objects("VBD").values() if b["VM"] == snap]
    assert svdi_ref in x.VDI.get_all()
    x.VDI.destroy(svdi_ref)
    assert srv.vdi_path(live) and not any(v["uuid"] == svdi["uuid"] for v in srv.objects("VDI").values())
    with pytest.raises(XenAPI.Failure) as e:
        x.VM.destroy(vm_ref)
    assert _details(e) == ["VM_BAD_POWER_STATE", vm_ref, "halted", "running"]


def x_session(x) -> str:
    """The session ref behind a XenAPI dispatcher (for the HTTP handlers)."""
    return x._Dispatcher__send.__self__._session


def test_checkpoint_has_the_memory(srv, x):
    vm = srv.add_vm("app", disks=[1 * MiB], memory=32 * MiB)
    vm_ref = x.VM.get_by_uuid(vm)
    memory = bytes(range(256)) * 4096 + b"\x00" * MiB + b"tail of memory"
    srv.set_memory(vm, memory)
    cp = x.VM.checkpoint(vm_ref, "cp")
    rec = x.VM.get_record(cp)
    assert rec["is_a_snapshot"] and rec["snapshot_of"] == vm_ref and rec["power_state"] == "Suspended"
    sv = rec["suspend_VDI"]
    svr = x.VDI.get_record(sv)
    assert svr["type"] == "suspend" and svr["virtual_size"] == str(32 * MiB)
    content = srv.export(svr["uuid"])
    assert len(content) == 32 * MiB and content[:len(memory)] == memory and not any(content[len(memory):])
    assert x.VM.get_power_state(vm_ref) == "Running"
    x.VM.hard_shutdown(vm_ref)
    with pytest.raises(XenAPI.Failure) as e:
        x.VM.checkpoint(vm_ref, "cp2")
    assert _details(e) == ["VM_BAD_POWER_STATE", vm_ref, "running", "halted"]


# -- CBT ----------------------------------------------------------------------------------------

def _disk_vdi_of(x, snap_vm):
    return next(x.VBD.get_VDI(b) for b in x.VM.get_VBDs(snap_vm) if x.VBD.get_type(b) == "Disk")


def test_cbt_changed_blocks_from_contents(srv, x):
    size = 4 * MiB + 3 * BLK  # 67 blocks: the bitmap has 9 bytes, the last one padded
    nblocks = size // BLK
    base = os.urandom(size)
    vm = srv.add_vm("cbt", disks=[base])
    vm_ref = x.VM.get_by_uuid(vm)
    live = srv.vdi_of(vm, 0)
    live_ref = x.VDI.get_by_uuid(live)
    x.VDI.enable_cbt(live_ref)
    x.VDI.enable_cbt(live_ref)  # idempotent
    assert x.VDI.get_cbt_enabled(live_ref) is True
    s1 = _disk_vdi_of(x, x.VM.snapshot(vm_ref, "s1"))
    assert x.VDI.get_cbt_enabled(s1) is True
    srv.guest_write(live, 0, b"\xff")                       # block 0
    srv.guest_write(live, 5 * BLK - 2, b"\x01\x02\x03\x04")  # blocks 4 and 5
    srv.guest_write(live, 66 * BLK + 100, b"end")            # the last block
    srv.guest_write(live, 30 * BLK, base[30 * BLK:30 * BLK + 500])  # the same bytes: not a change
    s2 = _disk_vdi_of(x, x.VM.snapshot(vm_ref, "s2"))
    assert _bits(x.VDI.list_changed_blocks(s1, s2), nblocks) == {0, 4, 5, 66}
    assert _bits(x.VDI.list_changed_blocks(s2, s1), nblocks) == {0, 4, 5, 66}
    assert _bits(x.VDI.list_changed_blocks(s2, s2), nblocks) == set()
    # the live VDI of a running VM is in use
    with pytest.raises(XenAPI.Failure) as e:
        x.VDI.list_changed_blocks(s1, live_ref)
    assert _details(e) == ["VDI_IN_USE", live_ref, "list_changed_blocks"]
    x.VM.clean_shutdown(vm_ref)
    assert _bits(x.VDI.list_changed_blocks(s1, live_ref), nblocks) == {0, 4, 5, 66}

    # data_destroy: a cbt_metadata VDI without data, still good for list_changed_blocks
    with pytest.raises(XenAPI.Failure) as e:
        x.VDI.data_destroy(live_ref)
    assert _details(e) == ["VDI_NO_CBT_METADATA", live_ref]
    s1_uuid = x.VDI.get_uuid(s1)
    path = srv.vdi_path(s1_uuid)
    used = int(x.SR.get_physical_utilisation(x.VDI.get_SR(s1)))
    x.VDI.data_destroy(s1)
    assert x.VDI.get_type(s1) == "cbt_metadata" and x.VDI.get_cbt_enabled(s1)
    assert not os.path.exists(path) and srv.vdi_path(s1_uuid) is None
    assert not any(f.startswith(s1_uuid) for f in os.listdir(os.path.dirname(path)))
    assert int(x.SR.get_physical_utilisation(x.VDI.get_SR(s1))) == used - size
    assert _bits(x.VDI.list_changed_blocks(s1, s2), nblocks) == {0, 4, 5, 66}
    with pytest.raises(XenAPI.Failure) as e:
        x.VDI.get_nbd_info(s1)
    assert _details(e) == ["VDI_INCOMPATIBLE_TYPE", s1, "cbt_metadata"]
    status, _ = _http(srv, "GET", f"/export_raw_vdi?session_id={x_session(x)}&vdi={s1}&format=raw")
    assert status == 404
    x.VDI.destroy(s1)
    assert s1 not in x.VDI.get_all()


def test_cbt_broken_chains(srv, x):
    vm = srv.add_vm("chain", disks=[2 * MiB, 2 * MiB], power_state="Halted")
    vm_ref = x.VM.get_by_uuid(vm)
    a, b = x.VDI.get_by_uuid(srv.vdi_of(vm, 0)), x.VDI.get_by_uuid(srv.vdi_of(vm, 1))

    def snap():
        vbds = [x.VBD.get_record(v) for v in x.VM.get_VBDs(x.VM.snapshot(vm_ref, "s"))]
        by = {v["userdevice"]: v["VDI"] for v in vbds if v["type"] == "Disk"}
        return by["0"], by["1"]

    def broken(f, t):
        with pytest.raises(XenAPI.Failure) as e:
            x.VDI.list_changed_blocks(f, t)
        assert _details(e) == ERR_460

    a0, b0 = snap()  # CBT off: no chain at all
    broken(a0, a)
    x.VDI.enable_cbt(a)
    x.VDI.enable_cbt(b)
    a1, b1 = snap()
    a2, b2 = snap()
    assert x.VDI.list_changed_blocks(a1, a2) == base64.b64encode(bytes(4)).decode()
    broken(a0, a1)          # a0 was taken before CBT was enabled
    broken(a1, b2)          # snapshots of two different disks
    x.VDI.disable_cbt(a)
    x.VDI.disable_cbt(a)    # idempotent
    assert x.VDI.get_cbt_enabled(a) is False
    x.VDI.enable_cbt(a)
    a3, _ = snap()
    broken(a2, a3)          # CBT was off in between
    a4, _ = snap()
    x.VDI.list_changed_blocks(a3, a4)
    x.VDI.resize(b, 3 * MiB)
    assert x.VDI.get_virtual_size(b) == str(3 * MiB)
    _, b5 = snap()
    broken(b2, b5)          # resized in between
    broken(b2, b)
    assert len(base64.b64decode(x.VDI.list_changed_blocks(b5, b))) == 6  # 48 blocks of the new size
    other = srv.add_vm("other", disks=[2 * MiB], power_state="Halted")
    o = x.VDI.get_by_uuid(srv.vdi_of(other, 0))
    x.VDI.enable_cbt(o)
    broken(a4, o)           # unrelated VDIs


# -- NBD ----------------------------------------------------------------------------------------

def _nbd_read(info, size) -> bytes:
    tls = nbd.tls_context(info["cert"]) if info["cert"] else None
    with nbd.NBDClient(info["address"], int(info["port"]), info["exportname"], tls=tls,
                       tls_name=info["subject"] or None) as c:
        buf = bytearray(size)
        c.read_into(buf, 0)
        return bytes(buf)


def test_nbd_tls_read(srv, x, tmp_path):
    data = bytearray(3 * MiB)
    data[:MiB] = os.urandom(MiB)
    data[2 * MiB + 7:2 * MiB + 20] = b"sparse island"
    vm = srv.add_vm("nbd", disks=[bytes(data)])
    snap_vdi = _disk_vdi_of(x, x.VM.snapshot(x.VM.get_by_uuid(vm), "s"))
    srv.guest_write(srv.vdi_of(vm, 0), 0, b"changed after the snapshot")
    infos = x.VDI.get_nbd_info(snap_vdi)
    assert len(infos) == 1
    info = infos[0]
    uuid = x.VDI.get_uuid(snap_vdi)
    assert info["address"] == "127.0.0.1" and isinstance(info["port"], str) and int(info["port"]) > 0
    assert info["exportname"] == f"/{uuid}?session_id={x_session(x)}"
    assert info["subject"] == "localhost" and info["cert"].startswith("-----BEGIN CERTIFICATE-----")
    assert x.VDI.get_nbd_info(snap_vdi) == infos  # the same server on the second ask
    assert _nbd_read(info, len(data)) == bytes(data)
    # several connections at once (--shared), as the Ray workers of a backup open them
    conns = [nbd.NBDClient(info["address"], int(info["port"]), info["exportname"],
                           tls=nbd.tls_context(info["cert"]), tls_name=info["subject"]) for _ in range(4)]
    try:
        got = [bytearray(MiB // 2) for _ in conns]
        ts = [threading.Thread(target=c.read_into, args=(g, i * MiB // 2)) for i, (c, g) in enumerate(zip(conns, got))]
        for t in ts:
            t.start()
        for t in ts:
            t.join(30)
        assert b"".join(got) == bytes(data[:2 * MiB])
    finally:
        for c in conns:
            c.close()
    # a client without TLS is refused by a TLS server
    with pytest.raises((nbd.NBDError, OSError)):
        _nbd_read(dict(info, cert=""), 4096)
    # a qemu client (gnutls) verifies the server too, with the CA of nbd_ca_dir
    out = tmp_path / "out.raw"
    subprocess.run(["qemu-img", "convert", "--object",
                    f"tls-creds-x509,id=tls0,endpoint=client,dir={srv.nbd_ca_dir}", "--image-opts",
                    f"driver=nbd,host=127.0.0.1,port={info['port']},export={info['exportname']},tls-creds=tls0",
                    "-O", "raw", str(out)], check=True, capture_output=True, timeout=60)
    assert out.read_bytes() == bytes(data)
    # destroying the VDI stops its server
    pids = srv.nbd_pids()
    assert pids and all(_alive(p) for p in pids) and _nbd_listens(int(info["port"]))
    x.VDI.destroy(snap_vdi)
    assert not any(_alive(p) for p in pids)
    assert not _nbd_listens(int(info["port"]))


def _nbd_listens(port: int) -> bool:
    """Whether an NBD server answers on the port: it greets with "NBDMAGIC" at once. Refused is
    the usual answer once its qemu-nbd is gone; but the freed port may be taken by another
    process meanwhile (CI saw it), or a connect may meet itself, so a connection alone is no
    proof."""
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=2)
    except OSError:
        return False
    try:
        s.settimeout(2)
        return s.recv(8) == b"NBDMAGIC"
    except OSError:
        return False
    finally:
        s.close()


def test_insecure_and_no_nbd(srv, x):
    data = os.urandom(MiB)
    vm = srv.add_vm("plain", disks=[data], power_state="Halted")
    vdi = x.VDI.get_by_uuid(srv.vdi_of(vm, 0))
    srv.set_nbd("insecure_nbd")
    (info,) = x.VDI.get_nbd_info(vdi)
    assert info["cert"] == "" and info["exportname"].startswith(f"/{srv.vdi_of(vm, 0)}?session_id=")
    assert _nbd_read(info, len(data)) == data
    srv.set_nbd(None)
    assert x.VDI.get_nbd_info(vdi) == []


# -- HTTP ---------------------------------------------------------------------------------------

def test_raw_export_import_http(srv, x):
    vm = srv.add_vm("raw", disks=[2 * MiB], power_state="Halted")
    vdi_uuid = srv.vdi_of(vm, 0)
    vdi = x.VDI.get_by_uuid(vdi_uuid)
    sid = x_session(x)
    payload = os.urandom(MiB + 12345)
    status, _ = _http(srv, "PUT", f"/import_raw_vdi?session_id={sid}&vdi={vdi}&format=raw", body=payload)
    assert status == 200
    assert srv.export(vdi_uuid)[:len(payload)] == payload and not any(srv.export(vdi_uuid)[len(payload):])
    status, got = _http(srv, "GET", f"/export_raw_vdi?session_id={sid}&vdi={vdi_uuid}&format=raw")
    assert status == 200 and len(got) == 2 * MiB and got == srv.export(vdi_uuid)
    # chunked transfer encoding
    chunks = [b"a" * 1000, b"b" * 70000, b"c"]
    status, _ = _http(srv, "PUT", f"/import_raw_vdi?session_id={sid}&vdi={vdi_uuid}&format=raw",
                      body=iter(chunks), headers={"Transfer-Encoding": "chunked"}, chunked=True)
    assert status == 200 and srv.export(vdi_uuid)[:71001] == b"".join(chunks)
    assert _http(srv, "GET", f"/export_raw_vdi?session_id=OpaqueRef:bad&vdi={vdi}&format=raw")[0] == 401
    assert _http(srv, "GET", f"/export_raw_vdi?vdi={vdi}&format=raw")[0] == 401
    assert _http(srv, "PUT", f"/import_raw_vdi?session_id=OpaqueRef:bad&vdi={vdi}&format=raw", body=b"x")[0] == 401
    assert _http(srv, "GET", f"/export_raw_vdi?session_id={sid}&vdi=OpaqueRef:nope&format=raw")[0] == 404
    too_big = bytes(2 * MiB + 1)
    assert _http(srv, "PUT", f"/import_raw_vdi?session_id={sid}&vdi={vdi}&format=raw", body=too_big)[0] == 400


def test_sr_full_and_vdi_in_use(srv, x):
    sr = x.SR.get_all()[0]
    rec = {"name_label": "big", "name_description": "", "SR": sr, "virtual_size": str(2 << 30), "type": "user",
           "sharable": False, "read_only": False, "other_config": {}}
    with pytest.raises(XenAPI.Failure) as e:
        x.VDI.create(rec)
    assert _details(e) == ["SR_FULL", str(2 << 30), str(1 << 30)]
    ok = x.VDI.create(dict(rec, virtual_size=str(MiB)))
    assert x.VDI.get_virtual_size(ok) == str(MiB)
    assert os.stat(srv.vdi_path(x.VDI.get_uuid(ok))).st_blocks == 0  # sparse
    with pytest.raises(XenAPI.Failure) as e:
        x.VDI.create(dict(rec, virtual_size=str((1 << 30) - MiB + 1)))
    assert _details(e) == ["SR_FULL", str((1 << 30) - MiB + 1), str((1 << 30) - MiB)]
    with pytest.raises(XenAPI.Failure) as e:
        x.VDI.create({k: v for k, v in rec.items() if k != "SR"})
    assert _details(e) == ["FIELD_TYPE_ERROR", "SR"]
    vm = srv.add_vm("busy", disks=[MiB])
    vdi = x.VDI.get_by_uuid(srv.vdi_of(vm, 0))
    with pytest.raises(XenAPI.Failure) as e:
        x.VDI.destroy(vdi)
    assert _details(e) == ["VDI_IN_USE", vdi, "destroy"]
    x.VM.hard_shutdown(x.VM.get_by_uuid(vm))
    path = srv.vdi_path(srv.vdi_of(vm, 0))
    x.VDI.destroy(vdi)
    assert not os.path.exists(path)


def _vm_create_record(name):
    return {"name_label": name, "name_description": "", "user_version": "1", "is_a_template": False,
            "affinity": "OpaqueRef:NULL", "memory_static_max": str(64 * MiB), "memory_dynamic_max": str(64 * MiB),
            "memory_dynamic_min": str(64 * MiB), "memory_static_min": str(16 * MiB), "VCPUs_params": {},
            "VCPUs_max": "2", "VCPUs_at_startup": "1", "actions_after_shutdown": "destroy",
            "actions_after_reboot": "restart", "actions_after_crash": "restart", "PV_bootloader": "",
            "PV_kernel": "", "PV_ramdisk": "", "PV_args": "", "PV_bootloader_args": "", "PV_legacy_args": "",
            "HVM_boot_policy": "BIOS order", "HVM_boot_params": {"order": "dc"}, "platform": {}, "PCI_bus": "",
            "other_config": {}, "recommendations": ""}


def test_vm_create_import_and_start(srv, x):
    rec = _vm_create_record("restored")
    with pytest.raises(XenAPI.Failure) as e:
        x.VM.create({k: v for k, v in rec.items() if k != "memory_static_max"})
    assert _details(e) == ["FIELD_TYPE_ERROR", "memory_static_max"]
    assert x.VM.get_by_name_label("restored") == []
    vm = x.VM.create(rec)
    r = x.VM.get_record(vm)
    assert r["power_state"] == "Halted" and r["VCPUs_max"] == "2" and r["HVM_boot_params"] == {"order": "dc"}
    sr = x.pool.get_default_SR(x.pool.get_all()[0])
    vdi = x.VDI.create({"name_label": "restored disk 0", "name_description": "", "SR": sr,
                        "virtual_size": str(MiB), "type": "user", "sharable": False, "read_only": False,
                        "other_config": {}})
    data = os.urandom(MiB)
    assert _http(srv, "PUT", f"/import_raw_vdi?session_id={x_session(x)}&vdi={vdi}&format=raw", body=data)[0] == 200
    with pytest.raises(XenAPI.Failure) as e:
        x.VBD.create({"VM": vm, "VDI": vdi, "userdevice": "0"})
    assert _details(e)[0] == "FIELD_TYPE_ERROR"
    vbd = x.VBD.create({"VM": vm, "VDI": vdi, "userdevice": "0", "bootable": True, "mode": "RW", "type": "Disk",
                        "empty": False, "other_config": {}, "qos_algorithm_type": "", "qos_algorithm_params": {}})
    net = x.network.get_all()[0]
    vif = x.VIF.create({"device": "0", "network": net, "VM": vm, "MAC": "aa:00:00:00:00:01", "MTU": "1500",
                        "other_config": {}, "qos_algorithm_type": "", "qos_algorithm_params": {}})
    assert x.VM.get_VIFs(vm) == [vif]
    x.VM.start(vm, False, False)
    assert x.VM.get_power_state(vm) == "Running" and x.VBD.get_currently_attached(vbd) is True
    with pytest.raises(XenAPI.Failure) as e:
        x.VM.start(vm, False, False)
    assert _details(e) == ["VM_BAD_POWER_STATE", vm, "halted", "running"]
    assert srv.export(x.VDI.get_uuid(vdi)) == data
    template = next(r for r, v in x.VM.get_all_records().items() if v["is_a_template"])
    with pytest.raises(XenAPI.Failure) as e:
        x.VM.start(template, False, False)
    assert _details(e) == ["VM_IS_TEMPLATE", template]
    x.VM.clean_shutdown(vm)
    x.VBD.destroy(vbd)
    x.VM.destroy(vm)
    assert vm not in x.VM.get_all() and vdi in x.VDI.get_all()


def test_xva_import_suspended_vm(srv, x):
    disk = bytearray(3 * MiB)
    disk[:MiB] = os.urandom(MiB)
    disk[-100:] = b"z" * 100      # the middle chunk is zeros: left out of the archive
    memory = os.urandom(300_000)
    buf = io.BytesIO()
    write_xva(buf, "frozen", [bytes(disk)], power_state="Suspended", suspend=memory, memory=8 * MiB, vcpus=2)
    xva = buf.getvalue()
    import tarfile
    tar = tarfile.open(fileobj=io.BytesIO(xva))
    names = tar.getnames()
    assert names[0] == "ova.xml"
    header = _parse_xmlrpc_value(tar.extractfile("ova.xml").read().decode())
    assert header["version"]["export_vsn"] == 2
    (disk_id,) = [o["id"] for o in header["objects"] if o["class"] == "VDI" and o["snapshot"]["type"] == "user"]
    assert [f"{disk_id}/0000000{i}" in names for i in range(3)] == [True, False, True]
    assert f"{disk_id}/00000002.checksum" in names

    sr = x.SR.get_all()[0]
    task = x.task.create("import", "")
    status, _ = _http(srv, "PUT", f"/import?session_id={x_session(x)}&sr_id={sr}&task_id={task}", body=xva)
    assert status == 200
    t = x.task.get_record(task)
    assert t["status"] == "success"
    (vm,) = xmlrpc.client.loads(f"<methodResponse><params><param>{t['result']}</param></params></methodResponse>")[0][0]
    r = x.VM.get_record(vm)
    assert r["name_label"] == "frozen" and r["power_state"] == "Suspended" and r["VCPUs_max"] == "2"
    sv = x.VDI.get_record(r["suspend_VDI"])
    assert sv["type"] == "suspend" and sv["SR"] == sr
    mem = srv.export(sv["uuid"])
    assert len(mem) == 8 * MiB and mem[:len(memory)] == memory and not any(mem[len(memory):])
    disks = [x.VBD.get_record(b) for b in r["VBDs"]]
    (d,) = [b for b in disks if b["type"] == "Disk"]
    assert srv.export(x.VDI.get_uuid(d["VDI"])) == bytes(disk)
    assert len(r["VIFs"]) == 1
    x.VM.resume(vm, False, False)
    assert x.VM.get_power_state(vm) == "Running" and x.VM.get_suspend_VDI(vm) == "OpaqueRef:NULL"
    assert sv["uuid"] not in {v["uuid"] for v in srv.objects("VDI").values()}
    x.task.destroy(task)

    # a bad checksum fails the task, and leaves nothing behind
    before = {c: set(srv.objects(c)) for c in ("VM", "VDI", "VBD", "VIF")}
    files = sorted(os.listdir(os.path.dirname(srv.vdi_path(x.VDI.get_uuid(d["VDI"])))))
    buf = io.BytesIO()
    write_xva(buf, "corrupt", [bytes(disk)], corrupt=(0, 2))
    task = x.task.create("import", "")
    status, _ = _http(srv, "PUT", f"/import?session_id={x_session(x)}&task_id={task}", body=buf.getvalue())
    assert status == 500
    t = x.task.get_record(task)
    assert t["status"] == "failure" and t["error_info"][0] == "IMPORT_ERROR" and "checksum" in t["error_info"][1]
    assert {c: set(srv.objects(c)) for c in before} == before
    assert sorted(os.listdir(os.path.dirname(srv.vdi_path(x.VDI.get_uuid(d["VDI"]))))) == files
    assert x.VM.get_by_name_label("corrupt") == []
    assert _http(srv, "PUT", f"/import?session_id=OpaqueRef:bad&task_id={task}", body=b"")[0] == 401


# -- stopping -----------------------------------------------------------------------------------

def test_stop_leaves_nothing(tmp_path):
    threads = set(threading.enumerate())
    srv = XapiServer(tmp_path / "x")
    srv.start()
    port = int(srv.url.rsplit(":", 1)[1])
    s = _session(srv)
    vm = srv.add_vm("v", disks=[MiB, MiB], power_state="Halted")
    for i in range(2):
        s.xenapi.VDI.get_nbd_info(s.xenapi.VDI.get_by_uuid(srv.vdi_of(vm, i)))
    srv.set_nbd("insecure_nbd")
    s.xenapi.VDI.get_nbd_info(s.xenapi.VDI.get_by_uuid(srv.vdi_of(vm, 0)))
    pids = srv.nbd_pids()
    assert len(pids) == 3 and all(_alive(p) for p in pids)
    srv.stop()
    assert not any(_alive(p) for p in pids)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    left = [t for t in set(threading.enumerate()) - threads if t.is_alive()]
    assert not left, left


def test_runnable_alone(tmp_path):
    image = tmp_path / "disk.raw"
    image.write_bytes(os.urandom(MiB))
    root = tmp_path / "root"
    p = subprocess.Popen([sys.executable, "-m", "tests.xapi_server", "--root", str(root), "--vm", f"alone={image}"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         env=dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    try:
        lines = dict(p.stdout.readline().strip().split(": ", 1) for _ in range(4))
        assert lines["url"].startswith("https://127.0.0.1:")
        assert os.stat(lines["credentials"]).st_mode & 0o777 == 0o600
        import tomllib
        with open(lines["credentials"], "rb") as f:
            creds = tomllib.load(f)
        s = XenAPI.Session(lines["url"], transport=xmlrpc.client.SafeTransport(
            context=ssl.create_default_context(cafile=lines["ca_file"])))
        s.xenapi.login_with_password(creds["username"], creds["password"], "2.0", "t")
        (vm,) = s.xenapi.VM.get_by_name_label("alone")
        vdi = next(s.xenapi.VBD.get_VDI(b) for b in s.xenapi.VM.get_VBDs(vm) if s.xenapi.VBD.get_type(b) == "Disk")
        (info,) = s.xenapi.VDI.get_nbd_info(vdi)
        assert _nbd_read(info, MiB) == image.read_bytes()
        nbd_pids = [int(d) for d in os.listdir("/proc") if d.isdigit() and _is_child_nbd(int(d), root)]
        assert len(nbd_pids) == 1
    finally:
        p.send_signal(signal.SIGTERM)
        rc = p.wait(30)
    assert rc == 0, p.stderr.read()
    assert not any(_alive(pid) for pid in nbd_pids)


def _is_child_nbd(pid: int, root) -> bool:
    """A qemu-nbd serving a file under `root`."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return False
    return bool(argv) and argv[0].endswith(b"qemu-nbd") and any(str(root).encode() in a for a in argv) \
        and _alive(pid)
