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


# -- file-level restore (tests/e2e/test_files.py): partitioned disks with ext4, XFS, FAT, NTFS --
# Each filesystem is made in a file of its own and then copied (sparse) into the disk at its
# partition's offset. XFS and NTFS are filled through a mount (a loop mount, an ntfs-3g FUSE
# mount: root only, test set-up only), FAT with mtools, ext4 with mkfs.ext4 -d: every way keeps
# the source's modification times, so that the restore can be checked against them.
def fs_tree(dst: str, symlinks: bool = True) -> str:
    """A small tree with nested folders, permissions, fixed (even-second, FAT-safe) mtimes, an
    empty file, a multi-block file of an odd size, a name with a space; a symlink if asked."""
    files = {
        "etc/hostname": b"web\n",
        "etc/nginx/nginx.conf": b"worker_processes 2;\nevents { worker_connections 64; }\n" * 40,
        "etc/nginx/conf.d/site.conf": b"server { listen 80; root /srv/www; }\n",
        "srv/www/index.html": b"<h1>alike</h1>\n",
        "srv/www/big.bin": os.urandom(2 * MiB + 12345),
        "srv/empty": b"",
        "srv/read me.txt": b"a name with a space\n",
        "bin/tool.sh": b"#!/bin/sh\necho tool\n",
    }
    modes = {"etc/nginx/nginx.conf": 0o640, "bin/tool.sh": 0o755, "srv/www/big.bin": 0o600}
    t0 = 1_600_000_000
    for n, (rel, data) in enumerate(sorted(files.items())):
        p = os.path.join(dst, rel)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "wb") as f:
            f.write(data)
        os.chmod(p, modes.get(rel, 0o644))
        os.utime(p, (t0 + 86400 * n, t0 + 86400 * n))
    os.chmod(os.path.join(dst, "etc/nginx"), 0o750)
    if symlinks:
        os.symlink("nginx/nginx.conf", os.path.join(dst, "etc/main.conf"))
        os.utime(os.path.join(dst, "etc/main.conf"), (t0 - 2, t0 - 2), follow_symlinks=False)
    dirs = [r for r, _, _ in os.walk(dst)]
    for n, d in enumerate(sorted(dirs, key=len, reverse=True)):  # deepest first: files are in place
        os.utime(d, (t0 - 1000 - 2 * n, t0 - 1000 - 2 * n))
    return dst


def _sparse_file(path: str, mib: int) -> None:
    with open(path, "wb") as f:
        f.truncate(mib * MiB)


def _copy_mounted(mnt: str, src: str, *cp_opts: str) -> None:
    for name in sorted(os.listdir(src)):
        run("cp", "-R", *cp_opts, os.path.join(src, name), mnt)


def ext4_fs(path: str, mib: int, src: str) -> str:
    _sparse_file(path, mib)
    run("mkfs.ext4", "-q", "-F", "-L", "root", "-E", "root_owner=0:0", "-d", src, path)
    return path


def xfs_fs(path: str, mib: int, src: str) -> str:
    """XFS needs 300 MiB at least (xfsprogs 5.19+); sparse, so it costs a few MiB."""
    import tempfile

    _sparse_file(path, mib)
    run("mkfs.xfs", "-q", "-f", "-L", "data", path)
    mnt = tempfile.mkdtemp(prefix="alike-xfs-")
    run("mount", "-o", "loop", path, mnt)
    try:
        _copy_mounted(mnt, src, "--preserve=mode,timestamps,links", "--no-dereference")
        for r, ds, _ in os.walk(src):  # folder times, once their content is in place
            for d in [r] + [os.path.join(r, x) for x in ds]:
                st = os.stat(d)
                os.utime(os.path.join(mnt, os.path.relpath(d, src)), ns=(st.st_atime_ns, st.st_mtime_ns))
    finally:
        run("umount", mnt)
        os.rmdir(mnt)
    return path


def fat_fs(path: str, mib: int, src: str) -> str:
    _sparse_file(path, mib)
    run("mkfs.vfat", "-n", "BOOT", path)
    env = dict(os.environ, MTOOLS_SKIP_CHECK="1")
    run("mcopy", "-s", "-m", "-Q", "-i", path, *[os.path.join(src, n) for n in sorted(os.listdir(src))], "::/",
        env=env)
    return path


def ntfs_fs(path: str, mib: int, src: str) -> str:
    import tempfile

    _sparse_file(path, mib)
    run("mkntfs", "-q", "-F", "-Q", "-L", "win", path)
    mnt = tempfile.mkdtemp(prefix="alike-ntfs-")
    run("ntfs-3g", path, mnt)
    try:
        _copy_mounted(mnt, src, "--preserve=timestamps")
        for r, ds, _ in os.walk(src):
            for d in [r] + [os.path.join(r, x) for x in ds]:
                st = os.stat(d)
                os.utime(os.path.join(mnt, os.path.relpath(d, src)), ns=(st.st_atime_ns, st.st_mtime_ns))
    finally:
        run("umount", mnt)
        os.rmdir(mnt)
    return path


def partitioned_disk(path: str, label: str, parts: list) -> str:
    """A sparse disk with a `label` ("gpt" or "dos") partition table and one partition per
    (filesystem file, sfdisk type) in `parts`, each 1 MiB-aligned and the size of its file."""
    sizes = [-(-os.path.getsize(fs) // MiB) for fs, _ in parts]
    _sparse_file(path, 1 + sum(sizes) + 1)  # +1 MiB at the end for GPT's backup header
    layout, start = [f"label: {label}"], 1
    for (fs, typ), size in zip(parts, sizes):
        layout.append(f"start={start * 2048}, size={size * 2048}, type={typ}")
        start += size
    run("sfdisk", "--quiet", path, input="\n".join(layout) + "\n")
    start = 1
    for (fs, _), size in zip(parts, sizes):
        run("dd", f"if={fs}", f"of={path}", "bs=1M", f"seek={start}", "conv=notrunc,sparse", "status=none")
        start += size
    return path
