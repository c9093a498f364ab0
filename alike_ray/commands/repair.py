"""`alike repair`: heal a store's damaged or missing blocks, manifests and version.json files from
the other store of the pair (an ADS from its ODS, or an ODS from its ADS). See pipelines/repair.py.
"""
from __future__ import annotations

import sys

from . import Served, absolute_args, add_server_options
from ..ui import Progress, _connect, _emit, _h, took, with_times

HELP = """Heal --store from --from, a store that shares its hash key (the ODS it was vaulted to, or
the ADS it was vaulted from). Takes the store's exclusive maintenance lock, verifies every block,
then fetches every damaged or missing block by its hash from --from (checked against the hash
before it is written into new packs), copies damaged or missing manifests and version.json files
whose copy in --from is intact, and rewrites the index so that no entry points at damaged data.
Damaged pack files stay in place until `alike gc` removes them. Exit 0 when everything was healed,
3 when some blocks or manifests are damaged in --from too (or missing there), 1 when the repair
could not finish (a copy worker kept dying, the lock was lost: run it again; the index is
unchanged), 2 for bad input. --dry-run only lists what would be fetched."""


def cmd_repair(args) -> int:
    from pipelines.repair import open_pair, run_repair
    from storage.backend import store_spec
    from storage.errors import DamagedData

    from ..config import store_url

    url = store_url(args)
    other = store_spec(args.source, args.from_endpoint or args.endpoint, args.from_profile or args.profile)
    try:
        open_pair(url, other)  # before Ray starts: both stores, and that one can heal the other
    except DamagedData as e:
        if "config.json" not in e.detail:  # a damaged config.json is what the repair writes again
            raise
    _connect(args)
    bar = Progress("repair", unit="block")

    def phase(text):
        if sys.stderr.isatty() and not args.json:
            print(f"repair: {text}", file=sys.stderr, flush=True)

    try:
        rep = run_repair(url, other, dry_run=args.dry_run, on_progress=bar, on_phase=phase)
    finally:
        bar.close()
    lines = []
    for b in rep["broken_before"]:
        n = b["damaged_blocks"]
        lines.append(f"  damaged: {b['vm']}@{b['version']} disk {b['disk']}"
                     + (f" ({n} block(s))" if n else " (manifest unreadable)"))
    for m in rep["metadata_copied"]:
        lines.append(f"  {'would copy' if args.dry_run else 'copied'} {m['key']} ({m['why']})")
    for m in rep.get("objects_healed", []):
        lines.append(f"  {'would heal' if args.dry_run else 'healed'} {m['key']}: {m['action']}")
    if args.dry_run and "blocks_to_fetch" not in rep:  # config.json first: the rest is known after
        lines.append(f"dry run: config.json would be written again; {rep['note']}")
    elif args.dry_run:
        lines.append(f"dry run: would fetch {rep['blocks_to_fetch']} block(s), {_h(rep['bytes_to_fetch'])}, "
                     f"from {len(rep['would_fetch_packs'])} pack(s) of {rep['from']}; would drop "
                     f"{len(rep['would_drop_packs'])} pack(s) and remove {len(rep['would_remove_segments'])} "
                     "damaged index segment(s) from the index; nothing was changed")
    else:
        lines.append(f"fetched {rep['blocks_fetched']} block(s), {_h(rep['bytes_fetched'])}, from {rep['from']}"
                     + (f"; moved {rep['blocks_moved_locally']} intact block(s) out of damaged packs"
                        if rep["blocks_moved_locally"] else "")
                     + (f"; removed {len(rep['segments_removed'])} damaged index segment(s)"
                        if rep["segments_removed"] else "")
                     + f" {took(args)}")
        if rep.get("damaged_packs_left"):
            lines.append(f"  {len(rep['damaged_packs_left'])} damaged pack file(s) left in place; nothing points "
                         "at their damaged blocks any more and `alike gc` removes them")
    for u in rep["unrepairable"]:
        lines.append(f"  UNREPAIRABLE: {u['what']}: {u['why']}")
    if not args.dry_run:
        lines.append("repaired: run `alike verify` to confirm" if rep["ok"] else
                     f"{len(rep['unrepairable'])} item(s) could not be repaired: restore them from another "
                     "copy or back the VMs up again")
    _emit(args, with_times(args, rep), "\n".join(lines))
    return 0 if rep["ok"] else 3


def register(add, sub) -> None:
    sp = add("repair", cmd_repair, "heal damaged or missing blocks and manifests from the other store", HELP)
    sp.add_argument("--from", dest="source", required=True, metavar="STORE",
                    help="the store to fetch intact copies from: a folder or s3://BUCKET/PREFIX")
    sp.add_argument("--from-endpoint", help="S3 endpoint of --from (default: --endpoint)")
    sp.add_argument("--from-profile", help="AWS profile of --from (default: --profile)")
    sp.add_argument("--dry-run", action="store_true", help="only list what would be fetched and fixed")
    sp.add_argument("--address", help="Ray cluster to join")
    add_server_options(sp, "repair")


def _client_args(d: dict) -> None:
    absolute_args(d, stores=("store", "source"))


SERVED = {"repair": Served(cmd_repair, _client_args)}
