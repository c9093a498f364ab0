"""`alike files`: file-level restore, straight from the store, without restoring the disk and
without root (the library is alike_ray/restore/files.py).

    alike files VM[@VERSION] parts [--disk N]                       disks, partitions, filesystems
    alike files VM[@VERSION] ls [PATH] [--disk N] [--partition P]   a folder's entries
    alike files VM[@VERSION] get PATH... --to DIR [--force]         files and folders (recursive)
"""
from __future__ import annotations

import json
from dataclasses import asdict

from . import Served, absolute_args, add_server_options
from ..ui import _emit, _h, out, work_starts


def cmd_files(args) -> int:
    from ..config import store_url
    from ..restore import files as lib

    if args.action == "ls" and len(args.paths) > 1:
        raise lib.FilesError("ls takes one PATH")
    if args.action == "get" and not args.paths:
        raise lib.FilesError("get needs the PATH of at least one file or folder to extract")
    if args.action == "get" and not args.to:
        raise lib.FilesError("get needs --to DIR: the folder to extract into")
    if args.action == "parts" and (args.paths or args.partition is not None):
        raise lib.FilesError("parts takes no PATH and no --partition")
    from storage.locks import store_lock
    from storage.store import Store

    spec = store_url(args)
    work_starts(args)  # no Ray: the work begins at once
    # a reader: a gc running meanwhile deletes no pack we may read (best effort without write rights)
    lock = store_lock(Store.open(spec).backend, "reader", "files")
    try:
        return _files(args, lib, spec)
    finally:
        lock.release()


def _files(args, lib, spec) -> int:
    disk = lib.open_disk(spec, args.vm, args.disk)
    if args.action == "parts":
        return _parts(args, lib, disk)
    fs = lib.filesystem(disk, args.partition)
    head = {"vm": disk.vm, "version": disk.version, "disk": disk.number, "partition": fs.part.number,
            "filesystem": fs.type}
    if args.action == "ls":
        path = lib.norm(args.paths[0] if args.paths else "/")
        top = fs.stat(path)
        entries = fs.listdir(path) if top.kind == "dir" else [top]
        if args.json:
            out(json.dumps({**head, "path": path, "entries": [e.as_dict() for e in entries]}))
            return 0
        out(f"{fs.where}: {path}")
        for e in entries:
            out(_ls_line(e))
        return 0
    try:
        res = lib.extract(fs, args.paths, args.to, force=args.force)
    except OSError as e:  # the local side: permissions, space
        raise lib.FilesError(f"cannot write {e.filename or args.to}: {e.strerror or e}") from None
    res.update(head, paths=[lib.norm(p) for p in args.paths])
    _emit(args, res, f"extracted {', '.join(res['paths'])} from {fs.where} to {res['to']}: "
                     f"{res['files']} files, {res['folders']} folders, {res['symlinks']} symlinks, {_h(res['bytes'])}"
                     + (f" ({res['skipped_special']} devices/fifos/sockets not recreated)"
                        if res["skipped_special"] else ""))
    return 0


def _ls_line(e) -> str:
    import time

    kind = {"dir": "d", "symlink": "l", "file": "-"}.get(e.kind, "?")
    mode = e.permissions()  # FAT, NTFS: from the read-only attribute
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.mtime_ns / 1e9)) if e.mtime_ns is not None else "-"
    owner = f"{e.uid}:{e.gid}" if e.uid is not None else "-"
    name = e.name + "/" if e.kind == "dir" else e.name
    if e.target is not None:
        name += f" -> {e.target}"
    return f"{kind}{mode} {owner:>11} {e.size:>12} {when}  {name}"


def _parts(args, lib, disk) -> int:
    # --disk given: that disk; else every disk of the version
    if args.disk is not None:
        disks = [disk]
    else:
        n = len(disk.view._disks(disk.vm, disk.version))
        disks = [disk] + [lib.open_disk(None, f"{disk.vm}@{disk.version}", i, view=disk.view) for i in range(1, n)]
    rows = []
    for d in disks:
        rows.append({"disk": d.number, "name": d.name, "size": d.size,
                     "partitions": [asdict(p) for p in lib.partitions(d)]})
    if args.json:
        out(json.dumps({"vm": disk.vm, "version": disk.version, "disks": rows}))
        return 0
    for r in rows:
        out(f"{disk.vm}@{disk.version} disk {r['disk']} {r['name']} ({_h(r['size'])})")
        for p in r["partitions"]:
            what = p["filesystem"] or f"- {p['found']}"
            desc = f"  {p['description']}" if p["description"] else ""
            out(f"  {p['number']:>3}  {p['scheme']:<4} start {p['start']:>14}  {_h(p['size']):>10}  {what}{desc}")
            if p["past_end"]:  # the partition table claims more than the disk holds
                out(f"       warning: {lib.Partition(**p).cut_short(r['size'])}")
    return 0


def register(add, sub) -> None:
    sp = add("files", cmd_files, "browse and extract files inside a backup's disks (no restore, no root)",
             "File-level restore from VM (latest version) or VM@VERSION (a version id or a unique prefix). "
             "parts: the disks, their partitions (MBR, GPT) and the filesystem in each. "
             "ls [PATH]: a folder's entries (names, sizes, times, permissions). "
             "get PATH... --to DIR: extract files and folders (folders recursively) into DIR, keeping "
             "times and permissions. Filesystems: ext2/3/4, XFS, FAT, exFAT, NTFS (and what The Sleuth Kit "
             "reads). The disk is read from the store block by block on demand; nothing is mounted.")
    sp.add_argument("vm", metavar="VM[@VERSION]")
    sp.add_argument("action", choices=["parts", "ls", "get"], help="parts | ls | get")
    sp.add_argument("paths", nargs="*", metavar="PATH", help="a path inside the filesystem (ls: one, default /)")
    sp.add_argument("--disk", type=_disk_number, help="disk number (default 0; parts: every disk)")
    sp.add_argument("--partition", type=_part_number,
                    help="partition number as in `parts` (default: the disk's only readable filesystem)")
    sp.add_argument("--to", metavar="DIR", help="get: the folder to extract into (created if missing)")
    sp.add_argument("--force", action="store_true", help="get: overwrite files that exist in --to")
    add_server_options(sp, "files command")


def _client_args(d: dict) -> None:
    absolute_args(d, paths=("to",))  # PATHs are inside the backup's filesystem: left as they are


SERVED = {"files": Served(cmd_files, _client_args)}


def _disk_number(s: str) -> int:
    import argparse

    if not s.isdigit():
        raise argparse.ArgumentTypeError(f"a disk number (0, 1, ...), not {s!r}")
    return int(s)


def _part_number(s: str) -> int:
    import argparse

    if not s.isdigit():
        raise argparse.ArgumentTypeError(f"a partition number as `alike files VM parts` shows it, not {s!r}")
    return int(s)

