"""`alike job preview|run|history`: backup jobs. A run itself is alike_ray/jobs.py `run` (which
`alike server` and a scheduler call too); this module parses, connects to Ray and prints."""
from __future__ import annotations

import json
import os
import sys

from . import Served, absolute_path, add_server_options
from ..ui import EPILOG, _connect, _h, out, took, with_times


def cmd_job_preview(args) -> int:
    from .. import jobs

    job = jobs.load(args.file)
    taken, missing = jobs.select(job)
    rows = [{"vm": vm.name, "source": vm.id, "state": vm.power_state, "tags": vm.tags, "disks": len(vm.disks)}
            for _, vm in taken]
    if args.json:
        out(json.dumps({"job": job.name, "vms": rows, "missing": missing}))
    else:
        out(f"job {job.name}: {len(rows)} VM(s) would be backed up now")
        if rows:
            out(f"  {'VM':<24} {'POWER':<10} {'DISKS':<8} TAGS")
        for r in rows:
            out(f"  {r['vm']:<24} {r['state']:<10} {r['disks']:<8} {', '.join(r['tags'])}".rstrip())
        if any(r["state"] == "n/a" for r in rows):
            out("  (POWER n/a: a disk image file has no power state)")
        for m, why in missing.items():
            out(f"  {m:<24} UNAVAILABLE: {why}")
    if not rows and not missing:
        raise jobs.JobError(f"{job.path}: the selection matches no VM of its sources")
    return 0


def cmd_job_run(args) -> int:
    from pipelines.cluster import local_node_id
    from storage.store import Store

    from .. import jobs

    job = jobs.load(args.file, base=getattr(args, "cwd", None))
    # alike_store_env: the $ALIKE_STORE of an `alike server` client (the server's own does not count)
    spec = jobs.store_for(job, args.store, args.endpoint, args.profile,
                          getattr(args, "alike_store_env", None) or os.environ.get("ALIKE_STORE"))
    Store.open(spec)  # a bad store is found before Ray starts
    _connect(args)
    last = {}

    def on_vm(vm, phase, done, total):
        if last.get(vm) != phase:
            last[vm] = phase
            print(f"{vm}: {phase}", file=sys.stderr, flush=True)

    run = jobs.run(job, spec, node_id=local_node_id(), on_vm=on_vm,
                   say=lambda text: print(text, file=sys.stderr, flush=True))
    _print_run(args, job, run)
    return run.code


def _print_run(args, job, run) -> None:
    from .. import jobs

    record, results = run.record, run.results
    for r in results:
        if "error" in r:
            print(f"alike: error: {r['vm']}: {r['error']}", file=sys.stderr)
        for note in r.get("cbt_notes", []):
            print(f"{r['vm']}: {note}", file=sys.stderr)
        for note in r.get("notes", []):  # the source's warnings (an image cut short...)
            print(f"alike: warning: {r['vm']}: {note}", file=sys.stderr)
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
        out(json.dumps(with_times(args, record)))
    else:
        ok = sum("error" not in r for r in results)
        out(f"job {job.name} run {record['run_id']}: {ok} of {len(results)} VM(s) backed up {took(args)}")
        for r in record["vms"]:
            out(f"  {r['vm']:<20} " + (f"FAILED: {r['error']}" if "error" in r else
                f"{r['version']}  read {_h(r['read_bytes'])}, {r['new_blocks']} new blocks, {_h(r['stored_bytes'])} stored"))
        for line in jobs.run_notes(record):
            out(f"  {line}")


def cmd_job_history(args) -> int:
    from storage.store import Store

    from .. import jobs
    from ..config import store_url

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
            for note in v.get("cbt_notes", []) + v.get("notes", []):
                out(f"    {v['vm']}: {note}")
        for line in jobs.run_notes(r):
            out(f"    {line}")
    return 0


def register(add, sub) -> None:
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
    add_server_options(sp, "job")
    sp = jadd("history", cmd_job_history, "past runs of jobs on a store, newest first")
    sp.add_argument("--store", help="store (default: $ALIKE_STORE)")
    sp.add_argument("--endpoint", help="S3 endpoint of the store")
    sp.add_argument("--profile", help="AWS profile of the store")
    sp.add_argument("--job", help="only this job")
    jp.set_defaults(fn=lambda a: (jp.print_help(), 2)[1])


def _client_args(d: dict) -> None:
    from ..config import absolute_store

    d["store"] = absolute_store(d.get("store"))
    d["file"] = absolute_path(d, d["file"])
    d["cwd"] = os.getcwd()  # relative paths in the job file are the client's
    if not d["store"] and os.environ.get("ALIKE_STORE"):  # the job's own store comes first
        d["alike_store_env"] = absolute_store(os.environ["ALIKE_STORE"])


SERVED = {"job run": Served(cmd_job_run, _client_args)}
