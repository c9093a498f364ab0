"""`alike instant`: a real QEMU (TCG) started from a backup through the FUSE mount and a qcow2
overlay; the guest's writes go to the overlay, never to the store; --stop leaves nothing."""
from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from tests.conftest import tree_digest


@pytest.mark.skipif(not shutil.which("qemu-system-x86_64") or not os.path.exists("/dev/fuse"),
                    reason="needs qemu-system-x86 and FUSE")
def test_instant_vm_from_backup(alike, corpus, tmp_path, monkeypatch):
    run_root = tmp_path / "instant"
    env = {"ALIKE_INSTANT_DIR": str(run_root)}
    store = tmp_path / "ads"
    alike.json("init", "--store", store)
    v = alike.json("backup", "--store", store, f"image:{corpus['web']}", "--name", "web")
    before = tree_digest(store)
    p = alike("instant", "--store", store, f"web@{v['version']}", "--name", "t1", "--json", env=env)
    assert p.returncode == 0, p.stderr
    st = json.loads(p.stdout)
    try:
        assert st["seconds_to_running"] > 0
        os.kill(st["qemu_pid"], 0)  # QEMU runs
        monkeypatch.setenv("ALIKE_INSTANT_DIR", str(run_root))
        from alike_ray.restore import instant

        sock = os.path.join(st["run"], "qmp.sock")
        assert instant.read_bytes(st["run"]) > 0  # it read the disk from the backup
        # a guest write through QEMU's block layer lands in the overlay
        [r] = instant._qmp(sock, {"execute": "human-monitor-command",
                                  "arguments": {"command-line": 'qemu-io virtio0 "write -P 0x5a 0 65536"'}})
        assert "error" not in r, r
        [r] = instant._qmp(sock, {"execute": "human-monitor-command",
                                  "arguments": {"command-line": 'qemu-io virtio0 "read -P 0x5a 0 65536"'}})
        assert "error" not in r and "Pattern verification failed" not in r["return"], r
        overlay = os.path.join(st["run"], "disk0.qcow2")
        info = json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json", overlay],
                                         capture_output=True, text=True, check=True).stdout)
        assert info["format"] == "qcow2" and info["backing-filename"].endswith("web.raw")
        listed = alike.json("instant", "--list", env=env)["instant"]
        assert [i["name"] for i in listed] == ["t1"] and listed[0]["running"]
        p = alike("instant", "--store", store, "web", "--name", "t1", env=env)
        assert p.returncode == 2 and "exists" in p.stderr  # one name, one instant VM
    finally:
        out = alike("instant", "--stop", "t1", env=env)
    assert out.returncode == 0, out.stderr
    with pytest.raises(OSError):
        os.kill(st["qemu_pid"], 0)
    assert not (run_root / "t1").exists()
    assert tree_digest(store) == before  # nothing was written to the store
    # the backup itself is unchanged: it restores to the original image
    alike.json("restore", "--store", store, "web", "--to", tmp_path / "w.raw")
    assert subprocess.run(["cmp", "-s", tmp_path / "w.raw", corpus["web"]]).returncode == 0
