"""`alike verify`: re-read and check the blocks of versions (pipelines/verify.py)."""
from __future__ import annotations

import json

from storage.errors import StoreError

from . import Served, absolute_args, add_server_options
from ..ui import Progress, _connect, _h, out, took, with_times


def cmd_verify(args) -> int:
    from pipelines.cluster import local_node_id
    from pipelines.verify import parse_age, parse_percent, run_verify
    from storage.store import Store

    from ..config import store_url

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
        out(json.dumps(with_times(args, rep)))
    else:
        what = ""
        if sample is not None:
            what = f" (a {sample:g}% sample of the {rep['packs_total']} packs in use)"
        elif older is not None:
            what = f" (those not validated within {args.older_than}, of {rep['packs_total']} in use)"
        rate = f"{rep['mb_per_s']:.1f} MB/s"
        out(f"checked {rep['blocks_checked']} blocks in {rep['packs_checked']} packs{what} "
            f"of {rep['versions']} versions: {_h(rep['bytes_read'])} {took(args, rate)}")
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


def register(add, sub) -> None:
    sp = add("verify", cmd_verify, "re-read and check every block of every version",
             "Re-read and re-hash the blocks of every version (default), a random --sample of the packs "
             "versions use, or the packs not validated --older-than an age. Packs found intact are "
             "remembered on the store (validation/). Exit 3 when anything is damaged.")
    sp.add_argument("--sample", metavar="P%", help="check a random P percent of the packs in use, e.g. 5%%")
    sp.add_argument("--older-than", metavar="AGE",
                    help="check only packs whose last successful validation is older than AGE "
                         "(e.g. 30d, 12h, 45m, 2w), or that were never validated")
    sp.add_argument("--address", help="Ray cluster to join")
    add_server_options(sp, "verify")


SERVED = {"verify": Served(cmd_verify, absolute_args)}
