"""Store pruning: remove the versions a retention policy does not keep (`alike prune`, job runs).

A prune takes a shared writer lock (it only removes version.json files and manifests, which never
hurts a backup or a vault running at the same time), decides per VM with pipelines/retention.py,
and removes the versions it does not keep with Store.delete_version. Their blocks stay in the
packs until `alike gc` finds nothing references them. No Ray: a prune only touches version folders.
"""
from __future__ import annotations

from storage.errors import StoreError

from .faults import crash_point
from .retention import plan


def prune_store(store, policy, vms=None, dry_run: bool = False, progress=None) -> dict:
    """Apply `policy` to `vms` (default: every VM) of `store` under a shared writer lock.
    -> {"store", "policy", "dry_run", "vms": [{"vm", "versions": [decision...], "removed", "kept"}],
        "removed": [vm@version...], "kept": n}. Used by `alike prune` and by job runs."""
    from storage.locks import store_lock

    lock = None if dry_run else store_lock(store.backend, "writer", "prune")
    if lock is not None:
        crash_point("prune-locked")
    try:
        pins = store.pins()
        have = store.list_vms()
        todo = [v for v in (vms if vms is not None else have) if v in have]
        rep = {"store": store.url, "policy": policy.to_dict(), "dry_run": dry_run, "vms": [], "removed": [],
               "kept": 0}
        for vm in todo:
            crash_point("prune-vm")
            if progress:
                progress(f"{vm}: deciding")
            row = _prune_vm(store, vm, policy, {v for m, v in pins if m == vm}, dry_run)
            rep["removed"] += [f"{vm}@{v}" for v in row.pop("removed_ids")]
            rep["kept"] += row["kept"]
            rep["vms"].append(row)
            if progress:
                progress(f"{vm}: {'would remove' if dry_run else 'removed'} {row['removed']}, kept {row['kept']}")
        return rep
    finally:
        if lock is not None:
            lock.release()


def _prune_vm(store, vm: str, policy, pinned: set, dry_run: bool) -> dict:
    """Decide for one VM and remove what is not kept, oldest first.
    -> {"vm", "versions": [decision...], "removed": n, "kept": n, "removed_ids": [version...]}"""
    ids = [v for _, v in store.list_versions(vm)]
    created = {}
    for v in ids:
        if not v[:8].isdigit():  # only ids without a time need version.json
            try:
                created[v] = store.read_version(vm, v).get("created")
            except StoreError:
                created[v] = None
    decisions = plan(ids, policy, pinned, created)
    row = {"vm": vm, "versions": [d.to_dict() for d in decisions], "removed": 0,
           "kept": sum(d.keep for d in decisions), "removed_ids": []}
    for d in reversed(decisions):  # oldest first
        if d.keep:
            continue
        if not dry_run:
            if store.backend.exists(f"pins/{vm}/{d.version}.json"):  # pinned meanwhile
                row["kept"] += 1
                row["versions"][decisions.index(d)].update(keep=True, reasons=["pinned"])
                continue
            crash_point("prune-removing")
            store.delete_version(vm, d.version, between=lambda: crash_point("prune-version-json"))
            crash_point("prune-removed")
        row["removed"] += 1
        row["removed_ids"].append(d.version)
    return row
