#!/usr/bin/env python3
"""Day-later backup with changed block tracking (CBT): alike's kvm: source vs borg and restic.

Per run (fresh VM, fresh repositories):
  1. a libvirt VM `alike-bench-<pid>-r<run>` (type qemu: TCG, no OS boots) whose disk vda is a
     qcow2 copy of vm1.raw (`qemu-img convert` into /var/lib/libvirt/images/...), started;
  2. alike: first backup of it through the kvm: source into a fresh store (full read, arms CBT);
  3. the day-later changes are written through QEMU's block layer while it runs: every extent
     where vm1-day2.raw differs from vm1.raw (compared in 4 KiB blocks), with the monitor's
     `qemu-io -d <vda backend> "write -q -s FILE OFF LEN"`, FILE holding vm1-day2.raw's bytes of
     that extent: the disk then equals vm1-day2.raw, and the checkpoint's dirty bitmap saw it
     all as a guest's writes;
  4. alike: the day-later backup (timed; must report cbt: true); then once more with nothing changed
     (timed: the floor, the fixed cost of a CBT backup);
  5. borg and restic, each into a repository already holding vm1.raw: a new archive/snapshot of
     vm1-day2.raw (timed), i.e. of the same disk content (checked in run 1 with `qemu-img
     compare` of the VM's qcow2, shut off, against vm1-day2.raw, and alike's CBT version restored
     and compared with `cmp`).
The page cache is dropped before every timed step. The VM, its images and the write files are
removed at the end, also on failure (and those of dead earlier invocations at the start).

    python bench/cbt.py --runs 3            # ~6-8 min on 2 cores; results/cbt.json + a section of latest.md
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
TOOLS = ["alike", "borg", "restic"]
ROWS = {"alike": "alike (CBT, kvm:)", "borg": "borg", "restic": "restic"}
BEGIN, END = "<!-- bench/cbt.py: begin -->", "<!-- bench/cbt.py: end -->"
bench.RAY_TMP = "/tmp/alike-bench-cbt-ray"   # our own head's temp dir: never bench.py's


# ---------------------------------------------------------------------------------------------
# the day-later changes as extents

def diff_extents(a: str, b: str, cache: str) -> list[tuple[int, int]]:
    """Extents (offset, length) where raw images a and b differ, in GRAIN blocks; cached."""
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
    step = 64 << 20
    d = np.concatenate([np.any(x[o:o + step].reshape(-1, GRAIN) != y[o:o + step].reshape(-1, GRAIN), axis=1)
                        for o in range(0, len(x), step)])
    idx = np.flatnonzero(d)
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


def alike_steps(conn, a, images, run_no, work, pieces, verify) -> dict:
    from tests import kvm_env

    name = f"{OWN}r{run_no}"
    img_dir = os.path.join(IMAGES, name)
    os.makedirs(img_dir)
    os.chmod(img_dir, 0o755)
    qcow2 = os.path.join(img_dir, "vm1.qcow2")
    run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", images["vm1"], qcow2], timeout=600)
    dom = conn.defineXML(kvm_env.domain_xml(name, [qcow2], description="alike bench/cbt.py"))
    rec = {}
    try:
        dom.create()
        d = os.path.join(work, "runs", f"cbt-alike-{run_no}")
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
        store = os.path.join(d, "store")
        with bench.RayHead(a.ray_cpus) as head:
            env = dict(os.environ, RAY_ADDRESS=head.address, RAY_AUTH_MODE="token")
            run(["alike", "init", "--store", store, "--block-size", a.block_size, "--json"], env=env)
            backup = ["alike", "backup", "--store", store, f"kvm:{URI}", "--vm", name, "--json"]
            t1, out, _ = timed(backup, env, drop=a.drop)
            j1 = last_json(out)
            if j1.get("cbt") is not False and j1.get("cbt") is not None:
                log(f"note: first backup reports cbt {j1.get('cbt')!r}")
            log(f"run {run_no} alike first (kvm, full) {t1:7.2f} s read {j1.get('read_bytes', 0) / 1e6:8.1f} MB")
            t0 = time.perf_counter()
            guest_writes(dom, pieces)
            tw = time.perf_counter() - t0
            log(f"run {run_no} wrote {len(pieces)} extents ({sum(p[1] for p in pieces) / 1e6:.1f} MB) through "
                f"QEMU's block layer in {tw:.1f} s")
            q0 = qemu_read_bytes(name)
            t2, out, _ = timed(backup, env, drop=a.drop)
            q1 = qemu_read_bytes(name)
            j2 = last_json(out)
            if j2.get("cbt") is not True:
                raise SystemExit(f"the day-later backup did not use CBT: {out.strip()[-2000:]}")
            # the floor: the same backup again, nothing changed (process start, Ray connect, backup job,
            # metadata): what any CBT backup costs on top of its changed data
            t3, out, _ = timed(backup, env, drop=a.drop)
            j3 = last_json(out)
            rec = dict(seconds=round(t2, 3), read_bytes=j2["read_bytes"], alike=j2,
                       qemu_read_bytes=(q1 - q0) if q0 is not None and q1 is not None else None,
                       first=dict(seconds=round(t1, 3), read_bytes=j1.get("read_bytes"), alike=j1),
                       nochange=dict(seconds=round(t3, 3), read_bytes=j3.get("read_bytes"), alike=j3),
                       write_seconds=round(tw, 2))
            log(f"run {run_no} alike CBT, nothing changed: {t3:7.2f} s (own {j3.get('seconds')} s), "
                f"read {j3.get('read_bytes')} B, cbt {j3.get('cbt')}")
            if verify:
                restored = os.path.join(d, "restored.raw")
                run(["alike", "restore", "--store", store, f"{name}@{j2['version']}", "--to", restored, "--force",
                     "--json"], env=env, timeout=1200)
                bench.cmp_or_die(images["vm1-day2"], restored, "alike's CBT version vs vm1-day2.raw")
                os.remove(restored)
                rec["restore_verified"] = True
        dom.destroy()
        if verify:  # the VM's disk after the writes is vm1-day2.raw: the peers back up the same content
            p = subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", qcow2, images["vm1-day2"]],
                               capture_output=True, text=True)
            if p.returncode:
                raise SystemExit(f"the VM's disk differs from vm1-day2.raw: {p.stdout.strip()} {p.stderr.strip()}")
            rec["disk_verified"] = True
            log(f"run {run_no} verified: VM disk == vm1-day2.raw, alike's CBT version restores to it")
        if not a.keep:
            shutil.rmtree(d, ignore_errors=True)
    finally:
        remove_domain(dom)
        shutil.rmtree(img_dir, ignore_errors=True)
    return rec


class CbtBorg(bench.Borg):
    name = "cbt-borg"


class CbtRestic(bench.Restic):
    name = "cbt-restic"


def peer_steps(tool: str, a, images, run_no, work) -> dict:
    t = (CbtBorg if tool == "borg" else CbtRestic)(work, images, run_no)
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
    for tool in TOOLS:
        recs = [r for r in results if r["tool"] == tool]
        if not recs:
            continue
        s = statistics.median(r["seconds"] for r in recs)
        med[tool] = dict(seconds=s, mb_s=recs[0]["logical_bytes"] / 1e6 / s,
                         read_bytes=int(statistics.median(r["read_bytes"] for r in recs)),
                         all_seconds=[r["seconds"] for r in recs], runs=len(recs))
    return med


def report(d: dict) -> str:
    meta, med, results = d["meta"], d["medians"], d["results"]
    a = med.get("alike")
    L = [BEGIN, "", "# day-later backup with changed block tracking (kvm: source)", ""]
    L.append(f"- command: `{meta['command']}`; date: {meta['date']}, host: {meta['host']} ({meta['cpus']} CPUs), "
             f"runs: {meta['runs']} (medians); versions: {meta['versions']}; {meta['qemu']}")
    L.append(f"- the VM: libvirt domain type qemu (TCG, no OS boots), disk vda = qcow2 copy of vm1.raw "
             f"({meta['logical_bytes'] / 1e6:,.1f} MB virtual); first backup through `alike backup --store S "
             f"kvm:{URI} --vm NAME` (a full read, arms CBT), then the day-later changes written while it runs, "
             f"through QEMU's block layer (HMP `qemu-io -d <vda backend> \"write -s FILE OFF LEN\"`, FILE = "
             f"vm1-day2.raw's bytes there): {meta['extents']} extents where vm1-day2.raw differs from vm1.raw "
             f"in 4 KiB blocks, {meta['changed_bytes'] / 1e6:,.1f} MB, as {meta['writes']} writes; then the timed "
             f"backup, which must report `cbt: true`.")
    L.append("- borg (`--sparse --chunker-params fixed,4194304 --compression zstd,3`) and restic (`--compression "
             "auto`): a new archive/snapshot of vm1-day2.raw (the same content as the VM's disk after the writes"
             + (": checked in run 1 with `qemu-img compare`, and alike's CBT version restored and `cmp`-ed"
                if meta.get("verified") else "") +
             ") into a repository already holding vm1.raw; each re-reads the whole image.")
    L.append(f"- alike joined to a Ray head started for the run (`ray start --head --num-cpus={meta['ray_cpus']}`, "
             f"`RAY_AUTH_MODE=token`), block size {meta['block_size']}. Page cache dropped before every timed step.")
    L.append("- **seconds**: wall time of the whole command; **MB/s**: the disk's logical size / seconds; "
             "**read bytes**: alike: `read_bytes` of `backup --json` (bytes read from the disk over the backup "
             "job's NBD export); borg, restic: bytes the command read from storage (`ru_inblock` x 512); "
             "**alike/peer speed**: peer seconds / alike seconds (>1 = alike faster). The *floor* row: the same "
             "`alike backup` once more right after, nothing changed (process start, Ray connect, backup job, "
             "metadata): the fixed cost of any CBT backup.")
    L.append("")
    L.append("| tool | seconds | MB/s | read bytes | alike/peer speed |")
    L.append("|---|---:|---:|---:|---:|")
    for t in TOOLS:
        m = med.get(t)
        if not m:
            continue
        sp = f"{m['seconds'] / a['seconds']:.2f}x" if a and t != "alike" else "-"
        L.append(f"| {ROWS[t]} | {m['seconds']:.2f} | {m['mb_s']:.0f} | {m['read_bytes'] / 1e6:,.1f} MB | {sp} |")
    nc = [r["nochange"] for r in results if r["tool"] == "alike" and r.get("nochange")]
    if nc:
        s = statistics.median(x["seconds"] for x in nc)
        rb = statistics.median(x["read_bytes"] or 0 for x in nc)
        L.append(f"| *alike (CBT, nothing changed: the floor)* | {s:.2f} | {meta['logical_bytes'] / 1e6 / s:.0f} | "
                 f"{rb / 1e6:,.1f} MB | (not a peer) |")
    L.append("")
    if a and med.get("borg"):
        r = med["borg"]["seconds"] / a["seconds"]
        L.append("| target | measured | ok |")
        L.append("|---|---:|:---:|")
        L.append(f"| day-later with CBT: alike >= 10x borg throughput | {r:.2f}x | {'yes' if r >= 10 else 'NO'} |")
        L.append("")
    al = [r for r in results if r["tool"] == "alike"]
    if al:
        def md(xs):
            xs = [x for x in xs if x is not None]
            return statistics.median(xs) if xs else None
        inner = md(r["alike"].get("seconds") for r in al)
        q = md(r.get("qemu_read_bytes") for r in al)
        f_s, f_r = md(r["first"]["seconds"] for r in al), md(r["first"]["read_bytes"] for r in al)
        L.append(f"alike, medians: own `seconds` of the CBT backup (inside the command, without process start and "
                 f"Ray connect) {inner:.2f} s; QEMU's reads from the qcow2 during it "
                 + (f"{q / 1e6:,.1f} MB" if q is not None else "?") +
                 f"; the first (full) kvm: backup {f_s:.2f} s, read {f_r / 1e6:,.1f} MB; applying the writes "
                 f"{md(r['write_seconds'] for r in al):.1f} s"
                 + (f"; the floor (same backup again, nothing changed) {md(r['nochange']['seconds'] for r in al if r.get('nochange')):.2f} s, "
                    f"own `seconds` {md(r['nochange']['alike'].get('seconds') for r in al if r.get('nochange')):.2f} s"
                    if any(r.get("nochange") for r in al) else "") + ".\n")
    L.append("Per-run seconds: " + "; ".join(f"{ROWS[t]}: {', '.join(f'{x:.2f}' for x in med[t]['all_seconds'])}"
                                            for t in TOOLS if t in med) + "\n")
    L.append(END)
    return "\n".join(L) + "\n"


def put_section(path: str, section: str) -> None:
    common.put_section(path, section, BEGIN, END)


# ---------------------------------------------------------------------------------------------

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3, help="repetitions; medians are reported (default 3)")
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
        sec = report(json.load(open(js_path)))
        put_section(md_path, sec)
        print(sec)
        return
    if os.geteuid() != 0:
        raise SystemExit("needs root: libvirt's system instance, drop_caches")
    for t in ("alike", "ray", "borg", "restic", "qemu-img"):
        if not shutil.which(t):
            raise SystemExit(f"{t} not found on PATH")
    tools = [t.strip() for t in a.tools.split(",") if t.strip()]
    cdir = os.path.join(a.work, "corpus")
    images = {k: os.path.join(cdir, f"{k}.raw") for k in ("vm1", "vm1-day2")}
    for p in images.values():
        if not os.path.exists(p):
            raise SystemExit(f"{p} missing: build the corpus first (python bench/bench.py --corpus-only)")
    logical = os.path.getsize(images["vm1"])
    def on_term(*_):
        raise KeyboardInterrupt("SIGTERM")  # so that the VM and images are removed on the way out

    signal.signal(signal.SIGTERM, on_term)
    conn = None
    t_start = time.time()
    if "alike" in tools:
        from tests import kvm_env

        conn, why = kvm_env.start_libvirt()
        if conn is None:
            raise SystemExit(f"libvirt: {why}")
        cleanup(conn)
    patch_dir = os.path.join(IMAGES, OWN + "writes")
    results = []
    try:
        extents = diff_extents(images["vm1"], images["vm1-day2"], os.path.join(a.work, "cbt-extents.json"))
        changed = sum(n for _, n in extents)
        log(f"day-later changes: {len(extents)} extents, {changed / 1e6:.1f} MB")
        pieces = write_pieces(extents, images["vm1-day2"], patch_dir) if conn else []
        for run_no in range(1, a.runs + 1):
            k = (run_no - 1) % len(tools)
            for tool in tools[k:] + tools[:k]:
                if tool == "alike":
                    r = alike_steps(conn, a, images, run_no, a.work, pieces, verify=run_no == 1)
                else:
                    r = peer_steps(tool, a, images, run_no, a.work)
                rec = dict(run=run_no, tool=tool, logical_bytes=logical, **r)
                rec["mb_s"] = round(logical / 1e6 / rec["seconds"], 1)
                results.append(rec)
                log(f"run {run_no} {ROWS[tool]:18s} {rec['seconds']:7.2f} s {rec['mb_s']:7.1f} MB/s "
                    f"read {rec['read_bytes'] / 1e6:8.1f} MB")
    finally:
        shutil.rmtree(patch_dir, ignore_errors=True)
        if conn is not None:
            cleanup(conn)
            conn.close()
    qv = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    meta = dict(command="python bench/cbt.py " + " ".join(sys.argv[1:] if argv is None else argv),
                date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), host=platform.node(),
                cpus=os.cpu_count(), runs=a.runs, block_size=a.block_size, ray_cpus=a.ray_cpus,
                logical_bytes=logical, extents=len(extents), changed_bytes=changed, writes=len(pieces),
                verified=any(r.get("disk_verified") and r.get("restore_verified") for r in results),
                versions=bench.versions(), qemu=qv, total_seconds=round(time.time() - t_start, 1))
    d = dict(meta=meta, medians=medians(results), results=results)
    os.makedirs(a.results, exist_ok=True)
    with open(js_path, "w") as f:
        json.dump(d, f, indent=1)
    sec = report(d)
    put_section(md_path, sec)
    print(sec)
    log(f"done in {meta['total_seconds']} s; wrote {js_path} and the section of {md_path}")


if __name__ == "__main__":
    main()
