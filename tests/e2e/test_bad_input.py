"""Bad input: each case gets a clear one-line error, a meaningful non-zero exit, no traceback,
and leaves what is stored unchanged."""
from __future__ import annotations

import os

import pytest

from tests.conftest import tree_digest


@pytest.fixture(scope="module")
def filled(tmp_path_factory, ray_address, corpus):
    from tests.conftest import CLI

    d = tmp_path_factory.mktemp("bad")
    alike = CLI(ray_address, d)
    store = d / "ads"
    alike.json("init", "--store", store)
    v = alike.json("backup", "--store", store, f"image:{corpus['web']}", "--name", "web")
    (d / "plain").mkdir()
    (d / "exists.raw").write_bytes(b"keep me")
    return {"dir": d, "store": store, "version": v["version"]}


CASES = [
    # (id, argv with {store} {dir} {web} placeholders, exit code, words the message must hold)
    ("missing image", ["backup", "--store", "{store}", "image:{dir}/nope.raw"], 2, "does not exist"),
    ("image is a folder", ["backup", "--store", "{store}", "image:{dir}/plain"], 2, "is a folder"),
    ("unknown source kind", ["backup", "--store", "{store}", "vhdx:{web}"], 2, "not supported"),
    ("source without kind", ["backup", "--store", "{store}", "{web}"], 2, "KIND:WHAT"),
    ("bad vm name", ["backup", "--store", "{store}", "image:{web}", "--name", "a/b"], 2, "not allowed"),
    ("store does not exist", ["backup", "--store", "{dir}/nostore", "image:{web}"], 2, "does not exist"),
    ("not a store", ["versions", "--store", "{dir}/plain"], 2, "not an alike store"),
    ("no store given", ["versions"], 2, "ALIKE_STORE"),
    ("block size not allowed", ["init", "--store", "{dir}/s2", "--block-size", "100K"], 2, "power of two"),
    ("block size not a size", ["init", "--store", "{dir}/s3", "--block-size", "big"], 2, "not understood"),
    ("init over a store", ["init", "--store", "{store}"], 2, "already holds a store"),
    ("init in a non-empty folder", ["init", "--store", "{dir}"], 2, "not empty"),
    ("unknown vm", ["restore", "--store", "{store}", "nosuchvm", "--to", "{dir}/x.raw"], 2, "no VM named"),
    ("unknown version", ["restore", "--store", "{store}", "web@19990101", "--to", "{dir}/x.raw"], 2, "no version"),
    ("restore target exists", ["restore", "--store", "{store}", "web", "--to", "{dir}/exists.raw"], 2, "--force"),
    ("restore into missing folder", ["restore", "--store", "{store}", "web", "--to", "{dir}/no/dir/x.raw"], 2,
     "does not exist"),
    ("versions of unknown vm", ["versions", "--store", "{store}", "--vm", "ghost"], 2, "no VM named"),
    ("--name with two sources", ["backup", "--store", "{store}", "image:{web}", "image:{web}", "--name", "x"], 2,
     "--name"),
    ("two sources, one vm", ["backup", "--store", "{store}", "image:{web}", "image:{web}"], 2, "distinct name"),
    ("unreachable ray cluster", ["backup", "--store", "{store}", "image:{web}", "--address", "127.0.0.1:1"], 2,
     "cannot reach the Ray cluster"),
    ("ray address not host:port", ["verify", "--store", "{store}", "--address", "nonsense"], 2, "HOST:PORT"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(alike, filled, corpus, case):
    _, argv, code, words = case
    before = tree_digest(filled["store"])
    argv = [a.format(store=filled["store"], dir=filled["dir"], web=corpus["web"]) for a in argv]
    p = alike(*argv)
    assert p.returncode == code, p.stderr
    assert "Traceback" not in p.stderr
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    assert lines and lines[-1].startswith("alike: error:") and words in lines[-1], p.stderr
    assert len([l for l in lines if l.startswith("alike: error:")]) == 1
    assert tree_digest(filled["store"]) == before
    assert (filled["dir"] / "exists.raw").read_bytes() == b"keep me"


def test_damaged_config(alike, tmp_path):
    store = tmp_path / "s"
    alike.json("init", "--store", store)
    (store / "config.json").write_text('{"format": 1, "block_size": "x"}')
    p = alike("versions", "--store", store)
    assert p.returncode == 2 and "damaged" in p.stderr and "Traceback" not in p.stderr


@pytest.fixture
def small_fs(tmp_path):
    """A real small filesystem (tmpfs of 6 MiB) to fill up; needs root to mount."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.system(f"mount -t tmpfs -o size=6m tmpfs {mnt} 2>/dev/null") != 0:
        pytest.skip("cannot mount a tmpfs here (not root)")
    yield mnt
    os.system(f"umount {mnt}")


def test_store_disk_full_during_backup(alike, corpus, small_fs, tmp_path):
    store = small_fs / "ads"
    alike.json("init", "--store", store)
    p = alike("backup", "--store", store, f"image:{corpus['web']}", "--name", "web")
    assert p.returncode == 4, p.stderr
    assert "No space left" in p.stderr and "Traceback" not in p.stderr
    assert alike.json("versions", "--store", store)["versions"] == []
    # the read tasks still going when one hit the full disk ended before the backup did, each
    # removing the pack it was streaming: no temporary file holds the space (killed mid-write,
    # they would leave theirs, and the next backup would find the disk still full)
    assert [f for _, _, fs in os.walk(store) for f in fs if f.startswith(".tmp-")] == []
    # the packs the failed backup wrote before the disk filled belong to no version: gc frees
    # them (the error says so), and the store still works (another, smaller VM fits)
    assert "alike gc --grace 0" in p.stderr
    alike.json("gc", "--store", store, "--grace", "0")
    assert [f for _, _, fs in os.walk(store / "packs") for f in fs] == []
    small = tmp_path / "small.raw"
    with open(small, "wb") as f:
        f.write(os.urandom(1024 * 1024))
    alike.json("backup", "--store", store, f"image:{small}", "--name", "small")
    assert alike.json("verify", "--store", store)["ok"]


def test_restore_target_disk_full(alike, corpus, small_fs, tmp_path):
    store = tmp_path / "ads"
    alike.json("init", "--store", store)
    alike.json("backup", "--store", store, f"image:{corpus['web']}", "--name", "web")
    p = alike("restore", "--store", store, "web", "--to", small_fs / "web.raw")
    assert p.returncode == 4, p.stderr
    assert "No space left" in p.stderr and "Traceback" not in p.stderr
    assert os.listdir(small_fs) == []  # the partial file is gone
