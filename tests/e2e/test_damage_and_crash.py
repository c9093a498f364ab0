"""Damaged packs are found by verify and refused by restore; a crash at any point of a backup
(kill -9 of the driver or of a worker) leaves no visible partial version."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests import images
from tests.matrix import cases


def same(a, b) -> bool:
    return subprocess.run(["cmp", "-s", a, b]).returncode == 0


def packs(store):
    out = []
    for root, _, files in os.walk(store / "packs"):
        out += [os.path.join(root, f) for f in files if not f.startswith(".tmp")]
    return sorted(out)


def test_flipped_byte_in_pack(alike, corpus, tmp_path):
    store = tmp_path / "ads"
    alike.json("init", "--store", store, "--block-size", "64K")
    web = alike.json("backup", "--store", store, f"image:{corpus['web']}", "--name", "web")
    db = alike.json("backup", "--store", store, f"image:{corpus['db']}", "--name", "db")
    # damage one block of web's pack (its first version wrote the first pack(s))
    from storage.pack import read_footer
    from storage.local import DirectoryBackend

    web_packs = sorted(packs(store), key=os.path.getmtime)[:1]
    pid = os.path.basename(web_packs[0])
    footer = read_footer(DirectoryBackend(str(store)), pid)
    off = int(footer["offset"][3]) + int(footer["length"][3]) // 2
    with open(web_packs[0], "r+b") as f:
        f.seek(off)
        b = f.read(1)
        f.seek(off)
        f.write(bytes([b[0] ^ 0x5A]))

    p = alike("verify", "--store", store, "--json")
    assert p.returncode == 3
    import json

    rep = json.loads(p.stdout)
    assert not rep["ok"] and rep["damaged_blocks"] >= 1
    broken = {(b["vm"], b["version"], b["disk"]) for b in rep["broken"]}
    assert ("web", web["version"], "web.raw") in broken
    assert all(vm == "web" for vm, _, _ in broken)  # db is intact
    p = alike("verify", "--store", store)
    assert p.returncode == 3 and f"web@{web['version']} disk web.raw" in p.stdout

    p = alike("restore", "--store", store, "web", "--to", tmp_path / "out.raw")
    assert p.returncode == 3 and "Damaged data" in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert not (tmp_path / "out.raw").exists()
    assert [f for f in os.listdir(tmp_path) if "out.raw" in f] == []
    # the intact VM still restores
    alike.json("restore", "--store", store, "db", "--to", tmp_path / "db.raw")
    assert same(tmp_path / "db.raw", corpus["db_raw"])


def test_deleted_pack_and_truncated_manifest(alike, corpus, tmp_path):
    store = tmp_path / "ads"
    alike.json("init", "--store", store)
    alike.json("backup", "--store", store, f"image:{corpus['web']}", "--name", "web")
    alike.json("backup", "--store", store, f"image:{corpus['db']}", "--name", "db")
    db_pack = sorted(packs(store), key=os.path.getmtime)[-1]
    os.unlink(db_pack)
    man = next((store / "versions" / "web").glob("*/disk-0.parquet"))
    man.write_bytes(man.read_bytes()[:50])
    import json

    p = alike("verify", "--store", store, "--json")
    assert p.returncode == 3
    rep = json.loads(p.stdout)
    assert {b["vm"] for b in rep["broken"]} == {"web", "db"}
    assert any("missing" in r for r in rep["problems"])
    p = alike("restore", "--store", store, "db", "--to", tmp_path / "db.raw")
    assert p.returncode == 3 and "Traceback" not in p.stderr and not (tmp_path / "db.raw").exists()


CRASH_POINTS = ["absorbed", "before-segments", "before-manifests", "before-version"]


# CI: the first and the last commit step (the crash matrix covers every point of the driver)
@pytest.mark.parametrize("point", cases(CRASH_POINTS, ci=["absorbed", "before-version"]))
def test_worker_killed_in_snapshot_actor(alike, corpus, tmp_path, point):
    """kill -9 of the worker running the VM's snapshot actor at each commit step."""
    store = tmp_path / "ads"
    alike.json("init", "--store", store, "--block-size", "64K")
    first = alike.json("backup", "--store", store, f"image:{corpus['db']}", "--name", "db")
    p = alike("backup", "--store", store, f"image:{corpus['web']}", "--name", "web",
              env={"ALIKE_CRASH_AT": point})
    assert p.returncode == 1 and "worker died" in p.stderr and "Traceback" not in p.stderr, p.stderr
    vers = alike.json("versions", "--store", store)["versions"]
    assert [(v["vm"], v["version"]) for v in vers] == [("db", first["version"])]
    assert alike.json("verify", "--store", store)["ok"]
    again = alike.json("backup", "--store", store, f"image:{corpus['web']}", "--name", "web")
    # blocks whose packs and index segments were committed before the crash are reused
    assert again["new_blocks"] > 0 or point in ("before-manifests", "before-version")
    assert alike.json("verify", "--store", store)["ok"]
    alike.json("restore", "--store", store, "web", "--to", tmp_path / "web.raw")
    assert same(tmp_path / "web.raw", corpus["web"])


def test_read_task_worker_killed_is_retried(alike, corpus, tmp_path):
    store = tmp_path / "ads"
    alike.json("init", "--store", store)
    flag = tmp_path / "crashed"
    out = alike.json("backup", "--store", store, f"image:{corpus['web']}", "--name", "web",
                     env={"ALIKE_CRASH_AT": "read-task", "ALIKE_CRASH_FLAG": str(flag)})
    assert flag.exists()  # a read task's worker really was killed
    assert alike.json("verify", "--store", store)["ok"]
    alike.json("restore", "--store", store, "web", "--to", tmp_path / "web.raw")
    assert same(tmp_path / "web.raw", corpus["web"])


def test_driver_killed_mid_backup(alike, tmp_path):
    """kill -9 of the `alike backup` process once its first pack is on the store."""
    store = tmp_path / "ads"
    alike.json("init", "--store", store, "--block-size", "64K")
    big = tmp_path / "big.raw"
    images.random_image(big, 192)
    env = dict(os.environ, RAY_ADDRESS=alike.address)
    proc = subprocess.Popen([sys.executable, "-m", "alike_ray.cli", "backup", "--store", str(store),
                             f"image:{big}", "--name", "big"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not packs(store) and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the backup finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert packs(store)  # it had written data...
    assert alike.json("versions", "--store", store)["versions"] == []  # ...but no version shows
    assert alike.json("verify", "--store", store)["ok"]
    out = alike.json("backup", "--store", store, f"image:{big}", "--name", "big")
    assert out["vm"] == "big"
    assert alike.json("verify", "--store", store)["ok"]
    alike.json("restore", "--store", store, "big", "--to", tmp_path / "r.raw")
    assert same(tmp_path / "r.raw", big)
