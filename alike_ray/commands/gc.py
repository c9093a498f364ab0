"""`alike gc`: reclaim the space of blocks that no version uses (see pipelines/gc.py)."""
from __future__ import annotations

import re
import sys
import time

from storage.errors import InvalidValue

from . import Served, absolute_args, add_server_options
from ..ui import _emit, _h, with_times, work_starts

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str, what: str) -> float:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text or "")
    if not m:
        raise InvalidValue(f"{what} {text!r} is not a duration: give a number with s, m, h, d or w (e.g. 30m, 1h, 0)")
    return float(m.group(1)) * _UNITS[m.group(2) or "s"]


def _when(t: float) -> str:
    """An epoch time as people read it: the local clock time, the date too when not today, and how far off."""
    lt = time.localtime(t)
    clock = time.strftime("%H:%M" if lt[:3] == time.localtime()[:3] else "%Y-%m-%d %H:%M", lt)
    left = max(0, int(t - time.time()))
    off = f"{left // 3600}h {left % 3600 // 60:02d}m" if left >= 3600 else f"{max(1, left // 60)} min"
    return f"{clock} {time.strftime('%Z', lt)} (in {off})".replace("  ", " ")


def _spared_line(rep: dict, dry_run: bool) -> str:
    """Why gc left unused packs alone and when their space comes back: right after a prune or an
    interrupted backup everything is younger than the grace period."""
    grace = rep["grace_seconds"]
    g = f"{grace / 3600:g}h" if grace >= 3600 else f"{grace / 60:g}m" if grace >= 60 else f"{grace:g}s"
    first, last = rep["spared_reclaimable_from"], rep["spared_reclaimable_by"]
    when = f"after {_when(last)}" if last - first < 60 else f"from {_when(first)} on, all after {_when(last)}"
    return (f"{'would spare' if dry_run else 'spared'} {rep['spared_packs']} unused pack(s) ({_h(rep['spared_bytes'])}) "
            f"younger than the --grace period ({g}): gc reclaims them {when}; "
            f"--grace 0 reclaims them now, safe when no backup, vault or prune is writing to this store")


def cmd_gc(args) -> int:
    from pipelines.gc import run_gc

    from ..config import store_url

    grace = parse_duration(args.grace, "--grace")
    wait = parse_duration(args.wait, "--wait")
    if not 0 <= args.repack_below <= 1:
        raise InvalidValue(f"--repack-below {args.repack_below} is not a fraction: give 0 to 1 (e.g. 0.5)")
    shown = {}

    def progress(phase, done, total):
        if sys.stderr.isatty() and not args.json:
            print(f"\rgc: {phase} {done}/{total}   ", end="", file=sys.stderr, flush=True)
            shown["any"] = True

    work_starts(args)  # no Ray: the work begins at once
    rep = run_gc(store_url(args), grace=grace, repack_below=args.repack_below, dry_run=args.dry_run,
                 wait=wait, on_progress=progress)
    if shown:
        print(file=sys.stderr)
    verb = "would delete" if args.dry_run else "deleted"
    text = [
        f"{'dry run: ' if args.dry_run else ''}{rep['live_blocks']} blocks are used by {rep['versions']} versions",
        f"{verb} {rep['packs_deleted']} packs ({_h(rep['bytes_deleted'])}), "
        f"of which {rep['orphan_packs']} were left by interrupted runs",
        f"{'would repack' if args.dry_run else 'repacked'} {rep['packs_repacked']} packs: "
        f"{rep['blocks_repacked']} live blocks ({_h(rep['bytes_repacked'])}) copied",
        f"kept {rep['packs_kept']} packs ({_h(rep['bytes_kept'])})",
    ]
    if rep.get("spared_packs"):
        text.append(_spared_line(rep, args.dry_run))
    if rep["packs_rescued"]:
        text.append(f"rescued {rep['packs_rescued']} packs that backups running meanwhile use")
    if rep["orphan_version_folders"] or rep["temp_files"]:
        text.append(f"{verb} {rep['orphan_version_folders']} unfinished version folders and "
                    f"{rep['temp_files']} temporary files of interrupted runs")
    if rep["finished_earlier_gc"]:
        text.append(f"finished {rep['finished_earlier_gc']} earlier gc run(s) that had been cut short")
    _emit(args, with_times(args, rep), "\n".join(text))
    return 0


def register(add, sub) -> None:
    sp = add("gc", cmd_gc, "reclaim the space of blocks that no version uses (safe while backups run)",
             "Delete packs whose blocks no version uses and repack packs that are mostly unused, then "
             "rewrite the index. Backups, vaults and prunes may run meanwhile: gc condemns packs first "
             "and deletes them once the writers that started before have finished. Packs younger than "
             "--grace are left alone. An interrupted gc leaves a valid store; the next one finishes it.")
    sp.add_argument("--dry-run", action="store_true", help="say what would be deleted and repacked; change nothing")
    sp.add_argument("--grace", default="1h", help="leave packs younger than this (default 1h; e.g. 0, 30m, 2d)")
    sp.add_argument("--repack-below", type=float, default=0.5, metavar="FRACTION",
                    help="repack packs whose used part is below this fraction of their size (default 0.5)")
    sp.add_argument("--wait", default="10m",
                    help="how long to wait for backups that started before gc (default 10m); after "
                         "that the deletion is left for the next gc")
    add_server_options(sp, "gc")


SERVED = {"gc": Served(cmd_gc, absolute_args)}
