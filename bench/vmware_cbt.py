#!/usr/bin/env python3
"""Day-later backup with changed block tracking of a vSphere VM: alike's vmware: source vs borg and restic.

The realistic day of bench/cbt.py and bench/xen_cbt.py (bench/work/corpus-16g, corpus.build_realistic: a
16 GiB disk with ~10 GB of data; vm1.raw -> vm1-day2.raw changes ~2% of it), on a vSphere VM. The vCenter
is govmomi's simulator (`simulator.VPX()`) run by alike's launcher tests/vcsim (tests/vcsim_server.py's
Vcsim: SOAP over HTTPS with its own certificate, the datastore HTTP interface /folder, and what the
launcher adds: QueryChangedDiskAreas from the real difference of the disk's contents, snapshots that
freeze the base disk), one per run, started with `-disk-mb <the corpus's size> -second-disk-mb 0
-seed=false` (the model VMs' disks sparse and empty; the launcher's own QueryChangedDiskAreas limits,
256 MiB and 1024 areas per answer).

Per run (fresh simulator, fresh store, fresh repositories; tool order rotated per run):
  1. alike: vm1.raw copied into the current disk file of VM DC0_H0_VM0 (`cp --sparse=always` onto the
     path /alike/disks gives: untimed, like the Ray head started for the run). The launcher keeps no
     state of a disk's contents between snapshots: it hashes a disk's granules when a snapshot freezes it
     (tests/vcsim/disks.go, freeze -> hashFile) and opens the file for each guest write, so a copy made
     before the first snapshot is simply the disk's content (no endpoint needed). `alike init`; the first
     backup (`alike backup --store S vmware:URL --vm DC0_H0_VM0 --credentials F --ca-bundle CA --json`: a
     full read, arms CBT with ReconfigVM_Task); the day-later changes written with the launcher's guest
     write (PUT /alike/write into the VM's current disk) for every extent where vm1-day2.raw differs from
     vm1.raw in 4 KiB blocks (cbt.diff_extents, cut at 64 MiB, xen_cbt.guest_writes): the disk then equals
     vm1-day2.raw; the timed CBT backup (must report cbt: true); the same once more with nothing changed
     (timed: the floor). Run 1 checks that the VM's disk equals vm1-day2.raw and that the CBT version
     restores to it (`alike restore` + `cmp`).
  2. borg and restic, each into a repository already holding vm1.raw (untimed): a timed archive/snapshot
     of vm1-day2.raw, i.e. a full re-read of the same disk content (cbt.peer_steps, bench.py's settings).
The page cache is dropped before every timed step.

What the simulator costs inside alike's timed commands, measured in the launcher (GET /alike/stats,
Vcsim.stats(): seconds and bytes of its own work, per command) and reported apart: CreateSnapshot_Task
copies the disk's data into the VM's new current file (`snapshot_copy`: a full -flat copy, ~10 GB
here) and, CBT being on, hashes every 64 KiB granule of the frozen disk (`snapshot_hash`: a read of its
data), from which QueryChangedDiskAreas answers later. A real vCenter does neither: its snapshot starts
a sparse delta disk (no data copied) and its changed areas come from the CBT (ctk) log kept while the
guest writes. So the report gives alike's end-to-end seconds and, derived, the same net of those two.
Also reported, not taken out: the consolidation at RemoveSnapshot_Task (a rename here) and the
QueryChangedDiskAreas calls (comparing kept hashes). After the run's steps, an untimed diagnostic:
with the page cache dropped, the time to read alike's CBT read set (cbt.patched_read_ranges) from the
VM's disk file, since the launcher's copy and hash pass leave the frozen disk's data in the page cache
for alike's reads (the net seconds are those of a warm source).

    python bench/vmware_cbt.py --runs 3            # results/vmware_cbt.json + its latest.md section
    python bench/vmware_cbt.py --runs 1 --tools alike
    python bench/vmware_cbt.py --corpus /other/bench/work/corpus-16g   # an already built corpus, never rebuilt
    python bench/vmware_cbt.py --report-only       # re-render the latest.md section from vmware_cbt.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import common  # noqa: E402
sys.path.insert(1, ROOT)
import bench  # noqa: E402
import cbt  # noqa: E402
import xen_cbt  # noqa: E402
from bench import drop_caches, last_json, log, run  # noqa: E402
from cbt import diff_extents, patched_read_bytes, patched_read_ranges, timed  # noqa: E402
from xen_cbt import (PEERS_BULLET, alike_sentence, columns_bullet, command_bullet, corpus_paragraph,  # noqa: E402
                     guest_writes, per_run, stale_dirs, table)

bench.RAY_TMP = "/tmp/alike-bench-vmw-ray"   # our own head's temp dir (cbt.py and xen_cbt.py set theirs on import)
TOOLS = ["alike", "borg", "restic"]          # rotated per run
ROWS = {"alike": "alike (CBT, vmware:, cold command)", "borg": "borg", "restic": "restic"}
VM = "DC0_H0_VM0"                            # the model's VM on the standalone host (its second disk off)
NET_OF = ("snapshot_copy", "snapshot_hash")  # the launcher's costs that a real vCenter does not have
ALSO = ("consolidate", "changed_areas", "after_task", "snapshot_copy_bytes", "snapshot_hash_bytes",
        "storage_read_bytes")
BEGIN, END = "<!-- bench/vmware_cbt.py: begin -->", "<!-- bench/vmware_cbt.py: end -->"
PREFIX = "vmw-cbt-"
OWN = f"{PREFIX}{os.getpid()}-"              # our dirs under WORK/runs (a dead invocation's are removed)


# ---------------------------------------------------------------------------------------------
# the vCenter: govmomi's simulator through tests/vcsim, with its emulation costs measured

def simulator(d: str, disk_bytes: int):
    from tests.vcsim_server import Vcsim

    class TimedVcsim(Vcsim):
        """The launcher, with what a real vCenter does not do read from its /alike/stats: the data copy of
        CreateSnapshot_Task (`snapshot_copy`) and the content-hash pass of the frozen disk
        (`snapshot_hash`); also its consolidations, QueryChangedDiskAreas calls and all its post-task work,
        and what the launcher's process read from storage (/proc/PID/io read_bytes: its copy, hash pass and
        /folder GETs where they missed the page cache)."""

        def read_bytes(self) -> int | None:
            try:
                with open(f"/proc/{self.proc.pid}/io") as f:
                    return int(next(ln.split()[1] for ln in f if ln.startswith("read_bytes:")))
            except (OSError, ValueError, StopIteration, AttributeError):
                return None

        def snap(self) -> dict:
            return dict(self.stats(), _io=self.read_bytes())

        def spent_since(self, before: dict) -> dict:
            now = self.stats()
            io0, io1 = before.get("_io"), self.read_bytes()

            def d(k, f="seconds"):
                return round(now.get(k, {}).get(f, 0) - before.get(k, {}).get(f, 0), 3 if f == "seconds" else None)

            out = {k: d(k) for k in NET_OF + ALSO[:3]}
            out.update(snapshot_copy_bytes=d("snapshot_copy", "bytes"), snapshot_hash_bytes=d("snapshot_hash", "bytes"),
                       snapshots=d("snapshot_copy", "calls"), changed_areas_calls=d("changed_areas", "calls"),
                       storage_read_bytes=io1 - io0 if io0 is not None and io1 is not None else None)
            return out

    if disk_bytes % (1 << 20):
        raise SystemExit(f"the disk ({disk_bytes} bytes) is not a whole number of MiB (-disk-mb)")
    return TimedVcsim(d, disk_mb=disk_bytes >> 20, second_disk_mb=0, seed=False, cbt_span=None, cbt_max_areas=None)


def credentials_file(sim, path: str) -> str:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f'username = "{sim.username}"\npassword = "{sim.password}"\n')
    return path


def the_disk(sim) -> dict:
    disks = sim.disks(VM)["disks"]
    if len(disks) != 1:
        raise SystemExit(f"{VM} has {len(disks)} disks, expected 1 (-second-disk-mb 0)")
    return disks[0]


def cold_read(path: str, ranges) -> dict:
    """Drop the page cache, then pread `ranges` of `path` in order: what alike's CBT read set costs from
    this disk when nothing is cached (untimed diagnostic)."""
    drop_caches(True)  # only called when the bench drops caches
    t0, n = time.perf_counter(), 0
    fd = os.open(path, os.O_RDONLY)
    try:
        for o, ln in ranges:
            n += len(os.pread(fd, ln, o))
    finally:
        os.close(fd)
    return dict(seconds=round(time.perf_counter() - t0, 3), bytes=n, ranges=len(ranges))


# ---------------------------------------------------------------------------------------------
# alike's steps

def alike_steps(a, images, run_no, extents, verify) -> dict:
    d = os.path.join(a.work, "runs", f"{OWN}alike-r{run_no}")
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    store = os.path.join(d, "store")
    tag = f"run {run_no} alike"
    logical = os.path.getsize(images["vm1"])
    sim = simulator(os.path.join(d, "vcsim"), logical)
    try:
        url = sim.start().url
        disk = the_disk(sim)
        if disk["capacity"] != logical:
            raise SystemExit(f"{VM}'s disk has {disk['capacity']} bytes, vm1.raw {logical}")
        t0 = time.perf_counter()
        run(["cp", "--sparse=always", images["vm1"], disk["path"]], timeout=1800)
        log(f"{tag}: vcsim at {url}, VM {VM} disk {disk['key']} ({disk['flat']}) = vm1.raw, copied in "
            f"{time.perf_counter() - t0:.1f} s (untimed)")
        creds = credentials_file(sim, os.path.join(d, "vc.toml"))
        with bench.RayHead(a.ray_cpus) as head:
            env = dict(os.environ, RAY_ADDRESS=head.address, RAY_AUTH_MODE="token")
            run(["alike", "init", "--store", store, "--block-size", a.block_size, "--json"], env=env)
            backup = ["alike", "backup", "--store", store, f"vmware:{url}", "--vm", VM, "--credentials", creds,
                      "--ca-bundle", sim.cert_file, "--json"]

            def step(what):
                s0 = sim.snap()
                dt, out, _ = timed(backup, env, drop=a.drop)
                j = last_json(out)
                sv = sim.spent_since(s0)
                log(f"{tag} {what:18s} {dt:7.2f} s (own {j.get('seconds')} s) read "
                    f"{(j.get('read_bytes') or 0) / 1e6:8.1f} MB, cbt {j.get('cbt')}; the simulator's snapshot copy "
                    f"{sv['snapshot_copy']:.1f} s ({(sv['snapshot_copy_bytes'] or 0) / 1e9:.2f} GB), hash pass "
                    f"{sv['snapshot_hash']:.1f} s, consolidation {sv['consolidate']:.2f} s, "
                    f"{sv['changed_areas_calls']} QueryChangedDiskAreas {sv['changed_areas']:.2f} s; the launcher "
                    f"read {(sv['storage_read_bytes'] or 0) / 1e9:.2f} GB from storage")
                if sv["snapshots"] != 1:
                    log(f"note: {sv['snapshots']} snapshot copies in one backup")
                return dict(seconds=round(dt, 3), read_bytes=j.get("read_bytes"), alike=j, server=sv,
                            net_seconds=round(dt - sum(sv[k] for k in NET_OF), 3)), out

            first, _ = step("first (full)")
            if first["alike"].get("cbt") not in (False, None):
                log(f"note: the first backup reports cbt {first['alike'].get('cbt')!r}")
            t0 = time.perf_counter()
            nw = guest_writes(None, None, extents, images["vm1-day2"],
                              write=lambda o, data: sim.guest_write(VM, disk["key"], o, data))
            tw = time.perf_counter() - t0
            log(f"{tag} wrote {nw} pieces ({sum(n for _, n in extents) / 1e6:.1f} MB) into the VM's disk in {tw:.1f} s")
            rec, out = step("CBT (day later)")
            if rec["alike"].get("cbt") is not True:
                raise SystemExit(f"the day-later backup did not use CBT: {out.strip()[-2000:]}")
            floor, _ = step("CBT, nothing changed")
            rec.update(first=first, nochange=floor, write_seconds=round(tw, 2), writes=nw)
            live = the_disk(sim)["path"]   # the snapshots are gone: the VM is back on its base disk
            if a.drop:
                rec["cold_read"] = cold_read(live, patched_read_ranges(extents, bench.parse_size(a.block_size)))
                log(f"{tag} untimed: alike's CBT read set ({rec['cold_read']['bytes'] / 1e6:.1f} MB in "
                    f"{rec['cold_read']['ranges']} ranges) read from the disk file with a cold cache in "
                    f"{rec['cold_read']['seconds']:.2f} s")
            if verify:
                bench.cmp_or_die(images["vm1-day2"], live, "the VM's disk after the writes vs vm1-day2.raw")
                rec["disk_verified"] = True
                restored = os.path.join(d, "restored.raw")
                run(["alike", "restore", "--store", store, f"{VM}@{rec['alike']['version']}", "--to", restored,
                     "--force", "--json"], env=env, timeout=1800)
                bench.cmp_or_die(images["vm1-day2"], restored, "alike's CBT version vs vm1-day2.raw")
                os.remove(restored)
                rec["restore_verified"] = True
                log(f"{tag} verified: the VM's disk == vm1-day2.raw, the CBT version restores to vm1-day2.raw")
    finally:
        sim.stop()
        if not a.keep:
            shutil.rmtree(d, ignore_errors=True)
    return rec


class VmwBorg(bench.Borg):
    name = "vmw-cbt-borg"


class VmwRestic(bench.Restic):
    name = "vmw-cbt-restic"


# ---------------------------------------------------------------------------------------------
# report

def summary(results) -> dict:
    med = xen_cbt.summary(results, net_of=NET_OF, also=ALSO)
    al = [r for r in results if r["tool"] == "alike"]
    if al:
        m = med["alike"]
        for k, xs in (("cbt", al), ("nochange", [r["nochange"] for r in al])):
            # net of the consolidation too (not in the table's net)
            v = xen_cbt._md(x["net_seconds"] - x["server"]["consolidate"] for x in xs)
            (m if k == "cbt" else m["nochange"])["net_consolidate_seconds"] = v
        cr = [r for r in al if r.get("cold_read")]
        if cr:
            m["cold_read"] = {k: xen_cbt._md(r["cold_read"][k] for r in cr) for k in ("seconds", "bytes")}
    return med


def report(d: dict) -> str:
    L = [BEGIN, "", "# day-later backup with changed block tracking (vmware: source)", ""]
    if not d.get("medians"):
        return "\n".join(L + ["(no results yet: `python bench/vmware_cbt.py --runs 3`)", END]) + "\n"
    meta, med = d["meta"], d["medians"]
    L.append(corpus_paragraph(meta, "a vSphere VM"))
    L.append("")
    L.append(f"- the vCenter: govmomi's simulator (`simulator.VPX()`, {meta.get('govmomi', 'govmomi')}) run by "
             "alike's launcher `tests/vcsim` (SOAP over HTTPS with its own certificate, the datastore HTTP interface "
             "`/folder`; the launcher adds QueryChangedDiskAreas computed from the real difference of the disk's "
             "contents and snapshots that freeze the base disk), one per run, `-disk-mb "
             f"{meta['logical_bytes'] >> 20} -second-disk-mb 0 -seed=false`; VM `{VM}` whose disk file is a sparse "
             "copy of vm1.raw (`cp --sparse=always`, untimed). alike: `alike backup --store S vmware:URL --vm "
             f"{VM} --credentials F --ca-bundle CA --json` (snapshot, QueryChangedDiskAreas, ranged GETs of the "
             "frozen base disk over `/folder`, snapshot removed), one process per backup, joined to a Ray head "
             f"started for the run (`ray start --head --num-cpus={meta['ray_cpus']}`); block size "
             f"{meta['block_size']}. First backup (full, arms CBT), then the day's extents written into the VM's "
             "disk (the launcher's guest write, `PUT /alike/write`: the disk then equals vm1-day2.raw), then the "
             "timed backup, which must report `cbt: true`; then once more, nothing changed (the *floor*).")
    L.append(PEERS_BULLET)
    L.append(columns_bullet("read over the datastore HTTP interface"))
    L.append("- **the simulator's costs inside alike's seconds** (measured in the launcher, `GET /alike/stats`, per "
             "command): CreateSnapshot_Task copies the disk's data into the VM's new current file (a full -flat "
             "copy, `copy_file_range`, no reflink on this ext4) and, CBT being on, hashes every 64 KiB granule of "
             "the frozen disk (a read of its data) so that QueryChangedDiskAreas can answer from the real "
             "contents. A real vCenter does neither: its snapshot starts a sparse delta disk (no data copied) and "
             "its changed areas come from the CBT (ctk) log kept while the guest writes. The *net* column is "
             "alike's seconds minus those two (derived, not measured as such). Not taken out: the consolidation "
             "at RemoveSnapshot_Task (here the VM's copy renamed over the frozen file, the kernel freeing that "
             "file's blocks; vSphere merges the delta's few writes into the base instead) and the "
             "QueryChangedDiskAreas calls (a comparison of kept hashes).")
    L.append(command_bullet(meta, "the VM's disk equals vm1-day2.raw and the CBT version restores to it (`cmp`)"))
    if meta.get("load"):
        L.append(f"- the machine during the run: {common.LoadSampler.text(meta['load'])}.")
    L.append("")
    L += table(meta, med, ROWS, "net of the simulator's copy + hash pass")
    a = med.get("alike")
    if a:
        f = a["nochange"]
        gb = lambda x: (x or 0) / 1e9  # noqa: E731
        L.append("")
        L.append(f"The simulator's costs, medians: in the CBT backup the snapshot copy {a['snapshot_copy']:.2f} s "
                 f"({gb(a['snapshot_copy_bytes']):.2f} GB) and the hash pass {a['snapshot_hash']:.2f} s "
                 f"({gb(a['snapshot_hash_bytes']):.2f} GB read); in the floor {f['snapshot_copy']:.2f} s and "
                 f"{f['snapshot_hash']:.2f} s; in the first backup {a['first']['snapshot_copy']:.2f} s and "
                 f"{a['first']['snapshot_hash']:.2f} s. Not taken out: the consolidation {a['consolidate']:.2f} s "
                 f"and the QueryChangedDiskAreas calls {a['changed_areas']:.2f} s in the CBT backup (all the "
                 f"launcher's own work after tasks: {a['after_task']:.2f} s). Net of the consolidation too: the CBT "
                 f"backup {a['net_consolidate_seconds']:.2f} s"
                 + "".join(f", {t} / that {med[t]['seconds'] / a['net_consolidate_seconds']:.2f}x" for t in ("borg", "restic")
                           if t in med and a['net_consolidate_seconds'] > 0)
                 + f"; the floor {f['net_consolidate_seconds']:.2f} s."
                 + (f" What the launcher's process read from storage during the CBT backup (`/proc/PID/io`): "
                    f"{gb(a['storage_read_bytes']):.2f} GB, against its copy's {gb(a['snapshot_copy_bytes']):.2f} GB."
                    if a.get("storage_read_bytes") is not None else ""))
        L.append("")
        L.append(alike_sentence(a, "vmware:", "the VM's disk"))
        cr = a.get("cold_read")
        if cr:
            L.append("")
            srb, cpb = a.get("storage_read_bytes"), a.get("snapshot_copy_bytes") or 0
            seen = ("" if srb is None else " (the launcher's storage reads above are about its copy's alone)"
                    if srb <= 1.1 * cpb else " (but the launcher's storage reads above exceed its copy's: part of "
                    "its hash pass or of alike's GETs missed the cache)")
            L.append(f"A warm source: the launcher's copy and hash pass read the frozen disk's data just before "
                     f"alike reads it, so alike's ranged GETs are served from the page cache{seen}. Untimed, after each "
                     f"run's steps: alike's CBT read set ({cr['bytes'] / 1e6:,.1f} MB, `cbt.patched_read_ranges`) "
                     f"read from the VM's disk file with the page cache dropped took {cr['seconds']:.2f} s (median), "
                     "the order of what a cold datastore would add to the net seconds.")
    L.append("")
    L.append(per_run(med, ROWS))
    L.append("")
    L.append(END)
    return "\n".join(L) + "\n"


# ---------------------------------------------------------------------------------------------

def govmomi_version() -> str:
    import subprocess

    p = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "golang-github-vmware-govmomi-dev"],
                       capture_output=True, text=True)
    return f"govmomi {p.stdout.strip()} (Debian)" if p.returncode == 0 else "govmomi"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3, help="repetitions; medians are reported (default 3)")
    ap.add_argument("--tools", default=",".join(TOOLS), help="comma list of alike,borg,restic (default all)")
    ap.add_argument("--work", default=os.path.join(HERE, "work"), help="work dir (default bench/work)")
    ap.add_argument("--corpus", help="a built realistic corpus (vm1.raw, vm1-day2.raw), used as it is and never "
                                     "rebuilt (default: WORK/corpus-16g, built by corpus.build_realistic)")
    ap.add_argument("--results", default=os.path.join(HERE, "results"), help="where vmware_cbt.json and latest.md are")
    ap.add_argument("--block-size", default="512K", help="alike store block size (default 512K)")
    ap.add_argument("--ray-cpus", type=int, default=2, help="CPUs of the Ray head alike joins (default 2)")
    ap.add_argument("--no-drop-caches", dest="drop", action="store_false", help="keep the page cache")
    ap.add_argument("--keep", action="store_true", help="keep the simulator, store and repositories under WORK/runs")
    ap.add_argument("--note", help="a sentence for the report (e.g. that the machine was shared)")
    ap.add_argument("--report-only", action="store_true", help="re-render latest.md's section from vmware_cbt.json")
    a = ap.parse_args(argv)
    md_path, js_path = os.path.join(a.results, "latest.md"), os.path.join(a.results, "vmware_cbt.json")
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
    for t in ("alike", "ray", "borg", "restic", "cmp", "cp"):
        if not shutil.which(t):
            raise SystemExit(f"{t} not found on PATH")
    tools = [t.strip() for t in a.tools.split(",") if t.strip()]
    if set(tools) - set(TOOLS):
        raise SystemExit(f"unknown tools: {sorted(set(tools) - set(TOOLS))}")

    def on_term(*_):
        raise KeyboardInterrupt("SIGTERM")  # so that the simulator and our dirs go on the way out

    signal.signal(signal.SIGTERM, on_term)
    if a.corpus:
        cdir = os.path.realpath(a.corpus)  # the path its cbt-extents.json was made for, through a symlink too
        log(f"corpus: using {cdir} as it is")
    else:
        import corpus

        corpus.build_realistic(a.work, log=log)
        cdir = os.path.join(a.work, "corpus-16g")
    images = {k: os.path.join(cdir, f"{k}.raw") for k in ("vm1", "vm1-day2")}
    for p in images.values():
        if not os.path.exists(p):
            raise SystemExit(f"{p} missing")
    logical = os.path.getsize(images["vm1"])
    used = os.stat(images["vm1-day2"]).st_blocks * 512
    os.makedirs(os.path.join(a.work, "runs"), exist_ok=True)
    stale_dirs(a.work, PREFIX, OWN)
    # the VM's disk, the snapshot's copy of it and the store at once (run 1: the restored image instead of the copy)
    need = 2 * os.stat(images["vm1"]).st_blocks * 512 + used // 2 + (2 << 30)
    free = shutil.disk_usage(os.path.join(a.work, "runs")).free
    log(f"free space under {a.work}: {free / 1e9:.1f} GB, needed at most ~{need / 1e9:.1f} GB")
    if free < need:
        raise SystemExit(f"not enough free space under {a.work}: {free / 1e9:.1f} GB, need ~{need / 1e9:.1f} GB")
    t_start = time.time()
    extents = diff_extents(images["vm1"], images["vm1-day2"], os.path.join(cdir, "cbt-extents.json"))
    changed = sum(n for _, n in extents)
    bsz = bench.parse_size(a.block_size)
    log(f"{logical / 2**30:.0f} GiB disk, {used / 1e9:.2f} GB of data; day-later changes: {len(extents)} extents, "
        f"{changed / 1e6:.1f} MB = {100 * changed / used:.2f}% of the data")
    if "alike" in tools:
        from tests.vcsim_server import build

        log(f"vcsim launcher: {build()}")
    results = []
    writes = 0
    with common.LoadSampler() as load:
        try:
            for run_no in range(1, a.runs + 1):
                load.label = f"run {run_no}"
                k = (run_no - 1) % len(tools)
                for tool in tools[k:] + tools[:k]:
                    if tool == "alike":
                        r = alike_steps(a, images, run_no, extents, run_no == 1)
                        writes = r["writes"]
                    else:
                        r = cbt.peer_steps(tool, a, images, run_no, a.work, peers={"borg": VmwBorg, "restic": VmwRestic})
                    rec = dict(run=run_no, tool=tool, logical_bytes=logical, **r)
                    rec["mb_s"] = round(logical / 1e6 / rec["seconds"], 1)
                    results.append(rec)
                    log(f"run {run_no} {ROWS[tool]:36s} {rec['seconds']:7.2f} s {rec['mb_s']:7.1f} MB/s "
                        f"read {(rec['read_bytes'] or 0) / 1e6:8.1f} MB"
                        + (f" (net of the simulator's copy + hash pass {rec['net_seconds']:.2f} s)"
                           if tool == "alike" else ""))
        finally:
            if not a.keep:
                stale_dirs(a.work, PREFIX, OWN)
    meta = dict(command="python bench/vmware_cbt.py " + " ".join(sys.argv[1:] if argv is None else argv),
                date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), host=platform.node(),
                cpus=os.cpu_count(), runs=a.runs, block_size=a.block_size, ray_cpus=a.ray_cpus, corpus=cdir,
                logical_bytes=logical, used_bytes=used, extents=len(extents), changed_bytes=changed,
                changed_in_grains_bytes=patched_read_bytes(extents, bsz), writes=writes,
                verified=any(r.get("disk_verified") for r in results) and all(
                    r.get("restore_verified") for r in results if r["tool"] == "alike" and r["run"] == 1),
                versions=bench.versions(), govmomi=govmomi_version(), load=load.summary(),
                total_seconds=round(time.time() - t_start, 1), note=a.note)
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
