"""The `alike` command.

Exit codes: 0 success; 1 failure of a run (a VM's backup failed); 2 bad input (usage, store,
VM, version, target); 3 damaged data found (verify) or refused (restore); 4 no space left;
5 a source cannot be read; 130 interrupted.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from storage.errors import StoreError

from .ui import EPILOG, Progress, _connect, _emit, _guard_stdout, _h, out  # noqa: F401


# -- commands -------------------------------------------------------------------------------
def cmd_init(args) -> int:
    from storage.store import Store

    from .config import parse_size, store_url

    st = Store.init(store_url(args), parse_size(args.block_size), args.zstd_level)
    _emit(args, {"store": st.url, "store_id": st.config["store_id"], "block_size": st.block_size},
          f"created store {st.url} (block size {_h(st.block_size)}, zstd level {args.zstd_level})")
    return 0


def cmd_backup(args) -> int:
    from pipelines.backup import run_backup
    from pipelines.cluster import local_node_id
    from storage.store import Store, check_vm_name

    from .config import store_url
    from .sources import open_source

    url = store_url(args)
    Store.open(url)
    if args.name and len(args.sources) > 1:
        raise StoreError("--name names one VM: give one source with it, or none (names come from the images)")
    _connect(args)
    node = local_node_id()
    jobs = []
    for spec in args.sources:
        opts = {"node_id": node}
        if spec.startswith("image:"):
            opts.update(name=args.name, shared=args.shared)
        src = open_source(spec, **opts)
        vms = src.list_vms()
        if len(vms) == 1 and not args.vm:
            jobs.append((src, check_vm_name(vms[0].name)))
            continue
        if not args.vm:
            raise StoreError(f"{spec} has {len(vms)} VMs: name the ones to back up with --vm "
                             f"(see `alike inventory {spec}`)")
        names = {v.name for v in vms}
        for want in args.vm:
            if want not in names:
                raise StoreError(f"no VM named {want!r} in {spec}: see `alike inventory {spec}`")
            jobs.append((src, check_vm_name(want)))
    names = [vm for _, vm in jobs]
    if len(set(names)) != len(names):
        raise StoreError(f"two sources would be the VM {max(names, key=names.count)!r}: give each a distinct name")
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
            "phase_seconds", "task_seconds", "vaulted")
    ok = [{k: r.get(k) for k in keys if k in r} for r in results if "error" not in r]
    if not args.json:
        for r in ok:
            patched = f" ({r['patched_blocks']} patched)" if r.get("patched_blocks") else ""
            out(f"{r['vm']}@{r['version']}: {_h(r['logical_bytes'])} disks, read {_h(r['read_bytes'])}, "
                  f"{r['new_blocks']} new blocks{patched}, {_h(r['stored_bytes'])} stored, {r['seconds']:.1f}s")
    elif len(results) == 1 and ok:
        out(json.dumps(ok[0]))
    else:
        out(json.dumps({"ok": not failed, "seconds": round(time.monotonic() - t0, 3), "vms": ok,
                          "errors": [{"vm": r["vm"], "error": r["error"]} for r in failed]}))
    if failed:
        return max(int(r.get("exit_code", 1)) for r in failed)
    return 0


def _vault(args, src_spec, vms=None, versions=None) -> dict:
    from pipelines.cluster import local_node_id
    from pipelines.vault import run_vault
    from storage.backend import store_spec

    dst = store_spec(args.to, args.to_endpoint or args.endpoint, args.to_profile or args.profile)
    bar = Progress("vault")
    t0 = time.monotonic()
    try:
        rep = run_vault(src_spec, dst, vms=vms, versions=versions, on_progress=bar, node_id=local_node_id())
    finally:
        bar.close()
    rep["seconds"] = round(time.monotonic() - t0, 3)
    return rep


def cmd_vault(args) -> int:
    from storage.store import Store

    from .config import store_url

    url = store_url(args)
    Store.open(url)
    _connect(args)
    rep = _vault(args, url, vms=args.vm, versions=args.version)
    rate = rep["bytes_copied"] / rep["seconds"] if rep["seconds"] else 0
    _emit(args, rep, f"vaulted {rep['versions_copied']} version(s) to {rep['target']} "
                     f"({rep['versions_present']} already there): {rep['blocks_copied']} blocks, "
                     f"{_h(rep['bytes_copied'])} copied in {rep['seconds']:.1f}s ({_h(rate)}/s)")
    if rep["versions_skipped"]:
        print(f"alike: error: {len(rep['versions_skipped'])} version(s) not vaulted, their blocks are damaged "
              f"in the source: {', '.join(rep['versions_skipped'])} (run `alike verify`)", file=sys.stderr)
        return 3
    return 0


def cmd_inventory(args) -> int:
    from .sources import open_source

    src = open_source(args.source)
    vms = src.list_vms()
    rows = [{"name": v.name, "id": v.id, "state": v.power_state, "tags": v.tags,
             "disks": [{"name": n, "size": sz} for n, sz in v.disks]} for v in vms]
    if args.json:
        out(json.dumps({"source": args.source, "vms": rows}))
        return 0
    out(f"{'VM':<24} {'STATE':<10} {'DISKS':>5}  TAGS")
    for r in rows:
        out(f"{r['name']:<24} {r['state']:<10} {len(r['disks']):>5}  {', '.join(r['tags'])}")
    return 0


def _job_store(args, job):
    from storage.backend import store_spec
    from storage.errors import InvalidValue

    # alike_store_env: the $ALIKE_STORE of an `alike server` client (the server's own does not count)
    url = args.store or job.store or getattr(args, "alike_store_env", None) or os.environ.get("ALIKE_STORE")
    if not url:
        raise InvalidValue(f"{job.path}: no store: put store = \"...\" in the job, pass --store or set ALIKE_STORE")
    return store_spec(url, args.endpoint or job.endpoint, args.profile or job.profile)


def cmd_job_preview(args) -> int:
    from . import jobs

    job = jobs.load(args.file)
    taken, missing = jobs.select(job)
    rows = [{"vm": vm.name, "source": vm.id, "state": vm.power_state, "tags": vm.tags, "disks": len(vm.disks)}
            for _, vm in taken]
    if args.json:
        out(json.dumps({"job": job.name, "vms": rows, "missing": missing}))
    else:
        out(f"job {job.name}: {len(rows)} VM(s) would be backed up now")
        for r in rows:
            out(f"  {r['vm']:<24} {r['state']:<10} {r['disks']} disk(s)  {', '.join(r['tags'])}")
        for m, why in missing.items():
            out(f"  {m:<24} UNAVAILABLE: {why}")
    if not rows and not missing:
        raise jobs.JobError(f"{job.path}: the selection matches no VM of its sources")
    return 0


def cmd_job_run(args) -> int:
    from pipelines.backup import run_backup
    from pipelines.cluster import local_node_id
    from storage.store import Store

    from . import jobs

    job = jobs.load(args.file, base=getattr(args, "cwd", None))
    spec = _job_store(args, job)
    store = Store.open(spec)
    _connect(args)
    node = local_node_id()
    taken, missing = jobs.select(job, node)
    if not taken and not missing:
        raise jobs.JobError(f"{job.path}: the selection matches no VM of its sources")
    run_id = jobs.new_run_id()
    t0 = time.time()
    record = {"job": job.name, "run_id": run_id, "file": os.path.abspath(job.path),
              "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t0)), "status": "running", "vms": []}
    jobs.record_run(store, job.name, run_id, record)
    last = {}

    def on_vm(vm, phase, done, total):
        if last.get(vm) != phase:
            last[vm] = phase
            print(f"{vm}: {phase}", file=sys.stderr, flush=True)

    results = run_backup(spec, [(src, vm.name) for src, vm in taken], parallel=job.parallel, full=job.full,
                         node_id=node, on_vm=on_vm, cbt=job.cbt)
    results += [{"vm": m, "error": why} for m, why in missing.items()]
    if job.vault_to:
        from pipelines.vault import run_vault
        from storage.backend import store_spec

        done = [r for r in results if "error" not in r]
        if done:
            dst = store_spec(job.vault_to, job.vault_endpoint or job.endpoint, job.vault_profile or job.profile)
            try:
                rep = run_vault(spec, dst, vms=[r["vm"] for r in done], versions=[r["version"] for r in done],
                                node_id=node)
                for r in done:
                    r["vaulted"] = f"{r['vm']}@{r['version']}" not in rep["versions_skipped"]
            except StoreError as e:
                for r in done:
                    r["vaulted"] = False
                    r["vault_error"] = e.message
    code = 0 if all("error" not in r for r in results) else 1
    if job.validate or job.validate_all:  # the data not validated yet (the new data), or all of it
        from pipelines.verify import run_verify

        print("validate: verifying " + ("the store" if job.validate_all else "the new data"),
              file=sys.stderr, flush=True)
        try:
            rep = run_verify(spec, on_progress=None, node_id=node, new_only=not job.validate_all)
            record["validate"] = {"ok": rep["ok"], "versions": rep.get("versions"), "mode": rep.get("mode"),
                                  "packs_checked": rep.get("packs_checked"),
                                  "blocks_checked": rep.get("blocks_checked"), "problems": rep.get("problems", []),
                                  "damaged": [f"{b['vm']}@{b['version']} disk {b['disk']}" for b in rep.get("broken", [])]}
            code = code if rep["ok"] else 3  # damaged data outranks a failed backup (1)
        except Exception as e:  # could not validate: the run fails, the backups stay
            record["validate"] = {"ok": False, "error": getattr(e, "message", None) or f"{type(e).__name__}: {e}"}
            code = max(code, 1)
    if job.retention:
        from .commands.prune import prune_store

        names = sorted({r["vm"] for r in results})  # the job's VMs, also those that failed this time
        record["retention"] = {}
        for where, policy in job.retention.items():
            entry = record["retention"][where] = {"policy": policy.to_dict()}
            if where == "onsite" and "error" not in record.get("validate", {}) and \
                    not record.get("validate", {}).get("ok", True):
                entry["skipped"] = "validation found damaged data: older versions may be the intact ones"
            elif where == "offsite" and not job.vault_to:
                entry["skipped"] = "the job has no vault_to store"
            else:
                try:
                    if where == "onsite":
                        target = store
                    else:
                        from storage.backend import store_spec

                        target = Store.open(store_spec(job.vault_to, job.vault_endpoint or job.endpoint,
                                                       job.vault_profile or job.profile))
                    rep = prune_store(target, policy, names)
                    entry.update(store=rep["store"], removed=rep["removed"], kept=rep["kept"])
                except Exception as e:  # reported; the backups stay
                    entry["error"] = getattr(e, "message", None) or f"{type(e).__name__}: {e}"
                    code = max(code, 1)
            print(f"retention {where}: " + jobs.retention_text(entry), file=sys.stderr, flush=True)
    keys = ("vm", "version", "logical_bytes", "read_bytes", "new_blocks", "stored_bytes", "cbt", "patched_blocks",
            "cbt_notes", "seconds", "vaulted", "vault_error", "error")
    record.update(status="ok" if code == 0 else "failed",
                  finished=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  seconds=round(time.time() - t0, 3),
                  vms=[{k: r[k] for k in keys if k in r} for r in results])
    jobs.record_run(store, job.name, run_id, record)
    for r in results:
        if "error" in r:
            print(f"alike: error: {r['vm']}: {r['error']}", file=sys.stderr)
        for note in r.get("cbt_notes", []):
            print(f"{r['vm']}: {note}", file=sys.stderr)
    for where, entry in record.get("retention", {}).items():
        if "error" in entry:
            print(f"alike: error: {where} retention failed (the backups are kept): {entry['error']}", file=sys.stderr)
    val = record.get("validate", {})
    if "error" in val:
        print(f"alike: error: validation could not run: {val['error']}", file=sys.stderr)
    elif val and not val["ok"]:
        print(f"alike: error: validation found damaged data: {', '.join(val['damaged'] + val['problems'])} "
              "(run `alike verify`)", file=sys.stderr)
    if args.json:
        out(json.dumps(record))
    else:
        ok = sum("error" not in r for r in results)
        out(f"job {job.name} run {run_id}: {ok} of {len(results)} VM(s) backed up in {record['seconds']:.1f}s")
        for r in record["vms"]:
            out(f"  {r['vm']:<20} " + (f"FAILED: {r['error']}" if "error" in r else
                f"{r['version']}  read {_h(r['read_bytes'])}, {r['new_blocks']} new blocks, {_h(r['stored_bytes'])} stored"))
        for line in jobs.run_notes(record):
            out(f"  {line}")
    return code


def cmd_job_history(args) -> int:
    from storage.store import Store

    from . import jobs
    from .config import store_url

    store = Store.open(store_url(args))
    runs = jobs.history(store, args.job)
    if args.json:
        out(json.dumps({"store": store.url, "runs": runs}))
        return 0
    if not runs:
        out("no job runs recorded" + (f" for {args.job}" if args.job else ""))
        return 0
    out(f"{'JOB':<16} {'RUN':<20} {'STATUS':<8} {'VMS':>4} {'FAILED':>6} {'READ':>10} {'NEW':>6} {'STORED':>10} {'SECONDS':>8}")
    for r in runs:
        vms = r.get("vms", [])
        out(f"{r['job']:<16} {r['run_id']:<20} {r.get('status', '?'):<8} {len(vms):>4} "
            f"{sum('error' in v for v in vms):>6} {_h(sum(v.get('read_bytes', 0) for v in vms)):>10} "
            f"{sum(v.get('new_blocks', 0) for v in vms):>6} {_h(sum(v.get('stored_bytes', 0) for v in vms)):>10} "
            f"{r.get('seconds', 0):>8.1f}")
        for v in vms:
            if "error" in v:
                out(f"    {v['vm']}: {v['error']}")
            for note in v.get("cbt_notes", []):
                out(f"    {v['vm']}: {note}")
        for line in jobs.run_notes(r):
            out(f"    {line}")
    return 0


def cmd_mount(args) -> int:
    from .config import store_url
    from .restore.mount import mount

    spec = store_url(args)
    print(f"mounting {args.store or os.environ.get('ALIKE_STORE')} read-only at {args.mountpoint}; "
          f"`umount {args.mountpoint}` or Ctrl-C to end", file=sys.stderr, flush=True)
    mount(spec, args.mountpoint, foreground=True, allow_other=args.allow_other)
    return 0


def cmd_instant(args) -> int:
    from .restore import instant

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

    from .config import store_url

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


def cmd_versions(args) -> int:
    from storage.store import Store

    from .catalog import versions_table
    from .config import store_url

    st = Store.open(store_url(args))
    if args.vm and args.vm not in st.list_vms():
        raise StoreError(f"no VM named {args.vm!r} in {st.url}")
    rows = versions_table(st, args.vm).to_pylist()
    if args.json:
        out(json.dumps({"store": st.url, "versions": rows}))
        return 0
    if not rows:
        out(f"no versions in {st.url} yet")
        return 0
    out(f"{'VM':<20} {'VERSION':<20} {'CREATED':<21} {'DISKS':>5} {'SIZE':>11} {'NEW STORED':>11}")
    for r in rows:
        out(f"{r['vm']:<20} {r['version']:<20} {r['created'] or '':<21} {r['disks']:>5} "
              f"{_h(r['logical_bytes']):>11} {_h(r['stored_bytes']):>11}")
    return 0


def cmd_restore(args) -> int:
    from pipelines.cluster import local_node_id
    from pipelines.restore import resolve_version, run_restore
    from storage.store import Store

    from .config import store_url

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
    from .restore.formats import EXTENSIONS, convert, fmt_for

    version = resolve_version(st, vm, version or None)
    meta = st.read_version(vm, version)
    ndisks = len(meta["disks"])
    hyper = None
    if args.to.startswith("kvm:"):  # a full restore into a hypervisor: a new VM there
        from .restore import hypervisor

        uri = args.to[len("kvm:"):]
        name = args.name or f"{vm}-restored"
        pool = args.pool_dir or hypervisor.DEFAULT_POOL
        hypervisor.check_target(uri, name, pool)
        hyper = (hypervisor, uri, name)
        args.to, args.format, args.disk = pool, "qcow2", "all"
    if args.disk in (None, "all"):
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
        os.makedirs(args.to, exist_ok=True)
        stems = [os.path.splitext(meta["disks"][n]["name"])[0] for n in disks]
        if len(set(stems)) != len(stems):  # two disks of one name: number them
            stems = [f"{n}-{s}" for n, s in zip(disks, stems)]
        targets = [os.path.join(args.to, s + EXTENSIONS[fmt]) for s in stems]
    for t in targets:
        if os.path.exists(t) and not args.force:
            raise StoreError(f"{t} exists: choose another target or pass --force to overwrite it")
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
            f"{_h(res['written_bytes'])} of data, {res['seconds']:.1f}s)")
    if hyper:
        text += f"\nnew VM {hyper[2]} defined on {hyper[1]} ({res['vm_created']['state']})"
    _emit(args, res, text)
    return 0


def cmd_verify(args) -> int:
    from pipelines.cluster import local_node_id
    from pipelines.verify import parse_age, parse_percent, run_verify
    from storage.store import Store

    from .config import store_url

    if args.sample and args.older_than:
        raise StoreError("give --sample or --older-than, not both")
    sample = parse_percent(args.sample) if args.sample else None
    older = parse_age(args.older_than) if args.older_than else None
    url = store_url(args)
    Store.open(url)
    _connect(args)
    bar = Progress("verify", unit="pack")

    def rate(nbytes, seconds):
        if bar and seconds > 0:
            bar.bar.set_postfix_str(f"{_h(nbytes)} read, {nbytes / 1e6 / seconds:.1f} MB/s", refresh=False)

    try:
        rep = run_verify(url, on_progress=bar, node_id=local_node_id(), sample=sample, older_than=older,
                         on_bytes=rate)
    finally:
        bar.close()
    if args.json:
        out(json.dumps(rep))
    else:
        what = ""
        if sample is not None:
            what = f" (a {sample:g}% sample of the {rep['packs_total']} packs in use)"
        elif older is not None:
            what = f" (those not validated within {args.older_than}, of {rep['packs_total']} in use)"
        out(f"checked {rep['blocks_checked']} blocks in {rep['packs_checked']} packs{what} "
            f"of {rep['versions']} versions: {_h(rep['bytes_read'])} in {rep['seconds']:.1f}s "
            f"({rep['mb_per_s']:.1f} MB/s)")
        for p in rep["problems"]:
            out(f"  problem: {p}")
        for b in rep["broken"]:
            n = b["damaged_blocks"]
            out(f"  DAMAGED: {b['vm']}@{b['version']} disk {b['disk']}"
                  + (f" ({n} damaged block(s))" if n else " (manifest unreadable)"))
        if rep["ok"]:
            out("all versions are intact" if rep["mode"] == "all" else "every pack checked is intact")
        else:
            out(f"{len(rep['broken'])} disk(s) of versions are damaged"
                + (f", {len(rep['damaged_packs'])} pack(s) and {len(rep['damaged_segments'])} index segment(s) "
                   "have damage" if rep["damaged_packs"] or rep["damaged_segments"] else "")
                + ": heal them with `alike repair --from OTHER_STORE`, or back up again")
    return 0 if rep["ok"] else 3


def cmd_stats(args) -> int:
    from storage.store import Store

    from .catalog import store_stats
    from .config import store_url

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


# -- parser ---------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="alike", description="Deduplicating VM backup on Ray.", epilog=EPILOG)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def add(name, fn, help_, desc=None):
        sp = sub.add_parser(name, help=help_, description=desc or help_, epilog=EPILOG)
        sp.add_argument("--store", help="store: a folder, or s3://BUCKET/PREFIX (default: $ALIKE_STORE)")
        sp.add_argument("--endpoint", help="S3 endpoint URL for MinIO, Ceph RGW... (default: boto3's, e.g. "
                                           "$AWS_ENDPOINT_URL; AWS S3 when unset)")
        sp.add_argument("--profile", help="AWS profile for S3 credentials (default: boto3's usual chain)")
        sp.add_argument("--json", action="store_true", help="print one JSON object on stdout")
        sp.set_defaults(fn=fn)
        return sp

    sp = add("init", cmd_init, "create a store")
    sp.add_argument("--block-size", default="512K", help="block size, a power of two from 64K to 4M (default 512K)")
    sp.add_argument("--zstd-level", type=int, default=3, help="zstd compression level, 1-19 (default 3)")

    sp = add("backup", cmd_backup, "back up VMs (a full version that stores only new data)",
             "Back up one or more sources. Each becomes a version of its VM: complete on its own, "
             "storing only blocks the store lacks. Sources: image:PATH[,PATH...] (raw or qcow2 "
             "files, block devices).")
    sp.add_argument("sources", nargs="+", metavar="SOURCE", help="e.g. image:/var/lib/images/web.qcow2")
    sp.add_argument("--name", help="VM name (default: the image file's name without extension)")
    sp.add_argument("--vm", action="append", help="a VM of a multi-VM source such as kvm:URI (repeatable)")
    sp.add_argument("--no-cbt", action="store_true", help="ignore changed block tracking: read every allocated block")
    sp.add_argument("--parallel", type=int, default=2, help="VMs backed up at once (default 2)")
    sp.add_argument("--full", action="store_true",
                    help="always full/baseline: ignore the previous version as munge cache")
    sp.add_argument("--shared", action="store_true",
                    help="the image path is visible on every Ray node (NFS...): read tasks may run anywhere")
    sp.add_argument("--address", help="Ray cluster to join (default: $RAY_ADDRESS, else a local instance)")
    sp.add_argument("--server", nargs="?", const=True, metavar="SOCKET",
                    help="run the backup in the long-lived `alike server` listening at SOCKET (default: "
                         "$ALIKE_SERVER, else the server's default socket): its Ray workers are already up, so "
                         "a backup costs only its own work. Setting $ALIKE_SERVER makes this the default")

    sp.add_argument("--vault-to", metavar="STORE", help="after the backup, vault the new versions to this store")
    sp.add_argument("--to-endpoint", help="S3 endpoint of the --vault-to store (default: --endpoint)")
    sp.add_argument("--to-profile", help="AWS profile of the --vault-to store (default: --profile)")

    sp = add("vault", cmd_vault, "copy versions to another store (ADS -> ODS, or back)",
             "Copy versions from --store to --to, only the blocks the target lacks. The target is created "
             "(with the source's hash key) when it does not exist. Resumable: run it again after an interruption. "
             "--endpoint/--profile apply to --store and, unless --to-endpoint/--to-profile are given, to --to.")
    sp.add_argument("--to", required=True, metavar="STORE", help="target store: a folder or s3://BUCKET/PREFIX")
    sp.add_argument("--to-endpoint", help="S3 endpoint of the target (default: --endpoint)")
    sp.add_argument("--to-profile", help="AWS profile of the target (default: --profile)")
    sp.add_argument("--vm", action="append", help="only this VM (repeatable; default: all)")
    sp.add_argument("--version", action="append", help="only this version id or prefix (repeatable)")
    sp.add_argument("--address", help="Ray cluster to join")

    sp = add("versions", cmd_versions, "list versions, newest first")
    sp.add_argument("--vm", help="only this VM")

    sp = add("restore", cmd_restore, "restore a version's disks to raw files",
             "Restore VM (latest version) or VM@VERSION (a version id or a unique prefix of one). "
             "A one-disk VM (or --disk N) is written to the file --to; several disks to files named after "
             "the disks in the folder --to. Formats other than raw go through qemu-img and are checked "
             "with qemu-img check and compare.")
    sp.add_argument("vm", metavar="VM[@VERSION]")
    sp.add_argument("--to", required=True,
                    help="target file, folder (several disks), or kvm:URI for a new VM on that libvirt host")
    sp.add_argument("--disk", default="all", help="disk number to restore, or all (default)")
    sp.add_argument("--name", help="with --to kvm:URI: the new VM's name (default VM-restored)")
    sp.add_argument("--pool-dir", help="with --to kvm:URI: where its disks go (default /var/lib/libvirt/images)")
    sp.add_argument("--memory", type=int, default=1024, help="with --to kvm:URI: memory in MiB (default 1024)")
    sp.add_argument("--vcpus", type=int, default=1, help="with --to kvm:URI: virtual CPUs (default 1)")
    sp.add_argument("--start", action="store_true", help="with --to kvm:URI: start the new VM")
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

    sp = add("verify", cmd_verify, "re-read and check every block of every version",
             "Re-read and re-hash the blocks of every version (default), a random --sample of the packs "
             "versions use, or the packs not validated --older-than an age. Packs found intact are "
             "remembered on the store (validation/). Exit 3 when anything is damaged.")
    sp.add_argument("--sample", metavar="P%", help="check a random P percent of the packs in use, e.g. 5%%")
    sp.add_argument("--older-than", metavar="AGE",
                    help="check only packs whose last successful validation is older than AGE "
                         "(e.g. 30d, 12h, 45m, 2w), or that were never validated")
    sp.add_argument("--address", help="Ray cluster to join")

    add("stats", cmd_stats, "logical and stored bytes, dedup ratio, blocks")

    sp = add("mount", cmd_mount, "mount a store read-only: every VM/version/disk as a raw file (FUSE)",
             "Mount a store (ADS or ODS) read-only at MOUNTPOINT: MOUNTPOINT/VM/VERSION/DISK.raw are the disks "
             "of every version at full size, read on demand. Runs until `umount MOUNTPOINT` or Ctrl-C.")
    sp.add_argument("mountpoint", metavar="MOUNTPOINT")
    sp.add_argument("--allow-other", action="store_true", help="let other users read the mount")

    sp = add("instant", cmd_instant, "boot a VM from a backup in seconds (QEMU over a copy-on-write overlay)",
             "Start QEMU from VM[@VERSION] without restoring it: the disks are served read-only from the store "
             "(alike mount) under qcow2 overlays that take the guest's writes. --stop NAME ends it and cleans up.")
    sp.add_argument("vm", nargs="?", metavar="VM[@VERSION]")
    sp.add_argument("--name", help="name of the instant VM (default VM-instant)")
    sp.add_argument("--memory", type=int, default=512, help="memory in MiB (default 512)")
    sp.add_argument("--stop", metavar="NAME", help="stop an instant VM and remove its overlay and mount")
    sp.add_argument("--list", action="store_true", help="list instant VMs")

    sp = sub.add_parser("inventory", help="list the VMs of a source", epilog=EPILOG,
                        description="List the VMs of a source (image:PATH, kvm:URI): names, state, disks, tags.")
    sp.add_argument("source", metavar="SOURCE")
    sp.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    sp.set_defaults(fn=cmd_inventory)

    jp = sub.add_parser("job", help="backup jobs: preview, run, history", epilog=EPILOG,
                        description="Backup jobs are TOML files (see alike_ray/jobs.py for every key).")
    jsub = jp.add_subparsers(dest="job_command", metavar="JOBCOMMAND")

    def jadd(name, fn, help_):
        sp = jsub.add_parser(name, help=help_, description=help_, epilog=EPILOG)
        sp.add_argument("--json", action="store_true", help="print one JSON object on stdout")
        sp.set_defaults(fn=fn)
        return sp

    sp = jadd("preview", cmd_job_preview, "show the VMs a run of the job would take now")
    sp.add_argument("file", metavar="FILE")
    sp = jadd("run", cmd_job_run, "run a job: back up its VMs, record the run on the store")
    sp.add_argument("file", metavar="FILE")
    sp.add_argument("--store", help="store (default: the job's store, else $ALIKE_STORE)")
    sp.add_argument("--endpoint", help="S3 endpoint of the store")
    sp.add_argument("--profile", help="AWS profile of the store")
    sp.add_argument("--address", help="Ray cluster to join")
    sp.add_argument("--server", nargs="?", const=True, metavar="SOCKET",
                    help="run the job in the long-lived `alike server` at SOCKET (default: $ALIKE_SERVER, else the "
                         "server's default socket); setting $ALIKE_SERVER makes this the default")
    sp = jadd("history", cmd_job_history, "past runs of jobs on a store, newest first")
    sp.add_argument("--store", help="store (default: $ALIKE_STORE)")
    sp.add_argument("--endpoint", help="S3 endpoint of the store")
    sp.add_argument("--profile", help="AWS profile of the store")
    sp.add_argument("--job", help="only this job")
    jp.set_defaults(fn=lambda a: (jp.print_help(), 2)[1])

    from .commands import register_all

    register_all(add, sub)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "fn", None):
        parser.print_help()
        return 2
    server = getattr(args, "server", None)
    if server is None and os.environ.get("ALIKE_SERVER") and hasattr(args, "server"):
        args.server = server = os.environ["ALIKE_SERVER"]
    if server:  # run it in `alike server`: no Ray, no numpy in this process
        from .server import default_socket, run_remote

        if server is True:
            args.server = default_socket()

        try:
            return run_remote(args, " ".join(filter(None, (args.command, getattr(args, "job_command", None)))))
        except StoreError as e:
            print(f"alike: error: {e.message}", file=sys.stderr)
            return int(e.exit_code)
    _guard_stdout()
    return run_args(args)


def run_args(args) -> int:
    """Run a parsed command; expected errors become one `alike: error:` line and an exit code
    (also in `alike server`, which runs commands for clients)."""
    from .sources import SourceError

    try:
        return args.fn(args)
    except (StoreError, SourceError) as e:
        msg = getattr(e, "message", None) or str(e)
        print(f"alike: error: {msg}", file=sys.stderr)
        return int(getattr(e, "exit_code", 2))
    except KeyboardInterrupt:
        out("alike: interrupted; nothing partial was committed", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
