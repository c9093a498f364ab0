"""Whole runs of the `alike` command on real ext4 disk images (raw and qcow2), joined to the
session's Ray instance."""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests import images


def same(a, b) -> bool:
    return subprocess.run(["cmp", "-s", a, b]).returncode == 0


def test_backup_restore_versions_verify_stats(alike, corpus, tmp_path):
    store = tmp_path / "ads"
    out = alike.json("init", "--store", store)
    assert out["block_size"] == 512 * 1024

    web = alike.json("backup", "--store", store, f"image:{corpus['web']}", "--name", "web")
    for k in ("vm", "version", "logical_bytes", "read_bytes", "new_blocks", "stored_bytes", "seconds"):
        assert k in web
    assert web["vm"] == "web" and web["logical_bytes"] == 64 * images.MiB
    # whitespace awareness: only allocated data is read
    assert 0 < web["read_bytes"] <= images.allocated_bytes(corpus["web"])
    assert web["new_blocks"] > 0 and 0 < web["stored_bytes"] < web["read_bytes"]  # ext4 + text compresses

    db = alike.json("backup", "--store", store, f"image:{corpus['db']}", "--name", "db")
    assert db["logical_bytes"] == 48 * images.MiB
    assert db["read_bytes"] <= images.allocated_bytes(corpus["db"])

    vers = alike.json("versions", "--store", store)["versions"]
    assert [v["vm"] for v in vers] == ["db", "web"]  # newest first

    r = alike.json("restore", "--store", store, "web", "--to", tmp_path / "web.raw")
    assert same(tmp_path / "web.raw", corpus["web"])
    assert images.allocated_bytes(tmp_path / "web.raw") <= images.allocated_bytes(corpus["web"]) + images.MiB  # sparse
    alike.json("restore", "--store", store, f"db@{db['version']}", "--to", tmp_path / "db.raw")
    assert same(tmp_path / "db.raw", corpus["db_raw"])

    v = alike.json("verify", "--store", store)
    assert v["ok"] and v["versions"] == 2 and v["blocks_checked"] > 0

    s = alike.json("stats", "--store", store)
    assert s["versions"] == 2
    assert s["logical_bytes"] == (64 + 48) * images.MiB
    assert s["unique_blocks"] == web["new_blocks"] + db["new_blocks"]
    assert s["stored_bytes"] >= web["stored_bytes"] + db["stored_bytes"]


def test_delta_analysis_and_full(alike, corpus, tmp_path):
    store = tmp_path / "ads"
    alike.json("init", "--store", store, "--block-size", "64K")
    first = alike.json("backup", "--store", store, f"image:{corpus['web']}", "--name", "web")
    again = alike.json("backup", "--store", store, f"image:{corpus['web']}", "--name", "web")
    # the previous version is the munge cache: unchanged blocks cost no lookup, no write
    assert again["index_lookups"] == 0 and again["new_blocks"] == 0 and again["stored_bytes"] == 0
    assert again["cache_hits"] >= first["new_blocks"] and again["read_bytes"] == first["read_bytes"]

    day2 = alike.json("backup", "--store", store, f"image:{corpus['web_day2']}", "--name", "web")
    assert 0 < day2["index_lookups"] <= (3 * images.MiB) // (64 * 1024) + 2
    assert day2["new_blocks"] >= 48  # 3 MiB of random data in 64K blocks
    assert day2["stored_bytes"] >= 3 * images.MiB

    full = alike.json("backup", "--store", store, f"image:{corpus['web_day2']}", "--name", "web", "--full")
    assert full["cache_hits"] == 0 and full["index_lookups"] > 0 and full["new_blocks"] == 0

    vers = alike.json("versions", "--store", store, "--vm", "web")["versions"]
    assert len(vers) == 4
    # every version restores on its own, old ones too
    oldest = vers[-1]["version"]
    alike.json("restore", "--store", store, f"web@{oldest}", "--to", tmp_path / "old.raw")
    assert same(tmp_path / "old.raw", corpus["web"])
    alike.json("restore", "--store", store, "web", "--to", tmp_path / "new.raw")
    assert same(tmp_path / "new.raw", corpus["web_day2"])


def test_parallel_vms_from_one_template_share_blocks(alike, corpus, tmp_path):
    store = tmp_path / "ads"
    alike.json("init", "--store", store)
    a = tmp_path / "a.raw"
    b = tmp_path / "b.raw"
    subprocess.run(["cp", "--sparse=always", corpus["web"], a], check=True)
    subprocess.run(["cp", "--sparse=always", corpus["web_day2"], b], check=True)
    out = alike.json("backup", "--store", store, f"image:{a}", f"image:{b}", "--parallel", "2")
    assert out["ok"] and {v["vm"] for v in out["vms"]} == {"a", "b"}
    s = alike.json("stats", "--store", store)
    # blocks common to both VMs are stored once, even when both are backed up at once
    assert sum(v["new_blocks"] for v in out["vms"]) == s["unique_blocks"]
    assert alike.json("verify", "--store", store)["ok"]
    for name, src in (("a", a), ("b", b)):
        alike.json("restore", "--store", store, name, "--to", tmp_path / f"{name}.out")
        assert same(tmp_path / f"{name}.out", src)


def test_compressed_qcow2_and_multi_disk_vm(alike, corpus, tmp_path):
    """A qcow2 with compressed clusters cannot be read in place: qemu-img resolves it."""
    store = tmp_path / "ads"
    alike.json("init", "--store", store)
    cq = images.to_qcow2(corpus["db_raw"], str(tmp_path / "c.qcow2"), "-c")
    out = alike.json("backup", "--store", store, f"image:{cq},{corpus['web']}", "--name", "two")
    assert out["logical_bytes"] == (48 + 64) * images.MiB
    alike.json("restore", "--store", store, "two", "--to", tmp_path / "two")
    assert same(tmp_path / "two" / "c.raw", corpus["db_raw"])
    assert same(tmp_path / "two" / "web.raw", corpus["web"])
    # one disk of several, by number
    alike.json("restore", "--store", store, "two", "--disk", "1", "--to", tmp_path / "one.raw")
    assert same(tmp_path / "one.raw", corpus["web"])
    p = alike("restore", "--store", store, "two", "--disk", "2", "--to", tmp_path / "x.raw")
    assert p.returncode == 2 and "no disk '2'" in p.stderr


@pytest.mark.parametrize("fmt", ["qcow2", "vhd", "vhdx"])
def test_restore_to_disk_formats(alike, corpus, tmp_path, fmt):
    """Each format is written by qemu-img, checked by it, and compared with the source image."""
    store = tmp_path / "ads"
    alike.json("init", "--store", store)
    alike.json("backup", "--store", store, f"image:{corpus['db']}", "--name", "db")
    target = tmp_path / f"db.{fmt}"
    r = alike.json("restore", "--store", store, "db", "--to", target)
    assert r["format"] == fmt and r["checks"][0]["compared"]
    qfmt = {"vhd": "vpc"}.get(fmt, fmt)
    info = subprocess.run(["qemu-img", "info", "--output=json", target], capture_output=True, text=True, check=True)
    assert json.loads(info.stdout)["format"] == qfmt
    # a third party says the content is the source's
    assert subprocess.run(["qemu-img", "compare", "-F", qfmt, corpus["db_raw"], target]).returncode == 0
    if fmt != "vhd":
        assert subprocess.run(["qemu-img", "check", "-f", qfmt, target], capture_output=True).returncode == 0
    assert not [f for f in os.listdir(tmp_path) if "alike-" in f]  # no temporary files left


def test_store_from_environment_and_help(alike, corpus, tmp_path):
    store = tmp_path / "envstore"
    p = alike("init", env={"ALIKE_STORE": str(store)})
    assert p.returncode == 0 and (store / "config.json").exists()
    p = alike("--help")
    assert p.returncode == 0
    for cmd in ("init", "backup", "versions", "restore", "verify", "stats"):
        assert cmd in p.stdout
        h = alike(cmd, "--help")
        assert h.returncode == 0 and "--json" in h.stdout and "--store" in h.stdout
