"""Real disk images for the tests: partitioned raw images holding ext4 filesystems made with
e2fsprogs from real directory trees, and qcow2 copies made with qemu-img."""
from __future__ import annotations

import os
import shutil
import subprocess
import sysconfig

MiB = 1024 * 1024


def run(*cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


def tree(dst: str, max_bytes: int, seed_dirs=None) -> str:
    """Copy real files (the Python standard library) into `dst`, up to about `max_bytes`."""
    seed_dirs = seed_dirs or [sysconfig.get_paths()["stdlib"]]
    os.makedirs(dst, exist_ok=True)
    total = 0
    for base in seed_dirs:
        for root, dirs, files in os.walk(base):
            dirs[:] = sorted(d for d in dirs if d not in ("__pycache__", "site-packages", "test"))
            for f in sorted(files):
                src = os.path.join(root, f)
                if not os.path.isfile(src) or os.path.islink(src):
                    continue
                rel = os.path.relpath(src, os.path.dirname(base))
                out = os.path.join(dst, rel)
                os.makedirs(os.path.dirname(out), exist_ok=True)
                shutil.copyfile(src, out)
                total += os.path.getsize(src)
                if total >= max_bytes:
                    return dst
    return dst


def ext4_image(path: str, size_mib: int, content_dir: str, label: str = "root") -> str:
    """A sparse raw disk with an MBR partition table and one ext4 partition at 1 MiB
    populated from `content_dir` (mkfs.ext4 -d)."""
    part = path + ".part"
    with open(path, "wb") as f:
        f.truncate(size_mib * MiB)
    run("sfdisk", "--quiet", path, input="label: dos\nstart=2048, type=83\n")
    with open(part, "wb") as f:
        f.truncate((size_mib - 1) * MiB)
    run("mkfs.ext4", "-q", "-F", "-L", label, "-E", "root_owner=0:0", "-d", content_dir, part)
    run("dd", f"if={part}", f"of={path}", "bs=1M", "seek=1", "conv=notrunc,sparse", "status=none")
    os.unlink(part)
    return path


def to_qcow2(raw: str, out: str, *extra) -> str:
    run("qemu-img", "convert", "-O", "qcow2", *extra, raw, out)
    return out


def allocated_bytes(path: str) -> int:
    return os.stat(path).st_blocks * 512


def random_image(path, mib: int) -> str:
    """A raw image of `mib` MiB of random (incompressible, unique) data."""
    with open(path, "wb") as f:
        for _ in range(mib // 8):
            f.write(os.urandom(8 * MiB))
        f.write(os.urandom((mib % 8) * MiB))
    return str(path)
