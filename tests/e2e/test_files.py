"""`alike files`: file-level restore from real filesystems inside backed-up disks, read from the
store without restoring the disk. One VM, `pc`, with three disks: 0, a GPT disk with an ext4 and
an XFS partition; 1, an MBR disk with a FAT and an NTFS partition; 2, an MBR disk whose one
partition is an LVM physical volume (no filesystem alike reads). Every filesystem holds the same
small tree (images.fs_tree: folders, permissions, fixed times, an empty file, a multi-block file,
a symlink where the filesystem has them)."""
from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile

import pytest

from tests import images
from tests.conftest import CLI, tree_digest

# (disk, partition, filesystem, has mode bits and symlinks)
FILESYSTEMS = [(0, 1, "ext4", True), (0, 2, "xfs", True), (1, 1, "fat16", False), (1, 2, "ntfs", False)]


@pytest.fixture(scope="module")
def fsdisks(ray_address, tmp_path_factory):
    d = tmp_path_factory.mktemp("files")
    lin_tree = images.fs_tree(str(d / "lin-tree"))
    win_tree = images.fs_tree(str(d / "win-tree"), symlinks=False)
    ext4 = images.ext4_fs(str(d / "ext4.fs"), 16, lin_tree)
    xfs = images.xfs_fs(str(d / "xfs.fs"), 300, lin_tree)
    fat = images.fat_fs(str(d / "fat.fs"), 16, win_tree)
    ntfs = images.ntfs_fs(str(d / "ntfs.fs"), 16, win_tree)
    lin = images.partitioned_disk(str(d / "lin.raw"), "gpt", [(ext4, "linux"), (xfs, "linux")])
    win = images.partitioned_disk(str(d / "win.raw"), "dos", [(fat, "c"), (ntfs, "7")])
    # a disk whose one partition holds an LVM physical volume: no filesystem alike reads
    lvm = images.partitioned_disk(str(d / "lvm.raw"), "dos", [(_lvm_like(str(d / "lvm.pv")), "8e")])
    for f in (ext4, xfs, fat, ntfs):
        os.unlink(f)
    alike = CLI(ray_address, d)
    store = d / "ads"
    alike.json("init", "--store", store)
    version = alike.json("backup", "--store", store, f"image:{lin},{win},{lvm}", "--name", "pc")["version"]
    return {"store": store, "trees": {0: lin_tree, 1: win_tree}, "version": version}


def _lvm_like(path: str) -> str:
    with open(path, "wb") as f:
        f.write(os.urandom(images.MiB))
        f.seek(512)
        f.write(b"LABELONE")
    return path


def same(a, b) -> bool:
    return subprocess.run(["cmp", "-s", a, b]).returncode == 0


def one_error(p, code: int) -> str:
    """The command failed with `code` and said so in one `alike: error:` line, no traceback."""
    assert p.returncode == code, (p.returncode, p.stderr)
    assert "Traceback" not in p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("alike: error: "), p.stderr
    return lines[0]


def check_entry(s: str, o: str, unix: bool) -> None:
    """`o` is `s` restored: same type, mtime, content and size (and mode, symlink target, when
    the filesystem keeps them)."""
    ss, so = os.lstat(s), os.lstat(o)
    assert stat.S_IFMT(ss.st_mode) == stat.S_IFMT(so.st_mode), o
    assert ss.st_mtime_ns == so.st_mtime_ns, (o, ss.st_mtime_ns, so.st_mtime_ns)
    if stat.S_ISLNK(ss.st_mode):
        assert os.readlink(s) == os.readlink(o)
        return
    if unix:
        assert stat.S_IMODE(ss.st_mode) == stat.S_IMODE(so.st_mode), (o, oct(so.st_mode))
    if stat.S_ISREG(ss.st_mode):
        assert ss.st_size == so.st_size and same(s, o), o


def check_tree(src: str, out: str, unix: bool, top: bool = True) -> int:
    """Every file and folder under `src` is restored under `out`, and nothing more (but ext4's
    lost+found); `src` itself too unless not `top` (a filesystem's root folder is mkfs's).
    -> regular files compared."""
    n = 0
    if top:
        check_entry(src, out, unix)
    for root, dirs, files in os.walk(src):
        for name in dirs + files:
            s = os.path.join(root, name)
            check_entry(s, os.path.join(out, os.path.relpath(s, src)), unix)
            n += stat.S_ISREG(os.lstat(s).st_mode)
    for root, dirs, files in os.walk(out):
        for name in dirs + files:
            rel = os.path.relpath(os.path.join(root, name), out)
            assert rel.startswith("lost+found") or os.path.lexists(os.path.join(src, rel)), rel
    return n


def test_parts(alike, fsdisks):
    store = fsdisks["store"]
    res = alike.json("files", "pc", "parts", "--store", store)  # every disk
    assert res["vm"] == "pc" and res["version"] == fsdisks["version"]
    gpt, mbr, lvm = res["disks"]
    assert [(p["number"], p["scheme"], p["filesystem"], p["start"]) for p in gpt["partitions"]] == \
        [(1, "gpt", "ext4", images.MiB), (2, "gpt", "xfs", 17 * images.MiB)]
    assert [p["size"] for p in gpt["partitions"]] == [16 * images.MiB, 300 * images.MiB]
    assert [(p["number"], p["scheme"], p["filesystem"]) for p in mbr["partitions"]] == \
        [(1, "mbr", "fat16"), (2, "mbr", "ntfs")]
    (p,) = lvm["partitions"]
    assert p["filesystem"] is None and "LVM2" in p["found"]
    one = alike.json("files", f"pc@{fsdisks['version'][:10]}", "parts", "--disk", "1", "--store", store)
    assert [d["disk"] for d in one["disks"]] == [1]
    text = alike("files", "pc", "parts", "--store", store, check=True).stdout
    assert "fat16" in text and "ntfs" in text and "xfs" in text and "LVM2" in text


@pytest.mark.parametrize("disk,part,fstype,unix", FILESYSTEMS, ids=[f[2] for f in FILESYSTEMS])
def test_ls(alike, fsdisks, disk, part, fstype, unix):
    store, src = fsdisks["store"], fsdisks["trees"][disk]
    sel = ["--disk", disk, "--partition", part, "--store", store]
    res = alike.json("files", "pc", "ls", "/etc/nginx", *sel)
    assert res["filesystem"] == fstype and res["partition"] == part and res["path"] == "/etc/nginx"
    got = {e["name"]: e for e in res["entries"]}
    assert sorted(got) == sorted(os.listdir(os.path.join(src, "etc/nginx")))
    for name, e in got.items():
        st = os.lstat(os.path.join(src, "etc/nginx", name))
        assert e["mtime_ns"] == st.st_mtime_ns, name
        assert e["kind"] == ("dir" if stat.S_ISDIR(st.st_mode) else "file")
        if e["kind"] == "file":
            assert e["size"] == st.st_size
        assert e["mode"] == (f"{stat.S_IMODE(st.st_mode):04o}" if unix else None)
    root = alike.json("files", "pc", "ls", *sel)["entries"]
    names = {e["name"] for e in root} - {"lost+found"}
    assert names == set(os.listdir(src))  # no $MFT, $FAT1, volume label... at the root
    if unix:
        link = alike.json("files", "pc", "ls", "/etc/main.conf", *sel)["entries"]
        assert link[0]["kind"] == "symlink" and link[0]["target"] == "nginx/nginx.conf"
    text = alike("files", "pc", "ls", "/srv/www", *sel, check=True).stdout
    assert "big.bin" in text and str(os.path.getsize(os.path.join(src, "srv/www/big.bin"))) in text


@pytest.mark.parametrize("disk,part,fstype,unix", FILESYSTEMS, ids=[f[2] for f in FILESYSTEMS])
def test_get(alike, fsdisks, tmp_path, disk, part, fstype, unix):
    store, src = fsdisks["store"], fsdisks["trees"][disk]
    sel = ["--disk", disk, "--partition", part, "--store", store]
    before = tree_digest(store)
    # a folder, recursively, and a file, in one run
    two = alike.json("files", "pc", "get", "/srv", "/etc/nginx/nginx.conf", "--to", tmp_path / "two", *sel)
    assert two["filesystem"] == fstype and two["partition"] == part
    assert check_tree(os.path.join(src, "srv"), str(tmp_path / "two" / "srv"), unix) == 4
    check_entry(os.path.join(src, "etc/nginx/nginx.conf"), str(tmp_path / "two" / "nginx.conf"), unix)
    conf = os.path.getsize(os.path.join(src, "etc/nginx/nginx.conf"))
    assert two["files"] == 5 and two["bytes"] == sum(
        os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(os.path.join(src, "srv")) for f in fs) + conf
    # the whole filesystem
    alike.json("files", "pc", "get", "/", "--to", tmp_path / "all", *sel)
    assert check_tree(src, str(tmp_path / "all"), unix, top=False) == 8
    if fstype == "ext4":  # a target that exists (the same code for every filesystem)
        with open(tmp_path / "two" / "nginx.conf", "wb") as f:
            f.write(b"changed")
        p = alike("files", "pc", "get", "/etc/nginx/nginx.conf", "--to", tmp_path / "two", *sel)
        assert "exists" in one_error(p, 2) and "--force" in p.stderr
        assert open(tmp_path / "two" / "nginx.conf", "rb").read() == b"changed"  # untouched
        alike.json("files", "pc", "get", "/etc/nginx/nginx.conf", "--to", tmp_path / "two", "--force", *sel)
        assert same(os.path.join(src, "etc/nginx/nginx.conf"), tmp_path / "two" / "nginx.conf")
        assert not [f for f in os.listdir(tmp_path / "two") if f.endswith(".alike-part")]
    assert tree_digest(store) == before  # read only


def test_errors(alike, fsdisks, tmp_path):
    store = fsdisks["store"]
    before = tree_digest(store)
    s = ["--store", store]
    cases = [
        (["pc@29990101", "ls", "/"], 2, "no version"),
        (["nosuchvm", "ls", "/"], 2, "no VM named"),
        (["pc", "ls", "/", "--disk", "3"], 2, "no disk 3"),
        (["pc", "ls", "/", "--partition", "7"], 2, "no partition 7"),
        (["pc", "ls", "/"], 2, "--partition"),  # two filesystems on disk 0: which one?
        (["pc", "ls", "/", "--disk", "2", "--partition", "1"], 2, "partition 1"),  # says where and what
        (["pc", "ls", "/", "--disk", "2"], 2, "no readable filesystems (1: an LVM2"),
        (["pc", "ls", "/etc/nope", "--partition", "1"], 2, "no /etc/nope"),
        (["pc", "get", "/nope/x", "--disk", "1", "--partition", "2", "--to", tmp_path / "o"], 2, "no /nope/x"),
        (["pc", "get", "/etc", "--partition", "2"], 2, "--to"),
    ]
    for args, code, words in cases:
        line = one_error(alike("files", *args, *s), code)
        assert words in line, (args, line)
    assert "LVM2" in alike("files", "pc", "ls", "/", "--disk", "2", "--partition", "1", *s).stderr
    assert not os.path.exists(tmp_path / "o")
    assert tree_digest(store) == before
    # damaged data in the store: exit 3, and the partial file is not left behind
    bad = tmp_path / "bad"
    shutil.copytree(store, bad)
    for root, _, files in os.walk(bad / "packs"):
        for f in files:
            p = os.path.join(root, f)
            size = os.path.getsize(p)
            with open(p, "r+b") as fh:
                for off in range(0, size - 4096, 16384):
                    fh.seek(off + 100)
                    fh.write(b"\xff" * 64)
    p = alike("files", "pc", "get", "/srv", "--partition", "1", "--to", tmp_path / "d", "--store", bad)
    assert "amaged" in one_error(p, 3)
    if os.path.exists(tmp_path / "d"):
        assert not [f for _, _, fs in os.walk(tmp_path / "d") for f in fs if f.endswith(".alike-part")]


def test_without_root(alike, fsdisks):
    """The library path needs no mount, loop device or FUSE: extraction as uid/gid 65534 from
    a copy of the store. /root (where this machine's Python lives) is mode 0700, so the process
    keeps one capability, CAP_DAC_READ_SEARCH (read and traverse), and none other: no
    CAP_SYS_ADMIN (mount, loop), no write past file permissions."""
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root to switch to an unprivileged user")
    work = tempfile.mkdtemp(prefix="alike-files-nobody-")
    try:
        os.chmod(work, 0o755)
        store = os.path.join(work, "ads")
        shutil.copytree(fsdisks["store"], store)
        subprocess.run(["chmod", "-R", "a+rX,go-w", store], check=True)
        out = os.path.join(work, "out")
        os.mkdir(out)
        os.chown(out, 65534, 65534)
        drop = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                "--inh-caps=-all,+dac_read_search", "--ambient-caps=-all,+dac_read_search",
                "--bounding-set=-all,+dac_read_search"]
        env = dict(os.environ, HOME="/nonexistent", RAY_ADDRESS="")
        status = subprocess.run(drop + [sys.executable, "-c", "import os; print(os.getuid(), os.getgid());"
                                        "print(open('/proc/self/status').read())"],
                                capture_output=True, text=True, env=env, check=True).stdout
        assert status.startswith("65534 65534")
        cap_eff = int(status.split("CapEff:")[1].split()[0], 16)
        assert cap_eff == 1 << 2  # CAP_DAC_READ_SEARCH only; CAP_SYS_ADMIN is bit 21
        before = tree_digest(store)
        for disk, part, fstype, unix in FILESYSTEMS:
            to = os.path.join(out, fstype)
            p = subprocess.run(drop + [sys.executable, "-m", "alike_ray.cli", "files", "pc", "get", "/",
                                       "--disk", str(disk), "--partition", str(part), "--to", to, "--store", store, "--json"],
                               capture_output=True, text=True, env=env)
            assert p.returncode == 0, p.stderr
            assert json.loads(p.stdout)["filesystem"] == fstype
            assert check_tree(fsdisks["trees"][disk], to, unix, top=False) == 8
            assert os.stat(os.path.join(to, "etc/hostname")).st_uid == 65534  # written by that user
        assert tree_digest(store) == before
    finally:
        shutil.rmtree(work, ignore_errors=True)
