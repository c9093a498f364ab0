"""Build the benchmark corpus: three raw VM disk images that look like installed systems.

template.raw  sparse raw disk, GPT (BIOS-boot + Linux root partition), ext4 root filled with
              real directory trees of this machine (/usr/lib, /usr/share, ...)
vm1.raw       the template, as deployed
vm2.raw       a second VM from the same template: other hostname, machine-id, host keys, logs,
              an extra application tree, some docs removed
vm1-day2.raw  vm1 a day later: packages installed (a few hundred MB of new files), logs
              appended and rotated, dpkg status rewritten

build() takes the geometry and the day-2 recipe as parameters: the default is the 2 GiB corpus
above (bench.py, cbt.py's "heavy day"); build_realistic() makes bench/work/corpus-16g/, a 16 GiB
disk holding ~9.5 GB (the system trees plus a PostgreSQL-like table of 8 KiB pages) whose day 2
changes ~1.5-2% of it (cbt.py's "realistic day"), with vm1 and vm1-day2 only.

Images are modified through a loop mount of the partition, so the block layout is what an
installed system's filesystem does, not a synthetic pattern. Needs root (losetup, mount).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import random
import shutil
import stat
import subprocess
import time

CORPUS_VERSION = 3
GIB = 1024 ** 3
MIB = 1024 ** 2

# Trees copied into the template, in order, until the fill budget is reached: (source, target in guest).
TEMPLATE_TREES = [
    ("/usr/bin", "usr/bin"),
    ("/usr/sbin", "usr/sbin"),
    ("/usr/lib/python3.11", "usr/lib/python3.11"),
    ("/usr/lib/python3", "usr/lib/python3"),
    ("/usr/share/doc", "usr/share/doc"),
    ("/usr/lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu"),
    ("/usr/include", "usr/include"),
    ("/usr/lib/gcc", "usr/lib/gcc"),
    ("/usr/share/locale", "usr/share/locale"),
    ("/usr/share/perl", "usr/share/perl"),
    ("/usr/share/zoneinfo", "usr/share/zoneinfo"),
    ("/usr/lib/postgresql", "usr/lib/postgresql"),
    ("/usr/share/i18n", "usr/share/i18n"),
    ("/usr/share/man", "usr/share/man"),
    ("/usr/share/icons", "usr/share/icons"),
    ("/usr/share/fonts", "usr/share/fonts"),
    ("/usr/share/cmake-3.25", "usr/share/cmake-3.25"),
    ("/root/.pyenv/versions/3.11.7/lib/python3.11", "usr/local/lib/python3.11"),
    ("/root/.pyenv/versions/3.12.1/lib/python3.12", "usr/local/lib/python3.12"),
    ("/root/.pyenv/versions/3.10.13/lib/python3.10", "usr/local/lib/python3.10"),
    ("/root/.pyenv/versions/3.9.18/lib/python3.9", "usr/local/lib/python3.9"),
]
# Trees only vm2 gets (its application), and only day 2 gets (packages installed overnight).
VM2_TREES = [("/usr/lib/jvm", "opt/app/jvm"), ("/usr/lib/node_modules", "opt/app/node_modules"),
             ("/usr/share/gitweb", "opt/app/web")]
DAY2_TREES = [("/usr/lib/llvm-14", "usr/lib/llvm-14"), ("/usr/lib/google-cloud-sdk", "usr/lib/google-cloud-sdk")]
ETC_FILES = ["/etc/os-release", "/etc/passwd", "/etc/group", "/etc/services", "/etc/protocols",
             "/etc/nsswitch.conf", "/etc/ld.so.conf", "/etc/login.defs", "/etc/adduser.conf",
             "/etc/bash.bashrc", "/etc/profile", "/etc/mime.types", "/var/lib/dpkg/status"]


def sh(*cmd, **kw) -> str:
    return subprocess.run(list(cmd), check=True, capture_output=True, text=True, **kw).stdout


def copy_tree(src: str, dst: str, budget: int) -> int:
    """Copy regular files, dirs and symlinks of src under dst, at most `budget` file bytes."""
    done = 0
    if not os.path.isdir(src) or budget <= 0:
        return 0
    for root, dirs, files in os.walk(src):
        dirs.sort()
        rel = os.path.relpath(root, src)
        droot = os.path.join(dst, rel) if rel != "." else dst
        os.makedirs(droot, exist_ok=True)
        for name in sorted(files) + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            s, d = os.path.join(root, name), os.path.join(droot, name)
            try:
                st = os.lstat(s)
                if stat.S_ISLNK(st.st_mode):
                    if not os.path.lexists(d):
                        os.symlink(os.readlink(s), d)
                elif stat.S_ISREG(st.st_mode):
                    if done + st.st_size > budget:
                        continue
                    shutil.copyfile(s, d)
                    os.chmod(d, stat.S_IMODE(st.st_mode))
                    os.utime(d, ns=(st.st_atime_ns, st.st_mtime_ns))
                    done += st.st_size
            except OSError:
                continue
        if budget - done < 64 * 1024:
            break
    return done


def copy_trees(trees, mnt: str, budget: int) -> int:
    done = 0
    for src, rel in trees:
        if budget - done < MIB:
            break
        done += copy_tree(src, os.path.join(mnt, rel), budget - done)
    return done


_WORDS = ("systemd kernel sshd cron CRON dhclient NetworkManager postfix nginx dockerd containerd "
          "kubelet Started Stopped Accepted publickey session opened closed for user root www-data "
          "GET POST 200 304 404 /api/v1/items /healthz /static/app.js upstream timed out connection "
          "reset by peer eth0 DHCPREQUEST DHCPACK lease renewed audit: type=1400 apparmor=ALLOWED "
          "operation=open profile=/usr/sbin/ntpd pid= comm= name= Reached target Timers").split()


def log_text(rng: random.Random, host: str, nbytes: int, t0: float) -> bytes:
    """Syslog-like lines: realistic entropy (timestamps, pids, words), compressible like real logs."""
    out, n, t = [], 0, t0
    while n < nbytes:
        t += rng.random() * 2
        line = "%s %s %s[%d]: %s\n" % (
            time.strftime("%b %d %H:%M:%S", time.gmtime(t)), host, rng.choice(_WORDS), rng.randrange(1, 65535),
            " ".join(rng.choice(_WORDS) for _ in range(rng.randrange(4, 16))))
        out.append(line)
        n += len(line)
    return "".join(out).encode()


def write_logs(mnt: str, host: str, seed: int, nbytes: int, t0: float, append: bool = False) -> None:
    rng = random.Random(seed)
    logdir = os.path.join(mnt, "var/log")
    os.makedirs(os.path.join(logdir, "journal"), exist_ok=True)
    parts = {"syslog": 0.5, "auth.log": 0.1, "kern.log": 0.1, "nginx-access.log": 0.2, "dpkg.log": 0.1}
    for name, frac in parts.items():
        with open(os.path.join(logdir, name), "ab" if append else "wb") as f:
            f.write(log_text(rng, host, int(nbytes * frac), t0))
    # a binary journal file rewritten in place (as journald does): new bytes everywhere
    with open(os.path.join(logdir, "journal", "system.journal"), "wb") as f:
        f.write(rng.randbytes(4 * MIB))


def identity(mnt: str, host: str, seed: int) -> None:
    rng = random.Random(seed)
    etc = os.path.join(mnt, "etc")
    os.makedirs(os.path.join(etc, "ssh"), exist_ok=True)
    with open(os.path.join(etc, "hostname"), "w") as f:
        f.write(host + "\n")
    with open(os.path.join(etc, "hosts"), "w") as f:
        f.write(f"127.0.0.1 localhost\n127.0.1.1 {host}.example.lan {host}\n")
    with open(os.path.join(etc, "machine-id"), "w") as f:
        f.write(rng.randbytes(16).hex() + "\n")
    for kind in ("rsa", "ecdsa", "ed25519"):
        with open(os.path.join(etc, "ssh", f"ssh_host_{kind}_key"), "wb") as f:
            f.write(rng.randbytes(2600 if kind == "rsa" else 400))
    with open(os.path.join(etc, "fstab"), "w") as f:
        f.write(f"UUID={rng.randbytes(16).hex()} / ext4 errors=remount-ro 0 1\n")


# ---------------------------------------------------------------------------------------------
# application data: a PostgreSQL-like table (heap of 8 KiB pages in 1 GiB segment files)

PAGE = 8192
ROWS_PER_PAGE = 48
DB_DIR = "var/lib/postgresql/15/main/base/16384"
DB_REL = "16397"
SEGMENT = GIB
_ROW = [("xmin", "<u4"), ("xmax", "<u4"), ("id", "<i8"), ("ts", "<i8"), ("customer", "<i4"), ("status", "<i2"),
        ("qty", "<i2"), ("amount", "<i8"), ("uuid", "V16"), ("name", "S24"), ("email", "S32"), ("note", "S48")]
_FIRST = ("anna ben carla david emma felix greta hugo ida jonas klara lukas mia noah olga paul rosa sven tina "
          "uwe vera walter xenia yusuf zoe").split()
_LAST = ("muller schmidt schneider fischer weber meyer wagner becker schulz hoffmann koch richter klein wolf "
         "neumann schwarz braun zimmermann hartmann lange werner krause").split()
_ITEMS = ("usb-c cable 2m|laptop stand alu|wireless mouse|mechanical keyboard|27in monitor|hdmi adapter|"
          "ssd 1tb nvme|webcam 1080p|desk lamp led|office chair|noise cancelling headset|docking station|"
          "printer paper a4|toner black|ethernet cable cat6|power strip 6x|external hdd 4tb|usb hub 7 port").split("|")


def _vocab(rng, n: int, width: int, make):
    import numpy as np

    return np.array([make(rng).encode()[:width] for _ in range(n)], dtype=f"S{width}")


@functools.lru_cache(maxsize=4)
def _vocabs(seed: int):
    """The text columns' vocabularies: the same for every call with this seed."""
    prng = random.Random(seed)
    return (_vocab(prng, 4096, 24, lambda r: f"{r.choice(_FIRST).title()} {r.choice(_LAST).title()}"),
            _vocab(prng, 4096, 32, lambda r: f"{r.choice(_FIRST)}.{r.choice(_LAST)}{r.randrange(100)}@example.com"),
            _vocab(prng, 1024, 48, lambda r: f"{r.choice(_ITEMS)} x{r.randrange(1, 9)} ref {r.randrange(16**6):06x}"))


def db_pages(seed: int, first_page: int, n: int) -> bytes:
    """n heap pages from page number first_page on: a page header (LSN, checksum, lower/upper), 48 line
    pointers, free space, then 48 rows of 160 bytes (ids, timestamps, amounts, a random uuid, names,
    e-mails and item texts from small vocabularies): compressible about like a real table (zstd ~3x),
    seeded, deterministic per (seed, first_page, n)."""
    import numpy as np

    rng = np.random.default_rng([seed, first_page])
    names, mails, notes = _vocabs(seed)
    rows = np.zeros(n * ROWS_PER_PAGE, dtype=np.dtype(_ROW))
    rid = first_page * ROWS_PER_PAGE + np.arange(len(rows), dtype=np.int64)
    rows["xmin"] = 1000 + rid // 7
    rows["id"] = rid + 1
    rows["ts"] = 1_700_000_000_000_000 + rid * 450_000 + rng.integers(0, 400_000, len(rows))
    rows["customer"] = rng.integers(1, 250_000, len(rows))
    rows["status"] = rng.choice(np.array([1, 2, 3, 4, 9], dtype=np.int16), len(rows), p=[.05, .1, .7, .1, .05])
    rows["qty"] = rng.integers(1, 12, len(rows))
    rows["amount"] = rng.integers(199, 250_000, len(rows))
    rows["uuid"] = rng.integers(0, 256, (len(rows), 16), dtype=np.uint8).view("V16").ravel()
    rows["name"] = names[rng.integers(0, len(names), len(rows))]
    rows["email"] = mails[rng.integers(0, len(mails), len(rows))]
    rows["note"] = notes[rng.integers(0, len(notes), len(rows))]
    rsize = rows.dtype.itemsize
    pages = np.zeros((n, PAGE), dtype=np.uint8)
    upper = PAGE - ROWS_PER_PAGE * rsize
    lower = 24 + 4 * ROWS_PER_PAGE
    hdr = np.zeros(n, dtype=np.dtype([("lsn", "<u8"), ("checksum", "<u2"), ("flags", "<u2"), ("lower", "<u2"),
                                      ("upper", "<u2"), ("special", "<u2"), ("version", "<u2"), ("prune", "<u4")]))
    hdr["lsn"] = 0x1_0000_0000 + (first_page + np.arange(n, dtype=np.uint64)) * 0x2000
    hdr["checksum"] = rng.integers(0, 65536, n)
    hdr["lower"], hdr["upper"], hdr["special"], hdr["version"] = lower, upper, PAGE, 0x2004
    pages[:, :24] = hdr.view(np.uint8).reshape(n, 24)
    lp = np.array([(upper + i * rsize) | (1 << 15) | (rsize << 17) for i in range(ROWS_PER_PAGE)], dtype="<u4")
    pages[:, 24:lower] = lp.view(np.uint8)
    pages[:, upper:] = rows.view(np.uint8).reshape(n, ROWS_PER_PAGE * rsize)
    return pages.tobytes()


def db_segments(mnt: str) -> list[str]:
    d = os.path.join(mnt, DB_DIR)
    return [os.path.join(d, DB_REL if i == 0 else f"{DB_REL}.{i}")
            for i in range(len([f for f in os.listdir(d) if f.split(".")[0] == DB_REL]))]


def write_db(mnt: str, seed: int, nbytes: int, first_page: int = 0) -> int:
    """The table (or more of it: from first_page on), nbytes of pages appended to its segment files."""
    os.makedirs(os.path.join(mnt, DB_DIR), exist_ok=True)
    npages, page, chunk = nbytes // PAGE, first_page, 8192
    per_seg = SEGMENT // PAGE
    while page < first_page + npages:
        seg, inseg = divmod(page, per_seg)
        n = min(chunk, first_page + npages - page, per_seg - inseg)
        path = os.path.join(mnt, DB_DIR, DB_REL if seg == 0 else f"{DB_REL}.{seg}")
        with open(path, "r+b" if os.path.exists(path) else "wb") as f:
            f.seek(inseg * PAGE)
            f.write(db_pages(seed, page, n))
        page += n
    return npages * PAGE


def db_page_count(mnt: str) -> int:
    return sum(os.path.getsize(p) for p in db_segments(mnt)) // PAGE


def rewrite_db_pages(mnt: str, seed: int, count: int, hot_frac: float = 0.5, hot_pages: float = 0.02) -> int:
    """A day of UPDATEs: `count` pages rewritten in place (as the database writes them back: pwrite of
    8 KiB into the segment file, conv=notrunc style), hot_frac of them among the newest hot_pages of
    the table, the others anywhere; in each, a few rows get a new status, amount and xmax, and the
    page a new LSN and checksum. -> distinct pages rewritten."""
    import numpy as np

    rng = np.random.default_rng([seed, 7])
    total = db_page_count(mnt)
    hot0 = int(total * (1 - hot_pages))
    nhot = int(count * hot_frac)
    pages = np.unique(np.concatenate([rng.integers(hot0, total, nhot), rng.integers(0, total, count - nhot)]))
    dt = np.dtype(_ROW)
    per_seg = SEGMENT // PAGE
    segs = db_segments(mnt)
    upper = PAGE - ROWS_PER_PAGE * dt.itemsize
    for p in pages.tolist():
        seg, inseg = divmod(p, per_seg)
        fd = os.open(segs[seg], os.O_RDWR)
        try:
            buf = bytearray(os.pread(fd, PAGE, inseg * PAGE))
            a = np.frombuffer(buf, dtype=np.uint8)
            rows = a[upper:].view(dt)
            k = rng.choice(ROWS_PER_PAGE, int(rng.integers(1, 5)), replace=False)
            rows["xmax"][k] = 900_000 + rng.integers(0, 5000, len(k))
            rows["status"][k] = rng.choice(np.array([3, 4, 9], dtype=np.int16), len(k))
            rows["amount"][k] = rng.integers(199, 250_000, len(k))
            rows["ts"][k] = 1_764_086_400_000_000 + rng.integers(0, 86_400_000_000, len(k))
            hdr = a[:16].view("<u8")
            hdr[0] = 0x9_0000_0000 + p * 0x10
            a[8:10] = rng.integers(0, 256, 2, dtype=np.uint8)
            os.pwrite(fd, bytes(buf), inseg * PAGE)
        finally:
            os.close(fd)
    return len(pages)


@dataclasses.dataclass
class Day2:
    """What a day changes in vm1 (vm1-day2.raw), all through the loop-mounted filesystem."""
    trees_bytes: int              # new files: packages installed overnight (DAY2_TREES, in order)
    log_bytes: int                # appended to the logs (the journal file is rewritten too)
    dpkg_rewrite: bool = True     # dpkg's status file rewritten (new file, replaced)
    db_page_writes: int = 0       # table pages rewritten in place (UPDATEs)
    db_append_bytes: int = 0      # table pages appended (INSERTs)


class Mounted:
    """Loop-mount the root partition of a raw image (offset from its GPT)."""

    def __init__(self, image: str, mnt: str, offset: int, size: int, mkfs: bool = False):
        self.image, self.mnt, self.offset, self.size, self.mkfs = image, mnt, offset, size, mkfs
        self.dev = None

    def __enter__(self):
        self.dev = sh("losetup", "--find", "--show", "--offset", str(self.offset), "--sizelimit",
                      str(self.size), self.image).strip()
        try:
            if self.mkfs:
                sh("mkfs.ext4", "-F", "-q", "-L", "root", "-E", "lazy_itable_init=0,lazy_journal_init=0",
                   self.dev)
            os.makedirs(self.mnt, exist_ok=True)
            sh("mount", "-t", "ext4", self.dev, self.mnt)
        except BaseException:
            subprocess.run(["losetup", "-d", self.dev])
            raise
        return self.mnt

    def __exit__(self, *exc):
        subprocess.run(["umount", self.mnt], check=False)
        subprocess.run(["losetup", "-d", self.dev], check=False)
        os.sync()


def root_partition(image: str) -> tuple[int, int]:
    pt = json.loads(sh("sfdisk", "--json", image))["partitiontable"]
    ss = pt.get("sectorsize", 512)
    p = pt["partitions"][-1]
    return p["start"] * ss, p["size"] * ss


def cp_sparse(src: str, dst: str) -> None:
    sh("cp", "--sparse=always", src, dst)


def _default_day2(size: int) -> Day2:
    return Day2(trees_bytes=int(size * 0.15), log_bytes=min(24 * MIB, size // 85))


def build(work: str, size: int, log=print, rebuild: bool = False, *, name: str = "corpus",
          fill: int | None = None, db_bytes: int = 0, vm2: bool = True, day2: Day2 | None = None) -> dict:
    """Build (or reuse) a corpus under work/NAME. -> its description (paths, sizes).

    size: virtual disk size; fill: bytes of system trees (TEMPLATE_TREES, in order; default 60% of
    size); db_bytes: a PostgreSQL-like table of that size after them (default none); vm2: build
    vm2.raw too; day2: the day-2 recipe (default: 15% of size of packages, logs, dpkg status).
    Defaults = the 2 GiB corpus of bench.py. Reused when built with the same parameters."""
    cdir = os.path.join(work, name)
    fill = int(size * 0.6) if fill is None else fill
    day2 = day2 or _default_day2(size)
    params = dict(fill=fill, db_bytes=db_bytes, vm2=vm2, day2=dataclasses.asdict(day2))
    default_params = dict(fill=int(size * 0.6), db_bytes=0, vm2=True, day2=dataclasses.asdict(_default_day2(size)))
    meta_path = os.path.join(cdir, "corpus.json")
    if not rebuild and os.path.exists(meta_path):
        meta = json.load(open(meta_path))
        if meta.get("version") == CORPUS_VERSION and meta.get("size") == size and \
                meta.get("params", default_params) == params and all(
                os.path.exists(os.path.join(cdir, f)) for f in meta["images"].values()):
            log(f"corpus: reusing {cdir} ({meta['describe']})")
            return meta
    if os.path.isdir(cdir):
        shutil.rmtree(cdir)
    os.makedirs(cdir)
    mnt = os.path.join(work, "mnt")
    t0 = time.time()
    tpl = os.path.join(cdir, "template.raw")
    with open(tpl, "wb") as f:
        f.truncate(size)
    # GPT: a 1 MiB BIOS boot partition, then the Linux root to the end
    sh("sfdisk", "-q", tpl, input="label: gpt\nstart=2048, size=2048, type=21686148-6449-6E6F-744E-656564454649\n"
                                   "start=4096, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4\n")
    off, psize = root_partition(tpl)
    vm2_diff = int(size * 0.10)
    boot_epoch = 1764000000.0
    with Mounted(tpl, mnt, off, psize, mkfs=True) as m:
        used = 0
        for f in ETC_FILES:
            d = os.path.join(m, f.lstrip("/"))
            os.makedirs(os.path.dirname(d), exist_ok=True)
            try:
                shutil.copyfile(f, d)
                used += os.path.getsize(d)
            except OSError:
                pass
        identity(m, "template", 1)
        write_logs(m, "template", 11, min(8 * MIB, size // 256), boot_epoch)
        used += copy_trees(TEMPLATE_TREES, m, fill - used)
        log(f"corpus: template filled with {used / MIB:.0f} MiB of files")
        if db_bytes:
            n = write_db(m, 5, db_bytes)
            log(f"corpus: table of {n / MIB:.0f} MiB ({n // PAGE} pages of {PAGE} B) in /{DB_DIR}")
    vm1 = os.path.join(cdir, "vm1.raw")
    if vm2:
        cp_sparse(tpl, vm1)
    else:
        os.replace(tpl, vm1)  # the template is only vm1's start: no copy
    with Mounted(vm1, mnt, off, psize) as m:
        identity(m, "vm1", 2)
        write_logs(m, "vm1", 12, min(6 * MIB, size // 340), boot_epoch + 3600)
    images = {"vm1": "vm1.raw", "vm1-day2": "vm1-day2.raw"}
    if vm2:
        images["vm2"] = "vm2.raw"
        cp_sparse(tpl, os.path.join(cdir, "vm2.raw"))
        with Mounted(os.path.join(cdir, "vm2.raw"), mnt, off, psize) as m:
            identity(m, "vm2", 3)
            write_logs(m, "vm2", 13, min(16 * MIB, size // 128), boot_epoch + 7200)
            shutil.rmtree(os.path.join(m, "usr/share/locale"), ignore_errors=True)  # a slimmer locale set
            n = copy_trees(VM2_TREES, m, vm2_diff)
            log(f"corpus: vm2 = template + {n / MIB:.0f} MiB application files, other identity and logs")
    cp_sparse(vm1, os.path.join(cdir, "vm1-day2.raw"))
    with Mounted(os.path.join(cdir, "vm1-day2.raw"), mnt, off, psize) as m:
        n = copy_trees(DAY2_TREES, m, day2.trees_bytes)
        write_logs(m, "vm1", 22, day2.log_bytes, boot_epoch + 86400, append=True)
        st = os.path.join(m, "var/lib/dpkg/status")
        if day2.dpkg_rewrite and os.path.exists(st):
            data = open(st, "rb").read()
            with open(st + "-new", "wb") as f:
                f.write(data + data[: len(data) // 4])
            os.replace(st + "-new", st)
        what = f"{n / MIB:.0f} MiB packages, {day2.log_bytes / MIB:.0f} MiB logs appended, journal rewritten"
        if day2.db_page_writes:
            k = rewrite_db_pages(m, 23, day2.db_page_writes)
            what += f", {k} table pages rewritten in place"
        if day2.db_append_bytes:
            k = write_db(m, 5, day2.db_append_bytes, first_page=db_page_count(m))
            what += f", {k / MIB:.0f} MiB of table pages appended"
        log(f"corpus: vm1-day2 = vm1 + {what}")
    if os.path.exists(tpl):
        os.remove(tpl)
    alloc = {f: os.stat(os.path.join(cdir, f)).st_blocks * 512 for f in images.values()}
    meta = {
        "version": CORPUS_VERSION, "size": size, "params": params,
        "images": images,
        "allocated_bytes": alloc,
        "partition": {"offset": off, "size": psize},
        "build_seconds": round(time.time() - t0, 1),
        "describe": f"{size / GIB:.2f} GiB virtual images, allocated "
                    + ", ".join(f"{k} {v / MIB:.0f} MiB" for k, v in alloc.items()),
    }
    with open(meta_path, "w") as f:
        json.dump(meta, f, indent=1)
    log(f"corpus: built in {meta['build_seconds']} s: {meta['describe']}")
    return meta


# cbt.py's "realistic day": a 16 GiB disk holding ~9.5 GB (system trees ~3.9 GB + a 5.6 GB table),
# a day that changes ~1.5-2% of it (packages, logs, table UPDATEs and INSERTs, dpkg status, journal)
REALISTIC = dict(size=16 * GIB, name="corpus-16g", fill=int(4.5e9), db_bytes=int(5.6e9), vm2=False,
                 day2=Day2(trees_bytes=100 * 10**6, log_bytes=40 * MIB, db_page_writes=3000,
                           db_append_bytes=16 * MIB))


def build_realistic(work: str, log=print, rebuild: bool = False) -> dict:
    return build(work, log=log, rebuild=rebuild, **REALISTIC)
