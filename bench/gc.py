#!/usr/bin/env python3
"""Garbage collection after deleting backups: `alike gc` vs `restic prune` vs `borg compact`.

Per run, per tool, a fresh repository:
  1. backups of vm1.raw, vm2.raw and vm1-day2.raw (the day-2 image as a second version of vm1),
     as in bench.py: alike `alike backup --store S image:PATH --name vm1|vm2` (joined to one Ray
     head started for the whole bench), restic `restic backup FILE` (repository v2,
     `--compression auto`), borg `borg create` (`-e none`, fixed 4 MiB chunks, zstd 3, --sparse);
  2. the first version of vm1 and the vm2 backup are deleted: alike with the Python API
     `Store.open(S).delete_version(vm, version)`, restic `restic forget ID ID`, borg
     `borg delete REPO::ARCHIVE` (each for both);
  3. timed, page cache dropped before: alike `alike gc --store S --grace 0 --json`, restic
     `restic prune` (default options), borg `borg compact REPO`, each under
     `/usr/bin/time -f '%e %M'` (peak RSS of the process); stored bytes (`du -sb` of the
     repository) before and after;
  4. the data left is checked: alike `alike verify --store S` (exit 0) and a restore of vm1's day-2
     version `cmp`-identical to vm1-day2.raw; restic `restic check`; borg `borg check`.
Also once per run, the memory floor of each program doing no work (`python -c "import alike_ray.cli,
pipelines.gc"`: the interpreter and gc's imports; `restic version`; `borg --version`).

    python bench/gc.py --runs 3          # ~8-10 min on 2 cores; results/gc.json + a section of latest.md
    python bench/gc.py --report-only     # re-render the latest.md section from results/gc.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import common  # noqa: E402
sys.path.insert(1, ROOT)
import bench  # noqa: E402
from bench import cmp_or_die, drop_caches, du, last_json, log, run  # noqa: E402

TOOLS = ["alike", "restic", "borg"]
STEP = {"alike": "alike gc --grace 0", "restic": "restic prune", "borg": "borg compact"}
BEGIN, END = "<!-- gc:begin -->", "<!-- gc:end -->"
bench.RAY_TMP = "/tmp/alike-bench-gc-ray"   # our own head's temp dir: never bench.py's or cbt.py's
GIB, MIB = 1 << 30, 1 << 20


def timed(cmd, env, cwd=None, drop=True) -> tuple[float, int, str]:
    """Drop the page cache, run under /usr/bin/time; -> (wall seconds, peak RSS bytes, stdout)."""
    drop_caches(drop)
    fd, tf = tempfile.mkstemp(prefix="gc-bench-time-")
    os.close(fd)
    try:
        dt, out = run(["/usr/bin/time", "-o", tf, "-f", "%e %M", *cmd], env=env, cwd=cwd, timeout=1800)
        with open(tf) as f:
            rss_kib = int(f.read().split()[-1])
    finally:
        os.remove(tf)
    return dt, rss_kib * 1024, out


def floor_rss(cmd, env=None, cwd=None) -> int:
    _, rss, _ = timed(cmd, env, cwd=cwd, drop=False)
    return rss


# ---------------------------------------------------------------------------------------------
# the tools: setup + 3 backups, delete, the timed step, the check

class GcAlike(bench.Alike):
    def __init__(self, work, images, run_no, address, block_size):
        super().__init__(work, images, run_no, address, block_size, tag="gc-alike")

    def backups(self):
        self.setup()
        for image, vm in (("vm1", "vm1"), ("vm2", "vm2"), ("vm1-day2", "vm1")):
            r = self._backup(self.images[image], vm)
            log(f"  alike backup {image:9s} {r['seconds']:6.2f} s")

    def delete(self):
        from storage.store import Store

        st = Store.open(self.repo)
        vm1 = st.list_versions("vm1")
        vm2 = st.list_versions("vm2")
        if len(vm1) != 2 or len(vm2) != 1:
            raise SystemExit(f"alike: expected 2 versions of vm1 and 1 of vm2, found {vm1} {vm2}")
        self.keep = vm1[1][1]
        for vm, v in (vm1[0], vm2[0]):
            st.delete_version(vm, v)
        return [f"{vm}@{v}" for vm, v in (vm1[0], vm2[0])]

    def gc(self, drop):
        dt, rss, out = timed(["alike", "gc", "--store", self.repo, "--grace", "0", "--json"], self.env, drop=drop)
        return dt, rss, last_json(out)

    def check(self):
        run(["alike", "verify", "--store", self.repo, "--json"], env=self.env, timeout=1800)
        target = os.path.join(self.restore_dir, "vm1-day2.raw")
        run(["alike", "restore", "--store", self.repo, f"vm1@{self.keep}", "--to", target, "--force", "--json"],
            env=self.env, timeout=1800)
        cmp_or_die(self.images["vm1-day2"], target, "alike after gc: vm1's day-2 version vs vm1-day2.raw")
        os.remove(target)
        return "alike verify: ok; restore of vm1's day-2 version == vm1-day2.raw (cmp)"


class GcRestic(bench.Restic):
    name = "gc-restic"

    def backups(self):
        self.setup()
        for image in ("vm1", "vm2", "vm1-day2"):
            r = self._backup(self.images[image])
            log(f"  restic backup {image:9s} {r['seconds']:6.2f} s")

    def delete(self):
        _, out = run(["restic", "snapshots", "--json"], env=self.env)
        snaps = sorted(json.loads(out), key=lambda s: s["time"])
        by_file = {}
        for s in snaps:
            by_file.setdefault(os.path.basename(s["paths"][0]), []).append(s["id"])
        ids = [by_file["vm1.raw"][0], by_file["vm2.raw"][0]]
        if len(snaps) != 3:
            raise SystemExit(f"restic: expected 3 snapshots, found {len(snaps)}")
        run(["restic", "forget", *ids], env=self.env)
        return [i[:8] for i in ids]

    def gc(self, drop):
        dt, rss, out = timed(["restic", "prune"], self.env, drop=drop)
        return dt, rss, {"stdout_tail": out.strip().splitlines()[-6:]}

    def check(self):
        run(["restic", "check"], env=self.env, timeout=1800)
        return "restic check: no errors"


class GcBorg(bench.Borg):
    name = "gc-borg"

    def backups(self):
        self.setup()
        for image in ("vm1", "vm2", "vm1-day2"):
            r = self._backup(self.images[image], image)
            log(f"  borg backup {image:9s} {r['seconds']:6.2f} s")

    def delete(self):
        for arch in ("vm1", "vm2"):
            run(["borg", "delete", f"{self.repo}::{arch}"], env=self.env)
        _, out = run(["borg", "list", "--short", self.repo], env=self.env)
        if out.split() != ["vm1-day2"]:
            raise SystemExit(f"borg: expected only archive vm1-day2 left, found {out.split()}")
        return ["vm1", "vm2"]

    def gc(self, drop):
        dt, rss, _ = timed(["borg", "compact", self.repo], self.env, drop=drop)
        return dt, rss, {}

    def check(self):
        run(["borg", "check", self.repo], env=self.env, timeout=1800)
        return "borg check: ok"


def one(tool, run_no, drop) -> dict:
    t0 = time.perf_counter()
    tool.backups()
    deleted = tool.delete()
    before = du(tool.repo)
    dt, rss, detail = tool.gc(drop)
    after = du(tool.repo)
    checked = tool.check()
    rec = dict(run=run_no, seconds=round(dt, 3), peak_rss_bytes=rss, stored_before=before, stored_after=after,
               reclaimed=before - after, deleted=deleted, checked=checked, detail=detail,
               run_seconds=round(time.perf_counter() - t0, 1))
    log(f"run {run_no} {tool.name:9s} gc {dt:6.2f} s peak {rss / MIB:7.1f} MiB stored {before / 1e6:7.1f} -> "
        f"{after / 1e6:7.1f} MB ({checked})")
    return rec


# ---------------------------------------------------------------------------------------------
# report

def medians(results: list) -> dict:
    med = {}
    for tool in TOOLS:
        recs = [r for r in results if r["tool"] == tool]
        if not recs:
            continue
        m = {k: statistics.median(r[k] for r in recs)
             for k in ("seconds", "peak_rss_bytes", "stored_before", "stored_after", "reclaimed")}
        gib = m["stored_before"] / GIB
        m.update(peak_mib=m["peak_rss_bytes"] / MIB, s_per_gib=m["seconds"] / gib,
                 mib_per_gib=m["peak_rss_bytes"] / MIB / gib, runs=len(recs),
                 all_seconds=[r["seconds"] for r in recs], all_peak_mib=[round(r["peak_rss_bytes"] / MIB, 1)
                                                                         for r in recs])
        fl = [r["floor_rss_bytes"] for r in recs if r.get("floor_rss_bytes")]
        if fl:
            m["floor_mib"] = statistics.median(fl) / MIB
        med[tool] = m
    return med


def report(d: dict) -> str:
    meta, med, results = d["meta"], d["medians"], d["results"]
    a = med.get("alike")
    L = [BEGIN, "", "# garbage collection after deleting backups (GC)", ""]
    L.append(f"- command: `{meta['command']}`; date: {meta['date']}, host: {meta['host']} ({meta['cpus']} CPUs), "
             f"runs: {meta['runs']} (medians); versions: {meta['versions']}")
    L.append("- per run and tool, a fresh repository: backups of vm1.raw, vm2.raw, vm1-day2.raw (the day-2 image "
             "as vm1's second version), options as in the tables above; then the first version of vm1 and the vm2 "
             "backup are deleted (alike: `Store.open(S).delete_version(vm, version)`, the Python API; restic: "
             "`restic forget ID ID`; borg: `borg delete REPO::vm1`, `REPO::vm2`); then the timed step, page cache "
             "dropped before it: alike `alike gc --store S --grace 0 --json` (default `--repack-below 0.5`; no "
             "other writer), restic `restic prune` (default options, i.e. `--max-unused 5%`), borg `borg compact "
             "REPO`. Afterwards: alike `alike verify` exit 0 and vm1's day-2 version restored and `cmp`-ed with "
             "vm1-day2.raw; restic `restic check`; borg `borg check`" +
             (" - all passed in every run." if meta.get("all_checked") else "."))
    L.append(f"- alike's backups/verify/restore join one Ray head started for the whole bench "
             f"(`ray start --head --num-cpus={meta['ray_cpus']}`); `alike gc` itself does not use Ray. Block size "
             f"{meta['block_size']}.")
    L.append("- **seconds**: wall time of the whole command (process start to exit); **peak MiB**: the command's "
             "peak RSS (`/usr/bin/time -f %M`); **stored**: `du -sb` of the repository before -> after the step; "
             "**s/GiB**, **MiB/GiB**: seconds and peak MiB per GiB stored before the step (2^30 bytes); "
             "**floor MiB**: peak RSS of the same program doing nothing (alike: `python -c \"import alike_ray.cli, "
             "pipelines.gc\"`, the interpreter plus gc's imports; `restic version`; `borg --version`); "
             "**alike/peer speed**: peer seconds / alike seconds (>1 = alike faster); **alike/peer memory**: alike "
             "peak / peer peak (<1 = alike smaller). With well under 1 GiB stored, fixed costs (process start, imports, "
             "opening the repository) are most of every figure: the per-GiB columns do not extrapolate linearly.")
    L.append("")
    L.append("| tool | step | seconds | peak MiB | stored before -> after | reclaimed | s/GiB | MiB/GiB | floor MiB "
             "| alike/peer speed | alike/peer memory |")
    L.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for t in TOOLS:
        m = med.get(t)
        if not m:
            continue
        sp = f"{m['seconds'] / a['seconds']:.2f}x" if a and t != "alike" else "-"
        mem = f"{a['peak_mib'] / m['peak_mib']:.2f}" if a and t != "alike" else "-"
        fl = f"{m['floor_mib']:.0f}" if m.get("floor_mib") else "-"
        L.append(f"| {t} | `{STEP[t]}` | {m['seconds']:.2f} | {m['peak_mib']:.0f} | "
                 f"{m['stored_before'] / 1e6:,.1f} -> {m['stored_after'] / 1e6:,.1f} MB | "
                 f"{m['reclaimed'] / 1e6:,.1f} MB | {m['s_per_gib']:.2f} | {m['mib_per_gib']:.0f} | {fl} | {sp} | {mem} |")
    L.append("")
    al = [r for r in results if r["tool"] == "alike" and isinstance(r.get("detail"), dict)]
    if al:
        def md(k):
            xs = [r["detail"].get(k) for r in al if r["detail"].get(k) is not None]
            return statistics.median(xs) if xs else None
        own = md("seconds")
        L.append("alike gc's report, medians: " + ", ".join(x for x in [
            f"own `seconds` {own:.2f} s (inside the command, without process start and imports)" if own is not None
            else None,
            f"versions marked {md('versions'):.0f}, live blocks {md('live_blocks'):,.0f}" if md("versions") is not None
            else None,
            f"{md('packs_deleted'):.0f} packs deleted ({md('bytes_deleted') / 1e6:,.1f} MB)"
            if md("packs_deleted") is not None else None,
            f"{md('packs_repacked'):.0f} packs repacked ({md('bytes_repacked') / 1e6:,.1f} MB of live blocks copied)"
            if md("packs_repacked") is not None else None,
            f"{md('packs_kept'):.0f} packs kept ({md('bytes_kept') / 1e6:,.1f} MB)"
            if md("packs_kept") is not None else None] if x) + ".\n")
    L.append("Per-run seconds / peak MiB: " + "; ".join(
        f"{t}: {', '.join(f'{s:.2f}' for s in med[t]['all_seconds'])} / "
        f"{', '.join(f'{x:.0f}' for x in med[t]['all_peak_mib'])}" for t in TOOLS if t in med) + "\n")
    L.append(END)
    return "\n".join(L) + "\n"


def put_section(path: str, section: str) -> None:
    common.put_section(path, section, BEGIN, END)


# ---------------------------------------------------------------------------------------------

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3, help="repetitions; medians are reported (default 3)")
    ap.add_argument("--tools", default=",".join(TOOLS), help="comma list of alike,restic,borg (default all)")
    ap.add_argument("--work", default=os.path.join(HERE, "work"), help="work dir with corpus/ (default bench/work)")
    ap.add_argument("--results", default=os.path.join(HERE, "results"), help="where gc.json and latest.md are")
    ap.add_argument("--block-size", default="512K", help="alike store block size (default 512K)")
    ap.add_argument("--ray-cpus", type=int, default=2, help="CPUs of the Ray head alike joins (default 2)")
    ap.add_argument("--no-drop-caches", dest="drop", action="store_false", help="keep the page cache")
    ap.add_argument("--keep", action="store_true", help="keep the repositories under WORK/runs")
    ap.add_argument("--report-only", action="store_true", help="re-render latest.md's section from gc.json")
    a = ap.parse_args(argv)
    md_path, js_path = os.path.join(a.results, "latest.md"), os.path.join(a.results, "gc.json")
    if a.report_only:
        sec = report(json.load(open(js_path)))
        put_section(md_path, sec)
        print(sec)
        return
    if os.geteuid() != 0:
        raise SystemExit("needs root: drop_caches before the timed step")
    for t in ("alike", "ray", "borg", "restic", "/usr/bin/time"):
        if not shutil.which(t):
            raise SystemExit(f"{t} not found (Debian: apt-get install time restic borgbackup)")
    tools = [t.strip() for t in a.tools.split(",") if t.strip()]
    cdir = os.path.join(a.work, "corpus")
    images = {k: os.path.join(cdir, f"{k}.raw") for k in ("vm1", "vm2", "vm1-day2")}
    for p in images.values():
        if not os.path.exists(p):
            raise SystemExit(f"{p} missing: build the corpus first (python bench/bench.py --corpus-only)")
    t_start = time.time()
    results = []
    with bench.RayHead(a.ray_cpus) as head:
        for run_no in range(1, a.runs + 1):
            k = (run_no - 1) % len(tools)
            for name in tools[k:] + tools[:k]:   # rotate: spread noise
                if name == "alike":
                    t = GcAlike(a.work, images, run_no, head.address, a.block_size)
                    floor = floor_rss([sys.executable, "-c", "import alike_ray.cli, pipelines.gc"], cwd=ROOT)
                elif name == "restic":
                    t = GcRestic(a.work, images, run_no)
                    floor = floor_rss(["restic", "version"])
                elif name == "borg":
                    t = GcBorg(a.work, images, run_no)
                    floor = floor_rss(["borg", "--version"], env=t.env)
                else:
                    raise SystemExit(f"unknown tool {name}")
                try:
                    rec = one(t, run_no, a.drop)
                finally:
                    if not a.keep:
                        t.cleanup()
                results.append(dict(tool=name, floor_rss_bytes=floor, **rec))
    meta = dict(command="python bench/gc.py " + " ".join(sys.argv[1:] if argv is None else argv),
                date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), host=platform.node(),
                cpus=os.cpu_count(), runs=a.runs, block_size=a.block_size, ray_cpus=a.ray_cpus,
                all_checked=all(r.get("checked") for r in results),
                versions=bench.versions(), total_seconds=round(time.time() - t_start, 1))
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
