"""`alike stats`: logical and stored bytes, dedup ratio, blocks."""
from __future__ import annotations

from ..ui import _emit, _h


def cmd_stats(args) -> int:
    from storage.store import Store

    from ..catalog import store_stats
    from ..config import store_url

    st = Store.open(store_url(args))
    s = store_stats(st)
    _emit(args, s, "\n".join([
        f"store          {s['store']}",
        f"VMs            {s['vms']}",
        f"versions       {s['versions']}",
        f"logical        {_h(s['logical_bytes'])}",
        f"stored         {_h(s['stored_bytes'])} in {s['packs']} packs",
        f"dedup ratio    {s['dedup_ratio'] or '-'}",
        f"unique blocks  {s['unique_blocks']} of {_h(s['block_size'])}"]))
    return 0


def register(add, sub) -> None:
    add("stats", cmd_stats, "logical and stored bytes, dedup ratio, blocks")
