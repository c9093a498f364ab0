"""`alike mount`: a store read-only as files (FUSE, alike_ray/restore/mount.py).

Not served by `alike server` (no SERVED): a mount is a process of its own for as long as it is
mounted. It uses no Ray (blocks are read from the store in the process, on demand), so it has
no Ray start-up to save; a FUSE mount belongs to the process that serves it, and `umount` or
Ctrl-C ends that process with it, where a mount owned by the server would live and die with the
server instead (and libfuse's own signal handling would be the server's)."""
from __future__ import annotations

import os
import sys


def cmd_mount(args) -> int:
    from ..config import store_url
    from ..restore.mount import mount

    spec = store_url(args)
    print(f"mounting {args.store or os.environ.get('ALIKE_STORE')} read-only at {args.mountpoint}; "
          f"`umount {args.mountpoint}` or Ctrl-C to end", file=sys.stderr, flush=True)
    mount(spec, args.mountpoint, foreground=True, allow_other=args.allow_other)
    return 0


def register(add, sub) -> None:
    sp = add("mount", cmd_mount, "mount a store read-only: every VM/version/disk as a raw file (FUSE)",
             "Mount a store (ADS or ODS) read-only at MOUNTPOINT: MOUNTPOINT/VM/VERSION/DISK.raw are the disks "
             "of every version at full size, read on demand. Runs until `umount MOUNTPOINT` or Ctrl-C.")
    sp.add_argument("mountpoint", metavar="MOUNTPOINT")
    sp.add_argument("--allow-other", action="store_true", help="let other users read the mount")
