"""Build the benchmark corpus: three raw VM disk images that look like installed systems.

template.raw  sparse raw disk, GPT (BIOS-boot + Linux root partition), ext4 root filled with
              real directory trees of this machine (/usr/lib, /usr/share, ...)
vm1.raw       the template, as deployed
vm2.raw       a second VM from the same template: other hostname, machine-id, host keys, logs,
              an extra application tree, some docs removed
vm1-day2.raw  vm1 a day later: packages installed (a few hundred MB of new files), logs
              appended and rotated, dpkg status rewritten

Images are modified through a loop mount of the partition, so the block layout is what an
installed system's filesystem does, not a synthetic pattern. Needs root (losetup, mount).
"""
from __future__ import annotations

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


def build(work: str, size: int, log=print, rebuild: bool = False) -> dict:
    """Build (or reuse) the corpus under work/corpus. -> its description (paths, sizes)."""
    cdir = os.path.join(work, "corpus")
    meta_path = os.path.join(cdir, "corpus.json")
    if not rebuild and os.path.exists(meta_path):
        meta = json.load(open(meta_path))
        if meta.get("version") == CORPUS_VERSION and meta.get("size") == size and all(
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
    fill = int(size * 0.6)
    vm2_diff = int(size * 0.10)
    day2_diff = int(size * 0.15)
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
    cp_sparse(tpl, os.path.join(cdir, "vm1.raw"))
    with Mounted(os.path.join(cdir, "vm1.raw"), mnt, off, psize) as m:
        identity(m, "vm1", 2)
        write_logs(m, "vm1", 12, min(6 * MIB, size // 340), boot_epoch + 3600)
    cp_sparse(tpl, os.path.join(cdir, "vm2.raw"))
    with Mounted(os.path.join(cdir, "vm2.raw"), mnt, off, psize) as m:
        identity(m, "vm2", 3)
        write_logs(m, "vm2", 13, min(16 * MIB, size // 128), boot_epoch + 7200)
        shutil.rmtree(os.path.join(m, "usr/share/locale"), ignore_errors=True)  # a slimmer locale set
        n = copy_trees(VM2_TREES, m, vm2_diff)
        log(f"corpus: vm2 = template + {n / MIB:.0f} MiB application files, other identity and logs")
    cp_sparse(os.path.join(cdir, "vm1.raw"), os.path.join(cdir, "vm1-day2.raw"))
    with Mounted(os.path.join(cdir, "vm1-day2.raw"), mnt, off, psize) as m:
        n = copy_trees(DAY2_TREES, m, day2_diff)
        logs = min(24 * MIB, size // 85)
        write_logs(m, "vm1", 22, logs, boot_epoch + 86400, append=True)
        st = os.path.join(m, "var/lib/dpkg/status")
        if os.path.exists(st):
            data = open(st, "rb").read()
            with open(st + "-new", "wb") as f:
                f.write(data + data[: len(data) // 4])
            os.replace(st + "-new", st)
        log(f"corpus: vm1-day2 = vm1 + {n / MIB:.0f} MiB packages, {logs / MIB:.0f} MiB logs appended, journal rewritten")
    os.remove(tpl)
    alloc = {k: os.stat(os.path.join(cdir, k)).st_blocks * 512 for k in ("vm1.raw", "vm2.raw", "vm1-day2.raw")}
    meta = {
        "version": CORPUS_VERSION, "size": size,
        "images": {"vm1": "vm1.raw", "vm2": "vm2.raw", "vm1-day2": "vm1-day2.raw"},
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
