#!/usr/bin/env python3
"""alike vs restic vs borg on the same VM disk images, in the same run.

Steps, per tool, per run (fresh repository each run):
  first    first backup of vm1.raw
  vm2      backup of vm2.raw (a second VM from the same template) into the same repository
  day2     backup of vm1-day2.raw (vm1 a day later; for alike the same VM name "vm1")
  restore  restore of the day-2 version to a file on the same filesystem, checked with cmp

MB/s = logical (virtual) image size in 10^6 bytes / wall seconds of the whole command, for
every tool alike. Stored bytes = `du -sb` of the repository directory after the step.
The page cache is dropped before every step. Needs root (loop mounts, drop_caches).

    python bench/bench.py --size 2G --runs 3
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import corpus  # noqa: E402

STEPS = ["first", "vm2", "day2", "restore"]
STEP_TITLES = {
    "first": "(a) first backup of vm1",
    "vm2": "(b) backup of vm2 (second VM from the same template)",
    "day2": "(c) day-later backup of vm1 (vm1-day2.raw)",
    "restore": "(d) restore of the day-later version to a file",
}
TOOLS = ["alike", "restic", "borg"]
RAY_TMP = "/tmp/alike-bench-ray"   # short: Ray's unix socket paths must stay < 108 chars


def log(*a):
    print(time.strftime("[%H:%M:%S]"), *a, file=sys.stderr, flush=True)


def parse_size(s: str) -> int:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]?)i?B?", s.strip(), re.I)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {s!r}: use e.g. 512M, 2G")
    mult = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[m.group(2).upper()]
    return int(float(m.group(1)) * mult)


def drop_caches(enabled: bool) -> None:
    os.sync()
    if not enabled:
        return
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        pass


def du(path: str) -> int:
    return int(subprocess.run(["du", "-sb", path], check=True, capture_output=True, text=True).stdout.split()[0])


def run(cmd, env=None, cwd=None, timeout=3600) -> tuple[float, str]:
    """Run a command, fail loudly; -> (wall seconds, stdout)."""
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    dt = time.perf_counter() - t0
    if p.returncode:
        raise RuntimeError(f"command failed (exit {p.returncode}): {' '.join(cmd)}\n"
                           f"stdout: {p.stdout[-3000:]}\nstderr: {p.stderr[-3000:]}")
    return dt, p.stdout


def cmp_or_die(a: str, b: str, what: str) -> None:
    p = subprocess.run(["cmp", a, b], capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"RESTORE MISMATCH ({what}): {a} differs from {b}: {p.stdout.strip()} {p.stderr.strip()}")


def last_json(out: str) -> dict:
    for line in reversed(out.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    try:
        return json.loads(out)
    except ValueError:
        return {}


# ---------------------------------------------------------------------------------------------
# Ray head for alike: started once per run, stopped by pid (never `ray stop`, which would kill
# every Ray process on the machine, including other people's).

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _proc_table():
    procs = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            procs[int(pid)] = (ppid, cmd)
        except (OSError, IndexError, ValueError):
            continue
    return procs


def ray_head_pids(tmp: str) -> list[int]:
    """Processes of our head (their command line names our temp dir) and all their descendants."""
    procs = _proc_table()
    roots = {pid for pid, (_, cmd) in procs.items() if tmp in cmd and pid != os.getpid()}
    out, changed = set(roots), True
    while changed:
        changed = False
        for pid, (ppid, _) in procs.items():
            if ppid in out and pid not in out:
                out.add(pid)
                changed = True
    return sorted(out)


class RayHead:
    def __init__(self, cpus: int):
        self.cpus = cpus
        self.address = None

    def __enter__(self):
        if os.path.isdir(RAY_TMP):
            shutil.rmtree(RAY_TMP, ignore_errors=True)
        port = free_port()
        env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token")
        env.pop("RAY_ADDRESS", None)
        cmd = ["ray", "start", "--head", f"--num-cpus={self.cpus}", "--disable-usage-stats",
               f"--port={port}", f"--temp-dir={RAY_TMP}", "--include-dashboard=false",
               f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
               f"--min-worker-port={20000 + port % 1000 * 10}", f"--max-worker-port={20000 + port % 1000 * 10 + 999}"]
        _, out = run(cmd, env=env, timeout=120)
        m = re.search(r"--address='([^']+)'", out)
        self.address = m.group(1) if m else f"127.0.0.1:{port}"
        log(f"ray head started at {self.address} (temp dir {RAY_TMP})")
        return self

    def __exit__(self, *exc):
        pids = ray_head_pids(RAY_TMP)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.time() + 10
            while time.time() < deadline and any(os.path.exists(f"/proc/{p}") for p in pids):
                time.sleep(0.2)
        log(f"ray head stopped ({len(pids)} processes)")


# ---------------------------------------------------------------------------------------------
# The tools. Each: setup(), step(name) -> dict(seconds, extra...), repo path.

class Tool:
    name = "?"

    def __init__(self, work: str, images: dict, run_no: int):
        self.images = images
        self.dir = os.path.join(work, "runs", re.sub(r"\W+", "-", self.name).strip("-") + f"-{run_no}")
        shutil.rmtree(self.dir, ignore_errors=True)
        os.makedirs(self.dir)
        self.repo = os.path.join(self.dir, "repo")
        self.restore_dir = os.path.join(self.dir, "restore")
        os.makedirs(self.restore_dir)

    def cleanup(self):
        shutil.rmtree(self.dir, ignore_errors=True)


class Alike(Tool):
    name = "alike"

    def __init__(self, work, images, run_no, address: str | None, block_size: str, tag: str = "alike"):
        self.name = tag
        super().__init__(work, images, run_no)
        self.env = dict(os.environ)
        self.env.pop("RAY_ADDRESS", None)
        if address:
            self.env["RAY_ADDRESS"] = address
            # Ray 2.60's `ray start` turns token auth on, but a driver joining by address does not
            # pick the token up unless RAY_AUTH_MODE=token (else: InvalidAuthToken)
            self.env["RAY_AUTH_MODE"] = "token"
        self.block_size = block_size

    def setup(self):
        run(["alike", "init", "--store", self.repo, "--block-size", self.block_size, "--json"], env=self.env)

    def _backup(self, image, vm):
        dt, out = run(["alike", "backup", "--store", self.repo, f"image:{image}", "--name", vm, "--json"],
                      env=self.env)
        j = last_json(out)
        if "versions" in j and isinstance(j["versions"], list):  # tolerate a list form
            j = j["versions"][0]
        return dict(seconds=dt, alike=j)

    def step(self, name):
        if name == "first":
            return self._backup(self.images["vm1"], "vm1")
        if name == "vm2":
            return self._backup(self.images["vm2"], "vm2")
        if name == "day2":
            return self._backup(self.images["vm1-day2"], "vm1")
        target = os.path.join(self.restore_dir, "vm1-day2.raw")
        dt, out = run(["alike", "restore", "--store", self.repo, "vm1", "--to", target, "--force", "--json"],
                      env=self.env)
        return dict(seconds=dt, restored=target, alike=last_json(out))


class Restic(Tool):
    name = "restic"

    def __init__(self, work, images, run_no):
        super().__init__(work, images, run_no)
        self.env = dict(os.environ, RESTIC_PASSWORD="bench", RESTIC_REPOSITORY=self.repo,
                        RESTIC_CACHE_DIR=os.path.join(self.dir, "cache"))
        self.snap = None

    def setup(self):
        run(["restic", "init", "--repository-version", "2"], env=self.env)

    def _backup(self, image):
        dt, out = run(["restic", "backup", "--json", "--quiet", "--compression", "auto",
                       os.path.basename(image)], env=self.env, cwd=os.path.dirname(image))
        j = last_json(out)
        self.snap = j.get("snapshot_id") or "latest"
        return dict(seconds=dt, restic={k: j.get(k) for k in ("snapshot_id", "data_added", "total_bytes_processed")})

    def step(self, name):
        if name in ("first", "vm2", "day2"):
            return self._backup(self.images[{"first": "vm1", "vm2": "vm2", "day2": "vm1-day2"}[name]])
        dt, _ = run(["restic", "restore", self.snap, "--target", self.restore_dir], env=self.env)
        found = [os.path.join(r, f) for r, _, fs in os.walk(self.restore_dir) for f in fs if f == "vm1-day2.raw"]
        return dict(seconds=dt, restored=found[0] if found else None)


class Borg(Tool):
    name = "borg"

    def __init__(self, work, images, run_no):
        super().__init__(work, images, run_no)
        self.env = dict(os.environ, BORG_BASE_DIR=os.path.join(self.dir, "home"),
                        BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK="yes", BORG_RELOCATED_REPO_ACCESS_IS_OK="yes",
                        BORG_PASSPHRASE="", BORG_DISPLAY_PASSPHRASE="no")

    def setup(self):
        run(["borg", "init", "-e", "none", self.repo], env=self.env)

    def _backup(self, image, archive):
        dt, _ = run(["borg", "create", "--sparse", "--chunker-params", "fixed,4194304", "--compression", "zstd,3",
                     f"{self.repo}::{archive}", os.path.basename(image)], env=self.env, cwd=os.path.dirname(image))
        return dict(seconds=dt)

    def step(self, name):
        if name == "first":
            return self._backup(self.images["vm1"], "vm1")
        if name == "vm2":
            return self._backup(self.images["vm2"], "vm2")
        if name == "day2":
            return self._backup(self.images["vm1-day2"], "vm1-day2")
        dt, _ = run(["borg", "extract", "--sparse", f"{self.repo}::vm1-day2", "vm1-day2.raw"],
                    env=self.env, cwd=self.restore_dir)
        return dict(seconds=dt, restored=os.path.join(self.restore_dir, "vm1-day2.raw"))


# ---------------------------------------------------------------------------------------------

def run_tool(tool: Tool, steps, logical: dict, drop: bool, results: list, run_no: int) -> None:
    tool.setup()
    for st in steps:
        drop_caches(drop)
        r = tool.step(st)
        stored = du(tool.repo)
        if st == "restore":
            src = tool.images["vm1-day2"]
            if not r.get("restored") or not os.path.exists(r["restored"]):
                raise SystemExit(f"{tool.name}: restore produced no file")
            cmp_or_die(src, r["restored"], tool.name)
            r["verified"] = True
            os.remove(r["restored"])
        img = {"first": "vm1", "vm2": "vm2", "day2": "vm1-day2", "restore": "vm1-day2"}[st]
        rec = dict(run=run_no, tool=tool.name, step=st, seconds=round(r.pop("seconds"), 3),
                   logical_bytes=logical[img], stored_bytes=stored, **r)
        rec["mb_s"] = round(rec["logical_bytes"] / 1e6 / rec["seconds"], 1)
        results.append(rec)
        log(f"run {run_no} {tool.name:12s} {st:8s} {rec['seconds']:8.2f} s {rec['mb_s']:8.1f} MB/s "
            f"stored {stored / 1e6:9.1f} MB")


def medians(results: list) -> dict:
    out = {}
    for rec in results:
        out.setdefault((rec["tool"], rec["step"]), []).append(rec)
    med = {}
    for (tool, step), recs in out.items():
        secs = statistics.median(r["seconds"] for r in recs)
        med[(tool, step)] = dict(seconds=secs, mb_s=recs[0]["logical_bytes"] / 1e6 / secs,
                                 stored_bytes=int(statistics.median(r["stored_bytes"] for r in recs)),
                                 runs=len(recs), all_seconds=[r["seconds"] for r in recs])
    return med


def fmt_bytes(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def report(med: dict, meta: dict, results: list) -> str:
    L = []
    L.append(f"# alike vs restic vs borg\n")
    L.append(f"- command: `{meta['command']}`")
    L.append(f"- date: {meta['date']}, host: {meta['host']} ({meta['cpus']} CPUs), runs: {meta['runs']} (medians)")
    L.append(f"- corpus: {meta['corpus']['describe']}")
    L.append(f"- versions: {meta['versions']}")
    L.append("- alike: block size %s, zstd 3, joined to a running local Ray head (`ray start --head "
             "--num-cpus=%d`), as a deployed cluster runs; `alike (cold)` = the same command starting its own "
             "Ray (no cluster running)." % (meta["block_size"], meta["cpus"]))
    L.append("- restic: repository v2, `--compression auto`, image backed up as a file (content-defined chunking); "
             "restore with `restic restore` (restic 0.14 writes no holes).")
    L.append("- borg: `-e none`, `--chunker-params fixed,4194304 --compression zstd,3 --sparse`; "
             "`borg extract --sparse`.")
    L.append("- **seconds**: wall time of the whole command (process start, Ray connect, ..., exit); median of runs.")
    L.append("- **MB/s**: logical (virtual) image size (%s = %s) / seconds, 10^6 bytes; the same basis for "
             "every tool, so it compares directly." % ("vm images", fmt_bytes(meta["corpus"]["size"])))
    L.append("- **stored**: `du -sb` of the repository directory after the step (cumulative); **added**: "
             "stored growth in this step (median stored minus the previous step's median).")
    L.append("- **alike/peer speed**: alike MB/s / this tool's MB/s (>1 = alike faster). "
             "**alike/peer stored**: alike stored bytes / this tool's (<1 = alike smaller). "
             "On the `alike (cold)` row the speed ratio is warm alike / cold alike.\n")
    tools = [t for t in ["alike", "alike (cold)", "restic", "borg"] if any(k[0] == t for k in med)]
    for st in STEPS:
        if not any(k[1] == st for k in med):
            continue
        L.append(f"## {STEP_TITLES[st]}\n")
        L.append("| tool | seconds | MB/s | stored | added | alike/peer speed | alike/peer stored |")
        L.append("|---|---:|---:|---:|---:|---:|---:|")
        a = med.get(("alike", st))
        for t in tools:
            m = med.get((t, st))
            if not m:
                continue
            if a and t != "alike":
                sp = f"{a['mb_s'] / m['mb_s']:.2f}x"
                so = f"{a['stored_bytes'] / m['stored_bytes']:.2f}" if t != "alike (cold)" else "-"
            else:
                sp = so = "-"
            i = STEPS.index(st)
            prev = med.get((t, STEPS[i - 1])) if i else None
            added = m["stored_bytes"] - (prev["stored_bytes"] if prev else 0) if (prev or i == 0) else None
            ad = fmt_bytes(added) if added is not None else "-"
            L.append(f"| {t} | {m['seconds']:.2f} | {m['mb_s']:.0f} | {fmt_bytes(m['stored_bytes'])} | {ad} | {sp} | {so} |")
        L.append("")
    L.append("## Targets\n")
    L.append("| target | measured | ok |")
    L.append("|---|---:|:---:|")

    def ratio(st, peer):
        a, p = med.get(("alike", st)), med.get((peer, st))
        return a["mb_s"] / p["mb_s"] if a and p else None

    for st, peer, need in [("first", "borg", 2), ("first", "restic", 3), ("day2", "borg", 2), ("restore", "borg", 2)]:
        r = ratio(st, peer)
        if r is not None:
            L.append(f"| {st}: alike >= {need}x {peer} throughput | {r:.2f}x | {'yes' if r >= need else 'NO'} |")
    a, r = med.get(("alike", "day2")), med.get(("restic", "day2"))
    if a and r:
        q = a["stored_bytes"] / r["stored_bytes"]
        L.append(f"| stored after 3 backups: alike <= restic | {fmt_bytes(a['stored_bytes'])} vs "
                 f"{fmt_bytes(r['stored_bytes'])} ({q:.2f}) | {'yes' if q <= 1 else 'NO'} |")
    L.append("")
    inner = []
    for t in ("alike", "alike (cold)"):
        for st in STEPS:
            xs = [r["alike"].get("seconds") for r in results if r["tool"] == t and r["step"] == st
                  and isinstance(r.get("alike"), dict) and r["alike"].get("seconds") is not None]
            if xs:
                inner.append(f"{t}/{st} {statistics.median(xs):.2f} s")
    if inner:
        L.append("alike's own `seconds` (inside the command, without process start and Ray connect), "
                 "medians: " + "; ".join(inner) + "\n")
    L.append("Per-run seconds: " + "; ".join(
        f"{t}/{s}: {', '.join(f'{x:.1f}' for x in m['all_seconds'])}" for (t, s), m in sorted(med.items())))
    return "\n".join(L) + "\n"


def versions() -> str:
    def v(cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout.strip().splitlines()[0]
        except Exception:
            return "?"
    import importlib.metadata as md
    try:
        alike = md.version("alike-ray")
    except Exception:
        alike = "?"
    return f"alike-ray {alike} (git {v(['git', '-C', os.path.dirname(HERE), 'rev-parse', '--short', 'HEAD'])}), " \
           f"{v(['ray', '--version'])}, {v(['restic', 'version'])}, {v(['borg', '--version'])}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=lambda v: parse_size(v) // (1 << 20) * (1 << 20), default=parse_size("2G"),
                    help="virtual size of each VM image (default 2G; ~60%% is filled with files)")
    ap.add_argument("--runs", type=int, default=3, help="repetitions; medians are reported (default 3)")
    ap.add_argument("--tools", default=",".join(TOOLS), help="comma list of alike,restic,borg (default all)")
    ap.add_argument("--work", default=os.path.join(HERE, "work"), help="work dir (default bench/work)")
    ap.add_argument("--results", default=os.path.join(HERE, "results"), help="where latest.md/.json go")
    ap.add_argument("--block-size", default="512K", help="alike store block size (default 512K)")
    ap.add_argument("--ray-cpus", type=int, default=2, help="CPUs of the Ray head alike joins (default 2)")
    ap.add_argument("--no-cold", action="store_true", help="skip the cold alike row (own Ray per command)")
    ap.add_argument("--no-drop-caches", action="store_true", help="keep the page cache between steps")
    ap.add_argument("--rebuild", action="store_true", help="rebuild the corpus even if one of this size exists")
    ap.add_argument("--corpus-only", action="store_true", help="build the corpus and stop")
    ap.add_argument("--keep", action="store_true", help="keep repositories under WORK/runs")
    ap.add_argument("--report-only", action="store_true",
                    help="rewrite RESULTS/latest.md from RESULTS/latest.json (no runs)")
    a = ap.parse_args(argv)
    if a.report_only:
        d = json.load(open(os.path.join(a.results, "latest.json")))
        md = report(medians(d["results"]), d["meta"], d["results"])
        with open(os.path.join(a.results, "latest.md"), "w") as f:
            f.write(md)
        print(md)
        return
    if os.geteuid() != 0:
        raise SystemExit("bench needs root: loop mounts to build the corpus, drop_caches between steps")
    for t in ("restic", "borg", "alike", "ray", "sfdisk", "mkfs.ext4", "losetup"):
        if not shutil.which(t):
            raise SystemExit(f"{t} not found on PATH")
    tools = [t.strip() for t in a.tools.split(",") if t.strip()]
    os.makedirs(a.work, exist_ok=True)
    t_start = time.time()
    meta_c = corpus.build(a.work, a.size, log=log, rebuild=a.rebuild)
    if a.corpus_only:
        return
    cdir = os.path.join(a.work, "corpus")
    images = {k: os.path.join(cdir, v) for k, v in meta_c["images"].items()}
    logical = {k: os.path.getsize(p) for k, p in images.items()}
    results: list = []
    drop = not a.no_drop_caches
    for run_no in range(1, a.runs + 1):
        order = tools[(run_no - 1) % len(tools):] + tools[:(run_no - 1) % len(tools)]  # rotate: spread noise
        for name in order:
            if name == "alike":
                if not a.no_cold:
                    cold = Alike(a.work, images, run_no, None, a.block_size, tag="alike (cold)")
                    run_tool(cold, ["first"], logical, drop, results, run_no)
                    cold.cleanup()
                with RayHead(a.ray_cpus) as head:
                    t = Alike(a.work, images, run_no, head.address, a.block_size)
                    run_tool(t, STEPS, logical, drop, results, run_no)
            elif name == "restic":
                t = Restic(a.work, images, run_no)
                run_tool(t, STEPS, logical, drop, results, run_no)
            elif name == "borg":
                t = Borg(a.work, images, run_no)
                run_tool(t, STEPS, logical, drop, results, run_no)
            else:
                raise SystemExit(f"unknown tool {name}")
            if not a.keep:
                t.cleanup()
    med = medians(results)
    meta = dict(command="python bench/bench.py " + " ".join(sys.argv[1:] if argv is None else argv),
                date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), host=platform.node(),
                cpus=os.cpu_count(), runs=a.runs, block_size=a.block_size, corpus=meta_c,
                versions=versions(), total_seconds=round(time.time() - t_start, 1))
    md = report(med, meta, results)
    print(md)
    os.makedirs(a.results, exist_ok=True)
    with open(os.path.join(a.results, "latest.md"), "w") as f:
        f.write(md)
    with open(os.path.join(a.results, "latest.json"), "w") as f:
        json.dump(dict(meta=meta, medians=[dict(tool=t, step=s, **m) for (t, s), m in sorted(med.items())],
                       results=results), f, indent=1)
    log(f"done in {meta['total_seconds']} s; wrote {a.results}/latest.md and latest.json")


if __name__ == "__main__":
    main()
