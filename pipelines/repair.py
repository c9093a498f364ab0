"""Repair: heal a store's damaged or missing blocks, manifests and version.json files from
another store that shares its hash key (an ADS from its ODS, or an ODS from its ADS).

Under the store's exclusive maintenance lock (storage/locks.py):
1. Metadata. For each version the other store also holds: a version.json or manifest that is
   missing or does not parse here, or that disagrees with its version.json, is replaced by the
   other store's copy when that copy is intact (parses, agrees with its version.json, and
   names only blocks the other store indexes). A local copy that is intact is never replaced.
2. Verification: the full `pipelines.verify` scan, which also finds index segments that do
   not parse and packs with a damaged footer or truncated.
3. Blocks. Every damaged block, every block in no index segment and every block of a missing
   pack is fetched by its hash from the other store; the intact blocks of a pack whose footer
   or tail is damaged are moved too (from the other store, else from the pack itself). Each is
   decoded and checked against its hash before it is written into new packs here
   (blockcopy.copy_blocks and storage.store.PackSink, shared with vault).
4. Index. Damaged segments are deleted (nothing can read them; their blocks were just
   re-indexed), then `Store.rewrite_index` drops the entries of the damaged copies and of the
   missing or damaged packs and adds the new copies.

Commit order as everywhere: packs -> index -> manifests were already fixed in step 1, but only
with intact copies, and a version whose blocks are still missing is reported, not hidden. A
crash leaves new packs that nothing references (gc removes them) and a repair can simply run
again. A damaged pack file itself stays where it is: no index entry points at its damaged
blocks any more, and `alike gc` removes it once nothing references it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import ray

from storage.errors import ObjectMissing, StoreError
from storage.index import h32
from storage.locks import store_lock
from storage.objects import digest
from storage.store import Store

from .blockcopy import copy_blocks, run_copy_tasks
from .faults import crash_point
from .verify import load_index, scan_store


class RepairRefused(StoreError):
    """Cannot repair {detail}"""


class Unrepairable(StoreError):
    """{detail}"""

    exit_code = 3


class RepairFailed(StoreError):
    """Repair failed: {detail}"""

    exit_code = 1


def open_pair(store_spec, other_spec) -> tuple[Store, Store]:
    store, other = Store.open(store_spec), Store.open(other_spec)
    if store.config.get("store_id") == other.config.get("store_id"):
        raise RepairRefused(f"{store.url} from {other.url}: they are the same store; give its ADS or ODS with --from")
    kid, oid = store.config.get("hash_key_id"), other.config.get("hash_key_id")
    if not kid or kid != oid or store.config.get("hash_key") != other.config.get("hash_key"):
        raise RepairRefused(
            f"{store.url} from {other.url}: the stores have different hash keys ({kid} and {oid}), so they "
            "share no blocks. Repair from the store this one was vaulted to or from")
    if store.block_size != other.block_size:
        raise RepairRefused(f"{store.url} from {other.url}: block sizes differ ({store.block_size} and "
                            f"{other.block_size})")
    return store, other


UNINDEXED = "names blocks that no index segment holds"


# -- metadata ----------------------------------------------------------------------------------
def _meta(store: Store, vm, v) -> dict | None:
    """version.json of vm@v on `store` if it is intact (passes its check, lists disks), else None."""
    try:
        m = store.read_version(vm, v)
    except ObjectMissing:
        raise
    except StoreError:
        return None
    ok = isinstance(m.get("disks"), list) and all(isinstance(d, dict) and "manifest" in d for d in m["disks"])
    return m if ok else None


def _manifest_ok(store: Store, vm, v, d: dict, index=None) -> tuple[bool, np.ndarray | None, str]:
    """-> (intact?, its hashes, why not). Intact: its bytes pass the check that `d` records."""
    try:
        m = store.read_manifest(vm, v, d)
    except StoreError as e:
        return False, None, e.message
    blocks, hashes = m.blocks, m.blobs()  # patched blocks need their base and delta blobs
    if "blocks" in d and int(d["blocks"]) != len(blocks):
        return False, hashes, f"lists {len(blocks)} blocks, its version.json {d['blocks']}"
    if index is not None and len(hashes) and not index.lookup(hashes)[0].all():
        return False, hashes, UNINDEXED
    return True, hashes, ""


@dataclass
class Copy:
    """One metadata object to replace with the other store's copy: a manifest (`disk`: its entry
    in the version.json the version will have) or a version.json (`meta`)."""
    key: str
    why: str
    vm: str
    version: str
    disk: dict | None = None
    meta: dict | None = None


def plan_metadata(store: Store, other: Store, other_index, local_index) -> tuple[list, list, list, set]:
    """-> (copies [Copy], hashes the copied manifests use, unrepairable [(what, why)],
    (vm, version, disk name) whose manifest or version.json is replaced)."""
    copies, hashes, bad, replaced = [], [], [], set()
    theirs = set(other.list_versions())
    for vm, v in store.list_versions():
        base = f"versions/{vm}/{v}/"
        try:
            mine = _meta(store, vm, v)
        except ObjectMissing:
            continue  # pruned meanwhile
        other_meta = None
        if (vm, v) in theirs:
            try:
                other_meta = _meta(other, vm, v)
            except ObjectMissing:
                pass
        if mine is None:
            if other_meta is None:
                bad.append((f"{vm}@{v}", "version.json is damaged and the other store has no intact copy"))
                continue
            meta, from_other = other_meta, True
        else:
            meta, from_other = mine, False
        rewrite_meta = from_other
        for d in meta["disks"]:
            ok, _, why = _manifest_ok(store, vm, v, d, local_index)
            readable = ok or why == UNINDEXED  # then the blocks phase fetches what it lacks
            if ok:
                continue
            # the other store's copy, checked against its own version.json
            od = next((x for x in (other_meta or {}).get("disks", []) if x.get("manifest") == d["manifest"]), None)
            their_ok, their_h, their_why = (_manifest_ok(other, vm, v, od, other_index) if od is not None
                                            else (False, None, "the other store does not hold this version"))
            if not their_ok:
                if readable:
                    continue
                bad.append((f"{vm}@{v} disk {d.get('name')}", f"manifest {why}; the other store's: {their_why}"))
                continue
            copies.append(Copy(base + d["manifest"], f"manifest {why or 'differs from its version.json'}", vm, v, disk=od))
            replaced.add((vm, v, d.get("name")))
            hashes.append(their_h)
            if od.get("manifest_blake3") != d.get("manifest_blake3"):
                d["manifest_blake3"] = od.get("manifest_blake3")
                rewrite_meta = True  # our version.json must name the bytes it now has
        if rewrite_meta:
            copies.append(Copy(base + "version.json", "version.json damaged" if from_other else
                               "version.json names the replaced manifest's check", vm, v, meta=meta))
            replaced.add((vm, v, "version.json"))
    # manifests before version.json: a version never points at a manifest that is not there yet
    copies.sort(key=lambda c: c.meta is not None)
    return copies, hashes, bad, replaced


def apply_copy(store: Store, other: Store, c: Copy) -> None:
    if c.meta is None:
        store.backend.put(c.key, other.read_manifest_bytes(c.vm, c.version, c.disk))
        return
    meta = dict(c.meta, disks=[dict(d) for d in c.meta["disks"]])
    for d in meta["disks"]:  # a version of a format-1 store gains its checks
        if "manifest_blake3" not in d:
            d["manifest_blake3"] = digest(store.backend.get(f"versions/{c.vm}/{c.version}/{d['manifest']}"))
    store.commit_version(c.vm, c.version, meta)


# -- blocks --------------------------------------------------------------------------------------
@ray.remote(max_retries=3)
def fetch_blocks(src_spec, dst_spec, packs: np.ndarray, offs: np.ndarray, lens: np.ndarray, hashes: np.ndarray):
    """Copy blocks (sorted by source pack and offset) into new packs of the destination, each
    checked against its hash first. -> (entries (hashes, packs, offsets, lengths), damaged, bytes)."""
    src, dst = Store.open_cached(src_spec), Store.open_cached(dst_spec)
    crash_point("repair-task")
    entries, damaged, nbytes = copy_blocks(src, dst, packs, offs, lens, hashes)
    return (entries[0], list(entries[1]), entries[2], entries[3]), damaged, nbytes


def _copy(src_spec, dst_spec, packs, offs, lens, hashes, on_progress=None, done0=0, total=0):
    """Run fetch_blocks over sorted slices. -> (entries, damaged hashes, bytes)."""
    order = np.lexsort((offs, packs.astype(str)))
    packs, offs, lens, hashes = packs[order].astype(str), offs[order], lens[order], hashes[order]
    ents = [[], [], [], []]
    damaged, nbytes = [np.zeros(0, "S32")], 0
    done = done0

    def absorb(result):
        nonlocal nbytes, done
        (h, p, o, n), bad, b = result
        for lst, x, dt in zip(ents, (h, p, o, n), ("S32", "U32", np.uint64, np.uint64)):
            lst.append(np.asarray(x, dtype=dt))
        damaged.append(bad)
        nbytes += b
        done += len(h) + len(bad)
        if on_progress:
            on_progress(done, total)

    def died(why):
        return RepairFailed(
            f"a block copy task's worker died more often than it is retried ({why}); the index was not "
            "changed (new packs that nothing references yet are removed by `alike gc`): run the repair again")

    run_copy_tasks(fetch_blocks, src_spec, dst_spec, packs, offs, lens, hashes, absorb, died)
    entries = (np.concatenate(ents[0] + [np.zeros(0, "S32")]),
               np.concatenate(ents[1] + [np.zeros(0, "U32")]).astype("U32"),
               np.concatenate(ents[2] + [np.zeros(0, np.uint64)]),
               np.concatenate(ents[3] + [np.zeros(0, np.uint64)]))
    return entries, np.unique(np.concatenate(damaged)), nbytes


# -- the run ---------------------------------------------------------------------------------------
# -- the store's other objects ------------------------------------------------------------------
def heal_config(store_spec, other_spec, dry_run: bool) -> str | None:
    """When this store's config.json fails its check, write it again from the other store's:
    the same hash key, block size and compression (they are a vault pair), a new store id, once
    a sample of this store's own blocks is shown to hash right under that key. -> what was done,
    or None when config.json is intact."""
    from storage.backend import open_backend
    from storage.errors import DamagedData
    from storage.objects import seal_json
    from storage.pack import pack_key
    from storage.store import FORMAT

    try:
        Store.open(store_spec)
        return None
    except DamagedData as e:
        if "config.json" not in e.detail:
            raise
        why = e.detail
    other = Store.open(other_spec)
    backend = open_backend(store_spec)
    keep = ("block_size", "hash", "hash_key", "hash_key_id", "compression", "zstd_level", "encryption")
    cfg = {k: other.config[k] for k in keep if k in other.config}
    import datetime
    import uuid

    cfg.update(format=FORMAT, store_id=uuid.uuid4().hex, repaired_from=other.config.get("store_id"),
               created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    candidate = Store(backend, cfg)
    try:
        _, h, p, o, n = candidate.read_index()
    except StoreError:
        h = np.zeros(0, "S32")
    checked = 0
    for i in np.random.default_rng(0).permutation(len(h))[:16]:
        try:
            stored = backend.get_range(pack_key(str(p[i])), int(o[i]), int(n[i]))
            candidate.codec.decode(stored, h32(h[i]))
            checked += 1
        except StoreError:
            continue
    if not checked:
        raise Unrepairable(f"{why}, and none of this store's blocks could be checked against {other.url}'s "
                           "hash key: not rewritten (is --from this store's vault pair?)")
    if not dry_run:
        backend.put("config.json", seal_json(cfg))
    return f"{why}: written again from {other.url}'s (same hash key: {checked} block(s) of this store checked)"


def _reindex_unindexed_packs(store: Store) -> int:
    """Index again every block of the packs no index entry names (a damaged gc record's
    condemned packs, leftovers of cut backups), each checked against its hash: a later gc
    decides what they hold that no version uses. -> blocks indexed."""
    from storage.pack import pack_key, parse_footer

    _, _, ip, _, _ = store.read_index()
    indexed = set(ip.tolist())
    add = [[], [], [], []]
    for pack in store.list_packs():
        if pack in indexed:
            continue
        try:
            data = store.backend.get(pack_key(pack))
            footer = parse_footer(data, len(data), pack)
        except (StoreError, ValueError):
            continue  # unreadable: nothing of it can be indexed
        for e in footer:
            o, n = int(e["offset"]), int(e["length"])
            try:
                store.codec.decode(data[o:o + n], h32(e["hash"]))
            except StoreError:
                continue
            for lst, x in zip(add, (h32(e["hash"]), pack, o, n)):
                lst.append(x)
    if add[0]:
        store.rewrite_index(add=(np.array(add[0], "S32"), np.array(add[1], "U32"),
                                 np.array(add[2], np.uint64), np.array(add[3], np.uint64)))
    return len(add[0])


def heal_objects(store: Store, other: Store, damaged: list[str], dry_run: bool) -> list[dict]:
    """Heal the small objects verify found damaged. -> [{key, action}]:
    - a pin or job run: the other store's copy when it has an intact one; else a pin is made
      again without its note (the version stays pinned) and a run record is removed;
    - a validation record: removed (it only dates past checks; those packs are checked again);
    - a gc record or its entries: the packs it condemned are indexed again (each block checked),
      then both are removed: the next gc decides again, from the versions, what may go;
    - a lock: left; it counts as live until it is older than the stale age, then it is broken."""
    done = []
    gc_done = False
    for key in sorted(set(damaged)):
        if key.startswith("locks/"):
            done.append({"key": key, "action": "left: counted as a live lock until stale, then broken"})
            continue
        if key.startswith(("pins/", "jobs/")):
            try:
                obj = other.get_json(key)
                action = f"copied from {other.url}"
            except StoreError:
                obj = None
            if obj is None and key.startswith("pins/"):
                vm, version = key[len("pins/"):-len(".json")].split("/", 1)
                obj = {"vm": vm, "version": version, "note": "(note lost: the pin was damaged; pinned again by repair)"}
                action = "pinned again (its note was lost: the other store has no intact copy)"
            if not dry_run:
                store.put_json(key, obj) if obj is not None else store.backend.delete(key)
            done.append({"key": key, "action": action if obj is not None else
                         "removed (the other store has no intact copy of this run record)"})
        elif key.startswith("validation/"):
            if not dry_run:
                store.backend.delete(key)
            done.append({"key": key, "action": "removed (the packs it dated are checked again)"})
        elif key.startswith("gc/"):
            n = 0
            if not dry_run and not gc_done:
                n = _reindex_unindexed_packs(store)
                gc_done = True
            rec = key if key.endswith(".json") else key[:-len(".entries.parquet")] + ".json"
            if not dry_run:
                store.backend.delete(rec[:-5] + ".entries.parquet")
                store.backend.delete(rec)
            done.append({"key": rec, "action": f"removed, after indexing again the packs no index names ({n} block(s)); "
                                               "the next `alike gc` decides again what may go"})
    return done


def run_repair(store_spec, other_spec, dry_run: bool = False, on_progress=None, on_phase=None) -> dict:
    healed_config = heal_config(store_spec, other_spec, dry_run)
    if healed_config and dry_run:
        return {"store": str(store_spec), "from": str(other_spec), "dry_run": True, "ok": True,
                "config": healed_config, "metadata_copied": [{"key": "config.json", "why": healed_config}],
                "unrepairable": [], "note": "run without --dry-run, then again to see the rest"}
    store, other = open_pair(store_spec, other_spec)
    lock = None if dry_run else store_lock(store.backend, "maintenance", "repair")
    try:
        rep = _run(store_spec, other_spec, store, other, dry_run, on_progress, on_phase or (lambda s: None), lock)
        if healed_config:
            rep["metadata_copied"].insert(0, {"key": "config.json", "why": healed_config})
        return rep
    finally:
        if lock is not None:
            lock.release()


def _run(store_spec, other_spec, store, other, dry_run, on_progress, phase, lock) -> dict:
    t0 = time.monotonic()
    rep = {"store": store.url, "from": other.url, "dry_run": dry_run, "ok": True,
           "metadata_copied": [], "blocks_fetched": 0, "bytes_fetched": 0, "blocks_moved_locally": 0,
           "segments_removed": [], "packs_dropped": [], "entries_dropped": 0, "unrepairable": [],
           "broken_before": [], "problems_before": []}
    phase("loading both indexes")
    other_index = load_index(other)
    local_index = load_index(store)
    phase("checking version.json files and manifests")
    copies, meta_hashes, meta_bad, replaced = plan_metadata(store, other, other_index, local_index)
    for c in copies:
        rep["metadata_copied"].append({"key": c.key, "why": c.why})
        if not dry_run:
            lock.check()
            apply_copy(store, other, c)
    rep["unrepairable"] += [{"what": w, "why": y} for w, y in meta_bad]

    phase("verifying every block")
    scan = scan_store(store_spec, on_progress)
    from .verify import report

    before = report(scan)
    rep["broken_before"] = before["broken"]
    rep["problems_before"] = before["problems"]
    bad = scan.bad_hashes()
    if dry_run and replaced:  # what only the manifests to be replaced name is not needed
        kept = [h for vm, v, disk, h in scan.disks
                if h is not None and (vm, v, disk) not in replaced and (vm, v, "version.json") not in replaced]
        bad = bad[np.isin(bad, np.concatenate(kept + [np.zeros(0, "S32")]))]
    extra = np.unique(np.concatenate(meta_hashes + [np.zeros(0, "S32")]))
    if len(extra):  # blocks that replaced manifests name and that this store lacks
        extra = extra[~local_index.lookup(extra)[0]]
    need = np.unique(np.concatenate([bad, extra]))
    # intact blocks of packs with a damaged footer or tail: moved so the pack can be dropped
    move = {}
    for p in scan.damaged_packs:
        h, o, n = scan.pack_refs[p]
        keep = ~np.isin(h, need)
        for hh, oo, nn in zip(h[keep], o[keep], n[keep]):
            move[h32(hh)] = (p, int(oo), int(nn))
    move_h = np.array(list(move), dtype="S32")
    want = np.unique(np.concatenate([need, move_h]))

    found, opacks, ooff, olen = other_index.locate(want)
    opacks = np.array([p or "" for p in opacks], dtype=object)
    rep["blocks_to_fetch"] = int(found.sum())
    rep["bytes_to_fetch"] = int(olen[found].astype(np.int64).sum())
    if dry_run:
        rep["would_fetch_packs"] = sorted(set(opacks[found].astype(str)))
        rep["would_remove_segments"] = sorted(scan.damaged_segments)
        rep["would_drop_packs"] = sorted(scan.missing_packs | set(scan.damaged_packs))
        lacking = want[~found & np.isin(want, need)]
        rep["unrepairable_blocks"] = int(len(lacking))
        if len(lacking):
            rep["unrepairable"] += _disks_of(scan, lacking, "the other store does not hold these blocks")
        rep["objects_healed"] = heal_objects(store, other, scan.damaged_objects, dry_run=True)
        rep["ok"] = not rep["unrepairable"]
        rep["seconds"] = round(time.monotonic() - t0, 3)
        return rep

    phase("fetching blocks from the other store")
    total = len(want)
    entries, damaged_there, nbytes = _copy(other_spec, store_spec, opacks[found], ooff[found], olen[found],
                                           want[found], on_progress, 0, total)
    rep["blocks_fetched"] = int(len(entries[0]))
    rep["bytes_fetched"] = int(nbytes)
    got = entries[0]
    # blocks to move that the other store lacks or holds damaged: from the damaged pack itself
    left_move = move_h[~np.isin(move_h, got)] if len(move_h) else move_h
    local_entries = None
    if len(left_move):
        lp = np.array([move[h32(h)][0] for h in left_move], dtype=object)
        lo = np.array([move[h32(h)][1] for h in left_move], np.uint64)
        ln = np.array([move[h32(h)][2] for h in left_move], np.uint64)
        local_entries, _, _ = _copy(store_spec, store_spec, lp, lo, ln, left_move)
        rep["blocks_moved_locally"] = int(len(local_entries[0]))
        got = np.concatenate([got, local_entries[0]])
    lacking = need[~np.isin(need, got)] if len(need) else need
    if len(lacking):
        in_other = found[np.searchsorted(want, lacking)]
        rep["unrepairable"] += _disks_of(scan, lacking[~in_other], "the other store does not hold these blocks")
        rep["unrepairable"] += _disks_of(scan, lacking[in_other], "damaged in the other store too")
    moved_all = set(h32(h) for h in got)
    drop_packs = set(scan.missing_packs)
    for p in scan.damaged_packs:
        h = scan.pack_refs[p][0]
        if all(h32(x) in moved_all for x in h):
            drop_packs.add(p)
    drop_entries = {scan.bad_entries[h32(h)] for h in got if h32(h) in scan.bad_entries}
    add = entries
    if local_entries is not None:
        add = tuple(np.concatenate([a, b]) for a, b in zip(entries, local_entries))
        add = (add[0], add[1].astype("U32"), add[2], add[3])

    phase("rewriting the index")
    lock.check()  # broken as stale meanwhile: another maintenance job may be running now
    for key in scan.damaged_segments:  # nothing can read them, and rewrite_index must
        store.backend.delete(key)
        rep["segments_removed"].append(key)
    if len(add[0]) or drop_packs or drop_entries or scan.damaged_segments:
        stats = store.rewrite_index(drop_packs=drop_packs, drop_entries=drop_entries,
                                    add=add if len(add[0]) else None)
        rep["entries_dropped"] = stats["entries_dropped"]
    rep["packs_dropped"] = sorted(drop_packs)
    rep["objects_healed"] = heal_objects(store, other, scan.damaged_objects, dry_run=False)
    # left in place: no index entry points at their damaged blocks now; gc removes them
    rep["damaged_packs_left"] = sorted(set(scan.damaged_packs) | {p for p, _ in scan.bad_entries.values()})
    rep["ok"] = not rep["unrepairable"]
    rep["seconds"] = round(time.monotonic() - t0, 3)
    return rep


def _disks_of(scan, hashes: np.ndarray, why: str) -> list[dict]:
    out = []
    if not len(hashes):
        return out
    for vm, v, disk, hs in scan.disks:
        if hs is None:
            continue
        n = int(np.isin(hs, hashes).sum())
        if n:
            out.append({"what": f"{vm}@{v} disk {disk}", "why": f"{n} block(s): {why}"})
    if not out:
        out.append({"what": f"{len(hashes)} block(s)", "why": why})
    return out
