"""`alike backup`: back up VMs (pipelines/backup.py), optionally vaulting the new versions."""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass

from storage.errors import StoreError

from . import Served, _checks, absolute_args, add_server_options
from ..ui import Progress, _connect, _h, out, took, with_times


@dataclass(frozen=True)
class Pick:
    """A VM to back up: the source spec it comes from and its name in the store."""
    spec: str
    vm: str


def cmd_backup(args) -> int:
    from pipelines.backup import run_backup
    from pipelines.cluster import local_node_id
    from storage.store import Store, check_vm_name

    from ..config import store_url
    from .vault import _vault

    url = store_url(args)
    Store.open(url)
    if args.name and len(args.sources) > 1:
        raise StoreError("--name names one VM: give one source with it, or none (names come from the images)")
    if args.name:
        check_vm_name(args.name)
    _checks.at_least(args.parallel, 1, "--parallel")
    if args.vault_to:
        _checks.store_target(args.vault_to, args.to_endpoint or args.endpoint, args.to_profile or args.profile)
    picks = _choose(args)  # before Ray starts: every source parsed and listed, every name checked
    _connect(args)
    node = local_node_id()
    jobs = _open_picked(args, picks, node)
    bar = Progress("backup")
    t0 = time.monotonic()
    try:
        results = run_backup(url, jobs, parallel=args.parallel, full=args.full, on_progress=bar, node_id=node,
                             cbt=not args.no_cbt)
    finally:
        bar.close()
    failed = [r for r in results if "error" in r]
    if args.vault_to and len(failed) < len(results):
        args.to = args.vault_to
        done = [r["vm"] for r in results if "error" not in r]
        rep = _vault(args, url, vms=done, versions=[r["version"] for r in results if "error" not in r])
        for r in results:
            if "error" not in r:
                r["vaulted"] = f"{r['vm']}@{r['version']}" not in rep["versions_skipped"]
        if rep["versions_skipped"]:
            failed.append({"vm": ",".join(rep["versions_skipped"]), "error": "vault after backup skipped damaged versions",
                           "exit_code": 3})
    for r in failed:
        print(f"alike: error: {r['error']}", file=sys.stderr)
    for r in results:  # what the source warned about (an image cut short...), kept with the version
        for note in r.get("notes", []):
            print(f"alike: warning: {r['vm']}: {note}", file=sys.stderr)
    keys = ("vm", "version", "logical_bytes", "read_bytes", "new_blocks", "stored_bytes", "zero_blocks",
            "cache_hits", "index_lookups", "packs", "cbt", "patched_blocks", "cbt_notes", "notes", "read_nodes", "seconds",
            "phase_seconds", "task_seconds", "actor_cpu_seconds", "vaulted")
    ok = [{k: r.get(k) for k in keys if k in r} for r in results if "error" not in r]
    if not args.json:  # one VM: the time the user waited; several: each VM's, then the user's
        for r in ok:
            patched = f" ({r['patched_blocks']} patched)" if r.get("patched_blocks") else ""
            out(f"{r['vm']}@{r['version']}: {_h(r['logical_bytes'])} disks, read {_h(r['read_bytes'])}, "
                f"{r['new_blocks']} new blocks{patched}, {_h(r['stored_bytes'])} stored, "
                + (took(args) if len(results) == 1 else f"{r['seconds']:.1f}s"))
        if len(results) > 1:
            out(f"{len(ok)} of {len(results)} VMs backed up {took(args)}")
    elif len(results) == 1 and ok:
        out(json.dumps(with_times(args, ok[0])))
    else:
        out(json.dumps(with_times(args, {"ok": not failed, "seconds": round(time.monotonic() - t0, 3), "vms": ok,
                                         "errors": [{"vm": r["vm"], "error": r["error"]} for r in failed]})))
    if failed:
        return max(int(r.get("exit_code", 1)) for r in failed)
    return 0


def _source_options(args, spec: str) -> dict:
    from ..jobs import source_options

    if spec.startswith("image:"):
        return {"name": args.name, "shared": args.shared}
    return source_options(spec, args.credentials, args.ca_bundle, args.memory, not args.no_cbt, args.quiesce)


def _choose(args) -> list[Pick]:
    """The VMs the sources name (all of a one-VM source, else those given with --vm), checked."""
    from storage.store import check_vm_name

    picks = []
    for spec in args.sources:
        src = _checks.open_source(spec, **_source_options(args, spec))
        vms = src.list_vms()
        if len(vms) == 1 and not args.vm:
            picks.append(Pick(spec, check_vm_name(vms[0].name)))
            continue
        if not args.vm:
            raise StoreError(f"{spec} has {len(vms)} VMs: name the ones to back up with --vm "
                             f"(see `alike inventory {spec}`)")
        names = {v.name for v in vms}
        for want in args.vm:
            if want not in names:
                raise StoreError(f"no VM named {want!r} in {spec}: see `alike inventory {spec}`")
            picks.append(Pick(spec, check_vm_name(want)))
    names = [p.vm for p in picks]
    if len(set(names)) != len(names):
        raise StoreError(f"two sources would be the VM {max(names, key=names.count)!r}: give each a distinct name")
    return picks


def _open_picked(args, picks: list[Pick], node: str) -> list:
    """-> [(source, VM name)] for run_backup: each source opened again, now with this Ray node
    (reads of local paths are pinned to it)."""
    from ..sources import open_source

    opened = {}
    for p in picks:
        if p.spec not in opened:
            opened[p.spec] = open_source(p.spec, node_id=node, **_source_options(args, p.spec))
    return [(opened[p.spec], p.vm) for p in picks]


def register(add, sub) -> None:
    sp = add("backup", cmd_backup, "back up VMs (a full version that stores only new data)",
             "Back up one or more sources. Each becomes a version of its VM: complete on its own, "
             "storing only blocks the store lacks. Sources: image:PATH[,PATH...] (raw or qcow2 "
             "files, block devices), kvm:LIBVIRT-URI (with --vm), xen:POOL-MASTER-URL and "
             "vmware:VCENTER-URL (with --vm and --credentials).")
    sp.add_argument("sources", nargs="+", metavar="SOURCE", help="e.g. image:/var/lib/images/web.qcow2")
    sp.add_argument("--name", help="VM name (default: the image file's name without extension)")
    sp.add_argument("--vm", action="append", help="a VM of a multi-VM source such as kvm:URI (repeatable)")
    sp.add_argument("--no-cbt", action="store_true", help="ignore changed block tracking: read every allocated block")
    add_hypervisor_options(sp)
    sp.add_argument("--memory", action="store_true",
                    help="xen: a disk-and-memory checkpoint of a running VM (its memory image is kept with the version)")
    sp.add_argument("--quiesce", action="store_true",
                    help="vmware: a quiesced snapshot (the guest's tools flush its filesystems first)")
    sp.add_argument("--parallel", type=int, default=2, help="VMs backed up at once (default 2)")
    sp.add_argument("--full", action="store_true",
                    help="always full/baseline: ignore the previous version as munge cache")
    sp.add_argument("--shared", action="store_true",
                    help="the image path is visible on every Ray node (NFS...): read tasks may run anywhere")
    sp.add_argument("--address", help="Ray cluster to join (default: $RAY_ADDRESS, else a local instance)")
    add_server_options(sp, "backup")

    sp.add_argument("--vault-to", metavar="STORE", help="after the backup, vault the new versions to this store")
    sp.add_argument("--to-endpoint", help="S3 endpoint of the --vault-to store (default: --endpoint)")
    sp.add_argument("--to-profile", help="AWS profile of the --vault-to store (default: --profile)")


def add_hypervisor_options(sp) -> None:
    """--credentials and --ca-bundle, for commands that talk to a hypervisor (xen:)."""
    sp.add_argument("--credentials", metavar="FILE",
                    help="xen:, vmware:: TOML file with username and password, mode 0600 (else "
                         "$ALIKE_XEN_USERNAME/$ALIKE_XEN_PASSWORD, $ALIKE_VMWARE_USERNAME/$ALIKE_VMWARE_PASSWORD); "
                         "never put a password on the command line")
    sp.add_argument("--ca-bundle", metavar="FILE",
                    help="xen:, vmware:: CA certificates (PEM) that sign the server's TLS certificate, or "
                         "that certificate itself (default: the system's CAs)")


def _client_args(d: dict) -> None:
    from ..config import absolute_source  # not ..sources: the client of a server imports no numpy

    absolute_args(d, stores=("store", "vault_to"), paths=("credentials", "ca_bundle"))
    sources = d.get("sources") or []
    d["sources"] = [absolute_source(s) for s in sources]
    for given, full in zip(sources, d["sources"]):  # image paths shown as given
        for g, f in zip(given.partition(":")[2].split(","), full.partition(":")[2].split(",")):
            if g != f:
                d.setdefault("_shown", {})[f] = g


SERVED = {"backup": Served(cmd_backup, _client_args)}
