"""Verify: re-read and re-hash the blocks that versions reference.

The driver reads every version.json and manifest (a damaged one is a problem of its version),
loads the index segment by segment (a segment that does not parse is a problem naming it, and
the blocks only it indexed count as missing), locates the distinct hashes of every manifest, and
fans out one `verify_pack` task per pack; each reads its pack once, checks the footer and
trailer (crc) and every referenced block (decompress, keyed BLAKE3 against the hash). The
damaged or missing hashes are then mapped back to the versions and disks they break.

Which packs are read:
- all (default): every pack that a version uses;
- `sample=P` (0 < P <= 100): a random P% of them (at least one);
- `older_than=SECONDS`: those whose last successful validation is older, or never validated;
- `new_only`: those never validated: the data written since the last validation (a job's
  `validate = true`).
Blocks that no index segment names are found whatever the mode: that costs no pack read.

Validations are remembered on the store, append-only, because several verifies (and the
repair) may run at once and no object is ever rewritten in place:

    validation/<UTC time>-<blake3>.parquet   columns pack (string), validated (float64 epoch s)

One object per run naming the packs found intact. The last validation of a pack is the
largest time over all objects. When there are more than `COMPACT_AT` objects, a run writes one
object holding the latest time per pack and then deletes the objects it read; two runs
compacting at once both write complete summaries, so deleting each other's inputs loses
nothing, and a reader in between sees duplicates, which the maximum absorbs.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import ray

from storage.errors import DamagedData, InvalidValue, ObjectMissing, StoreError
from storage.index import CompactIndex, h32
from storage.locks import read_locks
from storage.objects import check_in_key, digest, parquet_bytes, read_parquet
from storage.pack import parse_footer, pack_key
from storage.store import Store

VALIDATION_PREFIX = "validation/"
COMPACT_AT = 64
_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$", re.I)
_UNIT = {"": 86400, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_age(text: str) -> float:
    """'30d', '12h', '45m', '2w', '90s' (a bare number is days) -> seconds."""
    m = _AGE.match(str(text or ""))
    if not m:
        raise InvalidValue(f"age {text!r} is not allowed: give a number and a unit, e.g. 30d, 12h, 45m, 2w")
    return float(m.group(1)) * _UNIT[m.group(2).lower()]


def parse_percent(text: str) -> float:
    """'5%' or '5' -> 5.0, in (0, 100]."""
    try:
        p = float(str(text).strip().rstrip("%"))
    except ValueError:
        p = -1
    if not 0 < p <= 100:
        raise InvalidValue(f"sample {text!r} is not allowed: give a percentage above 0 and up to 100, e.g. 5%")
    return p


# -- remembered validations --------------------------------------------------------------------
def read_validations(store: Store) -> tuple[dict[str, float], list[str]]:
    """-> ({pack id: last validation time}, keys read). Unreadable objects are skipped: they
    only make a pack look less recently validated than it was."""
    last: dict[str, float] = {}
    keys = [k for k in store.backend.list(VALIDATION_PREFIX) if k.endswith(".parquet")]
    for k in keys:
        try:
            t = read_parquet(store.backend.get(k), k, check_in_key(k), required=store.strict)
            packs = t.column("pack").to_pylist()
            when = t.column("validated").to_numpy()
        except (StoreError, KeyError):  # removed meanwhile (a compaction), or damaged: verify names it
            continue
        for p, w in zip(packs, when):
            if w > last.get(p, -1.0):
                last[p] = float(w)
    return last, keys


def _validation_bytes(packs: list[str], when: list[float]) -> bytes:
    return parquet_bytes(pa.table({"pack": pa.array(packs, pa.string()),
                                   "validated": pa.array(np.asarray(when, np.float64))}))


def _validation_key(now: float, data: bytes) -> str:
    """validation/<UTC time>-<BLAKE3 of the object>.parquet: the key carries the check."""
    return VALIDATION_PREFIX + time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now)) + f"-{digest(data)}.parquet"


def record_validations(store: Store, packs: list[str], now: float | None = None) -> str | None:
    """Append one object naming `packs` as validated at `now`; compact when there are many."""
    now = time.time() if now is None else now
    key = None
    if packs:
        data = _validation_bytes(sorted(packs), [now] * len(packs))
        key = _validation_key(now, data)
        store.backend.put(key, data)
    keys = [k for k in store.backend.list(VALIDATION_PREFIX) if k.endswith(".parquet")]
    if len(keys) > COMPACT_AT:
        last, read = read_validations(store)
        names = sorted(last)
        data = _validation_bytes(names, [last[p] for p in names])
        summary = _validation_key(now, data)
        store.backend.put(summary, data)
        for k in read:  # only after the summary is durable
            if k != summary:
                store.backend.delete(k)
    return key


# -- the scan ------------------------------------------------------------------------------------
@ray.remote(max_retries=2)
def verify_pack(store_url, pack: str, offs: np.ndarray, lens: np.ndarray, hashes: np.ndarray):
    """-> (bad hashes, their offsets, reason, bytes read, pack problem or '' , missing?)."""
    store = Store.open_cached(store_url)
    try:
        data = store.backend.get(pack_key(pack))
    except ObjectMissing:
        return hashes, offs, f"pack {pack} is missing", 0, f"pack {pack} is missing", True
    pack_problem = ""
    footer = None
    try:
        footer = parse_footer(data, len(data), pack)
    except DamagedData as e:
        pack_problem = e.detail
    except ValueError:
        pack_problem = f"pack {pack} has a damaged footer"
    if footer is not None:
        pack_problem = _footer_disagrees(pack, footer, offs, lens, hashes)
    bad, bad_off = [], []
    reason = ""
    for o, l, h in zip(offs, lens, hashes):
        o, l = int(o), int(l)
        stored = data[o:o + l]
        try:
            if len(stored) != l:
                raise DamagedData(f"pack {pack} is truncated")
            store.codec.decode(stored, h32(h), where=f"in pack {pack} at offset {o}")
        except DamagedData as e:
            bad.append(h)
            bad_off.append(o)
            reason = reason or e.detail
    return (np.array(bad, dtype="S32"), np.array(bad_off, np.uint64), reason, len(data), pack_problem, False)


def _footer_disagrees(pack: str, footer, offs, lens, hashes) -> str:
    """'' when the footer names each block the index places in this pack, at the same offset
    and length; else the first disagreement (a footer that points into the wrong block)."""
    where = {int(o): i for i, o in enumerate(footer["offset"])}
    for o, l, h in zip(offs, lens, hashes):
        i = where.get(int(o))
        if i is None or int(footer["length"][i]) != int(l) or h32(footer["hash"][i]) != h32(h):
            return (f"pack {pack}'s footer disagrees with the index at offset {int(o)} "
                    f"(block {h32(h).hex()[:16]})")
    return ""


@dataclass
class Scan:
    """What a verification found, in the detail repair needs."""
    store: Store
    versions: list                      # (vm, version) committed
    disks: list = field(default_factory=list)   # (vm, version, disk name, hashes or None)
    problems: list = field(default_factory=list)
    reasons: list = field(default_factory=list)
    damaged_segments: list = field(default_factory=list)   # keys of segments that do not parse
    damaged_metadata: list = field(default_factory=list)   # (vm, version, key, why)
    damaged_objects: list = field(default_factory=list)    # keys of pins, job runs, gc, validation, locks
    hashes: np.ndarray = None           # every distinct hash that versions use
    unindexed: np.ndarray = None        # hashes no segment names
    bad_entries: dict = field(default_factory=dict)   # hash -> (pack, offset) of a damaged copy
    missing_packs: set = field(default_factory=set)
    damaged_packs: dict = field(default_factory=dict)  # pack -> problem (footer, truncation)
    pack_refs: dict = field(default_factory=dict)      # pack -> (hashes, offsets, lengths) checked
    packs_total: int = 0
    packs_checked: int = 0
    ok_packs: list = field(default_factory=list)
    blocks_checked: int = 0
    bytes_read: int = 0
    seconds: float = 0.0

    def bad_hashes(self) -> np.ndarray:
        parts = [self.unindexed, np.array(list(self.bad_entries), dtype="S32")]
        for p in self.missing_packs:
            parts.append(self.pack_refs[p][0])
        return np.unique(np.concatenate(parts + [np.zeros(0, "S32")]))


def load_index(store: Store, scan: Scan | None = None) -> CompactIndex:
    """The whole index; a segment that does not parse is noted in `scan` and skipped. One that
    a gc's compaction removes meanwhile is read in the segment that replaced it (load_segments)."""
    from .index import load_segments

    index = CompactIndex()
    damaged: list = []
    load_segments(store, None, index, damaged)
    if scan is not None:
        for key, why in damaged:
            scan.damaged_segments.append(key)
            scan.problems.append(why)
    return index


def read_versions(store: Store, scan: Scan) -> None:
    for vm, v in scan.versions:
        try:
            meta = store.read_version(vm, v)
            disks = meta["disks"]
        except StoreError as e:
            scan.problems.append(f"{vm}@{v}: {e.message}")
            scan.damaged_metadata.append((vm, v, f"versions/{vm}/{v}/version.json", e.message))
            scan.disks.append((vm, v, "version.json", None))
            continue
        except (KeyError, TypeError):
            why = f"versions/{vm}/{v}/version.json has no list of disks"
            scan.problems.append(f"{vm}@{v}: {why}")
            scan.damaged_metadata.append((vm, v, f"versions/{vm}/{v}/version.json", why))
            scan.disks.append((vm, v, "version.json", None))
            continue
        for d in disks:
            key = f"versions/{vm}/{v}/{d['manifest']}"
            try:
                m = store.read_manifest(vm, v, d)
                if "blocks" in d and int(d["blocks"]) != len(m.blocks):
                    raise DamagedData(f"manifest {key} lists {len(m.blocks)} blocks, its version.json {d['blocks']}")
                scan.disks.append((vm, v, d["name"], m.blobs()))
            except StoreError as e:
                scan.problems.append(f"{vm}@{v} disk {d['name']}: {e.message}")
                scan.damaged_metadata.append((vm, v, key, e.message))
                scan.disks.append((vm, v, d["name"], None))


# -- the store's other objects -------------------------------------------------------------------
def check_objects(store: Store) -> list[tuple[str, str]]:
    """Read and check every small object no version names: pins, job runs, gc records and their
    entries, validation records and locks. -> [(key, why)] of those that fail their check."""
    from .gc import read_gc_entries

    bad = []

    def one(key, read):
        try:
            read()
        except ObjectMissing:  # removed meanwhile (a lock released, a compaction)
            pass
        except StoreError as e:
            bad.append((key, e.detail or e.message))

    for key in store.backend.list("pins/"):
        if key.endswith(".json"):
            one(key, lambda k=key: store.get_json(k))
    for key in store.backend.list("jobs/"):
        if "/runs/" in key and key.endswith(".json"):
            one(key, lambda k=key: store.get_json(k))
    for key in store.backend.list("gc/"):
        if key.endswith(".json") and not key.endswith(".entries.json"):
            def rec_and_entries(k=key):
                rec = store.get_json(k)
                read_gc_entries(store, k[:-5] + ".entries.parquet", rec)
            one(key, rec_and_entries)
    for key in store.backend.list(VALIDATION_PREFIX):
        if key.endswith(".parquet"):
            one(key, lambda k=key: read_parquet(store.backend.get(k), k, check_in_key(k), required=store.strict))
    for lk in read_locks(store.backend, strict=store.strict):
        if lk.get("damaged"):
            bad.append((lk["_key"], f"{lk['damaged']}: counted as a live {lk['kind']} lock until it is "
                                    "older than the stale age, then broken"))
    return bad


def scan_store(store_url, on_progress=None, sample: float | None = None, older_than: float | None = None,
               new_only: bool = False,
               seed=None, on_bytes=None) -> Scan:
    t0 = time.monotonic()
    store = Store.open(store_url)
    scan = Scan(store=store, versions=store.list_versions())
    read_versions(store, scan)
    for key, why in check_objects(store):
        scan.damaged_objects.append(key)
        scan.problems.append(why if key in why else f"{key}: {why}")
    allh = np.unique(np.concatenate([h for *_, h in scan.disks if h is not None] + [np.zeros(0, "S32")]))
    scan.hashes = allh
    index = load_index(store, scan)
    found, packs, off, ln = index.locate(allh)
    packs = np.array([p or "" for p in packs], dtype=object)
    scan.unindexed = allh[~found]
    if len(scan.unindexed):
        scan.reasons.append(f"{len(scan.unindexed)} block(s) are in no index segment")
    order = np.argsort(packs[found].astype(str), kind="stable")
    fh, fp, fo, fl = allh[found][order], packs[found][order].astype(str), off[found][order], ln[found][order]
    groups = {}
    if len(fp):
        cut = np.flatnonzero(fp[1:] != fp[:-1]) + 1
        for s, e in zip(np.concatenate([[0], cut]), np.concatenate([cut, [len(fp)]])):
            groups[str(fp[s])] = (fh[s:e], fo[s:e].astype(np.uint64), fl[s:e].astype(np.uint64))
    scan.packs_total = len(groups)
    chosen = sorted(groups)
    if older_than is not None:
        last, _ = read_validations(store)
        limit = time.time() - older_than
        chosen = [p for p in chosen if last.get(p, -1.0) < limit]
    elif new_only:  # the packs never validated: the new data since the last validation
        last, _ = read_validations(store)
        chosen = [p for p in chosen if p not in last]
    if sample is not None and chosen:
        rng = np.random.default_rng(seed)
        k = max(1, int(round(len(chosen) * sample / 100.0)))
        chosen = sorted(rng.choice(np.array(chosen, dtype=object), size=min(k, len(chosen)), replace=False))
    scan.pack_refs = {p: groups[p] for p in chosen}
    scan.packs_checked = len(chosen)
    scan.blocks_checked = int(sum(len(groups[p][0]) for p in chosen))

    from .cluster import cluster_cpus

    in_flight = max(2, 2 * cluster_cpus())
    todo = list(chosen)
    pending, owner = [], {}
    done = 0
    if on_progress:
        on_progress(0, len(chosen))
    while todo or pending:
        while todo and len(pending) < in_flight:
            p = todo.pop(0)
            h, o, n = groups[p]
            r = verify_pack.remote(store_url, p, o, n, h)
            owner[r] = p
            pending.append(r)
        ready, pending = ray.wait(pending, num_returns=1, timeout=0.5)
        for r in ready:
            p = owner.pop(r)
            bad, bad_off, why, nbytes, pack_problem, missing = ray.get(r)
            done += 1
            scan.bytes_read += nbytes
            if missing:
                scan.missing_packs.add(p)
                scan.reasons.append(why)
            else:
                for h, o in zip(bad, bad_off):
                    scan.bad_entries[h32(h)] = (p, int(o))
                if why:
                    scan.reasons.append(why)
                if pack_problem:
                    scan.damaged_packs[p] = pack_problem
                    scan.reasons.append(pack_problem)
                if not len(bad) and not pack_problem:
                    scan.ok_packs.append(p)
        if on_progress:
            on_progress(done, len(chosen))
        if on_bytes:
            on_bytes(scan.bytes_read, time.monotonic() - t0)
    scan.seconds = time.monotonic() - t0
    return scan


def report(scan: Scan, mode: str = "all") -> dict:
    badset = scan.bad_hashes()
    broken = []
    for vm, v, disk, hashes in scan.disks:
        if hashes is None:
            broken.append({"vm": vm, "version": v, "disk": disk, "damaged_blocks": None})
            continue
        n = int(np.isin(hashes, badset).sum()) if len(badset) else 0
        if n:
            broken.append({"vm": vm, "version": v, "disk": disk, "damaged_blocks": n})
    secs = round(scan.seconds, 3)
    return {
        "ok": not broken and not scan.problems and not scan.damaged_packs,
        "mode": mode,
        "versions": len(scan.versions),
        "blocks_checked": scan.blocks_checked,
        "packs_checked": scan.packs_checked,
        "packs_total": scan.packs_total,
        "bytes_read": scan.bytes_read,
        "seconds": secs,
        "mb_per_s": round(scan.bytes_read / 1e6 / scan.seconds, 2) if scan.seconds > 0 else 0.0,
        "damaged_blocks": int(len(badset)),
        "damaged_packs": sorted(scan.damaged_packs),
        "missing_packs": sorted(scan.missing_packs),
        "damaged_segments": sorted(scan.damaged_segments),
        "damaged_objects": sorted(scan.damaged_objects),
        "broken": broken,
        "problems": scan.problems + scan.reasons,
    }


def run_verify(store_url, on_progress=None, node_id: str | None = None, index_actors: int = 1,
               sample: float | None = None, older_than: float | None = None, record: bool = True,
               new_only: bool = False,
               seed=None, on_bytes=None) -> dict:
    """Verify `store_url` (see the module doc for the modes) and remember the packs found intact.
    -> the report: ok, versions, blocks_checked, packs_checked, damaged_blocks, broken
    [{vm, version, disk, damaged_blocks (None: manifest or version.json unreadable)}], problems,
    and mode, packs_total, bytes_read, seconds, mb_per_s, damaged_packs, missing_packs,
    damaged_segments, validation_recorded."""
    from storage.locks import store_lock

    # a reader, registered before the index is read: a gc running meanwhile deletes no pack we may read
    lock = store_lock(Store.open(store_url).backend, "reader", "verify")
    try:
        scan = scan_store(store_url, on_progress, sample=sample, older_than=older_than, new_only=new_only, seed=seed,
                          on_bytes=on_bytes)
    finally:
        lock.release()
    mode = ("sample" if sample is not None else "older-than" if older_than is not None
            else "new" if new_only else "all")
    rep = report(scan, mode)
    if sample is not None:
        rep["sample_percent"] = sample
    if older_than is not None:
        rep["older_than_seconds"] = older_than
    rep["validation_recorded"] = None
    if record:
        try:
            rep["validation_recorded"] = record_validations(scan.store, scan.ok_packs)
        except StoreError as e:  # a read-only credential: the check itself stands
            rep["problems_recording"] = e.message
    return rep
