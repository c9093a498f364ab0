"""`alike restore`: a version's disks to files, or to a new VM on a hypervisor (pipelines/restore.py)."""
from __future__ import annotations

import os
import time

from storage.errors import StoreError

from . import Served, _checks, absolute_args, absolute_path, add_server_options
from ..ui import Progress, _connect, _emit, _h, took, with_times


def cmd_restore(args) -> int:
    from pipelines.cluster import local_node_id
    from pipelines.restore import resolve_version, run_restore
    from storage.store import Store

    from ..config import store_url

    url = store_url(args)
    st = Store.open(url)
    vm, _, version = args.vm.partition("@")
    if args.offsite:
        from storage.backend import store_spec

        off = store_spec(args.offsite, args.offsite_endpoint or args.endpoint, args.offsite_profile or args.profile)
        have_here = any(v == version or v.startswith(version) for _, v in st.list_versions(vm)) if version \
            else bool(st.list_versions(vm))
        if args.prefer == "offsite" or not have_here:
            url, st = off, Store.open(off)
    from ..restore.formats import EXTENSIONS, convert, fmt_for

    version = resolve_version(st, vm, version or None)
    meta = st.read_version(vm, version)
    ndisks = len(meta["disks"])
    hyper = xen = None
    memory_disk = [n for n, d in enumerate(meta["disks"]) if d.get("role") == "memory"]
    if args.to.startswith("xen:"):  # a full restore into a Xen pool: a new VM there
        from ..restore.xen import XenTarget

        xen = XenTarget(args.to[len("xen:"):], args.credentials, args.ca_bundle)
        name = args.name or f"{vm}-restored"
        if args.memory is not None:
            _checks.at_least(args.memory, 1, "--memory")
        if args.vcpus is not None:
            _checks.at_least(args.vcpus, 1, "--vcpus")
        disks = [n for n in range(ndisks) if n not in memory_disk]
        xen.check(name, args.sr, [meta["disks"][n]["size"] for n in range(ndisks)], args.network or [])
        return _restore_into(args, url, st, vm, version, meta, xen, name, disks, memory_disk)
    if args.to.startswith("vmware:"):  # a full restore into vSphere: a new VM there
        from ..restore.vmware import VmwareTarget

        target = VmwareTarget(args.to[len("vmware:"):], args.credentials, args.ca_bundle)
        name = args.name or f"{vm}-restored"
        for v, flag in ((args.memory, "--memory"), (args.vcpus, "--vcpus")):
            if v is not None:
                _checks.at_least(v, 1, flag)
        disks = [n for n in range(ndisks) if n not in memory_disk]
        if args.network and len(args.network) > 1:
            raise StoreError("--to vmware: takes one --network (every NIC goes on it)")
        target.check(name, args.datastore, args.folder, args.resource_pool, [meta["disks"][n]["size"] for n in disks],
                     (args.network or [None])[0])
        return _restore_into(args, url, st, vm, version, meta, target, name, disks, [])
    if args.to.startswith("kvm:"):  # a full restore into a hypervisor: a new VM there
        from ..restore import hypervisor

        uri = args.to[len("kvm:"):]
        name = args.name or f"{vm}-restored"
        pool = args.pool_dir or hypervisor.DEFAULT_POOL
        shape = meta.get("shape") or {}  # the recorded shape (a Xen VM's), else 1 GiB and 1 vCPU
        args.memory = (int(shape.get("memory_bytes") or 0) >> 20 or 1024) if args.memory is None else args.memory
        args.vcpus = int(shape.get("vcpus") or 1) if args.vcpus is None else args.vcpus
        _checks.at_least(args.memory, 1, "--memory")
        _checks.at_least(args.vcpus, 1, "--vcpus")
        hypervisor.check_target(uri, name, pool)
        hyper = (hypervisor, uri, name)
        args.to, args.format, args.disk = pool, "qcow2", "all"
    if hyper:  # a memory image (of a Xen checkpoint) has no meaning to KVM: the disks only
        disks = [n for n in range(ndisks) if n not in memory_disk]
    elif args.disk in (None, "all"):
        disks = list(range(ndisks))
    else:
        if not args.disk.isdigit() or int(args.disk) >= ndisks:
            raise StoreError(f"{vm}@{version} has no disk {args.disk!r}: use a number from 0 to {ndisks - 1}, or all")
        disks = [int(args.disk)]
    fmt = fmt_for(args.to, args.format)
    if hyper:
        targets = [os.path.join(args.to, f"{hyper[2]}-disk{n}.qcow2") for n in disks]
    elif len(disks) == 1:
        targets = [args.to]
    else:
        if os.path.exists(args.to) and not os.path.isdir(args.to):
            raise StoreError(f"{vm}@{version} has {ndisks} disks: --to must be a folder (or pass --disk N)")
        try:
            os.makedirs(args.to, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create the folder {args.to}: {e.strerror or e} (choose another --to)") from None
        stems = [os.path.splitext(meta["disks"][n]["name"])[0] for n in disks]
        if len(set(stems)) != len(stems):  # two disks of one name: number them
            stems = [f"{n}-{s}" for n, s in zip(disks, stems)]
        targets = [os.path.join(args.to, s + EXTENSIONS[fmt]) for s in stems]
    for t in targets:  # before Ray starts: a target that cannot be written is found at once
        if hyper:
            if os.path.exists(t) and not args.force:
                raise StoreError(f"{t} exists: choose another target or pass --force to overwrite it")
        else:
            _checks.output_file(t, args.force)
    from pipelines.restore import check_targets

    # room for the data before Ray starts (qcow2, vhd, vhdx: a raw file first, then the converted one)
    check_targets(st, vm, version, disks, targets, copies=1 if fmt == "raw" else 2)
    raws = targets if fmt == "raw" else [f"{t}.alike-raw" for t in targets]
    _connect(args)
    bar = Progress("restore")
    t0 = time.monotonic()
    try:
        res = run_restore(url, vm, version, raws, force=True if fmt != "raw" else args.force, on_progress=bar,
                          node_id=local_node_id(), disks=disks)
        if fmt != "raw":
            res["checks"] = []
            for raw, t in zip(raws, targets):
                res["checks"].append(convert(raw, t, fmt))
    finally:
        bar.close()
        if fmt != "raw":
            for raw in raws:
                if os.path.exists(raw):
                    os.unlink(raw)
    res.update(targets=targets, format=fmt, disks=disks)
    if hyper:
        try:
            res["vm_created"] = hyper[0].define(hyper[1], hyper[2], targets, args.memory, args.vcpus, args.start)
        except BaseException:
            for t in targets:
                if os.path.exists(t):
                    os.unlink(t)
            raise
    res["seconds"] = round(time.monotonic() - t0, 3)
    text = (f"restored {vm}@{version} to {', '.join(targets)} ({_h(res['logical_bytes'])}, "
            f"{_h(res['written_bytes'])} of data) {took(args)}")
    if hyper:
        text += f"\nnew VM {hyper[2]} defined on {hyper[1]} ({res['vm_created']['state']})"
        if memory_disk:
            text += "\n(the version's memory image was left out: KVM cannot resume a Xen VM's memory)"
    _emit(args, with_times(args, res), text)
    return 0


def _restore_into(args, url, st, vm, version, meta, target, name, disks, memory_disk) -> int:
    """Restore the disks (and a memory image) into raw files in a scratch folder, then build the VM
    on the hypervisor from them (restore/xen.py, restore/vmware.py); the files go in any case."""
    import tempfile

    from pipelines.cluster import local_node_id
    from pipelines.restore import check_targets, run_restore

    scratch = args.scratch_dir or tempfile.gettempdir()
    want = disks + memory_disk
    raws = [os.path.join(scratch, f"alike-xen-{os.getpid()}-{n}.raw") for n in want]
    check_targets(st, vm, version, want, raws)
    _connect(args)
    bar = Progress("restore")
    t0 = time.monotonic()
    try:
        try:
            res = run_restore(url, vm, version, raws, force=True, on_progress=bar, node_id=local_node_id(), disks=want)
        finally:
            bar.close()
        pairs = [(meta["disks"][n], r) for n, r in zip(want, raws)]
        mem = pairs[len(disks)] if memory_disk else None
        res["vm_created"] = target.create(name, meta, pairs[:len(disks)], mem, args.start, args.memory, args.vcpus)
    finally:
        for r in raws:
            if os.path.exists(r):
                os.unlink(r)
        target.close()
    res["seconds"] = round(time.monotonic() - t0, 3)
    res.update(disks=want, target=args.to)
    made = res["vm_created"]
    where = f"SR {made['sr']!r}" if "sr" in made else f"datastore {made['datastore']!r}"
    text = (f"restored {vm}@{version} into {target.url} as VM {name} ({made['uuid']}, {made['state']}, "
            f"{where}): {_h(res['logical_bytes'])}, {_h(res['written_bytes'])} of data, {took(args)}")
    for note in made.get("notes", []):
        text += f"\nnote: {note}"
    _emit(args, with_times(args, res), text)
    return 0


def register(add, sub) -> None:
    sp = add("restore", cmd_restore, "restore a version's disks to raw files",
             "Restore VM (latest version) or VM@VERSION (a version id or a unique prefix of one). "
             "A one-disk VM (or --disk N) is written to the file --to; several disks to files named after "
             "the disks in the folder --to. Formats other than raw go through qemu-img and are checked "
             "with qemu-img check and compare.")
    sp.add_argument("vm", metavar="VM[@VERSION]")
    sp.add_argument("--to", required=True,
                    help="target file, folder (several disks), kvm:URI for a new VM on that libvirt host, "
                         "xen:POOL-MASTER-URL for a new VM in that pool, or vmware:VCENTER-URL for a new VM there")
    sp.add_argument("--disk", default="all", help="disk number to restore, or all (default)")
    sp.add_argument("--name", help="with --to kvm: or xen: the new VM's name (default VM-restored)")
    sp.add_argument("--datastore", help="with --to vmware:URL: the datastore for the disks (default: the one "
                                        "with most free space)")
    sp.add_argument("--folder", help="with --to vmware:URL: the VM folder, a path under the datacenter's VM folder")
    sp.add_argument("--resource-pool", metavar="HOST-OR-CLUSTER",
                    help="with --to vmware:URL: the host or cluster whose resource pool runs the VM")
    sp.add_argument("--sr", help="with --to xen:URL: the SR (name or uuid) for the disks (default: the pool's default SR)")
    sp.add_argument("--network", action="append", metavar="[NIC=]NETWORK",
                    help="with --to xen:URL: connect the VM's NICs (or the NIC named NIC, by device or original "
                         "network) to NETWORK (name or uuid); repeatable; NICs not mapped are left out")
    sp.add_argument("--scratch-dir", help="with --to xen: or vmware:: where the disks are restored before the import "
                                          "(default: the temporary folder)")
    from .backup import add_hypervisor_options

    add_hypervisor_options(sp)
    sp.add_argument("--pool-dir", help="with --to kvm:URI: where its disks go (default /var/lib/libvirt/images)")
    sp.add_argument("--memory", type=int, help="with --to kvm: or xen: memory in MiB (default: the version's, "
                                               "else 1024)")
    sp.add_argument("--vcpus", type=int, help="with --to kvm: or xen: virtual CPUs (default: the version's, else 1)")
    sp.add_argument("--start", action="store_true", help="with --to kvm: or xen: start (or resume) the new VM")
    sp.add_argument("--format", choices=["raw", "qcow2", "vhd", "vhdx"],
                    help="disk format (default: from --to's extension, else raw sparse); "
                         "converted and checked with qemu-img")
    sp.add_argument("--force", action="store_true", help="overwrite an existing target")
    sp.add_argument("--offsite", metavar="STORE", help="the offsite store (ODS) holding copies of --store's versions")
    sp.add_argument("--offsite-endpoint", help="S3 endpoint of --offsite (default: --endpoint)")
    sp.add_argument("--offsite-profile", help="AWS profile of --offsite (default: --profile)")
    sp.add_argument("--prefer", choices=["onsite", "offsite"], default="onsite",
                    help="which store to read when both hold the version (default onsite; the other "
                         "is used when only it has the version)")
    sp.add_argument("--address", help="Ray cluster to join")
    add_server_options(sp, "restore")


def _client_args(d: dict) -> None:
    absolute_args(d, stores=("store", "offsite"), paths=("pool_dir", "scratch_dir", "credentials", "ca_bundle"))
    if not d["to"].startswith(("kvm:", "xen:", "vmware:")):  # a file or folder here
        d["to"] = absolute_path(d, d["to"])


SERVED = {"restore": Served(cmd_restore, _client_args)}
