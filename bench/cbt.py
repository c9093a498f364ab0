#!/usr/bin/env python3
"""Day-later backup with changed block tracking (CBT): alike's kvm: source vs borg and restic.

Two scenarios (--scenario heavy|realistic|both):
  heavy      the 2 GiB corpus of bench.py (bench/work/corpus): vm1.raw -> vm1-day2.raw changes ~21% of
             the data (a heavy day); the VM's disk is a qcow2 copy of vm1.raw (`qemu-img convert`);
  realistic  bench/work/corpus-16g (corpus.build_realistic: a 16 GiB disk with ~9.5 GB of data, system
             trees and a PostgreSQL-like table; a day of packages, logs and table writes changes ~2%);
             the VM's disk is a qcow2 overlay whose backing file is the raw vm1.raw (no copy).

Per run and scenario (fresh VMs, fresh repositories):
  1. alike, two ways, each with its own libvirt VM `alike-bench-<pid>-...` (type qemu: TCG, no OS
     boots) and its own store, one after the other (order rotated per run), joined to a Ray head
     started for the run: the *cold command* (`alike backup ... --json`, one process per backup) and
     the *service* (`alike backup --server SOCK ...`, run inside `alike server`, started before its
     VM's steps and stopped after them, untimed like the head; skipped with a log line when
     `alike server --help` fails). For each: the first backup (full read, arms CBT); the day-later
     changes written through QEMU's block layer while the VM runs: every extent where vm1-day2.raw
     differs from vm1.raw (compared in 4 KiB blocks), with the monitor's
     `qemu-io -d <vda backend> "write -q -s FILE OFF LEN"`, FILE holding vm1-day2.raw's bytes there:
     the disk then equals vm1-day2.raw and the checkpoint's dirty bitmap saw it all as a guest's
     writes; the day-later backup (timed; must report cbt: true); the same once more with nothing
     changed (timed: the floor, the fixed cost of a CBT backup);
  2. borg and restic, each into a repository already holding vm1.raw: a new archive/snapshot of
     vm1-day2.raw (timed), i.e. of the same disk content (checked in run 1: `qemu-img compare` of
     the cold VM's disk, shut off, against vm1-day2.raw, and each way's CBT version restored and
     compared with `cmp`).
The page cache is dropped before every timed step. VMs, their images, stores and the write files
are removed at the end of each run, also on failure (and those of dead earlier invocations at the
start).

    python bench/cbt.py --runs 3            # both scenarios: ~25-30 min on 2 cores (run 1 ~11 min with its checks); results/cbt.json + latest.md section
    python bench/cbt.py --runs 1 --scenario heavy
    python bench/cbt.py --report-only       # re-render the latest.md section from results/cbt.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
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

URI = "qemu:///system"
IMAGES = "/var/lib/libvirt/images"
PREFIX = "alike-bench-"
OWN = f"{PREFIX}{os.getpid()}-"
GRAIN = 4096                 # extents compared (and written) in ext4 blocks
MAX_WRITE = 64 << 20         # one qemu-io write at most (QEMU allocates the buffer)
TOOLS = ["alike", "borg", "restic"]          # rotated per run; "alike" = both ways
WAYS = ["cold", "service"]
ROWS = {"alike": "alike (CBT, kvm:, cold command)", "alike-service": "alike (CBT, kvm:, service)",
        "borg": "borg", "restic": "restic"}
WAY_TOOL = {"cold": "alike", "service": "alike-service"}
# scenario -> corpus directory under --work, how the VM's disk is made, where the diff is cached
SCENARIOS = {
    "heavy": dict(title="heavy day", corpus="corpus", disk="copy", extents="cbt-extents.json"),
    "realistic": dict(title="realistic day", corpus="corpus-16g", disk="overlay",
                      extents=os.path.join("corpus-16g", "cbt-extents.json")),
}
BEGIN, END = "<!-- bench/cbt.py: begin -->", "<!-- bench/cbt.py: end -->"
bench.RAY_TMP = "/tmp/alike-bench-cbt-ray"   # our own head's temp dir: never bench.py's
SOCK = f"/tmp/alike-bench-cbt-{os.getpid()}.sock"


# ---------------------------------------------------------------------------------------------
# the day-later changes as extents

def data_ranges(path: str) -> list[tuple[int, int]]:
    """[(start, end)] of the file's data (SEEK_DATA/SEEK_HOLE): the rest are holes, read as zeros."""
    out = []
    fd = os.open(path, os.O_RDONLY)
    try:
        size, off = os.fstat(fd).st_size, 0
        while off < size:
            try:
                s = os.lseek(fd, off, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole after off
                break
            e = os.lseek(fd, s, os.SEEK_HOLE)
            out.append((s, e))
            off = e
    finally:
        os.close(fd)
    return out


def diff_extents(a: str, b: str, cache: str) -> list[tuple[int, int]]:
    """Extents (offset, length) where raw images a and b differ, in GRAIN blocks; cached. Only the
    ranges where either file has data are compared (holes in both are equal)."""
    import numpy as np

    key = [[p, os.path.getsize(p), os.stat(p).st_mtime_ns] for p in (a, b)]
    try:
        with open(cache) as f:
            c = json.load(f)
        if c["key"] == key and c["grain"] == GRAIN:
            return [tuple(x) for x in c["extents"]]
    except (OSError, ValueError, KeyError):
        pass
    x = np.memmap(a, dtype=np.uint8, mode="r")
    y = np.memmap(b, dtype=np.uint8, mode="r")
    if len(x) != len(y) or len(x) % GRAIN:
        raise SystemExit(f"{a} and {b} differ in size (or are not in {GRAIN}-byte blocks)")
    ranges = []
    for s, e in sorted(data_ranges(a) + data_ranges(b)):
        s, e = s // GRAIN * GRAIN, min(len(x), -(-e // GRAIN) * GRAIN)
        if ranges and s <= ranges[-1][1]:
            ranges[-1][1] = max(ranges[-1][1], e)
        else:
            ranges.append([s, e])
    step = 64 << 20
    blocks = []
    for s, e in ranges:
        for o in range(s, e, step):
            n = min(step, e - o)
            d = np.any(x[o:o + n].reshape(-1, GRAIN) != y[o:o + n].reshape(-1, GRAIN), axis=1)
            blocks.append(np.flatnonzero(d) + o // GRAIN)
    idx = np.concatenate(blocks) if blocks else np.zeros(0, dtype=np.int64)
    out = []
    if len(idx):
        brk = np.flatnonzero(np.diff(idx) != 1)
        starts = np.concatenate([[idx[0]], idx[brk + 1]])
        ends = np.concatenate([idx[brk], [idx[-1]]]) + 1
        out = [(int(s) * GRAIN, int(e - s) * GRAIN) for s, e in zip(starts, ends)]
    with open(cache, "w") as f:
        json.dump(dict(key=key, grain=GRAIN, extents=out), f)
    return out


def write_pieces(extents, day2: str, d: str) -> list[tuple[int, int, str]]:
    """One file per write (extents cut at MAX_WRITE) holding day2's bytes there, readable by QEMU
    (the libvirt-qemu user). -> [(offset, length, file)]."""
    os.makedirs(d)
    os.chmod(d, 0o755)
    out = []
    with open(day2, "rb") as src:
        for off, ln in extents:
            for o in range(off, off + ln, MAX_WRITE):
                n = min(MAX_WRITE, off + ln - o)
                path = os.path.join(d, f"w{len(out):05d}-{o}.bin")
                src.seek(o)
                with open(path, "wb") as f:
                    f.write(src.read(n))
                os.chmod(path, 0o644)
                out.append((o, n, path))
    return out


# ---------------------------------------------------------------------------------------------
# libvirt: our VMs and images (never another run's: names carry our pid)

def _ours_or_stale(name: str) -> bool:
    if name.startswith(OWN):
        return True
    pid = name[len(PREFIX):].split("-", 1)[0]
    return name.startswith(PREFIX) and pid.isdigit() and not os.path.exists(f"/proc/{pid}")


def remove_domain(dom) -> None:
    from tests import kvm_env

    kvm_env.remove_domain(dom)


def cleanup(conn) -> None:
    """Our VMs and images, and those left by dead invocations."""
    for dom in conn.listAllDomains(0):
        if _ours_or_stale(dom.name()):
            remove_domain(dom)
    for name in os.listdir(IMAGES) if os.path.isdir(IMAGES) else []:
        if _ours_or_stale(name):
            shutil.rmtree(os.path.join(IMAGES, name), ignore_errors=True)


def qemu_read_bytes(name: str) -> int | None:
    """Bytes QEMU has read from storage so far (/proc/PID/io), to show what the CBT backup cost it."""
    try:
        with open(f"/run/libvirt/qemu/{name}.pid") as f:
            pid = int(f.read().strip())
        with open(f"/proc/{pid}/io") as f:
            return int(next(ln.split()[1] for ln in f if ln.startswith("read_bytes:")))
    except (OSError, ValueError, StopIteration):
        return None


def guest_writes(dom, pieces) -> None:
    """Write the pieces into disk vda of the running VM through its block backend (so the dirty
    bitmap of the checkpoint sees them, as a guest's writes)."""
    import libvirt_qemu
    from tests import kvm_env

    dev = kvm_env.qdev(dom, "vda")
    for off, ln, path in pieces:
        cmd = f'qemu-io -d {dev} "write -q -s {path} {off} {ln}"'
        out = libvirt_qemu.qemuMonitorCommand(dom, cmd, libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)
        if out.strip():
            raise RuntimeError(f"guest write failed: {cmd}: {out.strip()}")


# ---------------------------------------------------------------------------------------------
# the tools

def inblock_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_inblock * 512


def timed(cmd, env, cwd=None, drop=True):
    """Drop the page cache, run; -> (seconds, stdout, bytes read from storage by the command)."""
    drop_caches(drop)
    r0 = inblock_bytes()
    dt, out = run(cmd, env=env, cwd=cwd, timeout=1200)
    return dt, out, inblock_bytes() - r0


def service_available() -> tuple[bool, str]:
    """Whether this alike has `alike server` (the long-lived service with warm Ray workers)."""
    p = subprocess.run(["alike", "server", "--help"], capture_output=True, text=True)
    lines = (p.stderr.strip() or p.stdout.strip()).splitlines()
    return p.returncode == 0, lines[-1] if lines else f"exit {p.returncode}"


class Server:
    """`alike server` on the run's Ray head, started before the service's VM steps (untimed, like
    the head) and stopped after them."""

    def __init__(self, address: str, env: dict):
        self.address, self.env = address, env

    def __enter__(self):
        if os.path.exists(SOCK):
            os.remove(SOCK)
        t0 = time.perf_counter()
        run(["alike", "server", "start", "--socket", SOCK, "--address", self.address], env=self.env, timeout=300)
        log(f"alike server started on {SOCK} in {time.perf_counter() - t0:.1f} s")
        return self

    def __exit__(self, *exc):
        p = subprocess.run(["alike", "server", "stop", "--socket", SOCK], env=self.env, capture_output=True,
                           text=True, timeout=120)
        log(f"alike server stopped (exit {p.returncode}{': ' + p.stderr.strip()[-300:] if p.returncode else ''})")
        slog = SOCK[:-len(".sock")] + ".log"   # the server's log, next to its socket
        if exc[0] is None and not p.returncode and os.path.exists(slog):
            os.remove(slog)
        elif os.path.exists(slog):
            log(f"the server's log is kept: {slog}")


def vm_disk(sc: dict, base: str, img_dir: str) -> str:
    """The VM's disk vda: a qcow2 copy of the base (heavy) or a qcow2 overlay on it (realistic: no
    copy of the 16 GiB image; QEMU, as the libvirt-qemu user, reads the base through the overlay)."""
    qcow2 = os.path.join(img_dir, "vm1.qcow2")
    if sc["disk"] == "copy":
        run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", base, qcow2], timeout=600)
    else:
        os.chmod(base, 0o644)
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", os.path.abspath(base), "-F", "raw", qcow2], timeout=60)
    return qcow2


def alike_steps(conn, a, sc, images, run_no, work, pieces, verify, way, env) -> dict:
    """One way of running alike (cold command / service) on its own VM and store: first backup, the
    day's writes, the timed CBT backup, the floor; in run 1 the checks."""
    from tests import kvm_env

    name = f"{OWN}r{run_no}-{sc['key'][0]}-{way}"
    img_dir = os.path.join(IMAGES, name)
    os.makedirs(img_dir)
    os.chmod(img_dir, 0o755)
    qcow2 = vm_disk(sc, images["vm1"], img_dir)
    dom = conn.defineXML(kvm_env.domain_xml(name, [qcow2], description="alike bench/cbt.py"))
    d = os.path.join(work, "runs", f"cbt-alike-{run_no}-{way}")
    rec = {}
    tag = f"run {run_no} {sc['key']} alike {way}"
    try:
        dom.create()
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
        store = os.path.join(d, "store")
        run(["alike", "init", "--store", store, "--block-size", a.block_size, "--json"], env=env)
        backup = ["alike", "backup"] + (["--server", SOCK] if way == "service" else []) + \
            ["--store", store, f"kvm:{URI}", "--vm", name, "--json"]
        t1, out, _ = timed(backup, env, drop=a.drop)
        j1 = last_json(out)
        if j1.get("cbt") is not False and j1.get("cbt") is not None:
            log(f"note: first backup reports cbt {j1.get('cbt')!r}")
        log(f"{tag} first (kvm, full) {t1:7.2f} s read {j1.get('read_bytes', 0) / 1e6:8.1f} MB")
        t0 = time.perf_counter()
        guest_writes(dom, pieces)
        tw = time.perf_counter() - t0
        log(f"{tag} wrote {len(pieces)} extents ({sum(p[1] for p in pieces) / 1e6:.1f} MB) through "
            f"QEMU's block layer in {tw:.1f} s")
        q0 = qemu_read_bytes(name)
        t2, out, _ = timed(backup, env, drop=a.drop)
        q1 = qemu_read_bytes(name)
        j2 = last_json(out)
        if j2.get("cbt") is not True:
            raise SystemExit(f"the day-later backup ({way}) did not use CBT: {out.strip()[-2000:]}")
        # the floor: the same backup again, nothing changed (process start or service call, backup job,
        # metadata): what any CBT backup costs on top of its changed data
        t3, out, _ = timed(backup, env, drop=a.drop)
        j3 = last_json(out)
        rec = dict(seconds=round(t2, 3), read_bytes=j2["read_bytes"], alike=j2,
                   qemu_read_bytes=(q1 - q0) if q0 is not None and q1 is not None else None,
                   first=dict(seconds=round(t1, 3), read_bytes=j1.get("read_bytes"), alike=j1),
                   nochange=dict(seconds=round(t3, 3), read_bytes=j3.get("read_bytes"), alike=j3),
                   write_seconds=round(tw, 2))
        log(f"{tag} CBT, nothing changed: {t3:7.2f} s (own {j3.get('seconds')} s), "
            f"read {j3.get('read_bytes')} B, cbt {j3.get('cbt')}")
        if verify:
            restored = os.path.join(d, "restored.raw")
            run(["alike", "restore", "--store", store, f"{name}@{j2['version']}", "--to", restored, "--force",
                 "--json"], env=env, timeout=1800)
            bench.cmp_or_die(images["vm1-day2"], restored, f"alike's CBT version ({way}) vs vm1-day2.raw")
            os.remove(restored)
            rec["restore_verified"] = True
        dom.destroy()
        if verify and way == "cold":  # the VM's disk after the writes is vm1-day2.raw: the peers back up the same
            p = subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", qcow2, images["vm1-day2"]],
                               capture_output=True, text=True)
            if p.returncode:
                raise SystemExit(f"the VM's disk differs from vm1-day2.raw: {p.stdout.strip()} {p.stderr.strip()}")
            rec["disk_verified"] = True
        if verify:
            log(f"{tag} verified: " + ("VM disk == vm1-day2.raw, " if way == "cold" else "")
                + "the CBT version restores to vm1-day2.raw")
    finally:
        remove_domain(dom)
        shutil.rmtree(img_dir, ignore_errors=True)
        if not a.keep:
            shutil.rmtree(d, ignore_errors=True)
    return rec


def alike_both(conn, a, sc, images, run_no, work, pieces, service) -> list[tuple[str, dict]]:
    """Both ways on the run's Ray head, in an order rotated per run; the service only when present."""
    ways = WAYS if run_no % 2 else WAYS[::-1]
    out = []
    with bench.RayHead(a.ray_cpus) as head:
        env = dict(os.environ, RAY_ADDRESS=head.address, RAY_AUTH_MODE="token")
        for way in ways:
            if way == "service":
                if not service:
                    continue
                with Server(head.address, env):
                    out.append((way, alike_steps(conn, a, sc, images, run_no, work, pieces, run_no == 1, way, env)))
            else:
                out.append((way, alike_steps(conn, a, sc, images, run_no, work, pieces, run_no == 1, way, env)))
    return out


class CbtBorg(bench.Borg):
    name = "cbt-borg"


class CbtRestic(bench.Restic):
    name = "cbt-restic"


PEERS = {"borg": CbtBorg, "restic": CbtRestic}


def peer_steps(tool: str, a, images, run_no, work, peers=None) -> dict:
    """borg or restic into a repository already holding vm1.raw (untimed): a timed archive/snapshot of
    vm1-day2.raw, the full re-read. `peers`: {tool: Tool class} (their names make the repository dirs;
    bench/xen_cbt.py passes its own)."""
    t = (peers or PEERS)[tool](work, images, run_no)
    try:
        t.setup()
        corpus_dir = os.path.dirname(images["vm1"])
        if tool == "borg":
            base = ["borg", "create", "--sparse", "--chunker-params", "fixed,4194304", "--compression", "zstd,3"]
            run(base + [f"{t.repo}::vm1", "vm1.raw"], env=t.env, cwd=corpus_dir, timeout=1200)
            dt, _, rb = timed(base + [f"{t.repo}::vm1-day2", "vm1-day2.raw"], t.env, cwd=corpus_dir, drop=a.drop)
            return dict(seconds=round(dt, 3), read_bytes=rb)
        base = ["restic", "backup", "--json", "--quiet", "--compression", "auto"]
        run(base + ["vm1.raw"], env=t.env, cwd=corpus_dir, timeout=1200)
        dt, out, rb = timed(base + ["vm1-day2.raw"], t.env, cwd=corpus_dir, drop=a.drop)
        j = last_json(out)
        return dict(seconds=round(dt, 3), read_bytes=rb,
                    restic={k: j.get(k) for k in ("data_added", "total_bytes_processed")})
    finally:
        if not a.keep:
            t.cleanup()


# ---------------------------------------------------------------------------------------------
# report

def medians(results):
    med = {}
    for tool in ROWS:
        recs = [r for r in results if r["tool"] == tool]
        if not recs:
            continue
        s = statistics.median(r["seconds"] for r in recs)
        med[tool] = dict(seconds=s, mb_s=recs[0]["logical_bytes"] / 1e6 / s,
                         read_bytes=int(statistics.median(r["read_bytes"] for r in recs)),
                         all_seconds=[r["seconds"] for r in recs], runs=len(recs))
    return med


def _md(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def patched_read_ranges(extents, bsz: int, grain: int = 64 * 1024) -> list[tuple[int, int]]:
    """What alike's first CBT backup after a full one reads of `extents`, as (offset, length): the
    written granules of each block with at most half of its granules written (a patched block),
    the other blocks whole."""
    per = bsz // grain
    grains: dict[int, set] = {}
    for o, n in extents:
        for g in range(o // grain, (o + n - 1) // grain + 1):
            grains.setdefault(g // per, set()).add(g)
    out = []
    for b in sorted(grains):
        if per >= 2 and 2 * len(grains[b]) <= per:
            out += [(g * grain, grain) for g in sorted(grains[b])]
        else:
            out.append((b * bsz, bsz))
    return out


def patched_read_bytes(extents, bsz: int, grain: int = 64 * 1024) -> int:
    """The bytes of patched_read_ranges."""
    return sum(n for _, n in patched_read_ranges(extents, bsz, grain))


def scenario_report(key: str, d: dict) -> list[str]:
    meta, med, results = d["meta"], d["medians"], d["results"]
    ways = [t for t in ("alike", "alike-service") if t in med]
    L = [f"## {meta.get('title') or SCENARIOS[key]['title']} (`--scenario {key}`)", ""]
    used = meta.get("used_bytes")
    geo = (f"{meta['logical_bytes'] / 2**30:.0f} GiB virtual disk"
           + (f" holding {used / 1e9:,.2f} GB of data (allocated blocks of vm1-day2.raw)" if used else "")
           + f"; the day changed {meta['changed_bytes'] / 1e6:,.1f} MB"
           + (f" = {100 * meta['changed_bytes'] / used:.1f}% of the data" if used else "")
           + f" ({meta['extents']} extents where vm1-day2.raw differs from vm1.raw in 4 KiB blocks, "
             f"applied as {meta['writes']} writes)"
           + (f"; alike's {meta['block_size']} blocks holding a change: {meta['changed_in_blocks_bytes'] / 1e6:,.1f} MB"
              if meta.get("changed_in_blocks_bytes") else "")
           + (f"; what a CBT backup with patched blocks reads: {meta['changed_in_grains_bytes'] / 1e6:,.1f} MB (the "
              "written 64 KiB granules of a block with at most half of them written, the other blocks whole)"
              if meta.get("changed_in_grains_bytes") else ""))
    L.append(f"- {meta.get('corpus_text', 'the 2 GiB corpus of bench.py')}: {geo}.")
    L.append(f"- the VM's disk: {meta.get('disk_text', 'a qcow2 copy of vm1.raw (`qemu-img convert`)')}. "
             f"command: `{meta['command']}`; date: {meta['date']}, host: {meta['host']} ({meta['cpus']} CPUs), "
             f"runs: {meta['runs']} (medians); versions: {meta['versions']}; {meta['qemu']}"
             + ("; checked in run 1: the cold VM's disk equals vm1-day2.raw (`qemu-img compare`) and "
                "each way's CBT version restores to it (`cmp`)" if meta.get("verified") else ""))
    if meta.get("service_skipped"):
        L.append(f"- service row skipped: {meta['service_skipped']}")
    L.append("")
    hdr = "| tool | seconds | MB/s | read bytes |" + "".join(
        f" {'alike cold' if w == 'alike' else 'alike service'}/peer speed |" for w in ways)
    L.append(hdr)
    L.append("|---|---:|---:|---:|" + "---:|" * len(ways))
    for t in ROWS:
        m = med.get(t)
        if not m:
            continue
        sp = "".join(f" {m['seconds'] / med[w]['seconds']:.2f}x |" if t in ("borg", "restic") else " - |"
                     for w in ways)
        L.append(f"| {ROWS[t]} | {m['seconds']:.2f} | {m['mb_s']:.0f} | {m['read_bytes'] / 1e6:,.1f} MB |{sp}")
    for w in ways:
        nc = [r["nochange"] for r in results if r["tool"] == w and r.get("nochange")]
        if nc:
            s = statistics.median(x["seconds"] for x in nc)
            rb = statistics.median(x["read_bytes"] or 0 for x in nc)
            L.append(f"| *{ROWS[w]}, nothing changed: the floor* | {s:.2f} | {meta['logical_bytes'] / 1e6 / s:.0f} | "
                     f"{rb / 1e6:,.1f} MB |" + " (not a peer) |" * len(ways))
    L.append("")
    def f(x, scale=1.0, fmt="{:,.2f}", unit=" s"):
        return "?" if x is None else fmt.format(x / scale) + unit

    for w in ways:
        al = [r for r in results if r["tool"] == w]
        nc = [r["nochange"] for r in al if r.get("nochange")]
        L.append(f"{ROWS[w]}, medians: own `seconds` of the CBT backup (inside the command: without process start "
                 f"and Ray connect) {f(_md(r['alike'].get('seconds') for r in al))}; QEMU's reads from its disk "
                 f"during it {f(_md(r.get('qemu_read_bytes') for r in al), 1e6, '{:,.1f}', ' MB')}; the first (full) "
                 f"kvm: backup {f(_md(r['first']['seconds'] for r in al))}, read "
                 f"{f(_md(r['first']['read_bytes'] for r in al), 1e6, '{:,.1f}', ' MB')}; applying the writes "
                 f"{f(_md(r.get('write_seconds') for r in al), fmt='{:.1f}')}"
                 + (f"; the floor: own `seconds` {f(_md(x['alike'].get('seconds') for x in nc))}" if nc else "")
                 + ".\n")
    L.append("Per-run seconds: " + "; ".join(f"{ROWS[t]}: {', '.join(f'{x:.2f}' for x in med[t]['all_seconds'])}"
                                            for t in ROWS if t in med) + "\n")
    return L


def report(d: dict) -> str:
    scs = d["scenarios"]
    L = [BEGIN, "", "# day-later backup with changed block tracking (kvm: source)", ""]
    L.append(f"Two scenarios: the *heavy day* of the 2 GiB corpus (a fifth of the data rewritten) and a *realistic "
             f"day* on a 16 GiB disk (~2% of the data changed: packages, logs, database pages). Each: a libvirt "
             f"domain of type qemu (TCG, no OS boots), first backup through `alike backup --store S kvm:{URI} --vm "
             f"NAME` (a full read, arms CBT), then the day-later changes written while it runs, through QEMU's "
             f"block layer (HMP `qemu-io -d <vda backend> \"write -s FILE OFF LEN\"`, FILE = vm1-day2.raw's bytes "
             f"there), so that the checkpoint's dirty bitmap sees them as a guest's writes; then the timed backup, "
             f"which must report `cbt: true`.")
    L.append("")
    L.append("- alike two ways, each on its own VM and store: the **cold command** (`alike backup ... --json`, one "
             "process per backup, joined to a Ray head started for the run: `ray start --head --num-cpus=2`, "
             "`RAY_AUTH_MODE=token`) and the **service** (`alike backup --server SOCK ...`: the same backup run "
             "inside `alike server start --socket SOCK --address HEAD`, started before that VM's steps and not "
             "timed, like the head). Block size 512K.")
    L.append("- borg (`--sparse --chunker-params fixed,4194304 --compression zstd,3`) and restic (`--compression "
             "auto`): a new archive/snapshot of vm1-day2.raw (the same content as the VMs' disks after the "
             "writes) into a repository already holding vm1.raw; each re-reads the whole image.")
    L.append("- **seconds**: wall time of the whole command; **MB/s**: the disk's logical (virtual) size / "
             "seconds; **read bytes**: alike: `read_bytes` of `backup --json` (bytes read from the disk over "
             "the backup job's NBD export); borg, restic: bytes the command read from storage (`ru_inblock` x "
             "512); **alike/peer speed**: peer seconds / alike seconds (>1 = alike faster). The *floor* rows: the "
             "same `alike backup` once more right after, nothing changed: the fixed cost of any CBT backup. "
             "Page cache dropped before every timed step.")
    L.append("")
    rows = []
    for key in ("heavy", "realistic"):
        if key not in scs:
            continue
        med = scs[key]["medians"]
        for w in ("alike", "alike-service"):
            if w in med and "borg" in med:
                r = med["borg"]["seconds"] / med[w]["seconds"]
                rows.append(f"| day-later with CBT: alike >= 10x borg throughput ({scs[key]['meta'].get('title') or SCENARIOS[key]['title']}, "
                            f"{'cold command' if w == 'alike' else 'service'}) | {r:.2f}x | {'yes' if r >= 10 else 'NO'} |")
    if rows:
        L += ["| target | measured | ok |", "|---|---:|:---:|"] + rows + [""]
    for key in ("heavy", "realistic"):
        if key in scs:
            L += scenario_report(key, scs[key])
    L.append(END)
    return "\n".join(L) + "\n"


def load(js_path: str) -> dict:
    """cbt.json; one written before the scenarios (meta/medians/results at the top) is the heavy day."""
    try:
        d = json.load(open(js_path))
    except (OSError, ValueError):
        return {"scenarios": {}}
    if "scenarios" not in d:
        d = {"scenarios": {"heavy": d}}
    return d


def put_section(path: str, section: str) -> None:
    common.put_section(path, section, BEGIN, END)


# ---------------------------------------------------------------------------------------------

def run_scenario(key: str, a, conn, tools, service: tuple[bool, str], argv) -> dict:
    sc = dict(SCENARIOS[key], key=key)
    cdir = os.path.join(a.work, sc["corpus"])
    if key == "realistic":
        import corpus

        corpus.build_realistic(a.work, log=log)
    images = {k: os.path.join(cdir, f"{k}.raw") for k in ("vm1", "vm1-day2")}
    for p in images.values():
        if not os.path.exists(p):
            raise SystemExit(f"{p} missing: build the corpus first (python bench/bench.py --corpus-only)")
    logical = os.path.getsize(images["vm1"])
    used = os.stat(images["vm1-day2"]).st_blocks * 512
    t_start = time.time()
    patch_dir = os.path.join(IMAGES, OWN + "writes")
    results = []
    try:
        extents = diff_extents(images["vm1"], images["vm1-day2"], os.path.join(a.work, sc["extents"]))
        changed = sum(n for _, n in extents)
        bsz = bench.parse_size(a.block_size)  # alike's blocks that hold a change: what its CBT backup reads
        touched = len({b for o, n in extents for b in range(o // bsz, (o + n - 1) // bsz + 1)}) * bsz
        grains = patched_read_bytes(extents, bsz)
        log(f"{key}: {logical / 2**30:.0f} GiB disk, {used / 1e9:.2f} GB of data; day-later changes: "
            f"{len(extents)} extents, {changed / 1e6:.1f} MB = {100 * changed / used:.2f}% of the data")
        pieces = write_pieces(extents, images["vm1-day2"], patch_dir) if conn else []
        for run_no in range(1, a.runs + 1):
            k = (run_no - 1) % len(tools)
            for tool in tools[k:] + tools[:k]:
                if tool == "alike":
                    recs = alike_both(conn, a, sc, images, run_no, a.work, pieces, service[0])
                else:
                    recs = [(tool, peer_steps(tool, a, images, run_no, a.work))]
                for name, r in recs:
                    rec = dict(run=run_no, tool=WAY_TOOL.get(name, name), logical_bytes=logical, **r)
                    rec["mb_s"] = round(logical / 1e6 / rec["seconds"], 1)
                    results.append(rec)
                    log(f"run {run_no} {key} {ROWS[rec['tool']]:32s} {rec['seconds']:7.2f} s {rec['mb_s']:7.1f} MB/s "
                        f"read {rec['read_bytes'] / 1e6:8.1f} MB")
    finally:
        shutil.rmtree(patch_dir, ignore_errors=True)
    qv = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    meta = dict(title=sc["title"], command="python bench/cbt.py " + " ".join(sys.argv[1:] if argv is None else argv),
                date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), host=platform.node(),
                cpus=os.cpu_count(), runs=a.runs, block_size=a.block_size, ray_cpus=a.ray_cpus,
                logical_bytes=logical, used_bytes=used, extents=len(extents), changed_bytes=changed,
                changed_in_blocks_bytes=touched, changed_in_grains_bytes=grains,
                writes=len(pieces),
                verified=any(r.get("disk_verified") for r in results) and all(
                    r.get("restore_verified") for r in results if r["tool"].startswith("alike") and r["run"] == 1),
                service_skipped=None if service[0] else f"`alike server --help` fails here ({service[1]})",
                versions=bench.versions(), qemu=qv, total_seconds=round(time.time() - t_start, 1))
    if key == "heavy":
        meta["corpus_text"] = ("the 2 GiB corpus of bench.py (bench/work/corpus: vm1.raw -> vm1-day2.raw, packages "
                               "installed, logs appended, dpkg status and journal rewritten: a heavy day)")
        meta["disk_text"] = "a qcow2 copy of vm1.raw (`qemu-img convert`), one per VM"
    else:
        meta["corpus_text"] = ("bench/work/corpus-16g (`corpus.build_realistic`: GPT + ext4, the system trees of the "
                               "2 GiB corpus in full plus a PostgreSQL-like table of 8 KiB pages in 1 GiB segment "
                               "files; day 2: ~100 MB of new package files, 40 MiB of logs appended, 3,000 table "
                               "pages UPDATEd in place (half among the newest 2% of the table, half anywhere), "
                               "16 MiB of pages appended, dpkg status and journal rewritten)")
        meta["disk_text"] = ("a qcow2 overlay per VM whose backing file is the raw vm1.raw (`qemu-img create -f qcow2 "
                             "-b vm1.raw -F raw`): no copy of the 16 GiB image")
    return dict(meta=meta, medians=medians(results), results=results)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3, help="repetitions; medians are reported (default 3)")
    ap.add_argument("--scenario", choices=["heavy", "realistic", "both"], default="both",
                    help="heavy: the 2 GiB corpus (~21%% changed); realistic: 16 GiB, ~2%% changed (default both)")
    ap.add_argument("--tools", default=",".join(TOOLS), help="comma list of alike,borg,restic (default all)")
    ap.add_argument("--work", default=os.path.join(HERE, "work"), help="work dir with corpus/ (default bench/work)")
    ap.add_argument("--results", default=os.path.join(HERE, "results"), help="where cbt.json and latest.md are")
    ap.add_argument("--block-size", default="512K", help="alike store block size (default 512K)")
    ap.add_argument("--ray-cpus", type=int, default=2, help="CPUs of the Ray head alike joins (default 2)")
    ap.add_argument("--no-drop-caches", dest="drop", action="store_false", help="keep the page cache")
    ap.add_argument("--keep", action="store_true", help="keep the store/repositories under WORK/runs")
    ap.add_argument("--report-only", action="store_true", help="re-render latest.md's section from cbt.json")
    a = ap.parse_args(argv)
    md_path, js_path = os.path.join(a.results, "latest.md"), os.path.join(a.results, "cbt.json")
    if a.report_only:
        sec = report(load(js_path))
        put_section(md_path, sec)
        print(sec)
        return
    if os.geteuid() != 0:
        raise SystemExit("needs root: libvirt's system instance, drop_caches")
    for t in ("alike", "ray", "borg", "restic", "qemu-img"):
        if not shutil.which(t):
            raise SystemExit(f"{t} not found on PATH")
    tools = [t.strip() for t in a.tools.split(",") if t.strip()]
    keys = ["heavy", "realistic"] if a.scenario == "both" else [a.scenario]
    service = service_available() if "alike" in tools else (False, "alike not among --tools")
    if "alike" in tools and not service[0]:
        log(f"the service rows are skipped: `alike server --help` fails ({service[1]}); only the cold command runs")

    def on_term(*_):
        raise KeyboardInterrupt("SIGTERM")  # so that the VMs and images are removed on the way out

    signal.signal(signal.SIGTERM, on_term)
    conn = None
    if "alike" in tools:
        from tests import kvm_env

        conn, why = kvm_env.start_libvirt()
        if conn is None:
            raise SystemExit(f"libvirt: {why}")
        cleanup(conn)
    t_start = time.time()
    done = {}
    try:
        for key in keys:
            done[key] = run_scenario(key, a, conn, tools, service, argv)
    finally:
        if os.path.exists(SOCK):
            subprocess.run(["alike", "server", "stop", "--socket", SOCK], capture_output=True, timeout=120)
        if conn is not None:
            cleanup(conn)
            conn.close()
    d = load(js_path)   # the other scenario's last results stay (each entry has its own meta)
    d["scenarios"].update(done)
    d["scenarios"] = {k: d["scenarios"][k] for k in SCENARIOS if k in d["scenarios"]}
    os.makedirs(a.results, exist_ok=True)
    with open(js_path, "w") as f:
        json.dump(d, f, indent=1)
    sec = report(d)
    put_section(md_path, sec)
    print(sec)
    log(f"done in {time.time() - t_start:.1f} s; wrote {js_path} and the section of {md_path}")


if __name__ == "__main__":
    main()
