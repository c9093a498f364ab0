"""`alike instant`: boot a VM from a backup (alike_ray/restore/instant.py)."""
from __future__ import annotations

import json
import os

from storage.errors import StoreError

from ..ui import _emit, out


def cmd_instant(args) -> int:
    from ..restore import instant

    if args.list:
        rows = instant.listing()
        if args.json:
            out(json.dumps({"instant": rows}))
        else:
            for r in rows:
                out(f"{r['name']:<20} {r['vm']}@{r['version']}  {'running' if r['running'] else 'stopped'}  {r['run']}")
            if not rows:
                out("no instant VMs")
        return 0
    if args.stop:
        res = instant.stop(args.stop)
        _emit(args, res, f"stopped instant VM {args.stop}; its overlay and mount are gone")
        return 0
    if not args.vm:
        raise StoreError("give VM[@VERSION] to start, or --stop NAME, or --list")
    from pipelines.restore import resolve_version
    from storage.store import Store

    from ..config import store_url

    spec = store_url(args)
    st = Store.open(spec)
    vm, _, version = args.vm.partition("@")
    version = resolve_version(st, vm, version or None)
    meta = st.read_version(vm, version)
    store_arg = ["--store", args.store or os.environ.get("ALIKE_STORE", "")]
    if args.endpoint:
        store_arg += ["--endpoint", args.endpoint]
    if args.profile:
        store_arg += ["--profile", args.profile]
    name = args.name or f"{vm}-instant"
    res = instant.start(spec, vm, version, meta, name, memory=args.memory, store_arg=store_arg)
    _emit(args, res, f"instant VM {name} is running from {vm}@{version} ({res['seconds_to_running']:.1f}s); "
                     f"writes go to {res['run']}; stop it with `alike instant --stop {name}`")
    return 0


def register(add, sub) -> None:
    sp = add("instant", cmd_instant, "boot a VM from a backup in seconds (QEMU over a copy-on-write overlay)",
             "Start QEMU from VM[@VERSION] without restoring it: the disks are served read-only from the store "
             "(alike mount) under qcow2 overlays that take the guest's writes. --stop NAME ends it and cleans up.")
    sp.add_argument("vm", nargs="?", metavar="VM[@VERSION]")
    sp.add_argument("--name", help="name of the instant VM (default VM-instant)")
    sp.add_argument("--memory", type=int, default=512, help="memory in MiB (default 512)")
    sp.add_argument("--stop", metavar="NAME", help="stop an instant VM and remove its overlay and mount")
    sp.add_argument("--list", action="store_true", help="list instant VMs")
