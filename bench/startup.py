#!/usr/bin/env python3
"""How long does a command take to start? Wall time and time to first read of small commands,
cold (the command starts its own Ray instance) and through a running `alike server`.

Each command runs as a new process (`python -m alike_ray.cli ...`, as a user types it) on a tiny
store (one 24 MiB ext4 disk image, one version, its vault copy), so that what is measured is the
start-up: process start, imports, Ray start or server round trip, and the first steps of the
command. Two figures per command, medians over --runs:

- wall: from just before the process is started until it has exited (what /usr/bin/time says);
- first read: from the same start until the first read of the command's data (the disk image for
  a backup, a pack of the store for restore, verify, files and repair), seen with fanotify (so
  this needs root), by a process other than the command's own and the server's main process for
  a backup (their probe of the image header is not the backup's first read).

    python bench/startup.py --runs 3                      # this checkout, cold and served
    python bench/startup.py --tree /path/to/other/checkout --label before
    python bench/startup.py --report-only                 # print the table of startup.json

Results go to bench/results/startup.json under --label (default: after); the table printed
shows every label kept there. Commands a tree does not serve (an older alike served only backup)
are marked n/a in the served column.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)
from common import LoadSampler  # noqa: E402

RESULTS = os.path.join(HERE, "results", "startup.json")
MiB = 1 << 20

# name -> (arguments, which files count as its data: "image" or "packs", exclude own pids)
COMMANDS = {
    "backup": (["backup", "--store", "{ads}", "image:{img}", "--name", "vm", "--json"], "image", True),
    "restore": (["restore", "--store", "{ads}", "vm", "--to", "{out}", "--force", "--json"], "packs", False),
    "verify": (["verify", "--store", "{ads}", "--json"], "packs", False),
    "vault": (["vault", "--store", "{ads}", "--to", "{ods}", "--json"], None, False),
    "gc": (["gc", "--store", "{ads}", "--dry-run", "--json"], None, False),
    "files": (["files", "--store", "{ads}", "vm", "ls", "/", "--json"], "packs", False),
    "repair": (["repair", "--store", "{ads}", "--from", "{ods}", "--dry-run", "--json"], "packs", False),
}


def log(*a):
    print(time.strftime("[%H:%M:%S]"), *a, file=sys.stderr, flush=True)


class FirstRead:
    """fanotify on a set of files: the time of the first read of any of them (FAN_ACCESS) since
    arm(), by a process whose pid is not in `exclude`."""

    def __init__(self):
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.fanotify_init(0, os.O_RDONLY)  # FAN_CLASS_NOTIF
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "fanotify_init (needs root)")
        self.lock = threading.Lock()
        self.first = None
        self.exclude: set[int] = set()
        threading.Thread(target=self._loop, daemon=True).start()

    def watch(self, paths) -> None:
        for p in paths:
            if self.libc.fanotify_mark(self.fd, 1, ctypes.c_uint64(1), -100, os.fsencode(p)) != 0:
                raise OSError(ctypes.get_errno(), f"fanotify_mark {p}")

    def arm(self, exclude=()) -> None:
        with self.lock:
            self.first, self.exclude = None, set(exclude)

    def _loop(self):
        while True:
            buf = os.read(self.fd, 65536)
            now = time.monotonic()
            i = 0
            while i + 24 <= len(buf):
                ln, _, _, _, _, efd, pid = struct.unpack_from("IBBHQii", buf, i)
                if efd >= 0:
                    os.close(efd)
                with self.lock:
                    if self.first is None and pid not in self.exclude:
                        self.first = now
                i += ln or 24


def alike(tree: str, args, env_extra=None, **kw):
    env = dict(os.environ, PYTHONPATH=tree, ALIKE_SERVER_AUTOSTART="0")
    for k in ("RAY_ADDRESS", "ALIKE_STORE", "ALIKE_SERVER"):  # (an older alike takes ALIKE_SERVER=off for a path)
        env.pop(k, None)
    env.update(env_extra or {})
    return subprocess.Popen([sys.executable, "-m", "alike_ray.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, **kw)


def run(tree, args, env_extra=None, check=True):
    p = alike(tree, args, env_extra)
    out, err = p.communicate(timeout=600)
    if check and p.returncode:
        raise SystemExit(f"alike {' '.join(args)} failed ({p.returncode}): {err}")
    return p.returncode, out, err


def routes(tree: str) -> bool:
    """Does this tree route commands to a server at the default socket (and know ALIKE_SERVER=off)?"""
    return "ALIKE_SERVER_AUTOSTART" in open(os.path.join(tree, "alike_ray", "server.py")).read()


def setup(tree: str, work: str) -> dict:
    sys.path.insert(0, ROOT)
    from tests import images

    src = images.tree(os.path.join(work, "tree"), 3 * MiB, [os.path.join(os.path.dirname(os.__file__), "json")])
    img = images.ext4_image(os.path.join(work, "vm.raw"), 24, src, "vm")
    paths = {"img": img, "ads": os.path.join(work, "ads"), "ods": os.path.join(work, "ods"),
             "out": os.path.join(work, "restored.raw"), "sock": os.path.join(work, "s.sock")}
    off = {"ALIKE_SERVER": "off"} if routes(tree) else {}
    run(tree, ["init", "--store", paths["ads"]])
    run(tree, ["backup", "--store", paths["ads"], f"image:{img}", "--name", "vm"], off)
    run(tree, ["vault", "--store", paths["ads"], "--to", paths["ods"]], off)
    return paths


def measure(tree, paths, name, served: bool, fr: FirstRead, server_pid: int | None) -> dict | None:
    args, data, own = COMMANDS[name]
    args = [a.format(**paths) for a in args]
    if served:
        args += ["--server", paths["sock"]]
    env = {} if served or not routes(tree) else {"ALIKE_SERVER": "off"}
    fr.arm()
    t0 = time.monotonic()
    p = alike(tree, args, env)
    if own:
        fr.arm(exclude={p.pid} | ({server_pid} if server_pid else set()))
    out, err = p.communicate(timeout=600)
    wall = time.monotonic() - t0
    first = fr.first
    if p.returncode:
        if served and p.returncode == 2 and ("does not run" in err or "unrecognized arguments: --server" in err):
            return None
        raise SystemExit(f"alike {' '.join(args)} failed ({p.returncode}): {err}")
    rec = {"wall": round(wall, 3), "first_read": round(first - t0, 3) if data and first else None}
    try:
        js = json.loads(out)
        for k in ("wall_seconds", "startup_seconds", "seconds"):
            if k in js:
                rec[k] = js[k]
    except ValueError:
        pass
    return rec


def med(xs):
    xs = [x for x in xs if x is not None]
    return round(statistics.median(xs), 2) if xs else None


def bench(tree: str, runs: int) -> dict:
    work = tempfile.mkdtemp(prefix="alk-st-", dir="/tmp")  # short: a Unix socket path is < 108 bytes
    try:
        paths = setup(tree, work)
        fr = FirstRead()
        packs = [os.path.join(d, f) for s in ("ads",) for d, _, fs in os.walk(os.path.join(paths[s], "packs"))
                 for f in fs]
        fr.watch([paths["img"]] + packs)
        res = {name: {"cold": [], "served": []} for name in COMMANDS}
        with LoadSampler(every=5) as load:
            load.label = "cold"
            for r in range(runs):
                for name in COMMANDS:
                    res[name]["cold"].append(measure(tree, paths, name, False, fr, None))
                    log(f"cold {name} run {r + 1}: {res[name]['cold'][-1]}")
            load.label = "served"
            rc, out, err = run(tree, ["server", "start", "--socket", paths["sock"], "--json"])
            st = json.loads(out)
            try:
                for name in COMMANDS:  # one unmeasured run each: the server's first of a store warms it
                    measure(tree, paths, name, True, fr, st["pid"])
                for r in range(runs):
                    for name in COMMANDS:
                        res[name]["served"].append(measure(tree, paths, name, True, fr, st["pid"]))
                        log(f"served {name} run {r + 1}: {res[name]['served'][-1]}")
            finally:
                run(tree, ["server", "stop", "--socket", paths["sock"]], check=False)
        summary = {}
        for name, modes in res.items():
            summary[name] = {}
            for mode, recs in modes.items():
                recs = [x for x in recs if x is not None]
                summary[name][mode] = None if not recs else {
                    k: med([x.get(k) for x in recs]) for k in ("wall", "first_read", "startup_seconds")}
        return {"tree": tree, "runs": runs, "when": time.strftime("%Y-%m-%dT%H:%M:%S"), "load": load.summary(),
                "summary": summary, "raw": res}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def table(results: dict) -> str:
    lines = []
    for label, r in results.items():
        lines.append(f"\n{label}: {r['tree']} ({r['runs']} runs, {r['when']}; {LoadSampler.text(r.get('load'))})")
        lines.append(f"{'command':<10} {'cold wall':>10} {'cold 1st read':>14} {'served wall':>12} {'served 1st read':>16}")
        for name, m in r["summary"].items():
            def f(mode, k):
                v = (m.get(mode) or {}).get(k)
                return "n/a" if m.get(mode) is None else ("-" if v is None else f"{v:.2f} s")
            lines.append(f"{name:<10} {f('cold', 'wall'):>10} {f('cold', 'first_read'):>14} "
                         f"{f('served', 'wall'):>12} {f('served', 'first_read'):>16}")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--tree", default=ROOT, help="the alike source tree to measure (its PYTHONPATH)")
    ap.add_argument("--label", default="after")
    ap.add_argument("--report-only", action="store_true")
    a = ap.parse_args()
    results = json.load(open(RESULTS)) if os.path.exists(RESULTS) else {}
    if not a.report_only:
        results[a.label] = bench(os.path.abspath(a.tree), a.runs)
        os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
        with open(RESULTS + ".tmp", "w") as f:
            json.dump(results, f, indent=1)
        os.replace(RESULTS + ".tmp", RESULTS)
    print(table(results))


if __name__ == "__main__":
    main()
