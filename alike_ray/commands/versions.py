"""`alike versions`: list versions, newest first."""
from __future__ import annotations

import json

from storage.errors import StoreError

from ..ui import _h, out


def cmd_versions(args) -> int:
    from storage.store import Store

    from ..catalog import versions_table
    from .prune import list_pins
    from ..config import store_url

    st = Store.open(store_url(args))
    if args.vm and args.vm not in st.list_vms():
        raise StoreError(f"no VM named {args.vm!r} in {st.url}")
    rows = versions_table(st, args.vm).to_pylist()
    pins = {(p["vm"], p["version"]): p for p in list_pins(st)}
    for r in rows:  # prune always keeps a pinned version: say which, and why it was pinned
        p = pins.get((r["vm"], r["version"]))
        r["pinned"] = None if p is None else {"note": p["note"], "since": p["pinned"]}
    if args.json:
        out(json.dumps({"store": st.url, "versions": rows}))
        return 0
    if not rows:
        out(f"no versions in {st.url} yet")
        return 0
    out(f"{'VM':<20} {'VERSION':<20} {'CREATED':<21} {'DISKS':>5} {'SIZE':>11} {'NEW STORED':>11}  PINNED")
    for r in rows:
        pin = "" if r["pinned"] is None else "pinned" + (f": {r['pinned']['note']}" if r["pinned"]["note"] else "")
        out((f"{r['vm']:<20} {r['version']:<20} {r['created'] or '':<21} {r['disks']:>5} "
             f"{_h(r['logical_bytes']):>11} {_h(r['stored_bytes']):>11}  {pin}").rstrip())
    return 0


def register(add, sub) -> None:
    sp = add("versions", cmd_versions, "list versions, newest first")
    sp.add_argument("--vm", help="only this VM")
