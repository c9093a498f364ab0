#!/usr/bin/env python3
"""alike vs restic vs borg on the same VM disk images, in the same run.

Steps, per tool, per run (fresh repository each run):
  first    first backup of vm1.raw
  vm2      backup of vm2.raw (a second VM from the same template) into the same repository
  day2     backup of vm1-day2.raw (vm1 a day later; for alike the same VM name "vm1")
  restore  restore of the day-2 version to a file on the same filesystem, checked with cmp
  s3-vault    (--s3, default on; alike and restic) copy of all 3 versions from the local repository
              to an S3 server on 127.0.0.1 (moto's server mode, started by the bench, one per run)
  s3-restore  restore of the day-2 version from that S3 copy to a file, checked with cmp

MB/s = logical (virtual) image size in 10^6 bytes / wall seconds of the whole command, for
every tool alike; for s3-vault: bytes uploaded (object bytes in the S3 target after the step).
Stored bytes = `du -sb` of the repository directory after the step (S3 steps: the sum of the
object sizes under the tool's S3 prefix).
The page cache is dropped before every step. Needs root (loop mounts, drop_caches).

    python bench/bench.py --size 2G --runs 3
"""
from __future__ import annotations

import argparse
import contextlib
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
import common  # noqa: E402,F401  (a command runs in its own process unless sent to a server)
import corpus  # noqa: E402

LOCAL_STEPS = ["first", "vm2", "day2", "restore"]
S3_STEPS = ["s3-vault", "s3-restore"]
STEPS = LOCAL_STEPS + S3_STEPS
STEP_TITLES = {
    "first": "(a) first backup of vm1",
    "vm2": "(b) backup of vm2 (second VM from the same template)",
    "day2": "(c) day-later backup of vm1 (vm1-day2.raw)",
    "restore": "(d) restore of the day-later version to a file",
    "s3-vault": "(e) vault: copy of the 3 versions (vm1, vm2, vm1-day2) to S3 (offsite)",
    "s3-restore": "(f) restore of the day-later version from S3 to a file",
}
# the step whose stored bytes this step's "added" is counted from (None: an empty repository)
STEP_PREV = {"first": None, "vm2": "first", "day2": "vm2", "restore": "day2",
             "s3-vault": None, "s3-restore": "s3-vault"}
RESTORE_STEPS = ("restore", "s3-restore")
TOOLS = ["alike", "restic", "borg"]
S3_TOOLS = ("alike", "restic")  # borg has no S3 backend
# dummy credentials for the local S3 server, for every tool (and alike's Ray workers)
S3_ENV = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench-secret",
          "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
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
# S3 server for the S3 steps: moto's server mode (a real S3 HTTP API on 127.0.0.1, objects kept in
# memory), in its own process, one per run (so its memory is given back between runs), stopped by pid.

class S3Server:
    def __init__(self, log_path: str):
        self.log_path = log_path
        self.proc = None
        self.endpoint = None

    def __enter__(self):
        port = free_port()
        env = dict(os.environ, **S3_ENV)
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                     env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        self.endpoint = f"http://127.0.0.1:{port}"
        deadline = time.time() + 60
        while True:
            try:
                self.client().list_buckets()
                break
            except Exception:
                if self.proc.poll() is not None or time.time() > deadline:
                    raise SystemExit(f"S3 server (moto) did not start; see {self.log_path}")
                time.sleep(0.3)
        log(f"S3 server (moto, pid {self.proc.pid}) at {self.endpoint}")
        return self

    def client(self):
        import boto3
        from botocore.config import Config
        return boto3.client("s3", endpoint_url=self.endpoint, region_name=S3_ENV["AWS_DEFAULT_REGION"],
                            aws_access_key_id=S3_ENV["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=S3_ENV["AWS_SECRET_ACCESS_KEY"],
                            config=Config(retries={"mode": "standard", "max_attempts": 5}))

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def bucket_bytes(self, bucket: str, prefix: str = "") -> int:
        total = 0
        for page in self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            total += sum(o["Size"] for o in page.get("Contents", []))
        return total

    def delete_bucket(self, name: str) -> None:
        c = self.client()
        try:
            for page in c.get_paginator("list_objects_v2").paginate(Bucket=name):
                keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
                for i in range(0, len(keys), 1000):
                    c.delete_objects(Bucket=name, Delete={"Objects": keys[i:i + 1000], "Quiet": True})
            c.delete_bucket(Bucket=name)
        except Exception as e:  # the server goes at the end of the run anyway
            log(f"could not delete bucket {name}: {type(e).__name__}: {e}")

    def __exit__(self, *exc):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        log("S3 server stopped")


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

    s3: "S3Server | None" = None
    bucket: str | None = None
    s3_prefix = ""

    def use_s3(self, server: "S3Server", run_no: int) -> None:
        """Give the tool its own bucket on the run's S3 server (deleted again by cleanup)."""
        self.s3 = server
        self.bucket = re.sub(r"[^a-z0-9-]+", "-", f"bench-{self.name}-{run_no}".lower()).strip("-")
        self.s3_prefix = f"{re.sub(r'[^a-z0-9]+', '-', self.name.lower()).strip('-')}-{run_no}"
        server.create_bucket(self.bucket)

    def stored(self, step: str) -> int:
        if step in S3_STEPS:
            return self.s3.bucket_bytes(self.bucket, self.s3_prefix + "/")
        return du(self.repo)

    def cleanup(self):
        shutil.rmtree(self.dir, ignore_errors=True)
        if self.s3 and self.bucket:
            self.s3.delete_bucket(self.bucket)
            self.bucket = None


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
        s3_url = f"s3://{self.bucket}/{self.s3_prefix}" if self.bucket else None
        if name == "s3-vault":
            dt, out = run(["alike", "vault", "--store", self.repo, "--to", s3_url, "--endpoint", self.s3.endpoint,
                           "--json"], env=self.env)
            return dict(seconds=dt, alike=last_json(out))
        target = os.path.join(self.restore_dir, "vm1-day2.raw")
        src = ["--store", self.repo] if name == "restore" else ["--store", s3_url, "--endpoint", self.s3.endpoint]
        dt, out = run(["alike", "restore", *src, "vm1", "--to", target, "--force", "--json"], env=self.env)
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
        if name == "s3-vault":
            # a new repository on S3 with the local one's chunker parameters (so the copy keeps the
            # dedup), then `restic copy` of all snapshots; both commands are timed (alike's vault
            # creates its target too)
            env = dict(self.env, RESTIC_REPOSITORY=self.s3_repo, RESTIC_FROM_REPOSITORY=self.repo,
                       RESTIC_FROM_PASSWORD=self.env["RESTIC_PASSWORD"])
            t_init, _ = run(["restic", "init", "--repository-version", "2", "--copy-chunker-params"], env=env)
            t_copy, _ = run(["restic", "copy", "--compression", "auto"], env=env)
            return dict(seconds=t_init + t_copy, restic=dict(init_seconds=round(t_init, 3),
                                                             copy_seconds=round(t_copy, 3)))
        if name == "restore":
            dt, _ = run(["restic", "restore", self.snap, "--target", self.restore_dir], env=self.env)
        else:  # the latest snapshot of the day-2 image, from the S3 copy
            env = dict(self.env, RESTIC_REPOSITORY=self.s3_repo)
            # restic records the path resolved from the real working directory (symlinks resolved)
            dt, _ = run(["restic", "restore", "latest", "--path", os.path.realpath(self.images["vm1-day2"]),
                         "--target", self.restore_dir], env=env)
        found = [os.path.join(r, f) for r, _, fs in os.walk(self.restore_dir) for f in fs if f == "vm1-day2.raw"]
        return dict(seconds=dt, restored=found[0] if found else None)

    @property
    def s3_repo(self) -> str:
        return f"s3:{self.s3.endpoint}/{self.bucket}/{self.s3_prefix}"


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
        stored = tool.stored(st)
        if st in RESTORE_STEPS:
            src = tool.images["vm1-day2"]
            if not r.get("restored") or not os.path.exists(r["restored"]):
                raise SystemExit(f"{tool.name}: restore produced no file")
            cmp_or_die(src, r["restored"], tool.name)
            r["verified"] = True
            os.remove(r["restored"])
        if st == "s3-vault":  # the 3 versions; MB/s on the bytes uploaded (what the S3 target holds after)
            lb, basis = logical["vm1"] + logical["vm2"] + logical["vm1-day2"], stored
        else:
            lb = logical[{"first": "vm1", "vm2": "vm2", "day2": "vm1-day2", "restore": "vm1-day2",
                          "s3-restore": "vm1-day2"}[st]]
            basis = lb
        rec = dict(run=run_no, tool=tool.name, step=st, seconds=round(r.pop("seconds"), 3),
                   logical_bytes=lb, basis_bytes=basis, stored_bytes=stored, **r)
        rec["mb_s"] = round(rec["basis_bytes"] / 1e6 / rec["seconds"], 1)
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
        basis = statistics.median(r.get("basis_bytes", r["logical_bytes"]) for r in recs)
        med[(tool, step)] = dict(seconds=secs, mb_s=basis / 1e6 / secs, basis_bytes=int(basis),
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
    L.append("- **alike/peer speed**: this tool's seconds / alike's seconds, i.e. alike MB/s / this tool's MB/s "
             "where both count the same bytes (>1 = alike faster). "
             "**alike/peer stored**: alike stored bytes / this tool's (<1 = alike smaller). "
             "On the `alike (cold)` row the speed ratio is warm alike / cold alike.")
    if any(k[1] in S3_STEPS for k in med):
        L.append("- **S3 steps** (e, f): against a real S3 HTTP server on 127.0.0.1 started by the bench (moto %s "
                 "server mode, objects in memory, one server process per run, on the same 2 cores as the tools). "
                 "(e) alike: `alike vault --store LOCAL --to s3://BUCKET/alike-RUN --endpoint URL` (target created "
                 "by the command); restic: `restic init --repository-version 2 --copy-chunker-params` of "
                 "`s3:URL/BUCKET/restic-RUN` + `restic copy --from-repo LOCAL` (all snapshots; seconds = both "
                 "commands). (f) alike: `alike restore --store s3://... vm1 --to FILE`; restic: `restic restore "
                 "latest --path IMAGE --target DIR` on the S3 repository; both checked with `cmp`. borg has no S3 "
                 "backend: no borg rows. In (e) **MB/s** = bytes uploaded (the object bytes under the tool's S3 "
                 "prefix after the step, = **stored**) / seconds, so each tool's MB/s counts its own bytes and the "
                 "speed ratio is the seconds ratio of the same job (copy 3 versions offsite); in (f) MB/s is on the "
                 "logical image size, as in (d). **stored** in (e, f) = the S3 copy." % meta.get("moto", "?"))
    L.append("")
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
                sp = f"{m['seconds'] / a['seconds']:.2f}x"
                so = f"{a['stored_bytes'] / m['stored_bytes']:.2f}" if t != "alike (cold)" else "-"
            else:
                sp = so = "-"
            p = STEP_PREV[st]
            prev = med.get((t, p)) if p else None
            added = m["stored_bytes"] - (prev["stored_bytes"] if prev else 0) if (prev or p is None) else None
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


def write_latest(path: str, md: str) -> None:
    """Write latest.md, keeping the sections the other benches own (between their
    `<!-- NAME:begin -->` and `<!-- NAME:end -->` markers, e.g. `<!-- bench/cbt.py: begin -->`:
    cbt.py, xen_cbt.py, gc.py, restore_bench.py; any NAME is kept, in the order found)."""
    old = open(path).read() if os.path.exists(path) else ""
    marker = r"<!-- (\S+?):? ?begin -->.*?<!-- \1:? ?end -->"
    sections = [m.group(0) for m in re.finditer(marker, old, flags=re.S)]
    text = md.rstrip("\n") + "".join("\n\n" + sec for sec in sections) + "\n"
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


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
    ap.add_argument("--s3", action=argparse.BooleanOptionalAction, default=True,
                    help="S3 steps (e) vault to S3 and (f) restore from S3, alike and restic, against a moto "
                         "S3 server on 127.0.0.1 started per run (default on; --no-s3 to skip)")
    ap.add_argument("--keep", action="store_true", help="keep repositories under WORK/runs (S3 buckets go anyway)")
    ap.add_argument("--report-only", action="store_true",
                    help="rewrite RESULTS/latest.md from RESULTS/latest.json (no runs)")
    a = ap.parse_args(argv)
    if a.report_only:
        d = json.load(open(os.path.join(a.results, "latest.json")))
        md = report(medians(d["results"]), d["meta"], d["results"])
        write_latest(os.path.join(a.results, "latest.md"), md)
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
    if a.s3:
        import boto3  # noqa: F401  (fail early: the S3 steps need boto3 and moto's server mode)
        import moto.server  # noqa: F401
        os.environ.update(S3_ENV)  # dummy credentials for every tool, and for alike's Ray head/workers
        os.environ.pop("AWS_ENDPOINT_URL", None)
        os.environ.pop("AWS_PROFILE", None)
    for run_no in range(1, a.runs + 1):
        order = tools[(run_no - 1) % len(tools):] + tools[:(run_no - 1) % len(tools)]  # rotate: spread noise
        with (S3Server(os.path.join(a.work, "moto.log")) if a.s3 else contextlib.nullcontext()) as s3:
            for name in order:
                steps = STEPS if (s3 and name in S3_TOOLS) else LOCAL_STEPS
                if name == "alike":
                    if not a.no_cold:
                        cold = Alike(a.work, images, run_no, None, a.block_size, tag="alike (cold)")
                        run_tool(cold, ["first"], logical, drop, results, run_no)
                        cold.cleanup()
                    with RayHead(a.ray_cpus) as head:
                        t = Alike(a.work, images, run_no, head.address, a.block_size)
                        if steps is STEPS:
                            t.use_s3(s3, run_no)
                        run_tool(t, steps, logical, drop, results, run_no)
                elif name == "restic":
                    t = Restic(a.work, images, run_no)
                    if steps is STEPS:
                        t.use_s3(s3, run_no)
                    run_tool(t, steps, logical, drop, results, run_no)
                elif name == "borg":
                    t = Borg(a.work, images, run_no)
                    run_tool(t, steps, logical, drop, results, run_no)
                else:
                    raise SystemExit(f"unknown tool {name}")
                if not a.keep:
                    t.cleanup()
                elif t.bucket:
                    t.s3.delete_bucket(t.bucket)  # the server's memory; it goes at the end of the run anyway
    med = medians(results)
    meta = dict(command="python bench/bench.py " + " ".join(sys.argv[1:] if argv is None else argv),
                date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), host=platform.node(),
                cpus=os.cpu_count(), runs=a.runs, block_size=a.block_size, corpus=meta_c,
                versions=versions(), total_seconds=round(time.time() - t_start, 1))
    if a.s3:
        import importlib.metadata as imd
        meta["moto"] = imd.version("moto")
    md = report(med, meta, results)
    print(md)
    os.makedirs(a.results, exist_ok=True)
    write_latest(os.path.join(a.results, "latest.md"), md)
    with open(os.path.join(a.results, "latest.json"), "w") as f:
        json.dump(dict(meta=meta, medians=[dict(tool=t, step=s, **m) for (t, s), m in sorted(med.items())],
                       results=results), f, indent=1)
    log(f"done in {meta['total_seconds']} s; wrote {a.results}/latest.md and latest.json")


if __name__ == "__main__":
    main()
