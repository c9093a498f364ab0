"""`alike inventory`: list the VMs of a source."""
from __future__ import annotations

import json
import sys

from ..ui import EPILOG, out


def cmd_inventory(args) -> int:
    from ._checks import open_source

    from ..jobs import source_options

    src = open_source(args.source, **source_options(args.source, args.credentials, args.ca_bundle, False, True))  # listing only
    vms = src.list_vms()
    rows = [{"name": v.name, "id": v.id, "state": v.power_state, "tags": v.tags,
             "disks": [{"name": n, "size": sz} for n, sz in v.disks], "notes": v.notes,
             **({"datacenter": v.shape["datacenter"]} if v.shape.get("datacenter") else {}),
             **({"folder": v.folder} if v.folder else {})} for v in vms]
    for r in rows:  # what the source warns about (an image cut short...)
        for note in r["notes"]:
            print(f"alike: warning: {r['name']}: {note}", file=sys.stderr)
    if args.json:
        out(json.dumps({"source": args.source, "vms": rows}))
        return 0
    where = any("datacenter" in r or "folder" in r for r in rows)  # vmware: where each VM is filed
    out(f"{'VM':<24} {'STATE':<10} {'DISKS':>5}  " + (f"{'FOLDER':<24} " if where else "") + "TAGS")
    for r in rows:
        folder = "/".join(filter(None, (r.get("datacenter"), r.get("folder")))) if where else ""
        out(f"{r['name']:<24} {r['state']:<10} {len(r['disks']):>5}  " + (f"{folder:<24} " if where else "")
            + ", ".join(r["tags"]))
    return 0


def register(add, sub) -> None:
    sp = sub.add_parser("inventory", help="list the VMs of a source", epilog=EPILOG,
                        description="List the VMs of a source (image:PATH, kvm:URI, xen:POOL-MASTER-URL, vmware:VCENTER-URL): "
                                    "names, state, disks, tags.")
    sp.add_argument("source", metavar="SOURCE")
    from .backup import add_hypervisor_options

    add_hypervisor_options(sp)
    sp.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    sp.set_defaults(fn=cmd_inventory)
