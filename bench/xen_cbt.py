#!/usr/bin/env python3
"""Day-later backup with changed block tracking of a Xen VM: alike's xen: source vs borg and restic.

The realistic day of bench/cbt.py (bench/work/corpus-16g, corpus.build_realistic: a 16 GiB disk with
~10 GB of data; vm1.raw -> vm1-day2.raw changes ~2% of it), on a Xen VM instead of a libvirt one. The
pool is the protocol-level XAPI test server tests/xapi_server.py (XenAPI over XML-RPC/HTTPS, VDIs as
sparse raw files, NBD by real qemu-nbd processes with TLS), run inside this process, one per run.

Per run (fresh pool, fresh store, fresh repositories; tool order rotated per run):
  1. alike: a pool whose VM `vm1` has vm1.raw as its disk (add_vm copies it into a VDI: untimed, like
     the Ray head the commands join, started for the run); `alike init`; the first backup
     (`alike backup --store S xen:URL --vm vm1 --credentials F --ca-bundle CA --json`: a full read,
     arms CBT); the day-later changes written into the live VDI (guest_write of every extent where
     vm1-day2.raw differs from vm1.raw, in 4 KiB blocks, as bench/cbt.py computes them: the disk then
     equals vm1-day2.raw); the timed CBT backup (must report cbt: true); the same once more with
     nothing changed (timed: the floor). Run 1 checks that the live VDI equals vm1-day2.raw and that
     the CBT version restores to it (`alike restore` + `cmp`).
  2. borg and restic, each into a repository already holding vm1.raw (untimed): a timed
     archive/snapshot of vm1-day2.raw, i.e. a full re-read of the same disk content (bench.py's
     settings, bench/cbt.py's peer_steps).
The page cache is dropped before every timed step.

What the test server costs inside alike's timed commands, measured in the server and reported
apart: VM.snapshot copies each VDI (`cp --sparse=always`: ~10 GB here), and VDI.list_changed_blocks
compares the contents of the marker and the new snapshot (reads both). A real XAPI does neither:
its snapshot is copy-on-write (a new VHD/qcow2 leaf, no data copied) and its changed blocks come
from the CBT log that tapdisk keeps while the guest writes. So the report gives alike's end-to-end
seconds (what the command took here) and, derived, the same net of those two server costs.

    python bench/xen_cbt.py --runs 3            # results/xen_cbt.json + its latest.md section
    python bench/xen_cbt.py --runs 1 --tools alike
    python bench/xen_cbt.py --report-only       # re-render the latest.md section from xen_cbt.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import common  # noqa: E402
sys.path.insert(1, ROOT)
import bench  # noqa: E402
import cbt  # noqa: E402
from bench import last_json, log, run  # noqa: E402
from cbt import diff_extents, patched_read_bytes, timed  # noqa: E402

bench.RAY_TMP = "/tmp/alike-bench-xen-ray"   # our own head's temp dir (cbt.py set its own on import)
TOOLS = ["alike", "borg", "restic"]          # rotated per run
ROWS = {"alike": "alike (CBT, xen:, cold command)", "borg": "borg", "restic": "restic"}
VM = "vm1"
MAX_WRITE = 64 << 20                         # one guest_write at most
BEGIN, END = "<!-- bench/xen_cbt.py: begin -->", "<!-- bench/xen_cbt.py: end -->"
OWN = f"xen-cbt-{os.getpid()}-"              # our dirs under WORK/runs (a dead invocation's are removed)


# ---------------------------------------------------------------------------------------------
# the pool: the XAPI test server, with its emulation costs measured

def pool_class():
    from tests.xapi_server import XapiServer

    class TimedPool(XapiServer):
        """The test server, measuring what a real XAPI does not do: the data copy of VM.snapshot
        (`snapshot_copy`) and the content comparison of VDI.list_changed_blocks (`changed_blocks`)."""

        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.spent = {"snapshot_copy": 0.0, "changed_blocks": 0.0}
            self._spent_lock = threading.Lock()

        def _add(self, what, t0):
            with self._spent_lock:
                self.spent[what] += time.perf_counter() - t0

        def _snapshot_vdi(self, vdi, now):
            t0 = time.perf_counter()
            try:
                return super()._snapshot_vdi(vdi, now)
            finally:
                self._add("snapshot_copy", t0)

        def _x_VDI__list_changed_blocks(self, vdi_from, vdi_to):
            t0 = time.perf_counter()
            try:
                return super()._x_VDI__list_changed_blocks(vdi_from, vdi_to)
            finally:
                self._add("changed_blocks", t0)

        def spent_since(self, before: dict) -> dict:
            with self._spent_lock:
                return {k: round(v - before.get(k, 0.0), 3) for k, v in self.spent.items()}

        def snap(self) -> dict:
            with self._spent_lock:
                return dict(self.spent)

    return TimedPool


def stale_dirs(work: str, prefix: str = "xen-cbt-", own: str | None = None) -> None:
    """Remove our dirs under WORK/runs (named `own`, default OWN) and those of dead invocations
    (`prefix` + a pid that is gone). bench/vmware_cbt.py passes its own prefix."""
    d = os.path.join(work, "runs")
    own = OWN if own is None else own
    for name in os.listdir(d) if os.path.isdir(d) else []:
        if not name.startswith(prefix):
            continue
        pid = name[len(prefix):].split("-", 1)[0]
        if name.startswith(own) or (pid.isdigit() and not os.path.exists(f"/proc/{pid}")):
            shutil.rmtree(os.path.join(d, name), ignore_errors=True)


def guest_writes(srv, vdi: str, extents, day2: str, write=None) -> int:
    """Write vm1-day2.raw's bytes of every extent into the live VDI (as the guest would), in pieces
    of at most MAX_WRITE; -> writes. `write(offset, data)`: another server's guest write
    (bench/vmware_cbt.py), instead of srv.guest_write(vdi, ...)."""
    write = write or (lambda o, data: srv.guest_write(vdi, o, data))
    n = 0
    with open(day2, "rb") as src:
        for off, ln in extents:
            for o in range(off, off + ln, MAX_WRITE):
                k = min(MAX_WRITE, off + ln - o)
                src.seek(o)
                write(o, src.read(k))
                n += 1
    return n


# ---------------------------------------------------------------------------------------------
# alike's steps

def alike_steps(a, images, run_no, extents, verify) -> dict:
    d = os.path.join(a.work, "runs", f"{OWN}alike-r{run_no}")
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    store = os.path.join(d, "store")
    tag = f"run {run_no} alike"
    srv = pool_class()(os.path.join(d, "pool"))
    try:
        url = srv.start()
        t0 = time.perf_counter()
        vm_uuid = srv.add_vm(VM, disks=[images["vm1"]], description="alike bench/xen_cbt.py")
        vdi = srv.vdi_of(vm_uuid, 0)
        log(f"{tag}: pool at {url}, VM {VM} ({vm_uuid}) with vm1.raw copied into VDI {vdi} in "
            f"{time.perf_counter() - t0:.1f} s (untimed)")
        creds = srv.credentials_file(os.path.join(d, "xen.toml"))
        with bench.RayHead(a.ray_cpus) as head:
            env = dict(os.environ, RAY_ADDRESS=head.address, RAY_AUTH_MODE="token")
            run(["alike", "init", "--store", store, "--block-size", a.block_size, "--json"], env=env)
            backup = ["alike", "backup", "--store", store, f"xen:{url}", "--vm", VM, "--credentials", creds,
                      "--ca-bundle", srv.ca_file, "--json"]

            def step(what):
                s0 = srv.snap()
                dt, out, _ = timed(backup, env, drop=a.drop)
                j = last_json(out)
                sv = srv.spent_since(s0)
                log(f"{tag} {what:18s} {dt:7.2f} s (own {j.get('seconds')} s) read "
                    f"{(j.get('read_bytes') or 0) / 1e6:8.1f} MB, cbt {j.get('cbt')}; the server's snapshot copy "
                    f"{sv['snapshot_copy']:.1f} s, changed-block comparison {sv['changed_blocks']:.1f} s")
                return dict(seconds=round(dt, 3), read_bytes=j.get("read_bytes"), alike=j, server=sv,
                            net_seconds=round(dt - sv["snapshot_copy"] - sv["changed_blocks"], 3)), out

            first, _ = step("first (full)")
            if first["alike"].get("cbt") not in (False, None):
                log(f"note: the first backup reports cbt {first['alike'].get('cbt')!r}")
            t0 = time.perf_counter()
            nw = guest_writes(srv, vdi, extents, images["vm1-day2"])
            tw = time.perf_counter() - t0
            log(f"{tag} wrote {nw} pieces ({sum(n for _, n in extents) / 1e6:.1f} MB) into the live VDI in {tw:.1f} s")
            rec, out = step("CBT (day later)")
            if rec["alike"].get("cbt") is not True:
                raise SystemExit(f"the day-later backup did not use CBT: {out.strip()[-2000:]}")
            floor, _ = step("CBT, nothing changed")
            rec.update(first=first, nochange=floor, write_seconds=round(tw, 2), writes=nw)
            if verify:
                bench.cmp_or_die(images["vm1-day2"], srv.vdi_path(vdi), "the live VDI after the writes vs vm1-day2.raw")
                rec["disk_verified"] = True
                restored = os.path.join(d, "restored.raw")
                run(["alike", "restore", "--store", store, f"{VM}@{rec['alike']['version']}", "--to", restored,
                     "--force", "--json"], env=env, timeout=1800)
                bench.cmp_or_die(images["vm1-day2"], restored, "alike's CBT version vs vm1-day2.raw")
                os.remove(restored)
                rec["restore_verified"] = True
                log(f"{tag} verified: the live VDI == vm1-day2.raw, the CBT version restores to vm1-day2.raw")
    finally:
        srv.stop()
        if not a.keep:
            shutil.rmtree(d, ignore_errors=True)
    return rec


class XenBorg(bench.Borg):
    name = "xen-cbt-borg"


class XenRestic(bench.Restic):
    name = "xen-cbt-restic"


# ---------------------------------------------------------------------------------------------
# report

def _md(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _outside(x):
    """Seconds of the command outside alike's own `seconds`: process start, Ray connect, exit."""
    own = x["alike"].get("seconds")
    return None if own is None else x["seconds"] - own


NET_OF = ("snapshot_copy", "changed_blocks")   # the test server's costs that a real XAPI does not have


def _own_net(x, net_of=NET_OF):
    """alike's own `seconds` minus the test server's costs `net_of` (here: its snapshot copy and
    changed-block comparison)."""
    own = x["alike"].get("seconds")
    return None if own is None else own - sum(x["server"][k] for k in net_of)


def summary(results, net_of=NET_OF, also=()) -> dict:
    """Medians of what the report shows (cbt.medians for the seconds and read bytes of each tool).
    net_of: the server's costs (keys of each record's `server`) taken out of the net seconds, each
    also given as a median; also: more keys of `server` given as medians (not taken out)."""
    med = cbt.medians(results)   # keyed by cbt's tool names: alike, borg, restic
    al = [r for r in results if r["tool"] == "alike"]
    keys = tuple(net_of) + tuple(also)
    if al:
        m = med["alike"]
        m.update(net_seconds=_md(r["net_seconds"] for r in al),
                 own_seconds=_md(r["alike"].get("seconds") for r in al),
                 **{k: _md(r["server"].get(k) for r in al) for k in keys},
                 write_seconds=_md(r.get("write_seconds") for r in al),
                 outside_seconds=_md(_outside(r) for r in al),
                 own_net_seconds=_md(_own_net(r, net_of) for r in al))
        for k in ("first", "nochange"):
            xs = [r[k] for r in al]
            m[k] = dict(seconds=_md(x["seconds"] for x in xs), net_seconds=_md(x["net_seconds"] for x in xs),
                        own_seconds=_md(x["alike"].get("seconds") for x in xs),
                        read_bytes=_md(x["read_bytes"] for x in xs),
                        **{c: _md(x["server"].get(c) for x in xs) for c in keys},
                        all_seconds=[x["seconds"] for x in xs],
                        outside_seconds=_md(_outside(x) for x in xs),
                        own_net_seconds=_md(_own_net(x, net_of) for x in xs))
    return med


def corpus_paragraph(meta, on: str) -> str:
    """The report's first paragraph: the corpus and the day's changes, `on` e.g. "a Xen VM"."""
    used = meta["used_bytes"]
    return (f"The *realistic day* of bench/cbt.py on {on}: a {meta['logical_bytes'] / 2**30:.0f} GiB disk holding "
            f"{used / 1e9:,.2f} GB of data (bench/work/corpus-16g, `corpus.build_realistic`); the day changed "
            f"{meta['changed_bytes'] / 1e6:,.1f} MB = {100 * meta['changed_bytes'] / used:.1f}% of the data "
            f"({meta['extents']} extents where vm1-day2.raw differs from vm1.raw in 4 KiB blocks, applied as "
            f"{meta['writes']} writes); what a CBT backup with patched {meta['block_size']} blocks reads of it: "
            f"{meta['changed_in_grains_bytes'] / 1e6:,.1f} MB.")


PEERS_BULLET = ("- borg (`--sparse --chunker-params fixed,4194304 --compression zstd,3`) and restic (`--compression "
                "auto`): a new archive/snapshot of vm1-day2.raw into a repository already holding vm1.raw: a full "
                "re-read of the same disk content.")


def columns_bullet(read_how: str) -> str:
    """What the columns mean; `read_how`: where alike's read_bytes come from (e.g. "read over NBD")."""
    return ("- **seconds**: wall time of the whole command; **MB/s**: the disk's virtual size / seconds; **read "
            f"bytes**: alike: `read_bytes` of `backup --json` ({read_how}); borg, restic: bytes read from storage "
            "(`ru_inblock` x 512); **peer/alike**: peer seconds / alike seconds (>1 = alike faster). Page cache "
            "dropped before every timed step.")


def command_bullet(meta, checked: str) -> str:
    """Command, date, host, runs, versions; `checked`: what run 1 verified (shown when it did)."""
    return (f"- command: `{meta['command']}`; date: {meta['date']}, host: {meta['host']} ({meta['cpus']} CPUs), "
            f"runs: {meta['runs']} (medians); versions: {meta['versions']}"
            + (f"; checked in run 1: {checked}" if meta.get("verified") else "")
            + (f". {meta['note']}" if meta.get("note") else ""))


def table(meta, med, rows, net_header: str) -> list[str]:
    """The results table: alike's CBT backup, the peers' full re-reads, alike's floor."""
    a = med.get("alike")
    L = [f"| tool | seconds | {net_header} | MB/s | read bytes | peer/alike | peer/alike net |",
         "|---|---:|---:|---:|---:|---:|---:|"]
    if a:
        L.append(f"| {rows['alike']} | {a['seconds']:.2f} | {a['net_seconds']:.2f} | {a['mb_s']:.0f} | "
                 f"{a['read_bytes'] / 1e6:,.1f} MB | - | - |")
    for t in ("borg", "restic"):
        m = med.get(t)
        if m:
            r = f"{m['seconds'] / a['seconds']:.2f}x" if a else "-"
            rn = f"{m['seconds'] / a['net_seconds']:.2f}x" if a and a['net_seconds'] > 0 else "-"
            L.append(f"| {t} (full re-read) | {m['seconds']:.2f} | - | {m['mb_s']:.0f} | {m['read_bytes'] / 1e6:,.1f} MB "
                     f"| {r} | {rn} |")
    if a:
        f = a["nochange"]
        L.append(f"| *{rows['alike']}, nothing changed: the floor* | {f['seconds']:.2f} | {f['net_seconds']:.2f} | "
                 f"{meta['logical_bytes'] / 1e6 / f['seconds']:.0f} | {(f['read_bytes'] or 0) / 1e6:,.1f} MB | "
                 "(not a peer) | |")
    return L


def alike_sentence(a, source: str, written: str) -> str:
    """alike's medians beyond the table; `source` e.g. "xen:", `written` where the day's extents went."""
    f = a["nochange"]
    return (f"alike, medians: own `seconds` of the CBT backup (inside the command: without process start and Ray "
            f"connect; the server's costs included) {a['own_seconds']:.2f} s; the first (full) {source} backup "
            f"{a['first']['seconds']:.2f} s (net {a['first']['net_seconds']:.2f} s), read "
            f"{(a['first']['read_bytes'] or 0) / 1e6:,.1f} MB; writing the day's extents into {written} "
            f"{a['write_seconds']:.1f} s; the floor: own `seconds` {f['own_seconds']:.2f} s."
            + (f" Where the net seconds go (medians): in the CBT backup {a['own_net_seconds']:.2f} s inside "
               f"the command (own `seconds` minus the server's costs) and {a['outside_seconds']:.2f} s outside "
               f"it (process start, Ray connect, exit); in the floor {f['own_net_seconds']:.2f} s and "
               f"{f['outside_seconds']:.2f} s." if a.get("own_net_seconds") is not None
               and f.get("own_net_seconds") is not None else ""))


def per_run(med, rows) -> str:
    a = med.get("alike")
    return ("Per-run seconds: " + "; ".join(f"{rows[t]}: {', '.join(f'{x:.2f}' for x in med[t]['all_seconds'])}"
                                           for t in rows if t in med)
            + (f"; floor: {', '.join(f'{x:.2f}' for x in a['nochange']['all_seconds'])}" if a else ""))


def report(d: dict) -> str:
    L = [BEGIN, "", "# day-later backup with changed block tracking (xen: source)", ""]
    if not d.get("medians"):
        return "\n".join(L + ["(no results yet: `python bench/xen_cbt.py --runs 3`)", END]) + "\n"
    meta, med = d["meta"], d["medians"]
    L.append(corpus_paragraph(meta, "a Xen VM"))
    L.append("")
    L.append("- the pool: the protocol-level XAPI test server `tests/xapi_server.py` (XenAPI over XML-RPC/HTTPS, VDIs "
             "as sparse raw files, NBD with TLS by real `qemu-nbd` processes), in the bench's process, one per run; "
             "VM `vm1` with a copy of vm1.raw as its VDI (untimed). alike: `alike backup --store S xen:URL --vm vm1 "
             "--credentials F --ca-bundle CA --json`, one process per backup, joined to a Ray head started for the "
             f"run (`ray start --head --num-cpus={meta['ray_cpus']}`); block size {meta['block_size']}. First backup "
             "(full, arms CBT), then the day's extents written into the live VDI (`guest_write`: the disk then equals "
             "vm1-day2.raw), then the timed backup, which must report `cbt: true`; then once more, nothing changed "
             "(the *floor*).")
    L.append(PEERS_BULLET)
    L.append(columns_bullet("read over NBD"))
    L.append("- **the test server's costs inside alike's seconds** (measured in the server, per command): VM.snapshot "
             "copies the VDI's data (`cp --reflink=auto --sparse=always`, no reflink on this ext4), and "
             "VDI.list_changed_blocks compares the contents of the CBT marker and the new snapshot (reads both). "
             "A real XAPI does neither: its snapshot is copy-on-write (a new VHD/qcow2 leaf, no data copied) and "
             "its changed blocks come from the CBT log kept while the guest writes. The *net* column is alike's "
             "seconds minus those two (derived, not measured as such).")
    L.append(command_bullet(meta, "the live VDI equals vm1-day2.raw and the CBT version restores to it (`cmp`)"))
    L.append("")
    L += table(meta, med, ROWS, "net of the server's copy + comparison")
    a = med.get("alike")
    if a:
        f = a["nochange"]
        L.append("")
        L.append(f"The test server's costs, medians: in the CBT backup the snapshot copy {a['snapshot_copy']:.2f} s and "
                 f"the changed-block comparison {a['changed_blocks']:.2f} s; in the floor {f['snapshot_copy']:.2f} s "
                 f"and {f['changed_blocks']:.2f} s; in the first backup the snapshot copy "
                 f"{a['first']['snapshot_copy']:.2f} s.")
        L.append("")
        L.append(alike_sentence(a, "xen:", "the VDI"))
    L.append("")
    L.append(per_run(med, ROWS))
    L.append("")
    L.append(END)
    return "\n".join(L) + "\n"


# ---------------------------------------------------------------------------------------------

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3, help="repetitions; medians are reported (default 3)")
    ap.add_argument("--tools", default=",".join(TOOLS), help="comma list of alike,borg,restic (default all)")
    ap.add_argument("--work", default=os.path.join(HERE, "work"), help="work dir (default bench/work)")
    ap.add_argument("--results", default=os.path.join(HERE, "results"), help="where xen_cbt.json and latest.md are")
    ap.add_argument("--block-size", default="512K", help="alike store block size (default 512K)")
    ap.add_argument("--ray-cpus", type=int, default=2, help="CPUs of the Ray head alike joins (default 2)")
    ap.add_argument("--no-drop-caches", dest="drop", action="store_false", help="keep the page cache")
    ap.add_argument("--keep", action="store_true", help="keep the pool, store and repositories under WORK/runs")
    ap.add_argument("--note", help="a sentence for the report (e.g. that the machine was shared)")
    ap.add_argument("--report-only", action="store_true", help="re-render latest.md's section from xen_cbt.json")
    a = ap.parse_args(argv)
    md_path, js_path = os.path.join(a.results, "latest.md"), os.path.join(a.results, "xen_cbt.json")
    if a.report_only:
        d = json.load(open(js_path)) if os.path.exists(js_path) else {}
        if d.get("results"):
            d["medians"] = summary(d["results"])
        if a.note and d.get("meta"):
            d["meta"]["note"] = a.note
            with open(js_path, "w") as f:
                json.dump(d, f, indent=1)
        sec = report(d)
        common.put_section(md_path, sec, BEGIN, END)
        print(sec)
        return
    if os.geteuid() != 0:
        raise SystemExit("needs root: drop_caches, the corpus's loop mounts")
    for t in ("alike", "ray", "borg", "restic", "qemu-img", "qemu-nbd", "cmp"):
        if not shutil.which(t):
            raise SystemExit(f"{t} not found on PATH")
    tools = [t.strip() for t in a.tools.split(",") if t.strip()]
    if set(tools) - set(TOOLS):
        raise SystemExit(f"unknown tools: {sorted(set(tools) - set(TOOLS))}")

    def on_term(*_):
        raise KeyboardInterrupt("SIGTERM")  # so that the pool's qemu-nbd and our dirs go on the way out

    signal.signal(signal.SIGTERM, on_term)
    import corpus

    corpus.build_realistic(a.work, log=log)
    cdir = os.path.join(a.work, "corpus-16g")
    images = {k: os.path.join(cdir, f"{k}.raw") for k in ("vm1", "vm1-day2")}
    logical = os.path.getsize(images["vm1"])
    used = os.stat(images["vm1-day2"]).st_blocks * 512
    stale_dirs(a.work)
    t_start = time.time()
    extents = diff_extents(images["vm1"], images["vm1-day2"], os.path.join(cdir, "cbt-extents.json"))
    changed = sum(n for _, n in extents)
    bsz = bench.parse_size(a.block_size)
    log(f"{logical / 2**30:.0f} GiB disk, {used / 1e9:.2f} GB of data; day-later changes: {len(extents)} extents, "
        f"{changed / 1e6:.1f} MB = {100 * changed / used:.2f}% of the data")
    results = []
    writes = 0
    try:
        for run_no in range(1, a.runs + 1):
            k = (run_no - 1) % len(tools)
            for tool in tools[k:] + tools[:k]:
                if tool == "alike":
                    r = alike_steps(a, images, run_no, extents, run_no == 1)
                    writes = r["writes"]
                else:
                    r = cbt.peer_steps(tool, a, images, run_no, a.work, peers={"borg": XenBorg, "restic": XenRestic})
                rec = dict(run=run_no, tool=tool, logical_bytes=logical, **r)
                rec["mb_s"] = round(logical / 1e6 / rec["seconds"], 1)
                results.append(rec)
                log(f"run {run_no} {ROWS[tool]:32s} {rec['seconds']:7.2f} s {rec['mb_s']:7.1f} MB/s "
                    f"read {(rec['read_bytes'] or 0) / 1e6:8.1f} MB"
                    + (f" (net of the server's copy + comparison {rec['net_seconds']:.2f} s)" if tool == "alike" else ""))
    finally:
        if not a.keep:
            stale_dirs(a.work)
    meta = dict(command="python bench/xen_cbt.py " + " ".join(sys.argv[1:] if argv is None else argv),
                date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), host=platform.node(),
                cpus=os.cpu_count(), runs=a.runs, block_size=a.block_size, ray_cpus=a.ray_cpus,
                logical_bytes=logical, used_bytes=used, extents=len(extents), changed_bytes=changed,
                changed_in_grains_bytes=patched_read_bytes(extents, bsz), writes=writes,
                verified=any(r.get("disk_verified") for r in results) and all(
                    r.get("restore_verified") for r in results if r["tool"] == "alike" and r["run"] == 1),
                versions=bench.versions(), total_seconds=round(time.time() - t_start, 1), note=a.note)
    d = dict(meta=meta, medians=summary(results), results=results)
    os.makedirs(a.results, exist_ok=True)
    with open(js_path, "w") as f:
        json.dump(d, f, indent=1)
    sec = report(d)
    common.put_section(md_path, sec, BEGIN, END)
    print(sec)
    log(f"done in {time.time() - t_start:.1f} s; wrote {js_path} and the section of {md_path}")


if __name__ == "__main__":
    main()
