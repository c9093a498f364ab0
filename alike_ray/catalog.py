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


def store_stats(store: Store) -> dict:
    t = versions_table(store)
    sizes = store.backend.sizes("packs/")
    packs = list(sizes)
    stored = sum(sizes.values())
    hashes = [np.zeros(0, "S32")]
    segs = store.segment_keys()
    for k in segs:
        hashes.append(store.read_segment(k)[0])
    unique = int(len(np.unique(np.concatenate(hashes))))
    logical = int(sum(t.column("logical_bytes").to_pylist()))
    return {
        "store": store.url,
        "block_size": store.block_size,
        "vms": len(set(t.column("vm").to_pylist())),
        "versions": t.num_rows,
        "logical_bytes": logical,
        "stored_bytes": int(stored),
        "dedup_ratio": round(logical / stored, 2) if stored else None,
        "unique_blocks": unique,
        "packs": len(packs),
        "index_segments": len(segs),
    }
