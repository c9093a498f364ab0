"""`alike server`: commands run in a long-lived process with warm Ray workers. Backups driven by
`alike backup --server`: the same outputs and exit codes as a local backup; warm actors are
really reused; concurrent clients; a client that goes away; a server killed mid-backup; a
CBT backup of a real libvirt VM through the server. Every other command that moves data
(verify, gc, vault, restore, files, repair) gives the output of a local run; a server found
without --server, and when it is not used; a stale socket; a server started on the fly, a
client's Ctrl-C, and its idle stop."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from alike_ray.server import log_path
from tests import images, kvm_env

MiB = images.MiB
BS = 512 * 1024


def _short_dir():
    # a Unix socket path must stay under 108 bytes: pytest's tmp_path can be longer
    return tempfile.mkdtemp(prefix="alk-srv-", dir="/tmp")


def _start(alike, sock, env=None):
    p = alike("server", "start", "--socket", sock, "--address", alike.address, "--json", env=env, timeout=180)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


@pytest.fixture(scope="module")
def server(ray_address, tmp_path_factory):
    from tests.conftest import CLI

    d = _short_dir()
    sock = os.path.join(d, "s.sock")
    cli = CLI(ray_address, tmp_path_factory.mktemp("srv"))
    st = _start(cli, sock)
    yield sock, st
    cli("server", "stop", "--socket", sock, timeout=120)
    shutil.rmtree(d, ignore_errors=True)


def _warm(alike, sock):
    return alike.json("server", "status", "--socket", sock)["warm"]


def _no_traceback(p):
    assert "Traceback" not in p.stderr, p.stderr
    errs = [ln for ln in p.stderr.splitlines() if ln.startswith("alike: error:")]
    assert len(errs) == 1, p.stderr
    return errs[0]


def test_backup_through_server_same_as_local(server, alike, corpus, tmp_path, monkeypatch):
    """Two backups through the server: the JSON of a local backup (same keys, same counts), the
    second one in reused actors (the server's status counts them), and both versions restore
    byte-identical. $ALIKE_SERVER alone sends a backup to the server too; text output as locally."""
    sock, st = server
    assert st["pid"] > 0 and st["socket"] == sock and os.stat(sock).st_mode & 0o777 == 0o600
    # index shards started with the server, for the first backup of whichever store comes
    assert st["warm"]["indexes_started"] == 1 and list(st["warm"]["idle_indexes"])[0].startswith("any store"), st
    local, remote = str(tmp_path / "local"), str(tmp_path / "remote")
    alike("init", "--store", local, check=True)
    monkeypatch.chdir(tmp_path)  # a relative store path and image path are the client's, not the server's
    alike("init", "--store", "remote", check=True)
    subprocess.run(["cp", "--sparse=always", corpus["web"], str(tmp_path / "web.raw")], check=True)
    before = _warm(alike, sock)
    r1 = alike.json("backup", "--server", sock, "--store", "remote", "image:web.raw")
    l1 = alike.json("backup", "--store", local, "image:web.raw")
    assert set(r1) == set(l1)
    for k in ("vm", "logical_bytes", "read_bytes", "new_blocks", "stored_bytes", "zero_blocks", "cbt"):
        assert r1[k] == l1[k], k
    subprocess.run(["cp", "--sparse=always", corpus["web_day2"], str(tmp_path / "web.raw")], check=True)
    p = alike("backup", "--store", remote, "image:" + str(tmp_path / "web.raw"), env={"ALIKE_SERVER": sock}, check=True)
    assert p.stdout.startswith("web@") and "new blocks" in p.stdout, p.stdout
    after = _warm(alike, sock)
    assert after["actors_reused"] >= before["actors_reused"] + 2
    # both backups in warm shards (the first store's first backup too): none started for them
    assert after["indexes_reused"] >= before["indexes_reused"] + 2
    assert after["indexes_started"] == before["indexes_started"], (before, after)
    versions = [v["version"] for v in alike.json("versions", "--store", remote)["versions"]]
    assert len(versions) == 2
    for v, want in zip(sorted(versions), (corpus["web"], corpus["web_day2"])):
        out = str(tmp_path / f"{v}.raw")
        alike("restore", "--store", remote, f"web@{v}", "--to", out, check=True)
        assert subprocess.run(["cmp", out, want]).returncode == 0


def test_server_bad_input(server, alike, corpus, tmp_path):
    """Errors through the server are the local ones: one line, the same exit code, no traceback.
    Without a server at the socket: a clear exit 2. A second server on a live socket is refused."""
    sock, _ = server
    store = str(tmp_path / "s")
    p = alike("backup", "--server", sock, "--store", store, f"image:{corpus['web']}")
    assert p.returncode == 2 and "does not exist: create it with `alike init" in _no_traceback(p)
    alike("init", "--store", store, check=True)
    p = alike("backup", "--server", sock, "--store", store, "image:/nonexistent/disk.raw")
    assert p.returncode in (2, 5), p.stderr
    _no_traceback(p)
    p = alike("backup", "--server", sock, "--store", store, "kvm:qemu:///system", "--vm", "no-such-vm-xyz")
    assert p.returncode == 2, p.stderr
    _no_traceback(p)
    p = alike("backup", "--server", sock, "--address", alike.address, "--store", store, f"image:{corpus['web']}")
    assert p.returncode == 2 and "--address does not go with --server" in _no_traceback(p)
    nowhere = os.path.join(_short_dir(), "none.sock")
    p = alike("backup", "--server", nowhere, "--store", store, f"image:{corpus['web']}")
    assert p.returncode == 2 and "no alike server at" in _no_traceback(p)
    p = alike("server", "status", "--socket", nowhere)
    assert p.returncode == 2 and "alike server start" in _no_traceback(p)
    p = alike("server", "start", "--socket", sock, "--address", alike.address)
    assert p.returncode == 2 and "already runs" in _no_traceback(p)
    assert alike.json("versions", "--store", store)["versions"] == []


def test_concurrent_clients(server, alike, corpus, tmp_path):
    """Two clients at once, two VMs into one store: both commit, each restores byte-identical,
    and every output went to its own client."""
    sock, _ = server
    store = str(tmp_path / "s")
    alike("init", "--store", store, check=True)
    env = dict(os.environ, RAY_ADDRESS=alike.address)
    procs = [subprocess.Popen([sys.executable, "-m", "alike_ray.cli", "backup", "--server", sock, "--store", store,
                               f"image:{corpus[k]}", "--name", k, "--json"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for k in ("web", "db_raw")]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    got = [json.loads(o) for o, _ in outs]
    assert [g["vm"] for g in got] == ["web", "db_raw"]
    for g in got:
        out = str(tmp_path / f"{g['vm']}.raw")
        alike("restore", "--store", store, f"{g['vm']}@{g['version']}", "--to", out, check=True)
        assert subprocess.run(["cmp", out, corpus[g["vm"]]]).returncode == 0


def test_client_gone_backup_still_commits(server, alike, tmp_path):
    """A client killed while its backup runs: the server finishes the backup (committed, whole),
    writes what the client would have seen to its log, and keeps serving."""
    sock, st = server
    store = str(tmp_path / "s")
    alike("init", "--store", store, check=True)
    img = str(tmp_path / "big.raw")
    with open(img, "wb") as f:
        for _ in range(12):
            f.write(os.urandom(16 * MiB))
    env = dict(os.environ, RAY_ADDRESS=alike.address)
    p = subprocess.Popen([sys.executable, "-m", "alike_ray.cli", "backup", "--server", sock, "--store", store,
                          f"image:{img}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 60
    while time.time() < deadline and not alike.json("server", "status", "--socket", sock)["running"]:
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    deadline = time.time() + 180
    while time.time() < deadline and alike.json("server", "status", "--socket", sock)["running"]:
        time.sleep(0.2)
    log = open(st["log"]).read()
    assert f"from pid {p.pid}]: exit 0" in log, log[-3000:]
    [v] = alike.json("versions", "--store", store)["versions"]
    out = str(tmp_path / "r.raw")
    alike("restore", "--store", store, f"big@{v['version']}", "--to", out, check=True)
    assert subprocess.run(["cmp", out, img]).returncode == 0
    assert alike.json("verify", "--store", store)["ok"] is True


def test_server_killed_mid_backup(alike, corpus, tmp_path):
    """kill -9 of the server while it runs a backup (right after dispatching the VM): the client
    says so in one line (exit 1), nothing is committed, verify passes, and a new server on the same
    socket (the dead one's socket file is taken over) backs the VM up."""
    d = _short_dir()
    sock = os.path.join(d, "k.sock")
    store = str(tmp_path / "s")
    alike("init", "--store", store, check=True)
    try:
        _start(alike, sock, env={"ALIKE_CRASH_AT": "backup-dispatched"})
        p = alike("backup", "--server", sock, "--store", store, f"image:{corpus['web']}")
        assert p.returncode == 1, (p.returncode, p.stderr)
        assert "closed the connection before the backup ended" in _no_traceback(p)
        assert alike.json("versions", "--store", store)["versions"] == []
        assert alike.json("verify", "--store", store)["ok"] is True
        assert os.path.exists(sock)  # what a killed server leaves
        _start(alike, sock)
        r = alike.json("backup", "--server", sock, "--store", store, f"image:{corpus['web']}")
        out = str(tmp_path / "r.raw")
        alike("restore", "--store", store, f"web@{r['version']}", "--to", out, check=True)
        assert subprocess.run(["cmp", out, corpus["web"]]).returncode == 0
        st = alike.json("server", "stop", "--socket", sock, timeout=120)
        assert st["stopped"] is True and not os.path.exists(sock)
        with pytest.raises(ProcessLookupError):
            os.kill(st["pid"], 0)
    finally:
        alike("server", "stop", "--socket", sock, timeout=120)
        shutil.rmtree(d, ignore_errors=True)



def test_kvm_cbt_backup_through_server(server, alike, conn, tmp_path):
    """A real libvirt VM backed up through the server: the first backup reads what the disk
    holds, guest writes, the second one uses CBT (reads the changed blocks only) in warm actors,
    and both versions restore byte-identical to the disk at their snapshot times."""
    from tests.e2e.test_kvm import make_vm, same

    sock, _ = server
    lib = os.path.dirname(os.__file__)
    tree = images.tree(str(tmp_path / "t"), 6 * MiB, [f"{lib}/{x}" for x in ("email", "json", "http")])
    vm = kvm_env.vm_name("srv")
    dom, disks = make_vm(conn, vm, [tree], sizes=(48,))
    try:
        store = str(tmp_path / "s")
        alike("init", "--store", store, check=True)
        v1 = disks[0].snapshot_copy(str(tmp_path / "v1.raw"))
        r1 = alike.json("backup", "--server", sock, "--store", store, "kvm:" + kvm_env.URI, "--vm", vm)
        assert r1["cbt"] is False and 0 < r1["read_bytes"] < 48 * MiB
        regions = [(3 * MiB, 1 * MiB, 0x61), (40 * MiB + 777, 5000, 0x62)]
        for off, ln, pat in regions:
            disks[0].write(off, ln, pat)
        v2 = disks[0].snapshot_copy(str(tmp_path / "v2.raw"))
        r2 = alike.json("backup", "--server", sock, "--store", store, "kvm:" + kvm_env.URI, "--vm", vm)
        assert r2["cbt"] is True
        assert 0 < r2["read_bytes"] <= sum(ln for _, ln, _ in regions) + len(regions) * BS
        for r, want in ((r1, v1), (r2, v2)):
            out = str(tmp_path / f"{r['version']}.raw")
            alike("restore", "--store", store, f"{vm}@{r['version']}", "--to", out, check=True)
            assert same(out, want)
    finally:
        kvm_env.remove_domain(dom)


def test_job_run_through_server(server, alike, corpus, tmp_path, monkeypatch):
    """`alike job run --server`: the job file's relative paths (store, image sources) are the
    client's; per-VM phase lines reach the client; history and versions are those of a local run;
    a bad job file is the same one-line error."""
    sock, _ = server
    monkeypatch.chdir(tmp_path)
    for n, src in (("web1", "web"), ("db1", "db_raw"), ("web2", "web_day2")):
        subprocess.run(["cp", "--sparse=always", corpus[src], str(tmp_path / f"{n}.img")], check=True)
    alike("init", "--store", "ads", check=True)
    (tmp_path / "j.toml").write_text(
        'name = "nightly"\nstore = "ads"\nsources = ["image:web1.img", {uri = "image:db1.img", tags = ["prod"]}, '
        '"image:web2.img"]\n\n[select]\nkeyword = "web"\ntags = ["prod"]\n\n[options]\nparallel = 2\n')
    p = alike("job", "run", "j.toml", "--server", sock, "--json")
    assert p.returncode == 0, p.stderr
    run = json.loads(p.stdout)
    assert run["status"] == "ok" and sorted(v["vm"] for v in run["vms"]) == ["db1", "web1", "web2"]
    for phase in ("snapshot", "data acquisition", "metadata commit"):
        assert f"web1: {phase}" in p.stderr
    hist = alike.json("job", "history", "--store", str(tmp_path / "ads"))["runs"]
    assert [h["run_id"] for h in hist] == [run["run_id"]]
    for v in run["vms"]:
        out = str(tmp_path / f"{v['vm']}.out")
        alike("restore", "--store", "ads", f"{v['vm']}@{v['version']}", "--to", out, check=True)
        assert subprocess.run(["cmp", out, str(tmp_path / f"{v['vm']}.img")]).returncode == 0
    (tmp_path / "bad.toml").write_text('name = "x"\nstore = "ads"\nsources = ["image:web1.img"]\nfrobnicate = 1\n')
    p = alike("job", "run", "bad.toml", "--server", sock)
    assert p.returncode == 2 and "frobnicate" in _no_traceback(p)


# -- every command that moves data, through the server ---------------------------------------

_TIMES = re.compile(r"\b\d+(\.\d+)? ?(s|MB/s|B/s|KiB/s|MiB/s|GiB/s)\b")
_VARYING = ("seconds", "wall_seconds", "startup_seconds", "mb_per_s", "validation_recorded", "phase_seconds",
            "task_seconds")


def _same_text(a: str, b: str) -> bool:
    return _TIMES.sub("T", a) == _TIMES.sub("T", b)


def _same_json(a: dict, b: dict) -> None:
    assert set(a) == set(b), set(a) ^ set(b)
    assert {k: v for k, v in a.items() if k not in _VARYING} == {k: v for k, v in b.items() if k not in _VARYING}
    if "seconds" in a:  # the time the user waited, start-up apart
        for r in (a, b):
            assert 0 <= r["startup_seconds"] <= r["wall_seconds"], r


@pytest.fixture(scope="module")
def filled(ray_address, tmp_path_factory, corpus):
    """A store with one version of the web image (ext4) and its vault copy, made locally."""
    from tests.conftest import CLI

    d = tmp_path_factory.mktemp("filled")
    cli = CLI(ray_address, d)
    ads, ods = str(d / "ads"), str(d / "ods")
    cli("init", "--store", ads, check=True)
    v = cli.json("backup", "--store", ads, f"image:{corpus['web']}")["version"]
    cli("vault", "--store", ads, "--to", ods, check=True)
    return {"ads": ads, "ods": ods, "version": v}


def _both(alike, sock, *args, json_too=True):
    """Run `alike ARGS` here and through the server (--server): the same exit code, the same text
    on stdout and stderr (but for durations); then with --json, the same object but for times.
    -> (local, served) results of the --json runs (or of the text runs)."""
    here = alike(*args, "--no-server")
    there = alike(*args, "--server", sock)
    assert here.returncode == there.returncode, (here.stderr, there.stderr)
    assert _same_text(here.stdout, there.stdout), (here.stdout, there.stdout)
    assert _same_text(here.stderr, there.stderr), (here.stderr, there.stderr)
    if not json_too:
        return here, there
    jh, jt = alike(*args, "--json", "--no-server"), alike(*args, "--json", "--server", sock)
    assert jh.returncode == jt.returncode == here.returncode
    if jh.returncode == 0:
        _same_json(json.loads(jh.stdout), json.loads(jt.stdout))
    return jh, jt


def test_verify_through_server(server, alike, filled):
    sock, _ = server
    before = alike.json("server", "status", "--socket", sock)["commands_served"]
    _, there = _both(alike, sock, "verify", "--store", filled["ads"])
    assert json.loads(there.stdout)["ok"] is True
    assert alike.json("server", "status", "--socket", sock)["commands_served"] == before + 2


def test_gc_through_server(server, alike, filled):
    sock, _ = server
    _both(alike, sock, "gc", "--store", filled["ads"], "--dry-run")


def test_vault_through_server(server, alike, filled, tmp_path, monkeypatch):
    """A vault that copies (into two new stores, one each way) and one with nothing to do; the
    target's relative path is the client's."""
    sock, _ = server
    monkeypatch.chdir(tmp_path)
    here = alike.json("vault", "--store", filled["ads"], "--to", "o1", "--no-server")
    there = alike.json("vault", "--store", filled["ads"], "--to", "o2", "--server", sock)
    assert here["versions_copied"] == there["versions_copied"] == 1
    assert here["blocks_copied"] == there["blocks_copied"] > 0 and os.path.isdir(tmp_path / "o2" / "packs")
    _both(alike, sock, "vault", "--store", filled["ads"], "--to", "o1", json_too=False)


def test_restore_through_server(server, alike, filled, corpus, tmp_path, monkeypatch):
    """A restore to a relative path (the client's folder), byte-identical; an unknown version is
    the same one-line error (exit 2)."""
    sock, _ = server
    monkeypatch.chdir(tmp_path)
    here = alike("restore", "--store", filled["ads"], "web", "--to", "a.raw", "--no-server")
    there = alike("restore", "--store", filled["ads"], "web", "--to", "b.raw", "--server", sock)
    assert here.returncode == there.returncode == 0, there.stderr
    assert _same_text(here.stdout.replace("a.raw", "X"), there.stdout.replace("b.raw", "X"))
    assert "(start-up " in there.stdout
    for f in ("a.raw", "b.raw"):
        assert subprocess.run(["cmp", str(tmp_path / f), corpus["web"]]).returncode == 0
    _both(alike, sock, "restore", "--store", filled["ads"], "web@nosuchversion", "--to", "c.raw", json_too=False)


def test_files_through_server(server, alike, filled, tmp_path, monkeypatch):
    sock, _ = server
    monkeypatch.chdir(tmp_path)
    _both(alike, sock, "files", "--store", filled["ads"], "web", "ls", "/")
    top = [e for e in alike.json("files", "--store", filled["ads"], "web", "ls", "/", "--server", sock)["entries"]
           if e["name"] not in (".", "..", "lost+found")][0]["name"]
    p = alike("files", "--store", filled["ads"], "web", "get", "/" + top, "--to", "out", "--server", sock)
    assert p.returncode == 0 and (tmp_path / "out" / top).exists(), p.stderr
    _both(alike, sock, "files", "--store", filled["ads"], "web", "ls", "/no/such/dir", json_too=False)


def test_repair_through_server(server, alike, filled):
    sock, _ = server
    _both(alike, sock, "repair", "--store", filled["ads"], "--from", filled["ods"], "--dry-run")


def test_implicit_server_and_its_limits(server, alike, filled):
    """With $ALIKE_SERVER (or a server at the default socket) and no --server, a command runs in
    the server; with another environment than the server's (here ALIKE_PACK_TARGET), --address
    or --no-server, in its own process, with the same output."""
    sock, _ = server
    served = lambda: alike.json("server", "status", "--socket", sock)["commands_served"]  # noqa: E731
    n = served()
    p = alike("gc", "--store", filled["ads"], "--dry-run", env={"ALIKE_SERVER": sock})
    assert p.returncode == 0 and served() == n + 1, p.stderr
    for cmd, env in ((("gc", "--dry-run"), {"ALIKE_SERVER": sock, "ALIKE_PACK_TARGET": "1048576"}),
                     (("gc", "--dry-run", "--no-server"), {"ALIKE_SERVER": sock}),
                     (("verify", "--address", alike.address), {"ALIKE_SERVER": sock})):
        q = alike(cmd[0], "--store", filled["ads"], *cmd[1:], env=env)
        assert q.returncode == 0 and q.stderr == "" and q.stdout, q.stderr
    assert served() == n + 1
    p = alike("verify", "--store", filled["ads"], "--server", sock, "--no-server")
    assert p.returncode == 2 and "contradict" in _no_traceback(p)


def _stale_socket() -> str:
    """A socket file nobody listens at: what a server killed with -9 leaves."""
    path = os.path.join(_short_dir(), "stale.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.close()
    return path


def test_stale_socket_runs_here(alike, filled):
    """A socket file of a dead server: one warning line, then the command runs in its own process
    with the output of a local run; asked for with --server, it is an error (exit 2)."""
    sock = _stale_socket()
    local = alike("gc", "--store", filled["ads"], "--dry-run")
    p = alike("gc", "--store", filled["ads"], "--dry-run", env={"ALIKE_SERVER": sock})
    assert p.returncode == 0 and p.stdout == local.stdout
    assert p.stderr.splitlines() == [f"alike: warning: the alike server at {sock} does not answer (its socket was left "
                                     "by a server that was killed): the gc runs here; `alike server start` starts a "
                                     "new one"], p.stderr
    p = alike("gc", "--store", filled["ads"], "--dry-run", "--server", sock)
    assert p.returncode == 2 and "does not answer" in _no_traceback(p)
    shutil.rmtree(os.path.dirname(sock), ignore_errors=True)


def test_autostart_interrupt_and_idle(alike, filled, tmp_path):
    """Asked to (ALIKE_SERVER_AUTOSTART=1, as a terminal would), the first command starts a local
    server, says so in one line and runs in it; the next ones run in it silently; Ctrl-C of a
    client interrupts its command in the server as it does locally (exit 130, nothing committed,
    the server goes on); with no command for ALIKE_SERVER_IDLE the server stops by itself."""
    d = _short_dir()
    sock, flag = os.path.join(d, "auto.sock"), str(tmp_path / "paused")
    env = {"ALIKE_SERVER": sock, "ALIKE_SERVER_AUTOSTART": "1", "ALIKE_SERVER_IDLE": "2s",
           # the server's first gc holds after its mark phase while `flag` exists (pipelines/faults.py)
           "ALIKE_CRASH_AT": "gc-after-mark:1:pause", "ALIKE_CRASH_FLAG": flag}
    try:
        p = alike("verify", "--store", filled["ads"], env=env)
        assert p.returncode == 0 and "all versions are intact" in p.stdout, p.stderr
        assert p.stderr.splitlines() == [f"alike: started a local server at {sock} (stops after 2 s idle; "
                                         "`alike server stop`)"], p.stderr
        st = alike.json("server", "status", "--socket", sock)
        assert st["idle_timeout_seconds"] == 2 and st["commands_served"] == 1
        e = dict(os.environ, RAY_ADDRESS=alike.address, **env)
        c = subprocess.Popen([sys.executable, "-m", "alike_ray.cli", "gc", "--store", filled["ads"], "--dry-run"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=e)
        deadline = time.time() + 60
        while time.time() < deadline and not os.path.exists(flag):
            time.sleep(0.05)
        assert os.path.exists(flag), c.communicate(timeout=60)
        c.send_signal(signal.SIGINT)
        out, err = c.communicate(timeout=60)
        assert c.returncode == 130 and err.splitlines() == ["alike: interrupted; nothing partial was committed"], err
        os.unlink(flag)
        log = open(log_path(sock)).read()
        assert "interrupted by its client (Ctrl-C)" in log and "exit 130" in log, log[-2000:]
        p = alike("gc", "--store", filled["ads"], "--dry-run", env=env)  # the server goes on; no second line
        assert p.returncode == 0 and p.stderr == "", p.stderr
        assert alike.json("server", "status", "--socket", sock)["commands_served"] == 3
        deadline = time.time() + 60
        while time.time() < deadline and os.path.exists(sock):
            time.sleep(0.2)
        assert not os.path.exists(sock), "the server did not stop when idle"
        with pytest.raises(ProcessLookupError):
            for _ in range(100):
                os.kill(st["pid"], 0)
                time.sleep(0.1)
        assert "no command for 2 s: stopping" in open(log_path(sock)).read()
    finally:
        if os.path.exists(sock):  # a failed test's server
            alike("server", "stop", "--socket", sock, timeout=120)
        shutil.rmtree(d, ignore_errors=True)
