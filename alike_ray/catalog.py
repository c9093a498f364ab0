"""Versions on a store and queries over them, as Arrow tables (for the CLI and Jupyter)."""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from storage.store import Store


def versions_table(store: Store, vm: str | None = None) -> pa.Table:
    rows = []
    for name, v in store.list_versions(vm):
        m = store.read_version(name, v)
        rows.append({
            "vm": name, "version": v, "created": m.get("created"),
            "disks": len(m.get("disks", [])),
            "logical_bytes": int(m.get("logical_bytes", 0)),
            "read_bytes": int(m.get("read_bytes", 0)),
            "new_blocks": int(m.get("new_blocks", 0)),
            "stored_bytes": int(m.get("stored_bytes", 0)),
            "full": bool(m.get("full", False)),
            "seconds": float(m.get("seconds", 0.0)),
        })
    rows.sort(key=lambda r: (r["version"], r["vm"]), reverse=True)  # newest first
    schema = pa.schema([("vm", pa.string()), ("version", pa.string()), ("created", pa.string()),
                        ("disks", pa.int64()), ("logical_bytes", pa.int64()), ("read_bytes", pa.int64()),
                        ("new_blocks", pa.int64()), ("stored_bytes", pa.int64()), ("full", pa.bool_()),
                        ("seconds", pa.float64())])
    return pa.Table.from_pylist(rows, schema=schema)


def _disk_figures(store: Store, vm: str, version: str, meta: dict) -> tuple[int, np.ndarray]:
    """-> the bytes of a version's blocks with data (holes and zero blocks are in no manifest;
    a disk's last block counts for what the disk holds of it), and the blobs it references."""
    bs = store.block_size
    data, blobs = 0, [np.zeros(0, "S32")]
    for d in meta.get("disks", []):
        m = store.read_manifest(vm, version, d)
        size = int(d.get("size", 0))
        n = len(m.blocks)
        data += n * bs
        if n and size % bs and int(m.blocks[-1]) == (size - 1) // bs:
            data -= bs - size % bs
        blobs.append(m.blobs())
    return data, np.unique(np.concatenate(blobs))


def free_space(store: Store) -> tuple[int | None, str]:
    """-> (free bytes where the store's packs go, or None) and how to read it."""
    import shutil

    root = getattr(store.backend, "root", None)
    if root is None:
        return None, "n/a: an S3 store reports no free space (its bucket grows as needed, quotas aside)"
    return int(shutil.disk_usage(root).free), f"free on the filesystem of {root}"


def store_stats(store: Store) -> dict:
    """What a store holds, each figure named for what it counts: `logical_bytes` the disks'
    sizes, `data_bytes` their blocks with data (no holes, no zero blocks: what dedup works on),
    `stored_bytes` the packs; `referenced_blocks` the distinct blocks versions use (gc's live
    blocks), `index_blocks` those the index holds (also unused ones until a gc)."""
    from concurrent.futures import ThreadPoolExecutor

    t = versions_table(store)
    sizes = store.backend.sizes("packs/")
    stored = sum(sizes.values())
    hashes = [np.zeros(0, "S32")]
    segs = store.segment_keys()
    for k in segs:
        hashes.append(store.read_segment(k)[0])
    in_index = int(len(np.unique(np.concatenate(hashes))))
    rows = t.to_pylist()
    with ThreadPoolExecutor(8) as pool:
        figs = list(pool.map(lambda r: _disk_figures(store, r["vm"], r["version"],
                                                       store.read_version(r["vm"], r["version"])), rows))
    data = sum(f[0] for f in figs)
    referenced = int(len(np.unique(np.concatenate([np.zeros(0, "S32")] + [f[1] for f in figs]))))
    logical = int(sum(r["logical_bytes"] for r in rows))
    per_vm = {}
    for r, (d, _) in zip(rows, figs):  # rows are newest first: the first row of a VM is its newest
        vm = per_vm.setdefault(r["vm"], {"vm": r["vm"], "versions": 0, "newest": r["version"],
                                         "logical_bytes": r["logical_bytes"], "data_bytes": d,
                                         "added_bytes": 0})
        vm["versions"] += 1
        vm["added_bytes"] += r["stored_bytes"]
    free, free_note = free_space(store)
    return {
        "store": store.url,
        "block_size": store.block_size,
        "vms": len(per_vm),
        "versions": t.num_rows,
        "logical_bytes": logical,
        "data_bytes": int(data),
        "stored_bytes": int(stored),
        "dedup_ratio": round(data / stored, 2) if stored else None,
        "referenced_blocks": referenced,
        "index_blocks": in_index,
        "unique_blocks": in_index,  # the name of index_blocks before; kept for scripts
        "packs": len(sizes),
        "index_segments": len(segs),
        "free_bytes": free,
        "free_note": free_note,
        "per_vm": sorted(per_vm.values(), key=lambda v: v["vm"]),
    }
