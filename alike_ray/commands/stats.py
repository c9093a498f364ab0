"""`alike stats`: logical and stored bytes, dedup ratio, blocks."""
from __future__ import annotations

from ..ui import _emit, _h


def cmd_stats(args) -> int:
    from storage.store import Store

    from ..catalog import store_stats
    from ..config import store_url

    st = Store.open(store_url(args))
    s = store_stats(st)
    unused = s["index_blocks"] - s["referenced_blocks"]
    lines = [
        f"store              {s['store']}",
        f"VMs                {s['vms']} ({s['versions']} versions)",
        f"disks, logical     {_h(s['logical_bytes']):<10} the disks' sizes, summed over every version (holes, zeros included)",
        f"data               {_h(s['data_bytes']):<10} their blocks with data (no holes, no zero blocks)",
        f"stored             {_h(s['stored_bytes']):<10} in {s['packs']} packs, deduplicated and compressed",
        f"dedup ratio        {str(s['dedup_ratio'] or '-'):<10} data / stored (compression included)",
        f"blocks             {s['referenced_blocks']} used by versions, {s['index_blocks']} in the index"
        + (f" ({unused} no version uses: `alike gc` reclaims them)" if unused > 0 else "")
        + f"; {_h(s['block_size'])} each",
        "free space         " + (f"{_h(s['free_bytes']):<10} {s['free_note']}" if s["free_bytes"] is not None
                                 else s["free_note"]),
    ]
    if s["per_vm"]:
        lines.append("per VM (newest version; added: what its backups stored that was new)")
        w = max(len(v["vm"]) for v in s["per_vm"])
        for v in s["per_vm"]:
            lines.append(f"  {v['vm']:<{w}}  {v['versions']} version(s), newest {v['newest']}: disks "
                         f"{_h(v['logical_bytes'])}, data {_h(v['data_bytes'])}; added {_h(v['added_bytes'])}")
    _emit(args, s, "\n".join(lines))
    return 0


def register(add, sub) -> None:
    add("stats", cmd_stats, "logical, data and stored bytes, dedup ratio, blocks, free space, per VM")
