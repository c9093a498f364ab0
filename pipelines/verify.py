"""Verify: re-read and re-hash every block that any version references.

The driver gathers the distinct hashes of every manifest, locates them through the index
shards, and fans out one `verify_pack` task per pack; each reads its pack once, checks the
footer and every referenced block (decompress, keyed BLAKE3 against the hash). The damaged or
missing hashes are then mapped back to the versions and disks they break.
"""
from __future__ import annotations

import numpy as np
import ray

from storage.errors import DamagedData, ObjectMissing, StoreError
from storage.pack import pack_key
from storage.index import h32
from storage.store import Store

from .index import LocalIndex


@ray.remote(max_retries=2)
def verify_pack(store_url: str, pack: str, offs: np.ndarray, lens: np.ndarray, hashes: np.ndarray):
    """-> (bad hashes, reason, bytes checked)."""
    store = Store.open_cached(store_url)
    try:
        data = store.backend.get(pack_key(pack))
    except ObjectMissing:
        return hashes, f"pack {pack} is missing", 0
    bad = []
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
            reason = reason or e.detail
    return np.array(bad, dtype="S32"), reason, len(data)


def run_verify(store_url: str, on_progress=None, node_id: str | None = None, index_actors: int = 1) -> dict:
    store = Store.open(store_url)
    versions = store.list_versions()
    problems: list[str] = []
    manifests = []  # (vm, version, disk name, hashes)
    for vm, v in versions:
        try:
            meta = store.read_version(vm, v)
            for d in meta["disks"]:
                try:
                    manifests.append((vm, v, d["name"], store.read_manifest(vm, v, d["manifest"])[1]))
                except StoreError as e:
                    problems.append(f"{vm}@{v} disk {d['name']}: {e.message}")
                    manifests.append((vm, v, d["name"], None))
        except StoreError as e:
            problems.append(f"{vm}@{v}: {e.message}")
    allh = np.unique(np.concatenate([m[3] for m in manifests if m[3] is not None] + [np.zeros(0, "S32")]))
    index = LocalIndex(store_url)
    try:
        found, packs, off, ln, _ = index.locate(allh)
    finally:
        index.shutdown()
    bad = [allh[~found]]
    reasons = []
    if (~found).any():
        reasons.append(f"{int((~found).sum())} block(s) are in no index segment")
    order = np.argsort(packs[found].astype(str), kind="stable")
    fh, fp, fo, fl = allh[found][order], packs[found][order].astype(str), off[found][order], ln[found][order]
    refs = []
    if len(fp):
        cut = np.flatnonzero(fp[1:] != fp[:-1]) + 1
        for s, e in zip(np.concatenate([[0], cut]), np.concatenate([cut, [len(fp)]])):
            refs.append(verify_pack.remote(store_url, fp[s], fo[s:e], fl[s:e], fh[s:e]))
    checked_bytes = 0
    total = len(refs)
    done = 0
    pending = refs
    while pending:
        ready, pending = ray.wait(pending, num_returns=1, timeout=0.5)
        for r in ready:
            b, why, nbytes = ray.get(r)
            done += 1
            checked_bytes += nbytes
            if len(b):
                bad.append(b)
                reasons.append(why)
        if on_progress:
            on_progress(done, total)
    badset = np.unique(np.concatenate(bad))
    broken = []
    for vm, v, disk, hashes in manifests:
        if hashes is None:
            broken.append({"vm": vm, "version": v, "disk": disk, "damaged_blocks": None})
            continue
        n = int(np.isin(hashes, badset).sum()) if len(badset) else 0
        if n:
            broken.append({"vm": vm, "version": v, "disk": disk, "damaged_blocks": n})
    return {
        "ok": not broken and not problems,
        "versions": len(versions),
        "blocks_checked": int(len(allh)),
        "packs_checked": total,
        "bytes_read": checked_bytes,
        "damaged_blocks": int(len(badset)),
        "broken": broken,
        "problems": problems + reasons,
    }
