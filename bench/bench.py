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

--large (issue 15, the data path at the machine's limit): a 16 GiB vm1.raw holding the system
trees and its day-later copy (corpus.build(WORK, 16 GiB, name="corpus-large", vm2=False), or an
already built one with --corpus DIR), steps first / day2 (a full re-read, no CBT) / restore /
s3-vault / s3-restore, and before the runs the machine's compute limit measured on a sample of
vm1.raw (single-core zstd -3, zstd decompress, keyed BLAKE3): each alike row gets the seconds its
compute alone would take on the Ray CPUs and the share of that it reached. Results in
results/large.json and a section of results/latest.md.

    python bench/bench.py --large --runs 3 --corpus /work/main/bench/work/corpus-large

--server: alike's commands go through an `alike server` started per run on the run's Ray head
($ALIKE_SERVER set for every alike command; a command the server does not run yet runs locally).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shlex
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
import floor  # noqa: E402
import corpus  # noqa: E402

LOCAL_STEPS = ["first", "vm2", "day2", "restore"]
S3_STEPS = ["s3-vault", "s3-restore"]
STEPS = LOCAL_STEPS + S3_STEPS
STEP_TITLES = {
    "first": "first backup of vm1",
    "vm2": "backup of vm2 (second VM from the same template)",
    "day2": "day-later backup of vm1 (vm1-day2.raw)",
    "restore": "restore of the day-later version to a file",
    "s3-vault": "vault: copy of the {n} versions ({names}) to S3 (offsite)",
    "s3-restore": "restore of the day-later version from S3 to a file",
}
STEP_IMAGE = {"first": "vm1", "vm2": "vm2", "day2": "vm1-day2", "restore": "vm1-day2", "s3-restore": "vm1-day2"}
RESTORE_STEPS = ("restore", "s3-restore")
GIB = 1 << 30
LARGE_SIZE = 16 * GIB
LARGE_BEGIN, LARGE_END = "<!-- bench.py --large: begin -->", "<!-- bench.py --large: end -->"
# issue 15's targets for --large: (step, peer, at least peer seconds / alike seconds)
LARGE_TARGETS = [("first", "borg", 2.5), ("first", "restic", 4), ("day2", "borg", 2), ("restore", "borg", 3),
                 ("s3-restore", "restic", 1.5), ("s3-vault", "restic", 3)]
LIMIT_TARGET = 0.8   # each alike row at least 80% of its compute limit


def steps_of(images: dict) -> list:
    """The local steps a corpus has (no vm2 step without vm2.raw), then the S3 steps."""
    return [s for s in LOCAL_STEPS if s != "vm2" or "vm2" in images] + S3_STEPS


def step_prev(step: str, present) -> str | None:
    """The step whose stored bytes this step's "added" is counted from (None: an empty repository)."""
    if step in ("first", "s3-vault"):
        return None
    if step == "s3-restore":
        return "s3-vault"
    local = [s for s in LOCAL_STEPS if s in present or s == step]
    return local[local.index(step) - 1]


def step_titles(present, images) -> dict:
    """Titles lettered (a), (b), ... in the order of the steps present."""
    names = [k for k in ("vm1", "vm2", "vm1-day2") if k in images]
    out = {}
    for i, st in enumerate(s for s in STEPS if s in present):
        out[st] = f"({chr(ord('a') + i)}) " + STEP_TITLES[st].format(n=len(names), names=", ".join(names))
    return out
TOOLS = ["alike", "restic", "borg"]
S3_TOOLS = ("alike", "restic")  # borg has no S3 backend
# dummy credentials for the local S3 server, for every tool (and alike's Ray workers)
S3_ENV = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench-secret",
          "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
RAY_TMP = "/tmp/alike-bench-ray"   # short: Ray's unix socket paths must stay < 108 chars
# (bench.py's main() gives its head a temp dir of its own pid, RAY_TMP.PID.d: two bench.py at once
# never share one, and ray_head_pids of one never matches the other's processes)


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
        if exc[0] is None and re.search(r"\.\d+\.d$", RAY_TMP):  # a head of this pid's: its logs go too
            shutil.rmtree(RAY_TMP, ignore_errors=True)
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
# --server: `alike server` on the run's Ray head, started after the head (untimed, like the head),
# stopped before it; alike's commands reach it through $ALIKE_SERVER.

class AlikeServer:
    def __init__(self, sock: str, address: str, env: dict):
        self.sock, self.address, self.env = sock, address, dict(env)
        self.env.pop("ALIKE_SERVER", None)
        self.pid = None
        self.start_seconds = None

    def __enter__(self):
        t0 = time.perf_counter()
        # the server joins the head by --address (else it would take $RAY_ADDRESS, set here too)
        _, out = run(["alike", "server", "start", "--socket", self.sock, "--address", self.address, "--json"],
                     env=self.env, timeout=300)
        self.start_seconds = round(time.perf_counter() - t0, 2)
        self.pid = last_json(out).get("pid")
        log(f"alike server (pid {self.pid}) started on {self.sock} in {self.start_seconds:.1f} s")
        return self

    def __exit__(self, *exc):
        p = subprocess.run(["alike", "server", "stop", "--socket", self.sock], env=self.env, capture_output=True,
                           text=True, timeout=900)
        if p.returncode and self.pid:  # ours: stop it by its pid
            log(f"alike server stop failed (exit {p.returncode}: {p.stderr.strip()[-300:]}); SIGTERM to {self.pid}")
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(self.pid), signal.SIGTERM)
            deadline = time.time() + 30
            while time.time() < deadline and os.path.exists(f"/proc/{self.pid}"):
                time.sleep(0.2)
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(self.pid), signal.SIGKILL)
        slog = os.path.splitext(self.sock)[0] + ".log"  # the server's log, next to its socket
        if exc[0] is None and not p.returncode and os.path.exists(slog):
            os.remove(slog)
        elif os.path.exists(slog):
            log(f"the alike server's log is kept: {slog}")
        log(f"alike server stopped (exit {p.returncode})")


# ---------------------------------------------------------------------------------------------
# --large: the compute limit. Single-core speeds of what alike's data path computes per block
# (storage/codec.py: keyed BLAKE3 of every non-zero block, zstd -3 of every new one; a restore
# decompresses and checks the BLAKE3 of every block it writes), on a sample of the image's blocks.

def allocated_blocks(path: str, bs: int):
    """Block numbers (of size bs) that hold allocated data of a sparse file (SEEK_DATA/SEEK_HOLE)."""
    import numpy as np

    ranges = [(start // bs, (end - 1) // bs + 1) for start, end in floor.extents(path)]
    if not ranges:
        return np.zeros(0, np.int64)
    return np.unique(np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in ranges]))


def codec_speeds(path: str, bs: int, sample_bytes: int = 10 ** 9, reps: int = 3, blocks=None) -> dict:
    """Single-core MB/s (10^6 bytes of plaintext per second of this thread's CPU time) of zstd level 3
    compress, zstd decompress and keyed BLAKE3-256, with python `zstandard` and `blake3` as alike
    calls them (one block per call), on ~sample_bytes of the non-zero allocated blocks of `path`
    (`blocks`, default allocated_blocks()), spread evenly over them; median of `reps` repetitions
    each. CPU time, not wall time: what one core does, whatever else shares the machine (the wall
    time figures are kept beside, *_wall_mb_s)."""
    import blake3
    import numpy as np
    import zstandard

    blocks = allocated_blocks(path, bs) if blocks is None else blocks
    k = min(len(blocks), max(1, sample_bytes // bs))
    pick = np.unique(blocks[np.linspace(0, len(blocks) - 1, k).round().astype(np.int64)]) if k else blocks
    data, zero = [], 0
    fd = os.open(path, os.O_RDONLY)
    try:
        for b in pick.tolist():
            buf = os.pread(fd, bs, b * bs)
            if not buf.strip(b"\0"):
                zero += 1  # alike neither hashes nor stores a zero block
                continue
            data.append(buf)
    finally:
        os.close(fd)
    if not data:
        raise SystemExit(f"compute limit: no non-zero allocated block in {path}")
    total = sum(len(b) for b in data)
    key = os.urandom(32)
    cctx, dctx = zstandard.ZstdCompressor(level=3), zstandard.ZstdDecompressor()
    comp = [cctx.compress(b) for b in data]

    def median_of(fn):
        cpu, wall = [], []
        for _ in range(reps):
            t0, c0 = time.perf_counter(), time.thread_time()
            fn()
            cpu.append(time.thread_time() - c0)
            wall.append(time.perf_counter() - t0)
        return statistics.median(cpu), statistics.median(wall), cpu

    def compress():
        for b in data:
            cctx.compress(b)

    def decompress():
        for c in comp:
            dctx.decompress(c, max_output_size=bs)

    def hash_():
        for b in data:
            blake3.blake3(b, key=key).digest()

    out = dict(image=os.path.basename(path), block_size=bs, image_allocated_blocks=int(len(blocks)),
               sample_blocks=len(data), sample_bytes=total, zero_blocks_skipped=zero, reps=reps,
               zstd_ratio=round(total / sum(len(c) for c in comp), 3),
               versions=f"zstandard {zstandard.__version__} (libzstd {'.'.join(map(str, zstandard.ZSTD_VERSION))}), "
                        f"blake3 {getattr(blake3, '__version__', '?')}")
    out["load_before"] = round(os.getloadavg()[0], 2)
    for name, fn in (("zstd", compress), ("unzstd", decompress), ("blake3", hash_)):
        cpu, wall, times = median_of(fn)
        out[f"{name}_mb_s"] = round(total / 1e6 / cpu, 1)
        out[f"{name}_wall_mb_s"] = round(total / 1e6 / wall, 1)
        out[f"{name}_cpu_seconds"] = [round(t, 3) for t in times]
    out["load_after"] = round(os.getloadavg()[0], 2)
    return out


def compute_limit(rec: dict, lim: dict) -> float | None:
    """Seconds alike's compute alone takes for this step on lim["cores"] cores (None: not defined).
    backup: (hashed bytes / BLAKE3 + new bytes / zstd) / N, hashed = the non-zero blocks among the
    image's allocated blocks ((allocated blocks - zero_blocks) x block size), new = new_blocks x block
    size (alike's --json); restore: (written_bytes / decompress + written_bytes / BLAKE3) / N."""
    a = rec.get("alike") if isinstance(rec.get("alike"), dict) else None
    if not a or not lim:
        return None
    n, bs = lim["cores"], lim["block_size"]
    b3, z, uz = lim["blake3_mb_s"] * 1e6, lim["zstd_mb_s"] * 1e6, lim["unzstd_mb_s"] * 1e6
    st = rec["step"]
    if st in ("first", "vm2", "day2"):
        alloc = lim["allocated_blocks"].get(STEP_IMAGE[st])
        if alloc is None or a.get("new_blocks") is None:
            return None
        hashed = max(0, alloc - int(a.get("zero_blocks") or 0)) * bs
        return (hashed / b3 + int(a["new_blocks"]) * bs / z) / n
    if st in RESTORE_STEPS:
        w = a.get("written_bytes")
        return None if w is None else (w / uz + w / b3) / n
    return None


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

    writes_holes = True  # restores a sparse image sparse (else: every byte of its virtual size)

    def restore_need(self, image: str) -> int:
        """Bytes the restore of `image` writes to the disk."""
        return os.stat(image).st_blocks * 512 if self.writes_holes else os.path.getsize(image)

    def pre_step(self, step: str) -> None:
        """Before the step, before the page cache is dropped (untimed)."""

    def post_step(self, step: str, r: dict) -> None:
        """After the step (untimed): may add to its record."""

    def drop_local_repo(self) -> None:
        """The local repository, once only the S3 copy is used (before s3-restore): its disk space."""
        shutil.rmtree(self.repo, ignore_errors=True)

    def cleanup(self):
        shutil.rmtree(self.dir, ignore_errors=True)
        if self.s3 and self.bucket:
            self.s3.delete_bucket(self.bucket)
            self.bucket = None


class Alike(Tool):
    name = "alike"

    def __init__(self, work, images, run_no, address: str | None, block_size: str, tag: str = "alike",
                 server: str | None = None):
        self.name = tag
        super().__init__(work, images, run_no)
        self.env = self.make_env(address)
        self.server = server
        if server:  # every alike command: through the server where it runs it, else locally
            self.env["ALIKE_SERVER"] = server
        self.block_size = block_size
        self._served0 = None

    @staticmethod
    def make_env(address: str | None) -> dict:
        env = dict(os.environ)
        env.pop("RAY_ADDRESS", None)
        env.pop("ALIKE_SERVER", None)
        if address:
            env["RAY_ADDRESS"] = address
            # Ray 2.60's `ray start` turns token auth on, but a driver joining by address does not
            # pick the token up unless RAY_AUTH_MODE=token (else: InvalidAuthToken)
            env["RAY_AUTH_MODE"] = "token"
        return env

    def served_count(self) -> int | None:
        """How many commands the server has run to their end (`alike server status`), None without one."""
        if not self.server:
            return None
        p = subprocess.run(["alike", "server", "status", "--socket", self.server, "--json"], env=self.env,
                           capture_output=True, text=True, timeout=120)
        return last_json(p.stdout).get("commands_served") if p.returncode == 0 else None

    def pre_step(self, step):
        self._served0 = self.served_count()
        if step == "s3-restore" and self.s3 and self.bucket:  # the S3 server's floor for this restore
            self.s3_floor = s3_get_floor(self.s3, self.bucket, self.s3_prefix, "vm1")

    def post_step(self, step, r):
        if self.server:
            n = self.served_count()
            r["served"] = None if n is None or self._served0 is None else n > self._served0

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
    writes_holes = False  # restic 0.14's restore writes every byte (no --sparse before 0.15)

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

DISK_MARGIN = GIB  # free space a restore leaves at least, beyond what it writes


def run_tool(tool: Tool, steps, logical: dict, drop: bool, results: list, run_no: int, keep: bool = False,
             skipped: list | None = None) -> None:
    tool.setup()
    for st in steps:
        if st in RESTORE_STEPS:
            # never fill the (shared) disk: a restore that would leave less than DISK_MARGIN is skipped
            need, free = tool.restore_need(tool.images["vm1-day2"]), shutil.disk_usage(tool.restore_dir).free
            if free < need + DISK_MARGIN:
                why = (f"skipped: writes {need / 1e9:.1f} GB, {free / 1e9:.1f} GB free "
                       f"(needs {(need + DISK_MARGIN) / 1e9:.1f} GB with the {DISK_MARGIN / 1e9:.1f} GB margin)")
                log(f"run {run_no} {tool.name:12s} {st:8s} {why}")
                if skipped is not None:
                    skipped.append(dict(run=run_no, tool=tool.name, step=st, reason=why))
                continue
        if st == "s3-restore" and not keep:
            tool.drop_local_repo()  # only the S3 copy is read now: its disk space back before the restore
        tool.pre_step(st)
        drop_caches(drop)
        r = tool.step(st)
        tool.post_step(st, r)
        stored = tool.stored(st)
        if st in RESTORE_STEPS:
            src = tool.images["vm1-day2"]
            if not r.get("restored") or not os.path.exists(r["restored"]):
                raise SystemExit(f"{tool.name}: restore produced no file")
            r["restored_allocated_bytes"] = os.stat(r["restored"]).st_blocks * 512
            cmp_or_die(src, r["restored"], tool.name)
            r["verified"] = True
            os.remove(r["restored"])
        if st == "s3-vault":  # all the versions; MB/s on the bytes uploaded (what the S3 target holds after)
            lb, basis = sum(logical.values()), stored
        else:
            lb = logical[STEP_IMAGE[st]]
            basis = lb
        rec = dict(run=run_no, tool=tool.name, step=st, seconds=round(r.pop("seconds"), 3),
                   logical_bytes=lb, basis_bytes=basis, stored_bytes=stored, **r)
        rec["mb_s"] = round(rec["basis_bytes"] / 1e6 / rec["seconds"], 1)
        results.append(rec)
        log(f"run {run_no} {tool.name:12s} {st:8s} {rec['seconds']:8.2f} s {rec['mb_s']:8.1f} MB/s "
            f"stored {stored / 1e6:9.1f} MB" + {True: " (served)", False: " (ran locally)", None: ""}[r.get("served")])


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


def alike_label(med: dict) -> str:
    """The alike rows' tool name: `alike (server)` when the commands went through `alike server`."""
    return "alike (server)" if any(k[0] == "alike (server)" for k in med) else "alike"


def corpus_images(meta: dict) -> dict:
    return meta["corpus"].get("images") or {"vm1": "vm1.raw", "vm2": "vm2.raw", "vm1-day2": "vm1-day2.raw"}


def step_rows(med: dict, st: str, tools: list, A: str, present, extra=None) -> list:
    """One step's table rows: tool | seconds | MB/s | stored | added | alike/peer speed | alike/peer stored
    [| extra(tool) columns...]."""
    rows = []
    a = med.get((A, st))
    for t in tools:
        m = med.get((t, st))
        if not m:
            continue
        if a and t != A:
            sp = f"{m['seconds'] / a['seconds']:.2f}x"
            so = f"{a['stored_bytes'] / m['stored_bytes']:.2f}" if t != "alike (cold)" and m["stored_bytes"] else "-"
        else:
            sp = so = "-"
        p = step_prev(st, present)
        prev = med.get((t, p)) if p else None
        added = m["stored_bytes"] - (prev["stored_bytes"] if prev else 0) if (prev or p is None) else None
        ad = fmt_bytes(added) if added is not None else "-"
        cols = [t, f"{m['seconds']:.2f}", f"{m['mb_s']:.0f}", fmt_bytes(m["stored_bytes"]), ad, sp, so]
        if extra:
            cols += extra(t)
        rows.append("| " + " | ".join(cols) + " |")
    return rows


def served_note(results: list, A: str) -> str:
    """Which of alike's steps went through the server (as `alike server status` counted them)."""
    by = {}
    for r in results:
        if r["tool"] == A and "served" in r:
            by.setdefault(r["step"], set()).add(r["served"])
    if not by:
        return ""
    srv = [s for s in STEPS if by.get(s) == {True}]
    loc = [s for s in STEPS if by.get(s) == {False}]
    mixed = [s for s in STEPS if s in by and s not in srv and s not in loc]
    out = f"served by the server: {', '.join(srv) or 'none'}"
    if loc:
        out += f"; ran locally (this alike's server does not run them yet): {', '.join(loc)}"
    if mixed:
        out += f"; in some runs only, or not known: {', '.join(mixed)}"
    return out


def report(med: dict, meta: dict, results: list) -> str:
    A = alike_label(med)
    images = corpus_images(meta)
    present = [s for s in STEPS if any(k[1] == s for k in med)]
    titles = step_titles(present, images)
    s3_letters = ", ".join(titles[s][1] for s in S3_STEPS if s in titles)
    L = []
    L.append(f"# alike vs restic vs borg\n")
    L.append(f"- command: `{meta['command']}`")
    L.append(f"- date: {meta['date']}, host: {meta['host']} ({meta['cpus']} CPUs), runs: {meta['runs']} (medians)")
    L.append(f"- corpus: {meta['corpus']['describe']}")
    L.append(f"- versions: {meta['versions']}")
    L.append("- alike: block size %s, zstd 3, joined to a running local Ray head (`ray start --head "
             "--num-cpus=%d`), as a deployed cluster runs; `alike (cold)` = the same command starting its own "
             "Ray (no cluster running). Python modules load from their bytecode cache (`$PYTHONDONTWRITEBYTECODE` "
             "unset), as an installed program's do." % (meta["block_size"], meta.get("ray_cpus", meta["cpus"])))
    if A == "alike (server)":
        L.append("- **alike (server)**: every alike command run with `$ALIKE_SERVER` set to an `alike server` "
                 "started per run on that Ray head (`alike server start --socket WORK/alike.sock --address HEAD`, "
                 "untimed, like the head; stopped after alike's steps); a command the server does not run, runs "
                 "locally. " + served_note(results, A) + ".")
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
        L.append("- **S3 steps** (%s): against a real S3 HTTP server on 127.0.0.1 started by the bench (moto %s "
                 "server mode, objects in memory, one server process per run, on the same 2 cores as the tools). "
                 "(e) alike: `alike vault --store LOCAL --to s3://BUCKET/alike-RUN --endpoint URL` (target created "
                 "by the command); restic: `restic init --repository-version 2 --copy-chunker-params` of "
                 "`s3:URL/BUCKET/restic-RUN` + `restic copy --from-repo LOCAL` (all snapshots; seconds = both "
                 "commands). (f) alike: `alike restore --store s3://... vm1 --to FILE`; restic: `restic restore "
                 "latest --path IMAGE --target DIR` on the S3 repository; both checked with `cmp`. borg has no S3 "
                 "backend: no borg rows. In (e) **MB/s** = bytes uploaded (the object bytes under the tool's S3 "
                 "prefix after the step, = **stored**) / seconds, so each tool's MB/s counts its own bytes and the "
                 "speed ratio is the seconds ratio of the same job (copy 3 versions offsite); in (f) MB/s is on the "
                 "logical image size, as in (d). **stored** in (e, f) = the S3 copy."
                 % (s3_letters, meta.get("moto", "?")))
    L.append("")
    tools = [t for t in [A, "alike (cold)", "restic", "borg", "floor"] if any(k[0] == t for k in med)]
    for st in present:
        L.append(f"## {titles[st]}\n")
        L.append("| tool | seconds | MB/s | stored | added | alike/peer speed | alike/peer stored |")
        L.append("|---|---:|---:|---:|---:|---:|---:|")
        L += step_rows(med, st, tools, A, present)
        L.append("")
    L.append("## Targets\n")
    L.append(FLOOR_TEXT + "\n")
    L.append("| target | measured | ok | at the floor | the floor's own run |")
    L.append("|---|---:|:---:|---:|---:|")

    def ratio(st, peer):
        a, p = med.get((A, st)), med.get((peer, st))
        return a["mb_s"] / p["mb_s"] if a and p else None

    # (step, peer, at least, issues that set it): the core issue's, and issue 15's 2 GiB targets
    for st, peer, need, why in [("first", "borg", 2, " (also issue 15's 2 GiB target)"), ("first", "restic", 3, ""),
                                ("day2", "borg", 2, " (also issue 15's 2 GiB target)"), ("restore", "borg", 2, "")]:
        r = ratio(st, peer)
        if r is not None:
            fl = [floor_bound(x) for x in results if x["tool"] == "floor" and x["step"] == st]
            flo, own = "-", "-"
            if fl and med.get((peer, st)):
                f = med[(peer, st)]["seconds"] / statistics.median(fl)
                flo = f"{f:.2f}x" + (" (out of reach)" if f < need else "")
                own = f"{med[(peer, st)]['seconds'] / floor_work(results, st):.2f}x"
            L.append(f"| {st}: alike >= {need}x {peer} throughput{why} | {r:.2f}x | {'yes' if r >= need else 'NO'} "
                     f"| {flo} | {own} |")
    a, r = med.get((A, "day2")), med.get(("restic", "day2"))
    if a and r:
        q = a["stored_bytes"] / r["stored_bytes"]
        n = len([s for s in ("first", "vm2", "day2") if s in present])
        L.append(f"| stored after {n} backups: alike <= restic | {fmt_bytes(a['stored_bytes'])} vs "
                 f"{fmt_bytes(r['stored_bytes'])} ({q:.2f}) | {'yes' if q <= 1 else 'NO'} | - | - |")
    L.append("")
    inner = own_seconds(results, (A, "alike (cold)"))
    if inner:
        L.append("alike's own `seconds` (inside the command, without process start and Ray connect), "
                 "medians: " + "; ".join(inner) + "\n")
    L.append("Per-run seconds: " + "; ".join(
        f"{t}/{s}: {', '.join(f'{x:.1f}' for x in m['all_seconds'])}" for (t, s), m in sorted(med.items())))
    return "\n".join(L) + "\n"


def own_seconds(results: list, labels) -> list:
    inner = []
    for t in labels:
        for st in STEPS:
            xs = [r["alike"].get("seconds") for r in results if r["tool"] == t and r["step"] == st
                  and isinstance(r.get("alike"), dict) and r["alike"].get("seconds") is not None]
            if xs:
                inner.append(f"{t}/{st} {statistics.median(xs):.2f} s")
    return inner


def limits_by_step(results: list, A: str, lim: dict) -> dict:
    """step -> [(run, limit seconds, alike seconds)] of alike's records."""
    out = {}
    for r in results:
        if r["tool"] == A:
            x = compute_limit(r, lim)
            if x is not None:
                out.setdefault(r["step"], []).append((r["run"], x, r["seconds"]))
    return out


def run_ratios(results: list, st: str, A: str, peer: str) -> list:
    """Peer seconds / alike seconds of each run that has both (a ratio from one run)."""
    a = {r["run"]: r["seconds"] for r in results if r["tool"] == A and r["step"] == st}
    p = {r["run"]: r["seconds"] for r in results if r["tool"] == peer and r["step"] == st}
    return [p[k] / a[k] for k in sorted(a) if k in p]


def report_large(med: dict, meta: dict, results: list, skipped: list) -> str:
    """The --large section of latest.md (between LARGE_BEGIN and LARGE_END)."""
    A = alike_label(med)
    images = corpus_images(meta)
    present = [s for s in STEPS if any(k[1] == s for k in med) or any(x["step"] == s for x in skipped)]
    titles = step_titles(present, images)
    lim = meta.get("limit") or {}
    c = meta["corpus"]
    L = [LARGE_BEGIN, "", "# the data path at the machine's limit (bench.py --large)", ""]
    L.append(f"- command: `{meta['command']}`")
    L.append(f"- date: {meta['date']}, host: {meta['host']} ({meta['cpus']} CPUs), runs: {meta['runs']} (medians); "
             f"versions: {meta['versions']}; whole run {meta.get('total_seconds', 0) / 60:.0f} min")
    L.append(f"- corpus: `{c.get('dir', '?')}`: {c['describe']} (vm1: GPT + ext4 holding real system trees of this "
             f"machine; vm1-day2: vm1 a day later, corpus.py's heavy day: packages installed, logs appended, "
             f"journal and dpkg status rewritten); no vm2. Day-later backup = a full re-read of the raw file "
             f"(`image:` source, no changed-block tracking) for every tool.")
    how = ("joined to a Ray head started per run (`ray start --head --num-cpus=%d`)" % meta.get("ray_cpus", 2))
    L.append(f"- alike: block size {meta['block_size']}, zstd 3, every command {how}, as a deployed cluster runs; "
             "Python modules load from their bytecode cache (`$PYTHONDONTWRITEBYTECODE` unset), as an installed program's do.")
    if A == "alike (server)":
        L.append("- **alike (server)**: every alike command run with `$ALIKE_SERVER` set to an `alike server` "
                 "started per run on that head (`alike server start --socket WORK/alike.sock --address HEAD`, "
                 "untimed, like the head; stopped after alike's steps); a command the server does not run, runs "
                 "locally. " + served_note(results, A) + ".")
    s3 = any(k[1] in S3_STEPS for k in med)
    L.append("- restic: repository v2, `--compression auto`, the image backed up as a file; `restic restore` "
             "(restic 0.14 writes no holes: its restored file takes the image's whole virtual size on disk). "
             "borg: `-e none`, `--chunker-params fixed,4194304 --compression zstd,3 --sparse`; `borg extract "
             "--sparse`." + (" S3 steps against moto's S3 server on 127.0.0.1 (moto %s, one per run; alike `vault`"
                            " / restic `init --copy-chunker-params` + `copy`; restore from the S3 copy), as in "
                            "bench.py's 2 GiB report; the local repository is removed before the restore from S3."
                            % meta.get("moto", "?") if s3 else "") +
             " Every restore checked with `cmp` against vm1-day2.raw, then removed; a restore that would leave "
             "less than %.1f GB free on the disk is skipped (and listed)." % (DISK_MARGIN / 1e9))
    L.append("- **seconds**: wall time of the whole command, median of runs; **MB/s**: the image's virtual size "
             "(%s) / seconds (in the vault step: the bytes uploaded / seconds); **stored**: the repository's "
             "`du -sb` after the step (S3 steps: its objects' bytes), **added**: its growth in the step; "
             "**alike/peer speed**: peer seconds / alike seconds (>1 = alike faster); **alike/peer stored**: "
             "alike's stored / the peer's." % fmt_bytes(c["size"]))
    if lim:
        L.append(f"- **compute limit**, measured at the start of this run on the same data: {lim['sample_blocks']:,} "
                 f"non-zero blocks of {lim['block_size'] // 1024} KiB of {lim['image']} ({lim['sample_bytes'] / 1e9:.2f} "
                 f"GB, spread evenly over its {lim['image_allocated_blocks']:,} allocated blocks found with "
                 f"SEEK_DATA/SEEK_HOLE; {lim['zero_blocks_skipped']} zero blocks among them left out, as alike "
                 f"leaves them), one block per call, single core, median of {lim['reps']}: **zstd -3 compress "
                 f"{lim['zstd_mb_s']:.0f} MB/s**, **zstd decompress {lim['unzstd_mb_s']:.0f} MB/s**, **keyed "
                 f"BLAKE3 {lim['blake3_mb_s']:.0f} MB/s** (MB/s of plaintext per second of the thread's CPU time, "
                 f"what one core does whatever shares the machine; by wall time {lim.get('zstd_wall_mb_s', 0):.0f}, "
                 f"{lim.get('unzstd_wall_mb_s', 0):.0f} and {lim.get('blake3_wall_mb_s', 0):.0f} MB/s, load average "
                 f"{lim.get('load_before', 0):.1f} before, {lim.get('load_after', 0):.1f} after; {lim['versions']}; "
                 f"the sample compresses {lim['zstd_ratio']:.2f}x). On N = {lim['cores']} cores (the Ray CPUs): a backup's "
                 f"limit = (hashed bytes / BLAKE3 + new bytes / zstd) / N, hashed = the image's allocated "
                 f"{lim['block_size'] // 1024} KiB blocks minus alike's `zero_blocks` (what alike hashes), new = "
                 f"`new_blocks` x block size (what it compresses); a restore's = (`written_bytes` / decompress + "
                 f"`written_bytes` / BLAKE3) / N (each block decompressed and its hash checked); the vault "
                 f"computes nothing of that (it copies stored blocks): no limit. **of limit** = limit seconds / "
                 f"alike's seconds (100% = alike's whole command as fast as its compute alone could be).")
    if meta.get("load"):
        L.append("- the machine during the run: " + common.LoadSampler.text(meta["load"]) + ".")
    if meta.get("note"):
        L.append(f"- {meta['note']}")
    L.append("")
    tools = [t for t in [A, "restic", "borg", "floor"] if any(k[0] == t for k in med)]
    lims = limits_by_step(results, A, lim)
    for st in present:
        L.append(f"## {titles[st]}\n")
        L.append("| tool | seconds | MB/s | stored | added | alike/peer speed | alike/peer stored | compute limit | "
                 "of limit |")
        L.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|")

        def extra(t, st=st):
            if t != A:
                return ["", ""]
            xs = lims.get(st)
            if not xs:
                return ["-", "-"]
            lm = statistics.median(x for _, x, _ in xs)
            return [f"{lm:.2f} s", f"{100 * lm / med[(A, st)]['seconds']:.0f}%"]

        L += step_rows(med, st, tools, A, present, extra)
        for x in skipped:
            if x["step"] == st:
                L.append(f"| {x['tool']} (run {x['run']}) | {x['reason']} | | | | | | | |")
        L.append("")
    L.append("## Targets (issue 15)\n")
    L.append("Measured: medians of the runs (the tables' figures); in brackets each run's own ratio (the tools "
             "measured in the same run).\n")
    L.append("**at the limit**: the ratio alike would reach at 100% of its compute limit (peer's median seconds / "
             "alike's median limit seconds): where it is below the target, the target is out of reach on this machine "
             "with this data, whatever the software does.\n")
    L.append(FLOOR_TEXT + " In the compute-limit rows, **at the floor** is the share of its compute limit a "
             "tool at that bound reaches (limit seconds / the bound), and **the floor's own run** the share the floor "
             "itself reached (limit seconds / its time from first read to last write).\n")
    L.append("| target | measured | ok | at the limit | at the floor | the floor's own run |")
    L.append("|---|---:|:---:|---:|---:|---:|")
    what = {"first": "first backup", "day2": "day-later backup (full re-read)", "restore": "restore to a file",
            "s3-restore": "restore from S3", "s3-vault": "vault to S3 (restic: its copy)"}
    for st, peer, need in LARGE_TARGETS:
        a, p = med.get((A, st)), med.get((peer, st))
        if not (a and p):
            L.append(f"| {what[st]}: alike >= {need:g}x {peer} | not measured | - | - | - |")
            continue
        r = p["seconds"] / a["seconds"]
        per = ", ".join(f"{x:.2f}" for x in run_ratios(results, st, A, peer))
        xs = lims.get(st)
        best = "-"
        if xs:
            b = p["seconds"] / statistics.median(x for _, x, _ in xs)
            best = f"{b:.2f}x" + (" (out of reach)" if b < need else "")
        fl = [floor_bound(r) for r in results if r["tool"] == "floor" and r["step"] == st]
        flo, own = "-", "-"
        if fl:
            f = p["seconds"] / statistics.median(fl)
            flo = f"{f:.2f}x" + (" (out of reach)" if f < need else "")
            own = f"{p['seconds'] / floor_work(results, st):.2f}x"
        L.append(f"| {what[st]}: alike >= {need:g}x {peer} | {r:.2f}x ({per}) | {'yes' if r >= need else 'NO'} | {best} "
                 f"| {flo} | {own} |")
    for st in present:
        xs = lims.get(st)
        if not xs:
            continue
        q = statistics.median(x for _, x, _ in xs) / med[(A, st)]["seconds"]
        per = ", ".join(f"{100 * x / sec:.0f}%" for _, x, sec in sorted(xs))
        fl = [floor_bound(r) for r in results if r["tool"] == "floor" and r["step"] == st]
        flo, own = "-", "-"
        if fl:  # the share of the compute limit that a tool at the floor's bound, and the floor, reach
            lm = statistics.median(x for _, x, _ in xs)
            f = lm / statistics.median(fl)
            flo = f"{100 * f:.0f}%" + (" (out of reach)" if f < LIMIT_TARGET else "")
            own = f"{100 * lm / floor_work(results, st):.0f}%"
        L.append(f"| {what.get(st, st)}: alike >= {100 * LIMIT_TARGET:.0f}% of its compute limit | {100 * q:.0f}% "
                 f"({per}) | {'yes' if q >= LIMIT_TARGET else 'NO'} | - | {flo} | {own} |")
    a, r = med.get((A, "day2")), med.get(("restic", "day2"))
    if a and r:
        q = a["stored_bytes"] / r["stored_bytes"]
        L.append(f"| stored after the day-later backup: alike <= restic | {fmt_bytes(a['stored_bytes'])} vs "
                 f"{fmt_bytes(r['stored_bytes'])} ({q:.2f}) | {'yes' if q <= 1 else 'NO'} | - | - | - |")
    L.append("")
    facts = []
    for st in ("first", "day2", "restore", "s3-restore"):
        rs = [r for r in results if r["tool"] == A and r["step"] == st and isinstance(r.get("alike"), dict)]
        if not rs:
            continue
        j = rs[0]["alike"]
        if st in ("first", "day2"):
            facts.append(f"{st}: read {fmt_bytes(j.get('read_bytes') or 0)}, {j.get('zero_blocks')} zero blocks, "
                         f"{j.get('new_blocks')} new blocks, {j.get('cache_hits')} munge-cache hits")
        else:
            facts.append(f"{st}: wrote {fmt_bytes(j.get('written_bytes') or 0)}")
    if facts:
        L.append("alike's data (run 1, its `--json`): " + "; ".join(facts) + ".\n")
    inner = own_seconds(results, (A,))
    if inner:
        L.append("alike's own `seconds` (inside the command, without process start and Ray connect), "
                 "medians: " + "; ".join(inner) + "\n")
    L.append("Per-run seconds: " + "; ".join(
        f"{t}/{s}: {', '.join(f'{x:.1f}' for x in m['all_seconds'])}" for (t, s), m in sorted(med.items())))
    L += ["", LARGE_END]
    return "\n".join(L) + "\n"


def write_latest(path: str, md: str) -> None:
    """Write latest.md, keeping the sections the other benches own (between their
    `<!-- NAME:begin -->` and `<!-- NAME:end -->` markers, e.g. `<!-- bench/cbt.py: begin -->`:
    cbt.py, xen_cbt.py, gc.py, restore_bench.py, `<!-- bench.py --large: begin -->`: this script's
    --large; any NAME is kept, in the order found)."""
    old = open(path).read() if os.path.exists(path) else ""
    marker = r"<!-- ([^\n]+?):? ?begin -->.*?<!-- \1:? ?end -->"  # NAME may hold spaces (bench.py --large)
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


def load_corpus(cdir: str) -> dict:
    """An already built corpus directory (its corpus.json and images), used as it is: never rebuilt."""
    cdir = os.path.abspath(cdir)
    meta_path = os.path.join(cdir, "corpus.json")
    if not os.path.exists(meta_path):
        raise SystemExit(f"--corpus {cdir}: no corpus.json (build one with corpus.build, or bench.py without --corpus)")
    meta = json.load(open(meta_path))
    missing = [f for f in meta["images"].values() if not os.path.exists(os.path.join(cdir, f))]
    if missing or "vm1" not in meta["images"] or "vm1-day2" not in meta["images"]:
        raise SystemExit(f"--corpus {cdir}: images missing ({', '.join(missing) or 'vm1/vm1-day2 not listed'})")
    log(f"corpus: using {cdir} as it is ({meta['describe']})")
    return meta


def command_line(argv) -> str:
    """The command as typed, with PYTHONPATH when it is set (what the code under test is)."""
    args = sys.argv[1:] if argv is None else list(argv)
    env = f"PYTHONPATH={os.environ['PYTHONPATH']} " if os.environ.get("PYTHONPATH") else ""
    return env + "python " + shlex.join([os.path.relpath(os.path.abspath(sys.argv[0]), os.path.dirname(HERE))
                                         if argv is None else "bench/bench.py"] + args)


def disk_need(images: dict, tools: list, s3: bool) -> int:
    """A rough peak of the run's disk use: the largest restore (restic writes no holes) beside a
    repository (~ half of the day-2 image's data, at most) and, with S3, moto's spooled copy."""
    day2 = images["vm1-day2"]
    alloc = os.stat(day2).st_blocks * 512
    restore = os.path.getsize(day2) if "restic" in tools else alloc
    return restore + alloc // 2 * (2 if s3 else 1)


FLOOR_TEXT = (
    "**at the floor**: the peer's median seconds / the median of the floor's bound, the least time any tool can "
    "take for the step on these cores and this disk, measured in the same runs by bench/floor.py: the larger of its "
    "CPU seconds / the Ray CPUs (the least work of the step: first = read + BLAKE3 + zstd -3 of each block not seen "
    "before + direct writes; day2 = the same on the day-later image, knowing the first step's blocks for free, so "
    "that only its new blocks are compressed and written; restore = read the floor's own first output + decompress "
    "+ BLAKE3 + direct writes; no index, no coordination) and, for day2, the seconds to only read the day-later "
    "image with direct I/O (the best of 2, 4 and 8 reads in flight): below the target, the target is out of reach "
    "on this machine, measured. **the floor's own run**: the same ratio on the floor's own time from its first read "
    "to its last write (not a bound: what the least work took, reads and writes overlapped by threads).")


S3_GET_THREADS = (4, 8)


def s3_get_floor(s3: "S3Server", bucket: str, prefix: str, vm: str) -> dict:
    """The S3 server's share of a restore of vm's latest version from s3://bucket/prefix: the
    ranges of the packs that the version's blocks are in (planned as alike's restore plans them,
    untimed), only fetched with ranged GETs and thrown away, the best of S3_GET_THREADS requests
    in flight. No restore from that server can take less than fetching its bytes."""
    from concurrent.futures import ThreadPoolExecutor
    from unittest import mock

    import numpy as np

    from pipelines.index import LocalIndex
    from pipelines.restore import _spans, plan, resolve_version
    from storage.backend import store_spec
    from storage.pack import pack_key
    from storage.store import Store

    with mock.patch.dict(os.environ, S3_ENV):  # the S3 server's keys, for this process only while planning
        spec = store_spec(f"s3://{bucket}/{prefix}", s3.endpoint, None)
        store = Store.open(spec)
        _, rows = plan(store, LocalIndex(spec), vm, resolve_version(store, vm, None))
        key = store.backend._k
    packs = [rows["pack"].astype(str), rows["off"].astype(np.int64), rows["len"].astype(np.int64)]
    if "dlen" in rows:  # patched blocks: their deltas too
        m = rows["dlen"] > 0
        packs = [np.concatenate([packs[0], rows["dpack"][m].astype(str)]),
                 np.concatenate([packs[1], rows["doff"][m].astype(np.int64)]),
                 np.concatenate([packs[2], rows["dlen"][m].astype(np.int64)])]
    uniq = sorted(set(zip(*(a.tolist() for a in packs))))
    pk = [u[0] for u in uniq]
    spans = [(pk[i], start, end) for i, _, start, end in
             _spans(pk, np.array([u[1] for u in uniq]), np.array([u[2] for u in uniq]))]
    client = s3.client()

    def get(span):
        p, start, end = span
        body = client.get_object(Bucket=bucket, Key=key(pack_key(p)), Range=f"bytes={start}-{end - 1}")["Body"]
        return len(body.read())

    best = None
    for threads in S3_GET_THREADS:
        t0 = time.monotonic()
        with ThreadPoolExecutor(threads) as pool:
            got = sum(pool.map(get, spans))
        dt = time.monotonic() - t0
        if best is None or dt < best["s3_get_seconds"]:
            best = dict(s3_get_seconds=round(dt, 3), s3_get_threads=threads)
    best.update(s3_get_bytes=got, s3_get_requests=len(spans), block_bytes=int(sum(u[2] for u in uniq)))
    return best


def add_s3_floor(results: list, run_no: int, got: dict, logical_bytes: int) -> None:
    """The floor of s3-restore in this run: the restore floor's work (its CPU seconds: the same
    blocks decompressed, hashed and written), with the S3 server's fetch time (s3_get_floor)."""
    rest = [r for r in results if r["tool"] == "floor" and r["step"] == "restore" and r["run"] == run_no]
    f = dict(rest[0]["floor"]) if rest else dict(cpu_seconds=0.0, procs=1)
    f.pop("disk_seconds", None)
    f.update(got)
    sec = max(got["s3_get_seconds"], f.get("work_seconds") or 0.0)
    f["work_seconds"] = sec
    results.append(dict(run=run_no, tool="floor", step="s3-restore", seconds=sec, logical_bytes=logical_bytes,
                        basis_bytes=logical_bytes, stored_bytes=0, floor=f, mb_s=round(logical_bytes / 1e6 / sec, 1)))
    log(f"run {run_no} floor        s3-restore {sec:8.2f} s (the S3 server's GETs of the version's pack ranges: "
        f"{got['s3_get_seconds']:.2f} s for {got['s3_get_bytes'] / 1e9:.2f} GB in {got['s3_get_requests']} requests, "
        f"{got['s3_get_threads']} in flight)")


def floor_work(results: list, step: str) -> float:
    """The median of the floor's own seconds for `step`, from first read to last write."""
    return statistics.median(r["floor"].get("work_seconds") or r["seconds"] for r in results
                             if r["tool"] == "floor" and r["step"] == step)


def floor_bound(rec: dict) -> float:
    """The least seconds any tool can take for a step, from its floor's record (bench/floor.py in
    the same run): its CPU seconds over the cores (the work cannot take fewer), and for a full
    re-read the disk's time to only read the image (it cannot be read faster): the larger."""
    f = rec["floor"]
    return max(f["cpu_seconds"] / f["procs"], f.get("disk_seconds") or 0.0, f.get("s3_get_seconds") or 0.0)


def _own_alike_first() -> None:
    """`alike` is the script pip installed beside this interpreter, not a wrapper found first on
    $PATH (pyenv's shims add ~0.2 s to every command, which a user's installed `alike` does not
    pay; borg and restic are run as /usr/bin's)."""
    here = os.path.dirname(sys.executable)
    if os.path.exists(os.path.join(here, "alike")):
        os.environ["PATH"] = here + os.pathsep + os.environ.get("PATH", "")
    # and its Python modules load from their bytecode cache, as an installed program's do (pip
    # compiles them at install, Debian's borg ships its .pyc): with $PYTHONDONTWRITEBYTECODE set
    # (this machine's default) every alike command compiled its modules again, ~25 ms each
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=lambda v: parse_size(v) // (1 << 20) * (1 << 20), default=None,
                    help="virtual size of each VM image (default 2G, with --large 16G; ~60%% is filled with files)")
    ap.add_argument("--large", action="store_true",
                    help="issue 15's run: a 16 GiB vm1 + vm1-day2 corpus (WORK/corpus-large, or --corpus), steps "
                         "first/day2/restore/s3-vault/s3-restore, the compute limit measured first; results in "
                         "RESULTS/large.json and a section of RESULTS/latest.md")
    ap.add_argument("--corpus", metavar="DIR",
                    help="an already built corpus directory (corpus.json, vm1.raw, vm1-day2.raw[, vm2.raw]), used "
                         "as it is and never rebuilt (default: built or reused under WORK)")
    ap.add_argument("--runs", type=int, default=3, help="repetitions; medians are reported (default 3)")
    ap.add_argument("--tools", default=",".join(TOOLS), help="comma list of alike,restic,borg (default all)")
    ap.add_argument("--work", default=os.path.join(HERE, "work"), help="work dir (default bench/work)")
    ap.add_argument("--results", default=os.path.join(HERE, "results"), help="where latest.md/.json go")
    ap.add_argument("--block-size", default="512K", help="alike store block size (default 512K)")
    ap.add_argument("--ray-cpus", type=int, default=2, help="CPUs of the Ray head alike joins (default 2)")
    ap.add_argument("--server", action="store_true",
                    help="run alike's commands through an `alike server` (started per run on the run's Ray head "
                         "at WORK/alike.sock, $ALIKE_SERVER set for every alike command; a command the server "
                         "does not run yet runs locally); the rows say `alike (server)`")
    ap.add_argument("--no-cold", action="store_true",
                    help="skip the cold alike row (own Ray per command); --large never has it")
    ap.add_argument("--no-drop-caches", action="store_true", help="keep the page cache between steps")
    ap.add_argument("--rebuild", action="store_true", help="rebuild the corpus even if one of this size exists")
    ap.add_argument("--corpus-only", action="store_true", help="build the corpus and stop")
    ap.add_argument("--s3", action=argparse.BooleanOptionalAction, default=True,
                    help="S3 steps (e) vault to S3 and (f) restore from S3, alike and restic, against a moto "
                         "S3 server on 127.0.0.1 started per run (default on; --no-s3 to skip)")
    ap.add_argument("--limit-sample", type=lambda v: parse_size(v), default=10 ** 9,
                    help="--large: bytes of vm1.raw's blocks the compute limit is measured on (default 1 GB)")
    ap.add_argument("--note", help="a sentence for the report (e.g. about a shared machine)")
    ap.add_argument("--keep", action="store_true", help="keep repositories under WORK/runs (S3 buckets go anyway)")
    ap.add_argument("--report-only", action="store_true",
                    help="rewrite RESULTS/latest.md from RESULTS/latest.json (with --large: its section from "
                         "RESULTS/large.json) (no runs)")
    a = ap.parse_args(argv)
    _own_alike_first()
    global RAY_TMP
    RAY_TMP = f"/tmp/alike-bench-ray.{os.getpid()}.d"
    md_path = os.path.join(a.results, "latest.md")
    js_path = os.path.join(a.results, "large.json" if a.large else "latest.json")
    if a.report_only:
        d = json.load(open(js_path))
        if a.note:
            d["meta"]["note"] = a.note
        if a.large:
            md = report_large(medians(d["results"]), d["meta"], d["results"], d.get("skipped", []))
            common.put_section(md_path, md, LARGE_BEGIN, LARGE_END)
        else:
            md = report(medians(d["results"]), d["meta"], d["results"])
            write_latest(md_path, md)
        print(md)
        return
    if os.geteuid() != 0:
        raise SystemExit("bench needs root: loop mounts to build the corpus, drop_caches between steps")
    for t in ("restic", "borg", "alike", "ray", "sfdisk", "mkfs.ext4", "losetup"):
        if not shutil.which(t):
            raise SystemExit(f"{t} not found on PATH")
    tools = [t.strip() for t in a.tools.split(",") if t.strip()]
    size = a.size or (LARGE_SIZE if a.large else parse_size("2G"))
    os.makedirs(a.work, exist_ok=True)
    t_start = time.time()
    if a.corpus:
        if a.rebuild:
            raise SystemExit("--rebuild does not go with --corpus: a corpus given is used as it is, never rebuilt")
        meta_c = load_corpus(a.corpus)
        cdir = os.path.abspath(a.corpus)
    elif a.large:
        # 16 GiB: WORK/corpus-large (the name issue 15 gives); another size (a test): a corpus of its own
        name = "corpus-large" if size == LARGE_SIZE else f"corpus-large-{size >> 20}M"
        meta_c = corpus.build(a.work, size, log=log, rebuild=a.rebuild, name=name, vm2=False)
        cdir = os.path.join(a.work, name)
    else:
        meta_c = corpus.build(a.work, size, log=log, rebuild=a.rebuild)
        cdir = os.path.join(a.work, "corpus")
    meta_c = dict(meta_c, dir=cdir)
    if a.corpus_only:
        return
    images = {k: os.path.join(cdir, v) for k, v in meta_c["images"].items()}
    logical = {k: os.path.getsize(p) for k, p in images.items()}
    all_steps = steps_of(images)
    local_steps = [s for s in all_steps if s not in S3_STEPS]
    need, free = disk_need(images, tools, a.s3), shutil.disk_usage(a.work).free
    log(f"disk: ~{need / 1e9:.1f} GB needed at the peak (a restore beside a repository{' and the S3 copy' if a.s3 else ''}),"
        f" {free / 1e9:.1f} GB free under {a.work}" + ("" if free > need else
                                                         ": a restore that does not fit is skipped (and reported)"))
    results: list = []
    skipped: list = []
    drop = not a.no_drop_caches
    if a.s3:
        import boto3  # noqa: F401  (fail early: the S3 steps need boto3 and moto's server mode)
        import moto.server  # noqa: F401
        os.environ.update(S3_ENV)  # dummy credentials for every tool, and for alike's Ray head/workers
        os.environ.pop("AWS_ENDPOINT_URL", None)
        os.environ.pop("AWS_PROFILE", None)
    os.environ.pop("ALIKE_SERVER", None)  # only --server's alike rows use a server
    bs = parse_size(a.block_size)
    limit = None
    if a.large:
        log(f"compute limit: sampling ~{a.limit_sample / 1e9:.2f} GB of {images['vm1']}'s allocated blocks")
        drop_caches(drop)
        # the allocated blocks as alike's steps see them, after a drop: ext4 reports an unwritten extent
        # (a range the loop device zeroed when the image was made) as a hole to SEEK_DATA unless its
        # pages are in the page cache, so they are counted before anything reads the images
        alloc = {k: allocated_blocks(p, bs) for k, p in images.items()}
        limit = codec_speeds(images["vm1"], bs, a.limit_sample, blocks=alloc["vm1"])
        limit.update(cores=a.ray_cpus, allocated_blocks={k: int(len(v)) for k, v in alloc.items()})
        log(f"compute limit: zstd -3 {limit['zstd_mb_s']:.0f} MB/s, decompress {limit['unzstd_mb_s']:.0f} MB/s, "
            f"keyed BLAKE3 {limit['blake3_mb_s']:.0f} MB/s (single core, CPU time; wall: "
            f"{limit['zstd_wall_mb_s']:.0f}, {limit['unzstd_wall_mb_s']:.0f}, {limit['blake3_wall_mb_s']:.0f}; "
            f"{limit['sample_blocks']} blocks, {limit['sample_bytes'] / 1e9:.2f} GB)")
    cold = not (a.no_cold or a.large)
    label = "alike (server)" if a.server else "alike"
    with common.LoadSampler() as load:
        for run_no in range(1, a.runs + 1):
            load.label = f"run {run_no}"
            order = tools[(run_no - 1) % len(tools):] + tools[:(run_no - 1) % len(tools)]  # rotate: spread noise
            if "alike" in tools:  # the floors (bench/floor.py), in this run, before the tools
                fls = floor.measure_steps(images["vm1"], a.ray_cpus, os.path.join(a.work, "runs", "floor-out"),
                                          day2=images.get("vm1-day2"),
                                          steps=[st for st in floor.STEPS if st in local_steps],
                                          before=lambda: drop_caches(drop), disk=True)
                for st, fl in fls.items():
                    lb = logical[STEP_IMAGE[st]]
                    results.append(dict(run=run_no, tool="floor", step=st, seconds=fl.pop("seconds"),
                                        logical_bytes=lb, basis_bytes=lb, stored_bytes=fl["stored_bytes"], floor=fl))
                    results[-1]["mb_s"] = round(lb / 1e6 / results[-1]["seconds"], 1)
                    log(f"run {run_no} floor        {st:8s} {results[-1]['seconds']:8.2f} s ({fl['work_seconds']:.2f} s "
                        f"from first read to last write, {fl['cpu_seconds']:.1f} s CPU on {fl['procs']} processes"
                        + (f"; the image only read: {fl['disk_seconds']:.2f} s" if fl.get("disk_seconds") else "") + ")")
            with (S3Server(os.path.join(a.work, "moto.log")) if a.s3 else contextlib.nullcontext()) as s3:
                for name in order:
                    steps = all_steps if (s3 and name in S3_TOOLS) else local_steps
                    t = None
                    try:
                        if name == "alike":
                            if cold:
                                t = Alike(a.work, images, run_no, None, a.block_size, tag="alike (cold)")
                                run_tool(t, ["first"], logical, drop, results, run_no)
                                t.cleanup()
                            with RayHead(a.ray_cpus) as head:
                                with (AlikeServer(os.path.join(os.path.abspath(a.work), "alike.sock"), head.address,
                                                  Alike.make_env(head.address))
                                      if a.server else contextlib.nullcontext()) as srv:
                                    t = Alike(a.work, images, run_no, head.address, a.block_size, tag=label,
                                              server=srv.sock if srv else None)
                                    if s3 and name in S3_TOOLS:
                                        t.use_s3(s3, run_no)
                                    run_tool(t, steps, logical, drop, results, run_no, a.keep, skipped)
                                    if getattr(t, "s3_floor", None):
                                        add_s3_floor(results, run_no, t.s3_floor, logical[STEP_IMAGE["s3-restore"]])
                        elif name == "restic":
                            t = Restic(a.work, images, run_no)
                            if s3 and name in S3_TOOLS:
                                t.use_s3(s3, run_no)
                            run_tool(t, steps, logical, drop, results, run_no, a.keep, skipped)
                        elif name == "borg":
                            t = Borg(a.work, images, run_no)
                            run_tool(t, steps, logical, drop, results, run_no, a.keep, skipped)
                        else:
                            raise SystemExit(f"unknown tool {name}")
                    finally:  # a failed step too: no repository or restored image of GBs left behind
                        if t is not None:
                            if not a.keep:
                                t.cleanup()
                            else:
                                shutil.rmtree(t.restore_dir, ignore_errors=True)
                                if t.bucket:
                                    t.s3.delete_bucket(t.bucket)  # the server's memory; it goes anyway
    med = medians(results)
    meta = dict(command=command_line(argv),
                date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), host=platform.node(),
                cpus=os.cpu_count(), ray_cpus=a.ray_cpus, runs=a.runs, block_size=a.block_size, corpus=meta_c,
                versions=versions(), total_seconds=round(time.time() - t_start, 1), load=load.summary(),
                server=a.server, large=a.large)
    if limit:
        meta["limit"] = limit
    if a.note:
        meta["note"] = a.note
    if a.s3:
        import importlib.metadata as imd
        meta["moto"] = imd.version("moto")
    os.makedirs(a.results, exist_ok=True)
    with open(js_path, "w") as f:  # first: the measurements are kept even if the report fails
        json.dump(dict(meta=meta, medians=[dict(tool=t, step=s, **m) for (t, s), m in sorted(med.items())],
                       results=results, skipped=skipped), f, indent=1)
    if a.large:
        md = report_large(med, meta, results, skipped)
        common.put_section(md_path, md, LARGE_BEGIN, LARGE_END)
    else:
        md = report(med, meta, results)
        write_latest(md_path, md)
    print(md)
    log(f"done in {meta['total_seconds']} s; wrote {js_path} and {md_path}")


if __name__ == "__main__":
    main()
