"""Garbage collection (pipelines/gc.py): space comes back, nothing used is ever lost, a gc
cut anywhere leaves a valid store that the next gc finishes, and a backup that deduplicated
against a block gc condemned keeps that block."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from tests.matrix import cases

from storage.locks import store_lock
from storage.store import Store
from tests import images
from tests.conftest import CLI


def same(a, b) -> bool:
    return subprocess.run(["cmp", "-s", str(a), str(b)]).returncode == 0


def pack_bytes(store) -> int:
    return sum(s for s, _ in Store.open(str(store)).backend.stat_all("packs/").values())


@pytest.fixture(scope="module")
def prepared(ray_address, corpus, tmp_path_factory):
    """A store with garbage of every kind: web has two versions (the first will be deleted:
    its blocks that day 2 rewrote are dead, the rest live), db will be deleted whole (dead
    packs), a backup killed before its index segments (packs no segment names) and one
    killed before its version.json (indexed dead packs and a folder without version.json).
    -> (store path, {vm@version: source image}, the version ids)."""
    tmp = tmp_path_factory.mktemp("gc")
    alike = CLI(ray_address, tmp)
    store = tmp / "ads"
    alike.json("init", "--store", store, "--block-size", "64K")
    v1 = alike.json("backup", "--store", store, f"image:{corpus['web']}", "--name", "web")
    v2 = alike.json("backup", "--store", store, f"image:{corpus['web_day2']}", "--name", "web")
    db = alike.json("backup", "--store", store, f"image:{corpus['db']}", "--name", "db")
    for n, point in enumerate(("before-segments", "before-version")):
        img = images.random_image(tmp / f"crashed{n}.raw", 3)
        p = alike("backup", "--store", store, f"image:{img}", "--name", "crashed", env={"ALIKE_CRASH_AT": point})
        assert p.returncode != 0
    st = Store.open(str(store))
    saved = tmp / "db-v1"
    shutil.copytree(store / "versions" / "db" / db["version"], saved)
    st.delete_version("web", v1["version"])
    st.delete_version("db", db["version"])
    assert [v for _, v in st.list_versions()] == [v2["version"]]
    return store, {f"web@{v2['version']}": corpus["web_day2"]}, {"db": db["version"], "saved": saved,
                                                                  "db_raw": corpus["db_raw"]}


def copy_store(prepared, tmp_path):
    """A copy of the prepared store, its objects dated two hours back (gc spares what is
    younger than the oldest running writer, less a minute for clocks that differ)."""
    dst = tmp_path / "ads"
    shutil.copytree(prepared[0], dst)
    old = time.time() - 7200
    for root, _, files in os.walk(dst):
        for f in files:
            os.utime(os.path.join(root, f), (old, old))
    return dst


def check_whole(store, expect: dict, tmp_path, ray_address) -> None:
    """verify finds nothing wrong and every version restores byte-identical."""
    from pipelines.restore import run_restore
    from pipelines.verify import run_verify

    rep = run_verify(str(store))
    assert rep["ok"], rep
    for n, (ref, src) in enumerate(expect.items()):
        vm, v = ref.split("@")
        out = tmp_path / f"check-{n}-{time.monotonic_ns()}.raw"
        run_restore(str(store), vm, v, [str(out)])
        assert same(out, src), ref
        out.unlink()


def test_gc_reclaims_dead_and_sparse_packs_and_leftovers(alike, prepared, tmp_path, ray_address):
    store = copy_store(prepared, tmp_path)
    before = pack_bytes(store)
    from tests.conftest import tree_digest

    digest = tree_digest(store)
    dry = alike.json("gc", "--store", store, "--grace", "0", "--repack-below", "0.99", "--dry-run")
    assert tree_digest(store) == digest, "a dry run changed the store"
    assert dry["packs_deleted"] >= 3 and dry["orphan_packs"] >= 1 and dry["orphan_version_folders"] == 1

    # a grace period longer than the store's age protects everything
    kept = alike.json("gc", "--store", store, "--grace", "3h")
    assert kept["packs_deleted"] == 0 and kept["packs_repacked"] == 0
    assert pack_bytes(store) == before

    rep = alike.json("gc", "--store", store, "--grace", "0", "--repack-below", "0.99")
    assert rep["packs_deleted"] == dry["packs_deleted"] and rep["packs_repacked"] == dry["packs_repacked"]
    assert rep["packs_repacked"] >= 1 and rep["blocks_repacked"] >= 1
    after = pack_bytes(store)
    # what went, less what was copied again (plus the new packs' footers: 48 bytes a block)
    assert after <= before - rep["bytes_deleted"] + rep["bytes_repacked"] + 48 * rep["blocks_repacked"] + 4096
    assert after < 0.75 * before
    assert not list(Store.open(str(store)).backend.list("gc/"))
    assert not (store / "versions" / "crashed").exists() or not any(
        f for _, _, fs in os.walk(store / "versions" / "crashed") for f in fs)
    check_whole(store, prepared[1], tmp_path, ray_address)

    again = alike.json("gc", "--store", store, "--grace", "0", "--repack-below", "0.99")
    assert again["packs_deleted"] == 0 and again["packs_repacked"] == 0
    # every block left is used, and the stored size is what is used
    stats = alike.json("stats", "--store", store)
    assert stats["unique_blocks"] == again["live_blocks"]


def test_backup_that_deduplicated_against_a_condemned_block_keeps_it(alike, prepared, tmp_path, ray_address):
    """The race gc must survive: a backup registered before gc's index rewrite finds db's old
    blocks in the index, and commits a version using them after gc condemned their packs.
    The backup is played by the test (a writer lock, then the commit of a version whose
    manifests use those blocks: the deleted db version, saved), so that the order is certain."""
    store = copy_store(prepared, tmp_path)
    st = Store.open(str(store))
    lock = store_lock(st.backend, "writer", "backup")
    e = dict(os.environ, RAY_ADDRESS=ray_address)
    gc = subprocess.Popen([sys.executable, "-m", "alike_ray.cli", "gc", "--store", str(store), "--grace", "0", "--repack-below", "0.99",
                           "--wait", "120", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=e)
    try:
        deadline = time.time() + 60
        while not list(st.backend.list("gc/")):  # condemned, now waiting for our writer
            assert gc.poll() is None, gc.communicate()
            assert time.time() < deadline
            time.sleep(0.2)
        while not json.loads(st.backend.get(next(k for k in st.backend.list("gc/") if k.endswith(".json")))).get("indexed"):
            time.sleep(0.2)
        v1 = prepared[2]["db"]
        dst = store / "versions" / "db" / v1
        dst.mkdir(parents=True, exist_ok=True)
        names = sorted(os.listdir(prepared[2]["saved"]), key=lambda f: f == "version.json")  # commit order
        for f in names:
            shutil.copy(prepared[2]["saved"] / f, dst / f)
        lock.check()
    finally:
        lock.release()
    outs, errs = gc.communicate(timeout=120)
    assert gc.returncode == 0, errs
    rep = json.loads(outs)
    assert rep["packs_rescued"] >= 1
    expect = dict(prepared[1], **{f"db@{v1}": prepared[2]["db_raw"]})
    check_whole(store, expect, tmp_path, ray_address)


def test_gc_waits_for_writers_then_leaves_the_work_to_the_next(alike, prepared, tmp_path, ray_address):
    store = copy_store(prepared, tmp_path)
    st = Store.open(str(store))
    lock = store_lock(st.backend, "writer", "backup")
    try:
        p = alike("gc", "--store", store, "--grace", "0", "--wait", "2")
        assert p.returncode == 1 and "run `alike gc` again later" in p.stderr and "Traceback" not in p.stderr
        assert len(p.stderr.strip().splitlines()) == 1
        assert any(k.endswith(".json") for k in st.backend.list("gc/"))
        check_whole(store, prepared[1], tmp_path, ray_address)
        # a second gc meanwhile is refused at once, naming the first? no: the first ended; this one
        # also has to wait for our writer
    finally:
        lock.release()
    rep = alike.json("gc", "--store", store, "--grace", "0")
    assert rep["finished_earlier_gc"] == 1 and rep["packs_deleted"] >= 3
    assert not list(st.backend.list("gc/"))
    check_whole(store, prepared[1], tmp_path, ray_address)


def test_second_gc_is_refused_and_stale_lock_is_broken(alike, prepared, tmp_path):
    store = copy_store(prepared, tmp_path)
    st = Store.open(str(store))
    lock = store_lock(st.backend, "maintenance", "gc")
    try:
        p = alike("gc", "--store", store, "--grace", "0")
        assert p.returncode == 2 and "another gc" in p.stderr and f"pid {os.getpid()}" in p.stderr
    finally:
        lock.release()
    # a lock left by a process killed with -9 is broken, with a message
    child = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from storage.store import Store; from storage.locks import store_lock; "
        f"store_lock(Store.open({str(store)!r}).backend, 'maintenance', 'gc'); print('locked', flush=True); "
        "time.sleep(600)")], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "locked"
    child.kill()
    child.wait()
    p = alike("gc", "--store", store, "--grace", "0", "--json")
    assert p.returncode == 0, p.stderr
    assert "broke the stale lock of gc" in p.stderr and "its process is gone" in p.stderr


GC_POINTS = (["gc-after-mark", "gc-after-plan", "gc-repack-pack", "gc-after-repack", "gc-after-record"]
             + [f"gc-index-shard:{n}" for n in (1, 2, 3, 4, 6, 8, 10, 12, 14, 16)]
             + ["gc-after-index", "gc-after-condemn", "gc-orphan-folder", "gc-after-wait", "gc-after-rescue",
                "gc-delete-pack:1", "gc-delete-pack:2", "gc-delete-pack:3"])


GC_RESUMED = [f"{p}#resume" for p in ("gc-after-record", "gc-index-shard:4", "gc-delete-pack:2", "gc-after-wait",
                                       "gc-after-rescue")]
CI_GC = {"gc-after-mark", "gc-repack-pack", "gc-after-record", "gc-index-shard:4", "gc-after-index",
         "gc-after-condemn", "gc-after-wait", "gc-after-rescue", "gc-delete-pack:2", "gc-after-record#resume",
         "gc-delete-pack:2#resume"}


@pytest.mark.parametrize("point", cases(GC_POINTS + GC_RESUMED, CI_GC))
def test_gc_killed_anywhere(alike, prepared, tmp_path, ray_address, point):
    """kill -9 of gc at a point (the `#resume` cases: then killed again at the same point of
    the next gc's finishing of the first one); the store stays whole and the next gc finishes."""
    store = copy_store(prepared, tmp_path)
    before = pack_bytes(store)
    crash = point.split("#")[0]
    p = alike("gc", "--store", store, "--grace", "0", "--repack-below", "0.99", env={"ALIKE_CRASH_AT": crash})
    assert p.returncode == -9, (p.returncode, p.stderr)
    check_whole(store, prepared[1], tmp_path, ray_address)
    if point.endswith("#resume"):
        p = alike("gc", "--store", store, "--grace", "0", "--repack-below", "0.99", env={"ALIKE_CRASH_AT": crash})
        assert p.returncode in (-9, 0), p.stderr
        check_whole(store, prepared[1], tmp_path, ray_address)
    rep = alike.json("gc", "--store", store, "--grace", "0", "--repack-below", "0.99")
    assert not list(Store.open(str(store)).backend.list("gc/"))
    check_whole(store, prepared[1], tmp_path, ray_address)
    again = alike.json("gc", "--store", store, "--grace", "0", "--repack-below", "0.99")
    assert again["packs_deleted"] == 0 and again["packs_repacked"] == 0, (rep, again)
    assert pack_bytes(store) < 0.75 * before


def test_locks_of_other_hosts_stale_by_heartbeat_alive_while_beating(alike, prepared, tmp_path):
    """A lock from another host cannot be checked by pid: it is stale once its heartbeat is older
    than $ALIKE_LOCK_STALE, and then broken with a message; while it beats it holds."""
    store = copy_store(prepared, tmp_path)
    locks = store / "locks"
    locks.mkdir(exist_ok=True)
    now = time.time()

    def lock(name, kind, op, beat):
        (locks / f"{name}.json").write_text(json.dumps({
            "id": name, "kind": kind, "op": op, "host": "another-host.example", "pid": 4242,
            "started": now - 3600, "heartbeat": beat}))

    lock("maintenance-old", "maintenance", "repair", now - 900)   # stopped beating 15 min ago
    lock("writer-beating", "writer", "backup", now)                 # a backup on another host
    p = alike("gc", "--store", store, "--grace", "0", "--wait", "3", env={"ALIKE_LOCK_STALE": "600"})
    # the stale repair lock is broken, with a message; the live writer makes gc wait, then give up
    assert "broke the stale lock of repair (pid 4242 on another-host.example" in p.stderr
    assert "no heartbeat for" in p.stderr
    assert p.returncode == 1 and "run `alike gc` again later" in p.stderr and "Traceback" not in p.stderr
    assert not (locks / "maintenance-old.json").exists() and (locks / "writer-beating.json").exists()
    # a live maintenance lock of another host refuses a gc at once, naming it
    lock("maintenance-live", "maintenance", "repair", time.time())
    p = alike("gc", "--store", store, "--grace", "0", env={"ALIKE_LOCK_STALE": "600"})
    assert p.returncode == 2 and "another repair (pid 4242 on another-host.example" in p.stderr
    # once the writer is gone (its lock stale too), the next gc finishes the work left
    (locks / "maintenance-live.json").unlink()
    lock("writer-beating", "writer", "backup", now - 900)
    rep = alike.json("gc", "--store", store, "--grace", "0", env={"ALIKE_LOCK_STALE": "600"})
    assert rep["finished_earlier_gc"] == 1 and rep["packs_deleted"] >= 1
    assert not any(locks.iterdir())
