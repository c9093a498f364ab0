"""Garbage collection: reclaim the space of blocks that no version uses, while backups run.

Safety rests on one rule: a block that a version committed before, during or after a gc refers
to is never deleted. Writers (backup, vault, prune) register a lock before they read the index
or earlier versions (storage/locks.py); gc does not stop them. It works in phases:

1. mark: the distinct hashes of every committed version (Arrow manifests, vectorised numpy):
   32 bytes per live block, whatever the bytes stored.
2. plan: from the index (hash -> pack, offset, length) and one listing of the packs (size,
   time): packs older than the cutoff with no live block are condemned; packs whose live part
   is below `repack_below` of their size are repacked; packs that no index segment names
   (left by a crash before the index was written) are condemned. The cutoff is now minus the
   grace period, and never later than the start of the oldest live writer, whose packs may
   not be indexed yet. Newer packs are not touched.
3. repack: the live blocks of those packs, each checked against its hash, are copied as they
   are stored (no recompression) into new packs. Only these packs are downloaded; on S3
   nothing else is read but the index, the manifests and one listing.
4. condemn: gc/<id>.json records the condemned packs, their index entries, the versions
   marked and the writers registered; then the index is rewritten without the condemned
   packs' entries (and with the repacked copies). From here no new writer can dedup against a
   condemned block.
5. sweep: wait until every writer registered at condemnation has gone (it may have
   deduplicated against a condemned block before the rewrite); mark again, now with the
   versions committed since step 1; a condemned pack holding a block they use that no index
   entry names any more is rescued (indexed again); the others are deleted, then gc/<id>.json. When the wait times
   out the record stays, and the next gc finishes it first.

Also removed, when older than the cutoff: version folders that never got their version.json
(a crashed backup or prune) and, on a directory store, `.tmp-*` files of interrupted puts.
A gc cut anywhere leaves a valid store: each step is either not yet visible or repeated.
"""
from __future__ import annotations

import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from storage.errors import DamagedData, ObjectMissing, StoreError
from storage.index import h32
from storage.locks import live_locks, store_lock
from storage.objects import digest
from storage.pack import pack_key
from storage.store import PackSink, Store

from .faults import crash_point


class GCWaitTimeout(StoreError):
    """{detail}"""

    exit_code = 1


def _mark(store: Store, versions: list[tuple[str, str]], threads: int = 8) -> tuple[np.ndarray, list[str]]:
    """-> sorted distinct hashes of the blobs `versions` use (whole blocks, bases and deltas). A version whose manifests cannot be read
    stops the gc (its blocks would look unused), unless it was pruned meanwhile."""
    def one(vv):
        vm, v = vv
        try:
            meta = store.read_version(vm, v)
            return [store.read_manifest(vm, v, d).blobs() for d in meta["disks"]]
        except ObjectMissing:
            if not store.backend.exists(f"versions/{vm}/{v}/version.json"):
                return []  # pruned while we read: its blocks are free to go
            raise

    parts = [np.zeros(0, "S32")]
    with ThreadPoolExecutor(threads) as pool:
        for hs in pool.map(one, versions):
            for h in hs:
                parts.append(np.unique(h))
    return np.unique(np.concatenate(parts))


def _condemned_records(store: Store) -> list[str]:
    return [k for k in store.backend.list("gc/") if k.endswith(".json")]


def run_gc(store_spec, grace: float = 3600.0, repack_below: float = 0.5, dry_run: bool = False,
           wait: float = 600.0, on_progress=None, warn=None) -> dict:
    """Collect garbage on a store. `on_progress(phase, done, total)`. -> a report dict."""
    store = Store.open(store_spec)
    lock = store_lock(store.backend, "maintenance", "gc", **({"warn": warn} if warn else {}))
    try:
        return _run(store, grace, repack_below, dry_run, wait, on_progress, lock)
    finally:
        lock.release()


def _run(store: Store, grace, repack_below, dry_run, wait, on_progress, lock) -> dict:
    t0 = time.monotonic()
    progress = on_progress or (lambda *a: None)
    report = {"store": store.url, "dry_run": dry_run, "packs_deleted": 0, "bytes_deleted": 0,
              "packs_repacked": 0, "blocks_repacked": 0, "bytes_repacked": 0, "packs_rescued": 0,
              "orphan_packs": 0, "orphan_version_folders": 0, "temp_files": 0,
              "finished_earlier_gc": 0, "live_blocks": 0, "packs_kept": 0, "bytes_kept": 0}
    # an earlier gc that was cut short or timed out: finish its sweep first
    if not dry_run:
        for key in _condemned_records(store):
            _sweep(store, key, wait, report, progress, resumed=True)
            report["finished_earlier_gc"] += 1

    # 1. mark
    progress("mark", 0, 1)
    versions = store.list_versions()
    live = _mark(store, versions)
    report["live_blocks"] = int(len(live))
    report["versions"] = len(versions)
    crash_point("gc-after-mark")
    progress("mark", 1, 1)

    # 2. plan
    writers = live_locks(store.backend, "writer")
    now = time.time()
    cutoff = min([now - grace] + [float(w["started"]) - 60 for w in writers])
    packs_stat = {k.rsplit("/", 1)[1]: v for k, v in store.backend.stat_all("packs/").items()}
    seg_keys, h, p, o, n = store.read_index()
    names, codes = np.unique(p, return_inverse=True) if len(p) else (np.zeros(0, "U32"), np.zeros(0, np.int64))
    del p
    is_live = np.isin(h, live)
    live_bytes = np.bincount(codes, weights=np.where(is_live, n, 0).astype(np.float64), minlength=len(names))
    old = np.array([packs_stat.get(x, (0, now))[1] < cutoff for x in names], dtype=bool)
    exists = np.array([x in packs_stat for x in names], dtype=bool)
    size = np.array([packs_stat.get(x, (0, 0))[0] for x in names], dtype=np.float64)
    dead = old & exists & (live_bytes == 0)
    sparse = old & exists & (live_bytes > 0) & (live_bytes < repack_below * np.maximum(size, 1))
    indexed = set(names.tolist())
    orphans = [x for x, (sz, mt) in packs_stat.items() if x not in indexed and mt < cutoff]
    report["orphan_packs"] = len(orphans)
    kept = exists & ~dead & ~sparse
    report.update(_spared_by_grace(names, exists, live_bytes, packs_stat, indexed, writers, cutoff, now, grace))
    report["packs_kept"] = int(kept.sum())
    report["bytes_kept"] = int(size[kept].sum())
    crash_point("gc-after-plan")

    # live blocks of sparse packs that no kept pack also holds must be copied
    in_kept = np.zeros(len(h), bool)
    kept_codes = np.flatnonzero((kept | ~old) & exists)
    in_kept_pack = np.isin(codes, kept_codes)
    have_elsewhere = np.isin(h, h[in_kept_pack & is_live])
    sparse_codes = np.flatnonzero(sparse)
    to_copy = np.isin(codes, sparse_codes) & is_live & ~have_elsewhere
    # one copy per hash
    ci = np.flatnonzero(to_copy)
    if len(ci):
        _, first = np.unique(h[ci], return_index=True)
        ci = ci[np.sort(first)]
    del in_kept, in_kept_pack, have_elsewhere
    condemned = [str(x) for x in names[dead | sparse]] + orphans
    sizes = {x: int(packs_stat[x][0]) for x in condemned}
    if dry_run:
        report["packs_deleted"] = len(condemned)
        report["bytes_deleted"] = int(sum(sizes.values()))
    report["packs_repacked"] = int(len(sparse_codes))
    report["blocks_repacked"] = int(len(ci))
    report["bytes_repacked"] = int(n[ci].sum()) if len(ci) else 0
    orphan_folders, temps = _other_leftovers(store, cutoff)
    report["orphan_version_folders"] = len(orphan_folders)
    report["temp_files"] = len(temps)
    if dry_run:
        report["seconds"] = round(time.monotonic() - t0, 3)
        return report

    # 3. repack
    added = _repack(store, names, codes, h, o, n, ci, progress)
    crash_point("gc-after-repack")

    # 4. condemn: the record first, so that a cut from here on is finished by the next gc
    cmask = np.isin(codes, np.flatnonzero(dead | sparse))
    rec = {
        "id": uuid.uuid4().hex, "created": time.time(), "packs": condemned, "sizes": sizes,
        "versions": [f"{vm}@{v}" for vm, v in versions],
        "writers": [w["id"] for w in writers + live_locks(store.backend, "reader")],
    }
    rec_key = f"gc/{time.strftime('%Y%m%d-%H%M%S')}-{rec['id'][:8]}.json"
    entries_key = rec_key[:-5] + ".entries.parquet"
    entries = _entries_bytes(h[cmask], names[codes[cmask]], o[cmask], n[cmask])
    store.backend.put(entries_key, entries)
    rec["entries_blake3"] = digest(entries)
    store.put_json(rec_key, rec)
    crash_point("gc-after-record")
    del h, o, n, codes
    store.rewrite_index(drop_packs=set(condemned), add=added,
                        on_progress=lambda d, t: (progress("index", d, t), crash_point("gc-index-shard")))
    crash_point("gc-after-index")
    # writers registered now may have read the index before the rewrite: the sweep waits for them
    rec["writers"] = sorted(set(rec["writers"]) | {w["id"] for w in live_locks(store.backend)
                                                   if w.get("kind") in ("writer", "reader")})
    rec["indexed"] = True
    store.put_json(rec_key, rec)
    crash_point("gc-after-condemn")

    for folder in orphan_folders:
        for key in list(store.backend.list(folder)):
            store.backend.delete(key)
        crash_point("gc-orphan-folder")
    for path in temps:
        try:
            os.unlink(path)
        except OSError:
            pass

    # 5. sweep
    _sweep(store, rec_key, wait, report, progress, resumed=False)
    report["seconds"] = round(time.monotonic() - t0, 3)
    return report


def read_gc_entries(store: Store, entries_key: str, rec: dict):
    """The index entries a gc record's condemned packs had, checked against the record."""
    from storage.index import segment_arrays
    from storage.objects import read_parquet

    t = read_parquet(store.backend.get(entries_key), f"gc entries {entries_key}", rec.get("entries_blake3"),
                     required=store.strict)
    return segment_arrays(t)


def _spared_by_grace(names, exists, live_bytes, packs_stat, indexed, writers, cutoff, now, grace) -> dict:
    """The unused packs (no live block, or named by no index segment) that are left alone only
    because they are younger than the grace period: what `--grace 0` would free now. Right
    after a prune or an interrupted backup every pack is that young, and "deleted 0 packs"
    alone would say there is nothing to reclaim. -> report fields: how many, their bytes, and
    when the first and the last of them pass the grace period."""
    floor = min([now] + [float(w["started"]) - 60 for w in writers])  # the cutoff with --grace 0
    unused = [str(x) for x in names[exists & (live_bytes == 0)]]
    unused += [x for x in packs_stat if x not in indexed]
    young = [x for x in unused if cutoff <= packs_stat[x][1] < floor]
    times = sorted(packs_stat[x][1] + grace for x in young)
    return {"grace_seconds": grace, "spared_packs": len(young),
            "spared_bytes": int(sum(packs_stat[x][0] for x in young)),
            "spared_reclaimable_from": times[0] if times else None,
            "spared_reclaimable_by": times[-1] if times else None}


def _entries_bytes(h, p, o, n) -> bytes:
    from storage.index import segment_bytes

    return segment_bytes(h, list(p), o, n)


def _other_leftovers(store: Store, cutoff: float) -> tuple[list[str], list[str]]:
    """Version folders without version.json, and .tmp- files, older than the cutoff."""
    folders: dict[str, float] = {}
    committed = set()
    for key, (_, mt) in store.backend.stat_all("versions/").items():
        parts = key.split("/")
        if len(parts) != 4:
            continue
        folder = "/".join(parts[:3]) + "/"
        if parts[3] == "version.json":
            committed.add(folder)
        folders[folder] = max(folders.get(folder, 0), mt)
    orphan = [f for f, mt in folders.items() if f not in committed and mt < cutoff]
    temps = []
    if hasattr(store.backend, "temp_files"):
        temps = [p for p, mt in store.backend.temp_files() if mt < cutoff]
    return sorted(orphan), temps


def _repack(store: Store, names, codes, h, o, n, ci, progress):
    """Copy the blocks `ci` (indices into the index arrays) into new packs, each checked
    against its hash. -> the new entries (hashes, packs, offsets, lengths), written to no
    segment yet: the index rewrite adds them."""
    if not len(ci):
        return None
    order = ci[np.lexsort((o[ci], codes[ci]))]
    sink = PackSink(store, after_put=lambda: crash_point("gc-repack-pack"))
    groups = np.split(order, np.flatnonzero(np.diff(codes[order])) + 1)
    for gi, g in enumerate(groups):
        pack = str(names[codes[g[0]]])
        data = store.backend.get(pack_key(pack))
        for i in g:
            stored = data[int(o[i]):int(o[i]) + int(n[i])]
            store.codec.decode(stored, h32(h[i]), where=f"in pack {pack} at offset {int(o[i])} (gc repack)")
            sink.add(h32(h[i]), stored)
        progress("repack", gi + 1, len(groups))
    return sink.entries()


def _sweep(store: Store, rec_key: str, wait: float, report: dict, progress, resumed: bool) -> None:
    try:
        rec = store.get_json(rec_key)
    except ObjectMissing:
        return
    except DamagedData:
        raise DamagedData(f"gc record {rec_key} fails its check, so the gc it records cannot be finished; "
                          "`alike repair --from OTHER` indexes again the packs it condemned and removes it") from None
    entries_key = rec_key[:-5] + ".entries.parquet"
    waiting = set(rec["writers"])
    if resumed:
        # the gc that wrote the record was cut, maybe before or during its index rewrite:
        # do it again, and wait for everybody registered now as well
        store.rewrite_index(drop_packs=set(rec["packs"]))
        waiting |= {w["id"] for w in live_locks(store.backend) if w.get("kind") in ("writer", "reader")}
    # wait for the writers (and readers) that may have seen the index before it was rewritten
    deadline = time.monotonic() + wait
    while True:
        alive = {w["id"] for w in live_locks(store.backend) if w.get("kind") in ("writer", "reader")} & waiting
        if not alive:
            break
        if time.monotonic() > deadline:
            raise GCWaitTimeout(
                f"{len(alive)} backup(s) or other writer(s) that started before this gc are still running, "
                f"so {len(rec['packs'])} condemned pack(s) are kept for now: run `alike gc` again later to "
                "delete them (nothing was lost; the store is valid)")
        progress("wait for writers", 0, len(alive))
        time.sleep(1.0)
    crash_point("gc-after-wait")
    # every block a committed version uses (those committed since the mark too) must keep an
    # index entry in a pack that stays: a condemned pack holding one that has none is rescued
    rescue: set[str] = set()
    if rec["packs"]:
        used = _mark(store, store.list_versions())
        _, ih, _, _, _ = store.read_index()
        need = used[~np.isin(used, ih)]
        del ih, used
        if len(need):
            try:
                ch, (pnames, pidx), co, cn = read_gc_entries(store, entries_key, rec)
            except ObjectMissing:  # deleted with its packs by a sweep cut just after
                ch, pnames, pidx, co, cn = np.zeros(0, "S32"), [], np.zeros(0, int), [], []
            m = np.isin(ch, need)
            if m.any():
                pk = np.asarray(pnames, dtype="U32")[pidx]
                rescue = set(pk[m].tolist()) & set(rec["packs"])
                keep = np.isin(pk, list(rescue))
                store.rewrite_index(add=(ch[keep], pk[keep], co[keep], cn[keep]))
    report["packs_rescued"] += len(rescue)
    crash_point("gc-after-rescue")
    doomed = [x for x in rec["packs"] if x not in rescue]
    report["packs_deleted"] += len(doomed)
    report["bytes_deleted"] += int(sum(rec.get("sizes", {}).get(x, 0) for x in doomed))
    for i, pack in enumerate(doomed):
        store.backend.delete(pack_key(pack))
        crash_point("gc-delete-pack")
        progress("delete", i + 1, len(doomed))
    store.backend.delete(entries_key)
    store.backend.delete(rec_key)
