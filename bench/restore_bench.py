#!/usr/bin/env python3
"""Restore without restoring: FUSE sequential read (alike vs restic vs borg) and alike's instant VM.

Per run (fresh repositories each run):
  1. backups: vm1.raw, then vm1-day2.raw (for alike the same VM `vm1`), into alike (a directory
     store; `alike backup` joined to one Ray head started for the bench, as bench/bench.py does),
     restic (repository v2, `--compression auto`) and borg (`--sparse --chunker-params
     fixed,4194304 --compression zstd,3`); alike also backs up `vm1big`: a sparse 20 GiB raw
     file holding vm1-day2.raw's 2 GiB at its start (the same data: dedup makes it cheap);
  2. FUSE sequential read of the day-2 disk: each tool's repository mounted (`alike mount --store S
     MNT` -> MNT/vm1/<version>/<disk>.raw; `restic mount MNT` -> MNT/snapshots/latest/<path>;
     `borg mount REPO::vm1-day2 MNT` -> MNT/vm1-day2.raw), the page cache dropped, then timed:
     `dd if=<file> of=/dev/null bs=4M` of the whole 2 GiB file. In run 1 (or every run with
     --verify-all) the file's sha256 is then checked against vm1-day2.raw's. Unmounted after, also on
     failure;
  3. instant VM (alike only; restic and borg have nothing like it): the page cache dropped, then
     timed: `alike instant --store S vm1 --name bench-instant-<pid>` until it exits 0 (it returns when
     QEMU's block statistics show reads from the disk) and the QEMU process it names is alive in
     /proc with read I/O (/proc/<pid>/io rchar > 0); then `alike instant --stop`. The same for
     `vm1big` (20 GiB), to show the time does not grow with the disk size.

MB/s = 10^6 bytes / s. Medians of the runs; ratios (alike/restic, alike/borg) are of medians, and
per run in restore.json. Needs root (drop_caches, FUSE, QEMU).

    python bench/restore_bench.py --runs 3      # results/restore.json + a section of results/latest.md
    python bench/restore_bench.py --report-only # re-render the latest.md section from restore.json
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import common  # noqa: E402
sys.path.insert(1, ROOT)
import bench  # noqa: E402
from bench import drop_caches, last_json, log, run  # noqa: E402

bench.RAY_TMP = "/tmp/alike-bench-rst-ray"   # our own head's temp dir: never bench.py's or cbt.py's
TOOLS = ["alike", "restic", "borg"]
BEGIN, END = "<!-- restore:begin -->", "<!-- restore:end -->"
BIG = 20 << 30
INSTANT_TARGET = 10.0
OWN = f"bench-instant-{os.getpid()}"
TCG_CLI = ("import os, sys; _a = os.access; "
           "os.access = lambda p, m, *a, **k: False if p == '/dev/kvm' else _a(p, m, *a, **k); "
           "from alike_ray.cli import main; sys.exit(main(sys.argv[1:]))")


def qemu_alone(image: str, accel: str, drop: bool, work: str) -> dict:
    """QEMU alone, no alike: instant.py's QEMU command line on the local raw file (read-only), seconds
    from its start until its block statistics show a read: what any instant boot pays for the firmware."""
    from alike_ray.restore.instant import _qmp
    d = os.path.join(work, "runs", f"qemu-alone-{os.getpid()}")
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    sock, pidf = os.path.join(d, "qmp.sock"), os.path.join(d, "qemu.pid")
    drop_caches(drop)
    t0 = time.perf_counter()
    p = subprocess.run(["qemu-system-x86_64", "-name", f"{OWN}-alone", "-machine", f"pc,accel={accel}", "-m", "512",
                        "-drive", f"file={image},format=raw,if=virtio,readonly=on", "-display", "none",
                        "-nic", "none", "-daemonize", "-pidfile", pidf, "-qmp", f"unix:{sock},server=on,wait=off",
                        "-serial", f"file:{os.path.join(d, 'console.log')}"], capture_output=True, text=True)
    try:
        if p.returncode:
            raise RuntimeError(f"QEMU ({accel}) did not start: {p.stderr[-500:]}")
        t_started = time.perf_counter() - t0
        deadline = time.monotonic() + 120
        while True:
            [r] = _qmp(sock, {"execute": "query-blockstats"})
            if sum(x["stats"]["rd_bytes"] for x in r.get("return", [])):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"QEMU alone ({accel}) read nothing in 120 s")
            time.sleep(0.05)
        [k] = _qmp(sock, {"execute": "query-kvm"})
        return dict(seconds=round(time.perf_counter() - t0, 3), started_seconds=round(t_started, 3),
                    kvm_enabled=k.get("return", {}).get("enabled"))
    finally:
        try:
            pid = int(open(pidf).read())
            os.kill(pid, signal.SIGTERM)
            for _ in range(100):
                if not os.path.exists(f"/proc/{pid}"):
                    break
                time.sleep(0.05)
            else:
                os.kill(pid, signal.SIGKILL)
        except (OSError, ValueError):
            pass
        shutil.rmtree(d, ignore_errors=True)


def sha256_file(path: str, bufsize: int = 4 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while True:
            b = f.read(bufsize)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def ref_sha256(image: str, work: str) -> str:
    """sha256 of the corpus image, cached next to it (keyed by size and mtime)."""
    st = os.stat(image)
    cache = os.path.join(work, "restore-sha256.json")
    key = f"{os.path.realpath(image)}:{st.st_size}:{st.st_mtime_ns}"
    try:
        d = json.load(open(cache))
        if d.get("key") == key:
            return d["sha256"]
    except (OSError, ValueError):
        pass
    s = sha256_file(image)
    with open(cache, "w") as f:
        json.dump({"key": key, "sha256": s}, f)
    return s


def make_big(src: str, path: str) -> None:
    """A sparse 20 GiB raw file: src's bytes at the start, holes after."""
    if os.path.exists(path) and os.path.getsize(path) == BIG and os.path.getmtime(path) >= os.path.getmtime(src):
        return
    tmp = path + ".part"
    subprocess.run(["cp", "--sparse=always", src, tmp], check=True)
    subprocess.run(["truncate", "-s", str(BIG), tmp], check=True)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# mounts: a background process per mount, stopped by pid; nothing stays mounted

class Mount:
    def __init__(self, tool: str, cmd: list, mnt: str, env: dict, log_path: str, cwd: str | None = None):
        self.tool, self.cmd, self.mnt, self.env, self.log_path, self.cwd = tool, cmd, mnt, env, log_path, cwd
        self.proc = None
        self.ready_seconds = None

    def __enter__(self):
        os.makedirs(self.mnt, exist_ok=True)
        if os.path.ismount(self.mnt):
            raise SystemExit(f"{self.mnt} is mounted already")
        self._log = open(self.log_path, "w")
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(self.cmd, env=self.env, cwd=self.cwd, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 120
        while not os.path.ismount(self.mnt):
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.tool} mount exited {self.proc.returncode}: "
                                   f"{open(self.log_path).read()[-1500:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.tool} mount did not come up in 120 s")
            time.sleep(0.05)
        self.ready_seconds = time.perf_counter() - t0
        return self

    def wait_file(self, find, timeout=120) -> str:
        deadline = time.monotonic() + timeout
        while True:
            p = find()
            if p and os.path.exists(p):
                return p
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.tool} mount exited {self.proc.returncode}: "
                                   f"{open(self.log_path).read()[-1500:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.tool}: the disk file did not appear under {self.mnt} in {timeout} s")
            time.sleep(0.1)

    def __exit__(self, *exc):
        for cmd in (["fusermount", "-u", self.mnt], ["umount", self.mnt], ["umount", "-l", self.mnt]):
            if not os.path.ismount(self.mnt):
                break
            subprocess.run(cmd, capture_output=True)
            for _ in range(50):
                if not os.path.ismount(self.mnt):
                    break
                time.sleep(0.1)
        if self.proc and self.proc.poll() is None:
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                for sig in (signal.SIGTERM, signal.SIGKILL):
                    try:
                        os.kill(self.proc.pid, sig)
                    except ProcessLookupError:
                        break
                    try:
                        self.proc.wait(10)
                        break
                    except subprocess.TimeoutExpired:
                        pass
        self._log.close()
        if os.path.ismount(self.mnt):
            log(f"WARNING: {self.mnt} is still mounted")


def timed_read(path: str, drop: bool) -> tuple[float, int]:
    """dd of the whole file to /dev/null -> (seconds, bytes)."""
    drop_caches(drop)
    t0 = time.perf_counter()
    p = subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=4M"], capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if p.returncode:
        raise RuntimeError(f"dd of {path} failed: {p.stderr.strip()[-500:]}")
    n = int(p.stderr.strip().splitlines()[-1].split()[0])
    return dt, n


# ---------------------------------------------------------------------------------------------
# the tools

class Tool:
    name = "?"

    def __init__(self, work: str, run_no: int):
        self.dir = os.path.join(work, "runs", f"restore-{self.name}-{run_no}")
        shutil.rmtree(self.dir, ignore_errors=True)
        os.makedirs(self.dir)
        self.repo = os.path.join(self.dir, "repo")
        self.mnt = os.path.join(self.dir, "mnt")

    def cleanup(self):
        if os.path.ismount(self.mnt):
            subprocess.run(["umount", "-l", self.mnt], capture_output=True)
        shutil.rmtree(self.dir, ignore_errors=True)


class Alike(Tool):
    name = "alike"

    def __init__(self, work, run_no, address, block_size, big=True):
        super().__init__(work, run_no)
        self.big = big
        self.env = dict(os.environ)
        self.env.pop("RAY_ADDRESS", None)
        if address:
            self.env["RAY_ADDRESS"] = address
            self.env["RAY_AUTH_MODE"] = "token"
        self.block_size = block_size

    def backup(self, images):
        run(["alike", "init", "--store", self.repo, "--block-size", self.block_size, "--json"], env=self.env)
        out = {}
        todo = [("vm1", "vm1"), ("vm1-day2", "vm1")] + ([("vm1big", "vm1big")] if self.big else [])
        for key, vm in todo:
            image = images[key]
            dt, _ = run(["alike", "backup", "--store", self.repo, f"image:{image}", "--name", vm, "--json"],
                        env=self.env)
            out[key] = round(dt, 3)
        return out

    def mount(self):
        return Mount("alike", ["alike", "mount", "--store", self.repo, self.mnt], self.mnt, self.env,
                     os.path.join(self.dir, "mount.log"))

    def disk_file(self):
        d = os.path.join(self.mnt, "vm1")
        if not os.path.isdir(d):
            return None
        vs = sorted(os.listdir(d))
        if len(vs) < 2:
            return None  # both versions must be there; the day-2 one is the latest
        disks = sorted(os.listdir(os.path.join(d, vs[-1])))
        return os.path.join(d, vs[-1], disks[0]) if disks else None

    def instant(self, vm: str, drop: bool, tcg: bool = False) -> dict:
        """`alike instant` as shipped; tcg=True: the same CLI in a Python whose os.access denies /dev/kvm,
        so instant.py picks accel=tcg (a what-if: nothing else changes)."""
        name = f"{OWN}-{vm}{'-tcg' if tcg else ''}"
        cli = [sys.executable, "-c", TCG_CLI] if tcg else ["alike"]
        drop_caches(drop)
        t0 = time.perf_counter()
        p = subprocess.run([*cli, "instant", "--store", self.repo, vm, "--name", name, "--json"], env=self.env,
                           capture_output=True, text=True, timeout=300)
        t_cmd = time.perf_counter() - t0
        try:
            if p.returncode:
                raise RuntimeError(f"alike instant {vm} failed (exit {p.returncode}): {p.stdout[-1500:]} "
                                   f"{p.stderr[-1500:]}")
            j = last_json(p.stdout)
            pid = j.get("qemu_pid")
            if not pid or not os.path.exists(f"/proc/{pid}"):
                raise RuntimeError(f"alike instant {vm}: no QEMU process (pid {pid!r}) in /proc after exit 0: {j}")
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"qemu-system" not in f.read():
                    raise RuntimeError(f"alike instant {vm}: pid {pid} is not QEMU")
            # the reads: QEMU's own I/O counters (all threads) and the disk's block statistics
            io = dict(line.split(": ") for line in open(f"/proc/{pid}/io").read().split("\n") if ": " in line)
            t_checked = time.perf_counter() - t0
            rd = None
            try:
                sys.path.insert(0, ROOT)
                from alike_ray.restore import instant as inst
                rd = inst.read_bytes(j["run"])
            except Exception as e:  # noqa: BLE001  (only a detail for the report)
                log(f"instant {vm}: query-blockstats failed: {type(e).__name__}: {e}")
            if int(io.get("rchar", 0)) <= 0 and not rd:
                raise RuntimeError(f"alike instant {vm}: QEMU shows no reads (io {io}, blockstats {rd})")
            return dict(seconds=round(t_cmd, 3), seconds_checked=round(t_checked, 3),
                        own_seconds=j.get("seconds_to_running"), qemu_rchar=int(io.get("rchar", 0)),
                        qemu_read_bytes=int(io.get("read_bytes", 0)), blockstats_rd_bytes=rd)
        finally:
            s = subprocess.run(["alike", "instant", "--stop", name, "--json"], env=self.env,
                               capture_output=True, text=True, timeout=120)
            if s.returncode and p.returncode == 0:
                log(f"WARNING: alike instant --stop {name} exit {s.returncode}: {s.stderr[-500:]}")


class Restic(Tool):
    name = "restic"

    def __init__(self, work, run_no):
        super().__init__(work, run_no)
        self.env = dict(os.environ, RESTIC_PASSWORD="bench", RESTIC_REPOSITORY=self.repo,
                        RESTIC_CACHE_DIR=os.path.join(self.dir, "cache"))
        self.day2 = None

    def backup(self, images):
        run(["restic", "init", "--repository-version", "2"], env=self.env)
        out = {}
        for key in ("vm1", "vm1-day2"):
            dt, _ = run(["restic", "backup", "--json", "--quiet", "--compression", "auto",
                         os.path.basename(images[key])], env=self.env, cwd=os.path.dirname(images[key]))
            out[key] = round(dt, 3)
        self.day2 = images["vm1-day2"]
        return out

    def mount(self):
        return Mount("restic", ["restic", "mount", self.mnt], self.mnt, self.env, os.path.join(self.dir, "mount.log"))

    def disk_file(self):
        # restic 0.14 keeps the path as given (relative: the file name) under the snapshot's root
        for p in (os.path.basename(self.day2), os.path.realpath(self.day2).lstrip("/")):
            f = os.path.join(self.mnt, "snapshots", "latest", p)
            if os.path.exists(f):
                return f
        return None


class Borg(Tool):
    name = "borg"

    def __init__(self, work, run_no):
        super().__init__(work, run_no)
        self.env = dict(os.environ, BORG_BASE_DIR=os.path.join(self.dir, "home"),
                        BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK="yes", BORG_RELOCATED_REPO_ACCESS_IS_OK="yes",
                        BORG_PASSPHRASE="", BORG_DISPLAY_PASSPHRASE="no")

    def backup(self, images):
        run(["borg", "init", "-e", "none", self.repo], env=self.env)
        out = {}
        for key in ("vm1", "vm1-day2"):
            dt, _ = run(["borg", "create", "--sparse", "--chunker-params", "fixed,4194304", "--compression", "zstd,3",
                         f"{self.repo}::{key}", os.path.basename(images[key])], env=self.env,
                        cwd=os.path.dirname(images[key]))
            out[key] = round(dt, 3)
        return out

    def mount(self):
        return Mount("borg", ["borg", "mount", "-f", f"{self.repo}::vm1-day2", self.mnt], self.mnt, self.env,
                     os.path.join(self.dir, "mount.log"))

    def disk_file(self):
        return os.path.join(self.mnt, "vm1-day2.raw")


# ---------------------------------------------------------------------------------------------

def medians(results: list) -> dict:
    by = {}
    for r in results:
        by.setdefault((r["tool"], r["step"]), []).append(r)
    med = {}
    for (tool, step), rs in by.items():
        secs = statistics.median(r["seconds"] for r in rs)
        m = dict(seconds=secs, all_seconds=[r["seconds"] for r in rs], runs=len(rs))
        if "bytes" in rs[0]:
            m["bytes"] = rs[0]["bytes"]
            m["mb_s"] = statistics.median(r["mb_s"] for r in rs)
            m["all_mb_s"] = [r["mb_s"] for r in rs]
        for k in ("own_seconds", "blockstats_rd_bytes", "qemu_rchar", "mount_ready_seconds", "seconds_checked",
                  "started_seconds"):
            xs = [r[k] for r in rs if r.get(k) is not None]
            if xs:
                m[k] = statistics.median(xs)
        med[f"{tool}/{step}"] = m
    return med


def run_ratios(results: list, peer: str) -> list:
    """alike MB/s / peer MB/s of the FUSE read, per run (both from the same run)."""
    out = []
    for r in sorted({x["run"] for x in results}):
        a = [x for x in results if x["run"] == r and x["tool"] == "alike" and x["step"] == "fuse-read"]
        p = [x for x in results if x["run"] == r and x["tool"] == peer and x["step"] == "fuse-read"]
        if a and p:
            out.append(a[0]["mb_s"] / p[0]["mb_s"])
    return out


def fmt_small(n) -> str:
    return f"{n:,} B" if n < 100_000 else bench.fmt_bytes(n)


def report(d: dict) -> str:
    meta, med, results = d["meta"], d["medians"], d["results"]
    L = [BEGIN, "", "# restore without restoring: FUSE sequential read and instant VM", ""]
    L.append(f"- command: `{meta['command']}`; date: {meta['date']}, host: {meta['host']} ({meta['cpus']} CPUs), "
             f"runs: {meta['runs']} (medians); versions: {meta['versions']}")
    L.append("- repositories per run: vm1.raw then vm1-day2.raw (2 GiB virtual, real ext4; alike: the same VM "
             "`vm1`, block size %s, `alike backup` joined to a Ray head started for the bench; restic: repository "
             "v2, `--compression auto`; borg: `--sparse --chunker-params fixed,4194304 --compression zstd,3`)."
             % meta["block_size"])
    L.append("- **FUSE sequential read**: the day-2 disk file on each tool's FUSE mount (`alike mount --store S "
             "MNT` -> `MNT/vm1/<version>/<disk>.raw`; `restic mount MNT` -> `MNT/snapshots/latest/<path>`; "
             "`borg mount REPO::vm1-day2 MNT`), page cache dropped, then timed `dd if=FILE of=/dev/null bs=4M` "
             "of the whole file (%s); mount start-up not included. sha256 of what was read checked against "
             "vm1-day2.raw's: %s. **MB/s** = 10^6 bytes / s; **alike/peer** = alike MB/s / peer MB/s "
             "(>1 = alike faster): the median of the per-run ratios (each from one run), the runs' ratios in "
             "brackets." % (bench.fmt_bytes(meta["disk_bytes"]), meta["verified"]))
    if meta.get("loadavg") or meta.get("note"):
        la = meta.get("loadavg") or {}
        L.append("- machine load (other test runs on the same 2 cores): "
                 + "; ".join([f"{k} {v}" for k, v in la.items()] + ([meta["note"]] if meta.get("note") else []))
                 + ".")
    L.append("- **instant VM** (alike only: restic and borg have no such command): page cache dropped, then "
             "timed from starting `alike instant --store S VM --name N` until it exits 0 (it returns once QEMU's "
             "block statistics show reads of the disk) and its QEMU process is alive in /proc with read I/O "
             "(`/proc/PID/io` rchar > 0); then `alike instant --stop N`. instant.py runs QEMU with `accel=kvm:tcg` when "
             "/dev/kvm is usable (here: %s, nested in a VM). "
             "`vm1big`: a sparse 20 GiB raw file with vm1-day2.raw's 2 GiB at its start, backed up as its own VM."
             % {"kvm": "yes, KVM", "tcg": "no, TCG"}.get(meta.get("accel"), "?"))
    L.append("")
    L.append("| FUSE sequential read of the day-2 disk | seconds | MB/s | alike/peer | mount up (s) |")
    L.append("|---|---:|---:|---:|---:|")
    a = med.get("alike/fuse-read")
    for t in TOOLS:
        m = med.get(f"{t}/fuse-read")
        if not m:
            continue
        rs = run_ratios(results, t) if t != "alike" else []
        ratio = f"{statistics.median(rs):.2f}x ({', '.join(f'{x:.2f}' for x in rs)})" if rs else "-"
        L.append(f"| {t} | {m['seconds']:.2f} | {m['mb_s']:.0f} | {ratio} | {m.get('mount_ready_seconds', 0):.2f} |")
    L.append("")
    L.append("| instant VM | disk size | seconds to running | alike's own | QEMU read (blockstats) | "
             "target < 10 s |")
    L.append("|---|---:|---:|---:|---:|:---:|")
    rows = [("instant-vm1", "`alike instant` vm1 (as shipped: accel=kvm:tcg, KVM here)", meta["disk_bytes"]),
            ("instant-vm1big", "`alike instant` vm1big (as shipped)", BIG),
            ("instant-vm1-tcg", "`alike instant` vm1, TCG (what-if)", meta["disk_bytes"]),
            ("instant-vm1big-tcg", "`alike instant` vm1big, TCG (what-if)", BIG)]
    for step, label, size in rows:
        m = med.get(f"alike/{step}")
        if not m:
            continue
        own = f"{m['own_seconds']:.2f}" if m.get("own_seconds") is not None else "-"
        rd = fmt_small(int(m["blockstats_rd_bytes"])) if m.get("blockstats_rd_bytes") is not None else "-"
        L.append(f"| {label} | {size / 2**30:.0f} GiB | {m['seconds']:.2f} | {own} | {rd} | "
                 f"{'yes' if m['seconds'] < INSTANT_TARGET else 'NO'} |")
    for accel in ("kvm", "tcg"):
        m = med.get(f"qemu/alone-{accel}")
        if m:
            L.append(f"| *QEMU alone, no alike ({accel}): local raw file, start to first read* | "
                     f"{meta['disk_bytes'] / 2**30:.0f} GiB | {m['seconds']:.2f} | - | - | (reference) |")
    if any(k.endswith("-tcg") for k in med):
        L.append("")
        L.append("*What-if TCG rows*: the same `alike instant` command line run by a Python whose `os.access` "
                 "denies /dev/kvm, so instant.py picks `accel=tcg`; nothing else changes. *QEMU alone*: instant.py's "
                 "QEMU command line on the local vm1-day2.raw (read-only, no alike, no FUSE), timed from its start "
                 "to its first disk read (QMP query-blockstats): the firmware's share of any instant boot.")
    L.append("")
    per_run = []
    for r in sorted({x["run"] for x in results}):
        rr = {x["tool"] + "/" + x["step"]: x for x in results if x["run"] == r}
        bits = []
        for t in TOOLS:
            x = rr.get(f"{t}/fuse-read")
            if x:
                bits.append(f"{t} {x['mb_s']:.0f} MB/s")
        for p in ("restic", "borg"):
            if rr.get("alike/fuse-read") and rr.get(f"{p}/fuse-read"):
                bits.append(f"alike/{p} {rr['alike/fuse-read']['mb_s'] / rr[p + '/fuse-read']['mb_s']:.2f}x")
        for st in ("instant-vm1", "instant-vm1big", "instant-vm1-tcg", "instant-vm1big-tcg"):
            x = rr.get(f"alike/{st}")
            if x:
                bits.append(f"{st} {x['seconds']:.2f} s")
        for accel in ("kvm", "tcg"):
            x = rr.get(f"qemu/alone-{accel}")
            if x:
                bits.append(f"QEMU alone {accel} {x['seconds']:.2f} s")
        per_run.append(f"run {r}: " + ", ".join(bits))
    L.append("Per run: " + "; ".join(per_run) + ".")
    bk = meta.get("backup_seconds_median")
    if bk:
        L.append("")
        L.append("Backups (not the subject here, medians, s): " + "; ".join(f"{k} {v:.1f}" for k, v in bk.items()) + ".")
    L += ["", END]
    return "\n".join(L) + "\n"


def put_section(path: str, section: str) -> None:
    common.put_section(path, section, BEGIN, END)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3, help="repetitions; medians are reported (default 3)")
    ap.add_argument("--tools", default=",".join(TOOLS), help="comma list of alike,restic,borg (default all)")
    ap.add_argument("--work", default=os.path.join(HERE, "work"), help="work dir with corpus/ (default bench/work)")
    ap.add_argument("--results", default=os.path.join(HERE, "results"), help="where restore.json and latest.md are")
    ap.add_argument("--block-size", default="512K", help="alike store block size (default 512K)")
    ap.add_argument("--ray-cpus", type=int, default=2, help="CPUs of the Ray head alike joins (default 2)")
    ap.add_argument("--no-drop-caches", dest="drop", action="store_false", help="keep the page cache")
    ap.add_argument("--no-big", dest="big", action="store_false", help="skip the 20 GiB sparse disk")
    ap.add_argument("--no-tcg", dest="tcg", action="store_false",
                    help="skip the what-if rows with QEMU's TCG instead of KVM (instant and QEMU alone)")
    ap.add_argument("--verify-all", action="store_true", help="sha256-check the FUSE read in every run, not just run 1")
    ap.add_argument("--keep", action="store_true", help="keep the repositories under WORK/runs")
    ap.add_argument("--report-only", action="store_true", help="re-render latest.md's section from restore.json")
    a = ap.parse_args(argv)
    md_path, js_path = os.path.join(a.results, "latest.md"), os.path.join(a.results, "restore.json")
    if a.report_only:
        sec = report(json.load(open(js_path)))
        put_section(md_path, sec)
        print(sec)
        return
    if os.geteuid() != 0:
        raise SystemExit("needs root: drop_caches, FUSE mounts, QEMU")
    for t in ("alike", "ray", "borg", "restic", "qemu-system-x86_64", "qemu-img", "fusermount", "dd"):
        if not shutil.which(t):
            raise SystemExit(f"{t} not found on PATH")
    tools = [t.strip() for t in a.tools.split(",") if t.strip()]
    cdir = os.path.join(a.work, "corpus")
    images = {k: os.path.join(cdir, f"{k}.raw") for k in ("vm1", "vm1-day2")}
    for p in images.values():
        if not os.path.exists(p):
            raise SystemExit(f"{p} missing: build the corpus with `python bench/bench.py --corpus-only`")
    t_start = time.time()
    images["vm1big"] = os.path.join(a.work, "restore-vm1big.raw")
    if a.big and "alike" in tools:
        make_big(images["vm1-day2"], images["vm1big"])
    disk_bytes = os.path.getsize(images["vm1-day2"])
    load_start = "%.1f %.1f %.1f" % os.getloadavg()
    ref = ref_sha256(images["vm1-day2"], a.work)
    log(f"vm1-day2.raw sha256 {ref[:16]}...")

    def on_term(*_):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)

    results, backups, verified = [], [], []
    head = bench.RayHead(a.ray_cpus) if "alike" in tools else None
    try:
        if head:
            head.__enter__()
        for run_no in range(1, a.runs + 1):
            k = (run_no - 1) % len(tools)
            order = tools[k:] + tools[:k]  # rotate: spread the noise
            for name in order:
                if name == "alike":
                    t = Alike(a.work, run_no, head.address, a.block_size, big=a.big)
                elif name == "restic":
                    t = Restic(a.work, run_no)
                elif name == "borg":
                    t = Borg(a.work, run_no)
                else:
                    raise SystemExit(f"unknown tool {name}")
                try:
                    bs = t.backup(images)
                    backups.append(dict(run=run_no, tool=name, **bs))
                    log(f"run {run_no} {name:7s} backups {bs}")
                    with t.mount() as m:
                        f = m.wait_file(t.disk_file)
                        size = os.path.getsize(f)
                        if size != disk_bytes:
                            raise RuntimeError(f"{name}: {f} is {size} bytes, not {disk_bytes}")
                        dt, n = timed_read(f, a.drop)
                        if n != disk_bytes:
                            raise RuntimeError(f"{name}: dd read {n} bytes of {disk_bytes}")
                        rec = dict(run=run_no, tool=name, step="fuse-read", seconds=round(dt, 3), bytes=n,
                                   mb_s=round(n / 1e6 / dt, 1), mount_ready_seconds=round(m.ready_seconds, 3),
                                   file=os.path.relpath(f, t.mnt))
                        if run_no == 1 or a.verify_all:
                            got = sha256_file(f)
                            if got != ref:
                                raise SystemExit(f"FUSE READ MISMATCH ({name}): sha256 {got} != {ref} ({f})")
                            rec["sha256_ok"] = True
                            verified.append(f"{name} run {run_no}")
                        results.append(rec)
                        log(f"run {run_no} {name:7s} fuse-read {dt:7.2f} s {rec['mb_s']:7.1f} MB/s"
                            f"{' sha256 ok' if rec.get('sha256_ok') else ''}")
                    if name == "alike":
                        for vm in (("vm1", "vm1big") if a.big else ("vm1",)):
                            for tcg in ((False, True) if a.tcg else (False,)):
                                r = t.instant(vm, a.drop, tcg=tcg)
                                step = f"instant-{vm}{'-tcg' if tcg else ''}"
                                results.append(dict(run=run_no, tool="alike", step=step, **r))
                                log(f"run {run_no} alike   {step}: {r['seconds']:.2f} s (own "
                                    f"{r['own_seconds']}), QEMU rchar {r['qemu_rchar']}, blockstats rd "
                                    f"{r['blockstats_rd_bytes']}")
                        for accel in (("kvm", "tcg") if a.tcg else ("kvm",)):
                            r = qemu_alone(images["vm1-day2"], accel, a.drop, a.work)
                            results.append(dict(run=run_no, tool="qemu", step=f"alone-{accel}", **r))
                            log(f"run {run_no} QEMU alone ({accel}, kvm enabled: {r['kvm_enabled']}): "
                                f"first read after {r['seconds']:.2f} s")
                finally:
                    if not a.keep:
                        t.cleanup()
    finally:
        if head:
            head.__exit__(None, None, None)
        if not a.keep and os.path.exists(images["vm1big"]):
            os.remove(images["vm1big"])
    accel = "kvm" if os.access("/dev/kvm", os.R_OK | os.W_OK) else "tcg"
    bmed = {}
    for tool in tools:
        for key in ("vm1", "vm1-day2", "vm1big"):
            xs = [b[key] for b in backups if b["tool"] == tool and key in b]
            if xs:
                bmed[f"{tool} {key}"] = statistics.median(xs)
    meta = dict(command="python bench/restore_bench.py " + " ".join(sys.argv[1:] if argv is None else argv),
                date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), host=platform.node(), cpus=os.cpu_count(),
                runs=a.runs, block_size=a.block_size, versions=bench.versions() + "; " + _qemu_version(),
                disk_bytes=disk_bytes, big_bytes=BIG if a.big else None, accel=accel, ref_sha256=ref,
                verified=", ".join(verified) or "no", backup_seconds_median=bmed,
                total_seconds=round(time.time() - t_start, 1),
                loadavg={"load average (1/5/15 min) at the start": load_start,
                         "at the end": "%.1f %.1f %.1f" % os.getloadavg()})
    d = dict(meta=meta, medians=medians(results), results=results, backups=backups)
    os.makedirs(a.results, exist_ok=True)
    with open(js_path + ".tmp", "w") as f:
        json.dump(d, f, indent=1)
    os.replace(js_path + ".tmp", js_path)
    sec = report(d)
    put_section(md_path, sec)
    print(sec)
    log(f"done in {meta['total_seconds']} s; wrote {js_path} and the section of {md_path}")


def _qemu_version() -> str:
    try:
        return subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True,
                              timeout=30).stdout.splitlines()[0]
    except Exception:
        return "QEMU ?"


if __name__ == "__main__":
    main()
