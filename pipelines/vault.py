"""Vault: replicate versions from one store to another (ADS -> ODS, ODS -> ADS, any backend).

Dedup-aware: only blocks the target's index lacks are copied, once each, whatever the number
of versions that share them. Blocks travel as they are stored (no recompression) but are
decoded and re-hashed on the way, so damaged data is never copied. Resumable: each `copy_packs`
task puts its target packs and then the index segments naming them, so an interrupted run
leaves only durable, indexed blocks (or unreferenced packs), and the next run copies only what
is still missing. A version is committed on the target (manifests, then version.json) only
after every one of its blocks is there. Vaulting again copies nothing.

The target shares the source's hash key (it is created with it), else blocks would not match;
a target with another key or block size is refused.
"""
from __future__ import annotations


import numpy as np
import ray

from storage.errors import StoreError
from storage.locks import store_lock
from storage.objects import digest
from storage.store import Store

from .blockcopy import copy_blocks, run_copy_tasks
from .faults import crash_point
from .index import LocalIndex


class VaultError(StoreError):
    """{detail}"""


class VaultFailed(VaultError):
    """{detail}"""

    exit_code = 1  # not bad input: the run could not finish; running it again goes on


def open_target(src: Store, target_spec) -> Store:
    """Open the target store, creating it with the source's block size and hash key."""
    try:
        dst = Store.open(target_spec)
    except StoreError as e:
        if type(e).__name__ not in ("NotAStore",) and "does not exist" not in e.message:
            raise
        dst = None
    if dst is None:
        from storage.backend import open_backend

        backend = open_backend(target_spec)
        path = backend.local_path("")
        if path is None and hasattr(backend, "check_bucket"):
            backend.check_bucket()
        if any(True for _ in backend.list("")):
            raise VaultError(f"{backend.url} holds other data and is not a store: vault into an empty location")
        cfg = dict(src.config)
        import datetime
        import uuid

        from storage.objects import seal_json
        from storage.store import FORMAT

        cfg.update(store_id=uuid.uuid4().hex, vault_of=src.config["store_id"], format=FORMAT,
                   created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
        backend.put("config.json", seal_json(cfg))
        return Store(backend, cfg)
    if dst.config["hash_key"] != src.config["hash_key"]:
        raise VaultError(
            f"{dst.url} is a store with another hash key than {src.url}: its blocks cannot be shared. "
            "Vault into a new (empty) location, which alike creates with the right key")
    if dst.block_size != src.block_size:
        raise VaultError(f"{dst.url} has block size {dst.block_size}, {src.url} {src.block_size}: they must match")
    return dst


@ray.remote(max_retries=3)
def copy_packs(src_spec, dst_spec, packs: np.ndarray, offs: np.ndarray, lens: np.ndarray, hashes: np.ndarray):
    """Copy blocks (sorted by source pack and offset) into new target packs, then index them.
    -> (blocks copied, stored bytes copied, damaged hashes)."""
    src, dst = Store.open_cached(src_spec), Store.open_cached(dst_spec)
    crash_point("vault-task")
    (h, p, o, n), damaged, nbytes = copy_blocks(src, dst, packs, offs, lens, hashes,
                                                after_put=lambda: crash_point("vault-pack"))
    if len(h):
        dst.write_segments(h, list(p), o, n)
        crash_point("vault-segments")
    return len(h), nbytes, damaged


def run_vault(src_spec, dst_spec, vms: list[str] | None = None, versions: list[str] | None = None,
              on_progress=None, node_id: str | None = None) -> dict:

    src = Store.open(src_spec)
    dst = open_target(src, dst_spec)
    if src.config["store_id"] == dst.config["store_id"]:
        raise VaultError("the source and the target are the same store")
    chosen = src.list_versions()
    if vms:
        unknown = set(vms) - {vm for vm, _ in chosen}
        if unknown:
            raise VaultError(f"no VM named {sorted(unknown)[0]!r} in {src.url}")
        chosen = [(vm, v) for vm, v in chosen if vm in vms]
    if versions:
        sel = [(vm, v) for vm, v in chosen if any(v == x or v.startswith(x) for x in versions)]
        if not sel:
            raise VaultError(f"no version {versions[0]!r} in {src.url}: see `alike versions`")
        chosen = sel
    # registered before the target's index is read (see storage/locks.py)
    lock = store_lock(dst.backend, "writer", "vault")
    crash_point("vault-locked")
    try:
        reader = store_lock(src.backend, "reader", "vault")
        try:
            return _run_vault(src_spec, dst_spec, src, dst, chosen, on_progress, lock)
        finally:
            reader.release()
    finally:
        lock.release()


def _run_vault(src_spec, dst_spec, src, dst, chosen, on_progress, lock) -> dict:
    have = set(dst.list_versions())
    todo = [(vm, v) for vm, v in chosen if (vm, v) not in have]
    report = {"source": src.url, "target": dst.url, "versions_selected": len(chosen),
              "versions_copied": 0, "versions_present": len(chosen) - len(todo),
              "blocks_copied": 0, "bytes_copied": 0, "damaged_blocks": 0, "versions_skipped": []}
    if not todo:
        return report
    metas, manifests = {}, {}
    for vm, v in todo:
        metas[(vm, v)] = src.read_version(vm, v)
        manifests[(vm, v)] = [src.read_manifest(vm, v, d).blobs() for d in metas[(vm, v)]["disks"]]
    allh = np.unique(np.concatenate([h for hs in manifests.values() for h in hs] + [np.zeros(0, "S32")]))
    dst_index = LocalIndex(dst_spec)
    try:
        have_h = dst_index.lookup(allh) if len(allh) else np.zeros(0, bool)
    finally:
        dst_index.shutdown()
    need = allh[~have_h]
    crash_point("vault-planned")
    src_index = LocalIndex(src_spec)
    try:
        found, packs, off, ln, _ = src_index.locate(need)
    finally:
        src_index.shutdown()
    damaged = [need[~found]]
    need, packs, off, ln = need[found], packs[found].astype(str), off[found], ln[found]
    order = np.lexsort((off, packs))
    need, packs, off, ln = need[order], packs[order], off[order], ln[order]
    total_bytes = int(ln.astype(np.int64).sum())
    done_bytes = 0

    def absorb(result):
        nonlocal done_bytes
        c, b, bad = result
        report["blocks_copied"] += c
        report["bytes_copied"] += b
        done_bytes += b
        if len(bad):
            damaged.append(bad)
        if on_progress:
            on_progress(done_bytes, total_bytes)

    def died(why):
        return VaultFailed(
            f"a copy task's worker died more often than it is retried ({why}); the versions "
            "copied so far are whole, nothing partial was committed: run the vault again to go on")

    run_copy_tasks(copy_packs, src_spec, dst_spec, packs, off, ln, need, absorb, died)
    bad = np.unique(np.concatenate(damaged))
    skipped = []
    for (vm, v), hs in manifests.items():
        if len(bad) and any(np.isin(h, bad).any() for h in hs):
            skipped.append(f"{vm}@{v}")
            continue
        crash_point("vault-commit")
        lock.check()
        for d in metas[(vm, v)]["disks"]:
            raw = src.read_manifest_bytes(vm, v, d)  # checked against its version.json
            dst.backend.put(f"versions/{vm}/{v}/{d['manifest']}", raw)
            d.setdefault("manifest_blake3", digest(raw))  # a version of a format-1 store gains its check
            crash_point("vault-manifest")
        dst.commit_version(vm, v, metas[(vm, v)])
        crash_point("vault-committed")
        report["versions_copied"] += 1
    report["damaged_blocks"] = int(len(bad))
    report["versions_skipped"] = skipped
    return report
