"""`alike prune`, `alike pin`, `alike unpin`, `alike pins`: retention on a store.

The pruning itself (the lock, the decisions, the removal) is pipelines/prune.py, which job runs
(alike_ray/jobs.py) call too; this module parses the options and prints the decisions.
"""
from __future__ import annotations

import json
import sys

from storage.errors import DamagedData, InvalidValue, ObjectMissing, StoreError

from ..ui import _emit, out

HELP = """Remove the versions a retention policy does not keep (restic/borg semantics). Per VM, versions
are taken newest first: --keep-last N keeps the N newest; --keep-hourly/daily/weekly/monthly/yearly N
keep the newest version of each of the N most recent hours/days/ISO weeks/months/years that have
versions (UTC). A version kept by any rule is kept. Pinned versions (`alike pin`) are always kept and
do not count towards any N. The newest version of each VM is always kept, so a VM never loses its
last version. At least one --keep-* option is required. The space is reclaimed by `alike gc`."""


def _count(text, flag: str) -> int:
    try:
        n = int(str(text).strip())
    except ValueError:
        n = -1
    if n < 0:
        raise InvalidValue(f"{flag} {text!r} is not allowed: give a whole number of 0 or more")
    return n


def policy_from_args(args):
    from pipelines.retention import RULES, Policy

    values = {"keep_last": args.keep_last, **{f"keep_{r}": getattr(args, f"keep_{r}") for r in RULES}}
    given = {k: _count(v, "--" + k.replace("_", "-")) for k, v in values.items() if v is not None}
    policy = Policy(**given)
    if not policy:
        raise InvalidValue("give at least one --keep-* option of 1 or more (--keep-last, --keep-daily...): "
                           "a prune without one would remove every version but the newest")
    return policy


def cmd_prune(args) -> int:
    from pipelines.prune import prune_store
    from storage.store import Store

    from ..config import store_url

    policy = policy_from_args(args)
    st = Store.open(store_url(args))
    if args.vm and args.vm not in st.list_vms():
        raise StoreError(f"no VM named {args.vm!r} in {st.url}")

    def progress(line):
        if sys.stderr.isatty() and not args.json:
            print(line, file=sys.stderr, flush=True)

    rep = prune_store(st, policy, [args.vm] if args.vm else None, dry_run=args.dry_run, progress=progress)
    lines = []
    for row in rep["vms"]:
        for d in row["versions"]:
            lines.append((f"KEEP    {row['vm']}@{d['version']}  {', '.join(d['reasons'])}" if d["keep"]
                          else f"REMOVE  {row['vm']}@{d['version']}"))
    n = len(rep["removed"])
    if args.dry_run:
        lines.append(f"dry run: would remove {n} version(s) and keep {rep['kept']} ({policy.describe()}); "
                     "nothing was changed")
    else:
        lines.append(f"removed {n} version(s), kept {rep['kept']} ({policy.describe()})"
                     + ("; run `alike gc` to reclaim the space of blocks no version uses any more" if n else ""))
    _emit(args, rep, "\n".join(lines))
    return 0


def _resolve(store, spec: str, pinned_only: bool = False) -> tuple[str, str]:
    vm, _, version = spec.partition("@")
    if not vm or not version:
        raise InvalidValue(f"{spec!r}: give VM@VERSION (a version id or a unique prefix of one; "
                           "`alike versions` lists them)")
    pins = {v for m, v in store.pins() if m == vm}
    ids = sorted(pins) if pinned_only else [v for _, v in store.list_versions(vm)]
    if not ids and not pinned_only:
        raise StoreError(f"no VM named {vm!r} in {store.url} (VMs there: {', '.join(store.list_vms()) or 'none'})")
    matches = [v for v in ids if v == version] or [v for v in ids if v.startswith(version)]
    if len(matches) != 1:
        what = "pinned version" if pinned_only else "version"
        raise StoreError(f"{'no' if not matches else 'more than one'} {what} {version!r} of {vm}: "
                         + ("run `alike pins` to list pins" if pinned_only else
                            f"run `alike versions --store {store.url} --vm {vm}` to list them"))
    return vm, matches[0]


def cmd_pin(args) -> int:
    from storage.store import Store

    from ..config import store_url

    st = Store.open(store_url(args))
    vm, version = _resolve(st, args.version)
    st.pin(vm, version, args.note or "")
    _emit(args, {"vm": vm, "version": version, "note": args.note or "", "pinned": True},
          f"pinned {vm}@{version}: prune keeps it until `alike unpin {vm}@{version}`")
    return 0


def cmd_unpin(args) -> int:
    from storage.store import Store

    from ..config import store_url

    st = Store.open(store_url(args))
    vm, version = _resolve(st, args.version, pinned_only=True)
    st.unpin(vm, version)
    _emit(args, {"vm": vm, "version": version, "pinned": False},
          f"unpinned {vm}@{version}: prune may remove it now")
    return 0


def list_pins(store) -> list[dict]:
    rows = []
    for vm, version in sorted(store.pins()):
        row = {"vm": vm, "version": version, "note": "", "pinned": None}
        try:
            row.update({k: v for k, v in store.read_pin(vm, version).items() if k in ("note", "pinned")})
        except ObjectMissing:  # unpinned meanwhile
            pass
        except DamagedData as e:  # the pin still counts: only its note is lost
            row["damaged"] = e.detail
        row["exists"] = store.backend.exists(f"versions/{vm}/{version}/version.json")
        rows.append(row)
    return rows


def cmd_pins(args) -> int:
    from storage.store import Store

    from ..config import store_url

    st = Store.open(store_url(args))
    rows = [r for r in list_pins(st) if not args.vm or r["vm"] == args.vm]
    if args.json:
        out(json.dumps({"store": st.url, "pins": rows}))
        return 0
    if not rows:
        out(f"no pinned versions in {st.url}")
        return 0
    out(f"{'VM':<20} {'VERSION':<20} {'PINNED':<26} NOTE")
    for r in rows:
        out(f"{r['vm']:<20} {r['version']:<20} {r['pinned'] or '':<26} {r['note']}"
            + ("" if r["exists"] else "  (version no longer exists)"))
    return 0


def register(add, sub) -> None:
    sp = add("prune", cmd_prune, "remove versions a retention policy does not keep (see --help)", HELP)
    sp.add_argument("--vm", help="only this VM (default: every VM of the store)")
    sp.add_argument("--keep-last", metavar="N", help="keep the N newest versions")
    for rule, what in (("hourly", "hours"), ("daily", "days"), ("weekly", "ISO weeks"), ("monthly", "months"),
                       ("yearly", "years")):
        sp.add_argument(f"--keep-{rule}", metavar="N", help=f"keep the newest version of each of the N most recent "
                                                            f"{what} that have versions (UTC)")
    sp.add_argument("--dry-run", action="store_true", help="list each version with KEEP/REMOVE and why; change nothing")

    sp = add("pin", cmd_pin, "pin a version: prune always keeps it",
             "Pin VM@VERSION (a version id or a unique prefix of one): `alike prune` and job retention always "
             "keep it, and it does not count towards their numbers.")
    sp.add_argument("version", metavar="VM@VERSION")
    sp.add_argument("--note", help="why it is pinned (shown by `alike pins`)")

    sp = add("unpin", cmd_unpin, "unpin a version: prune may remove it again")
    sp.add_argument("version", metavar="VM@VERSION")

    sp = add("pins", cmd_pins, "list pinned versions")
    sp.add_argument("--vm", help="only this VM")
