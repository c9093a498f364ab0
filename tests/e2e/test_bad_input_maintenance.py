"""Bad input to the maintenance and restore commands (gc, prune, pin, verify, repair, files,
job retention) and bad store states: each case gets a clear error naming what is wrong, the
exit code it must have, no traceback, and leaves what is stored unchanged. (The backup and
restore cases are in test_bad_input.py.)"""
from __future__ import annotations

import json
import os
import shutil
import time

import pytest

from storage.locks import store_lock
from storage.store import Store
from tests.conftest import CLI, tree_digest


@pytest.fixture(scope="module")
def filled(tmp_path_factory, ray_address, corpus):
    d = tmp_path_factory.mktemp("badm")
    alike = CLI(ray_address, d)
    store = d / "ads"
    alike.json("init", "--store", store, "--block-size", "64K")
    v = alike.json("backup", "--store", store, f"image:{corpus['web']}", "--name", "web")
    alike.json("init", "--store", d / "otherkey", "--block-size", "64K")
    (d / "plain").mkdir()
    (d / "out").mkdir()
    # a name that `get /` would write: taken already
    root = alike.json("files", "--store", store, "web", "ls", "/")
    first = sorted(e["name"] for e in root["entries"])[0]
    (d / "out" / first).write_text("keep me")
    (d / "out" / "exists.txt").write_text("keep me")

    def job(name, text):
        (d / f"{name}.toml").write_text(f'name = "{name}"\nstore = "{store}"\n'
                                        f'sources = ["image:{corpus["web"]}"]\n' + text)

    job("badkey", "[retention.onsite]\nkeep_lastt = 2\n")
    job("negative", "[retention.onsite]\nkeep_last = -1\n")
    job("badtype", '[retention.offsite]\nkeep_daily = "x"\n')
    job("badvalidate", '[options]\nvalidate = "yes"\n')
    job("badsection", "[retention.sideways]\nkeep_last = 1\n")
    return {"dir": d, "store": store, "version": v["version"], "out": [first, "exists.txt"]}


CASES = [
    # (id, argv with {store} {dir} {v} placeholders, exit code, words the last line must hold)
    ("gc grace not a duration", ["gc", "--store", "{store}", "--grace", "soon"], 2, "not a duration"),
    ("gc repack above 1", ["gc", "--store", "{store}", "--repack-below", "1.5"], 2, "not a fraction"),
    ("gc wait negative", ["gc", "--store", "{store}", "--wait", "-1"], 2, "not a duration"),
    ("gc missing store", ["gc", "--store", "{dir}/nostore"], 2, "does not exist"),
    ("gc not a store", ["gc", "--store", "{dir}/plain"], 2, "not an alike store"),
    ("gc no store", ["gc"], 2, "ALIKE_STORE"),
    ("prune without a rule", ["prune", "--store", "{store}"], 2, "--keep"),
    ("prune negative", ["prune", "--store", "{store}", "--keep-last", "-1"], 2, "-1"),
    ("prune not a number", ["prune", "--store", "{store}", "--keep-daily", "x"], 2, "whole number"),
    ("prune unknown vm", ["prune", "--store", "{store}", "--vm", "ghost", "--keep-last", "1"], 2, "ghost"),
    ("prune not a store", ["prune", "--store", "{dir}/plain", "--keep-last", "1"], 2, "not an alike store"),
    ("pin unknown vm", ["pin", "ghost@x", "--store", "{store}"], 2, "ghost"),
    ("pin unknown version", ["pin", "web@19990101", "--store", "{store}"], 2, "19990101"),
    ("unpin unknown version", ["unpin", "web@19990101", "--store", "{store}"], 2, "19990101"),
    ("verify sample zero", ["verify", "--store", "{store}", "--sample", "0%"], 2, "sample"),
    ("verify sample over 100", ["verify", "--store", "{store}", "--sample", "150%"], 2, "sample"),
    ("verify sample not a number", ["verify", "--store", "{store}", "--sample", "lots"], 2, "sample"),
    ("verify older-than not an age", ["verify", "--store", "{store}", "--older-than", "soon"], 2, "soon"),
    ("repair from missing store", ["repair", "--store", "{store}", "--from", "{dir}/nostore"], 2, "does not exist"),
    ("repair from another key", ["repair", "--store", "{store}", "--from", "{dir}/otherkey"], 2, "key"),
    ("repair from itself", ["repair", "--store", "{store}", "--from", "{store}"], 2, "same"),
    ("repair without --from", ["repair", "--store", "{store}"], 2, "--from"),
    ("files unknown vm", ["files", "--store", "{store}", "ghost", "ls"], 2, "ghost"),
    ("files unknown version", ["files", "--store", "{store}", "web@19990101", "ls"], 2, "19990101"),
    ("files missing path", ["files", "--store", "{store}", "web", "ls", "/no/such/dir"], 2, "/no/such/dir"),
    ("files disk out of range", ["files", "--store", "{store}", "web", "ls", "/", "--disk", "5"], 2, "disk"),
    ("files partition out of range", ["files", "--store", "{store}", "web", "ls", "/", "--partition", "9"], 2,
     "partition"),
    ("files target exists", ["files", "--store", "{store}", "web", "get", "/", "--to", "{dir}/out"], 2, "--force"),
    ("job retention unknown key", ["job", "run", "{dir}/badkey.toml"], 2, "keep_lastt"),
    ("job retention negative", ["job", "run", "{dir}/negative.toml"], 2, "keep_last"),
    ("job retention wrong type", ["job", "run", "{dir}/badtype.toml"], 2, "keep_daily"),
    ("job validate wrong type", ["job", "run", "{dir}/badvalidate.toml"], 2, "validate"),
    ("job retention unknown table", ["job", "run", "{dir}/badsection.toml"], 2, "sideways"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(alike, filled, case):
    _, argv, code, words = case
    before = tree_digest(filled["store"])
    argv = [a.format(store=filled["store"], dir=filled["dir"], v=filled["version"]) for a in argv]
    p = alike(*argv)
    assert p.returncode == code, p.stderr
    assert "Traceback" not in p.stderr
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    assert lines and lines[-1].startswith("alike") and "error:" in lines[-1] and words in lines[-1], p.stderr
    assert len([l for l in lines if "error:" in l]) == 1
    assert tree_digest(filled["store"]) == before
    assert sorted(p.name for p in (filled["dir"] / "out").iterdir()) == sorted(filled["out"])


def _copy(filled, tmp_path):
    dst = tmp_path / "ads"
    shutil.copytree(filled["store"], dst)
    return dst


def _one_error(p, code, words):
    assert p.returncode == code, p.stderr
    assert "Traceback" not in p.stderr
    errs = [l for l in p.stderr.splitlines() if "error:" in l]
    assert len(errs) == 1 and words in errs[0], p.stderr


def test_state_gc_while_gc_runs(alike, filled, tmp_path):
    store = _copy(filled, tmp_path)
    lock = store_lock(Store.open(str(store)).backend, "maintenance", "repair")
    try:
        before = tree_digest(store)
        _one_error(alike("gc", "--store", store), 2, "another repair")
        assert tree_digest(store) == before
    finally:
        lock.release()


def test_state_damaged_gc_record(alike, filled, tmp_path):
    store = _copy(filled, tmp_path)
    (store / "gc").mkdir()
    (store / "gc" / "20260101-000000-deadbeef.json").write_text("{not json")
    _one_error(alike("gc", "--store", store), 3, "gc record")  # damaged data: repair heals it
    assert (store / "gc" / "20260101-000000-deadbeef.json").exists()


def test_state_damaged_lock_counts_until_stale(alike, filled, tmp_path, corpus):
    """A lock object that fails its check (puts are atomic: only damage tears one) stands for a
    writer that cannot be named: verify names it, and it counts as live until the object is older
    than the stale age; then whoever finds it breaks it, with a message, and gc goes on."""
    store = _copy(filled, tmp_path)
    (store / "locks").mkdir(exist_ok=True)
    torn = store / "locks" / "writer-torn.json"
    torn.write_text('{"id": "wri')
    p = alike("verify", "--store", store, "--json")
    assert p.returncode == 3 and "locks/writer-torn.json" in json.loads(p.stdout)["damaged_objects"], p.stdout
    old = time.time() - 3600
    os.utime(torn, (old, old))
    p = alike("gc", "--store", store, "--grace", "0", "--json")
    assert p.returncode == 0, p.stderr
    assert "broke the stale lock" in p.stderr and "damaged" in p.stderr, p.stderr
    assert json.loads(p.stdout)["live_blocks"] > 0 and not torn.exists()


def test_state_damaged_version_json(alike, filled, tmp_path):
    store = _copy(filled, tmp_path)
    vj = store / "versions" / "web" / filled["version"] / "version.json"
    vj.write_text("{torn")
    before = tree_digest(store)
    _one_error(alike("restore", "--store", store, "web", "--to", tmp_path / "x.raw"), 3, "version.json")
    assert not (tmp_path / "x.raw").exists()
    # gc must not take a version it cannot read for one with no blocks: it stops
    p = alike("gc", "--store", store, "--grace", "0")
    _one_error(p, 3, "version.json")
    assert tree_digest(store) == before


def test_state_damaged_manifest_stops_gc(alike, filled, tmp_path):
    store = _copy(filled, tmp_path)
    m = next((store / "versions" / "web" / filled["version"]).glob("disk-*.parquet"))
    m.write_bytes(m.read_bytes()[:100])
    before = tree_digest(store)
    _one_error(alike("gc", "--store", store, "--grace", "0"), 3, "manifest")
    assert tree_digest(store) == before


def test_state_damaged_index_segment(alike, filled, tmp_path):
    store = _copy(filled, tmp_path)
    seg = next((store / "index").rglob("*.parquet"))
    seg.write_bytes(b"PAR1 torn")
    before = tree_digest(store)
    _one_error(alike("restore", "--store", store, "web", "--to", tmp_path / "x.raw"), 3, "index segment")
    _one_error(alike("gc", "--store", store, "--grace", "0"), 3, "index segment")
    assert tree_digest(store) == before
    assert not (tmp_path / "x.raw").exists()


def test_state_missing_config(alike, filled, tmp_path):
    store = _copy(filled, tmp_path)
    (store / "config.json").unlink()
    for argv in (["gc"], ["prune", "--keep-last", "1"], ["verify"]):
        _one_error(alike(*argv, "--store", store), 2, "not an alike store")
