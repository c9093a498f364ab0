#!/usr/bin/env python3
"""The floor of a first backup on this machine: the least work any backup of an image must do,
done with the least overhead, timed on the whole image.

    python bench/floor.py IMAGE [--step first|day2|restore] [--procs N] [--out DIR] [--json]

What it does: N processes (default 2, the bench's Ray CPUs), each its own share of the image's
allocated 64 MiB ranges (SEEK_DATA/SEEK_HOLE), read 4 MiB at a time with direct I/O; every
non-zero 512 KiB block is hashed with keyed BLAKE3 and compressed with zstd -3 (python
`zstandard` and `blake3`, the libraries alike calls: their work is C, one call per block), and
the compressed bytes are appended to 32 MiB files under DIR written with direct I/O and fsync.
No index, no dedup lookups, no manifests, no coordination between the processes.
--step day2 reads and hashes only (a full re-read whose blocks are all known already);
--step restore reads back what a first step wrote, decompresses and hashes every block, and
writes the image's blocks into a sparse file with direct I/O.

Why: bench.py --large's compute limit is a sum of single-core speeds measured on a sample. This
is the same work on all the data, with real reads and writes, on all the cores at once: a tool
that does what alike, borg or restic must do for a first backup cannot take less. A target ratio
above (peer seconds / floor seconds) measured in the same run is out of reach on the machine.
"""
from __future__ import annotations

import argparse
import json
import mmap
import multiprocessing as mp
import os
import queue
import shutil
import sys
import time

BS = 512 << 10
TASK = 64 << 20
PIECE = 4 << 20
PACK = 32 << 20
ALIGN = 4096


def extents(path: str) -> list[tuple[int, int]]:
    fd = os.open(path, os.O_RDONLY)
    try:
        size, out, off = os.fstat(fd).st_size, [], 0
        while off < size:
            try:
                d = os.lseek(fd, off, os.SEEK_DATA)
            except OSError:  # ENXIO: no data after off
                break
            h = min(os.lseek(fd, d, os.SEEK_HOLE), size)
            out.append((d, h))
            off = h
        return out
    finally:
        os.close(fd)


def pieces(path: str, k: int, n: int) -> list[tuple[int, int]]:
    """Process k's (offset, length) reads: whole blocks of the allocated ranges, 64 MiB ranges dealt
    round-robin over the n processes."""
    size = os.path.getsize(path)
    out = []
    for s, e in extents(path):
        s, e = s // BS * BS, min(-(-e // BS) * BS, size)
        for a in range(s, e, PIECE):
            if (a // TASK) % n == k:
                out.append((a, min(PIECE, e - a)))
    return out


def work(path: str, k: int, n: int, out: str, step: str, q) -> None:
    """One process's share of a step: "first" (read, BLAKE3, zstd -3, direct writes of 32 MiB
    files, and the list of what it stored, for "restore"), "day2" (read and BLAKE3 only: a full
    re-read whose blocks are all known)."""
    import blake3
    import numpy as np
    import zstandard

    direct = getattr(os, "O_DIRECT", 0)
    fd = os.open(path, os.O_RDONLY | direct)
    rbuf = mmap.mmap(-1, PIECE)
    rmv = memoryview(rbuf)
    wbuf = mmap.mmap(-1, PACK + (8 << 20))
    cctx = zstandard.ZstdCompressor(level=3)
    key = bytes(32)
    t0, c0 = time.perf_counter(), time.process_time()
    read = stored = files = pos = blocks = 0
    index = []  # (image offset, compressed length) of each stored block, in the files' order
    ends = []   # blocks stored up to the end of each file

    def flush():
        nonlocal pos, files
        m = -(-pos // ALIGN) * ALIGN
        wbuf[pos:m] = bytes(m - pos)
        name = os.path.join(out, f"{k}-{files}")
        wfd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | direct, 0o644)
        try:
            os.write(wfd, memoryview(wbuf)[:m])
            os.ftruncate(wfd, pos)
            os.fsync(wfd)
        finally:
            os.close(wfd)
        files += 1
        ends.append(len(index))
        pos = 0

    for a, ln in pieces(path, k, n):
        got = os.preadv(fd, [rmv[:-(-ln // ALIGN) * ALIGN]], a)
        got = min(got, ln)
        read += got
        for b in range(0, got, BS):
            blk = rmv[b:min(b + BS, got)]
            if not any(blk[:64]) and not blk.tobytes().strip(b"\0"):
                continue  # a zero block: nothing to hash or store
            blake3.blake3(blk, key=key).digest()
            blocks += 1
            if step == "day2":
                continue
            z = cctx.compress(blk)
            wbuf[pos:pos + len(z)] = z
            pos += len(z)
            stored += len(z)
            index.append((a + b, len(z)))
            if pos >= PACK:
                flush()
    if pos:
        flush()
    os.close(fd)
    if step == "first":
        np.save(os.path.join(out, f"{k}.index.npy"), np.array(index, np.int64).reshape(-1, 2))
        np.save(os.path.join(out, f"{k}.ends.npy"), np.array(ends, np.int64))
    q.put(dict(seconds=time.perf_counter() - t0, cpu=time.process_time() - c0, read=read, stored=stored,
               blocks=blocks, files=files))


def restore_work(target: str, k: int, out: str, q) -> None:
    """One process's share of a restore of what "first" stored: read its files, decompress every
    block, BLAKE3 it (a restore checks each block it writes), and write runs of consecutive
    blocks into the target file with direct I/O."""
    import blake3
    import numpy as np
    import zstandard

    direct = getattr(os, "O_DIRECT", 0)
    index = np.load(os.path.join(out, f"{k}.index.npy"))
    ends = np.load(os.path.join(out, f"{k}.ends.npy")).tolist()
    dctx = zstandard.ZstdDecompressor()
    key = bytes(32)
    tfd = os.open(target, os.O_WRONLY | direct)
    rbuf = mmap.mmap(-1, PACK + (8 << 20))
    wbuf = mmap.mmap(-1, PIECE + BS)
    t0, c0 = time.perf_counter(), time.process_time()
    written = read = 0
    run_at, wpos = -1, 0

    def put():
        nonlocal wpos, written
        if wpos:
            os.pwrite(tfd, memoryview(wbuf)[:-(-wpos // ALIGN) * ALIGN], run_at)
            written += wpos
        wpos = 0

    first = 0
    for f, end in enumerate(ends):
        name = os.path.join(out, f"{k}-{f}")
        size = os.path.getsize(name)
        rfd = os.open(name, os.O_RDONLY | direct)
        try:
            got = os.preadv(rfd, [memoryview(rbuf)[:-(-size // ALIGN) * ALIGN]], 0)
        finally:
            os.close(rfd)
        read += min(got, size)
        at = 0
        for off, ln in index[first:end].tolist():
            blk = dctx.decompress(rbuf[at:at + ln], max_output_size=BS)
            at += ln
            blake3.blake3(blk, key=key).digest()
            if wpos and (off != run_at + wpos or wpos + len(blk) > PIECE):
                put()
            if not wpos:
                run_at = off
            wbuf[wpos:wpos + len(blk)] = blk
            wpos += len(blk)
        first = end
    put()
    os.fsync(tfd)
    os.close(tfd)
    q.put(dict(seconds=time.perf_counter() - t0, cpu=time.process_time() - c0, read=read, stored=0,
               blocks=int(len(index)), files=len(ends), written=written))


STEPS = ("first", "day2", "restore")


def _run(ctx, target, argsets) -> tuple[float, list]:
    q = ctx.Queue()
    t0 = time.perf_counter()
    ps = [ctx.Process(target=target, args=(*a, q)) for a in argsets]
    for p in ps:
        p.start()
    rs = []
    while len(rs) < len(ps):
        try:
            rs.append(q.get(timeout=1))
        except queue.Empty:
            if any(p.exitcode not in (None, 0) for p in ps):
                for p in ps:
                    p.kill()
                raise SystemExit(f"floor: a process failed (exit codes {[p.exitcode for p in ps]})")
    for p in ps:
        p.join()
    return time.perf_counter() - t0, rs


def _result(wall: float, rs: list, procs: int, step: str) -> dict:
    r = dict(seconds=round(wall, 3), cpu_seconds=round(sum(x["cpu"] for x in rs), 3),
             read_bytes=sum(x["read"] for x in rs), stored_bytes=sum(x["stored"] for x in rs),
             blocks=sum(x["blocks"] for x in rs), procs=procs, step=step)
    if step == "restore":
        r["written_bytes"] = sum(x["written"] for x in rs)
    return r


def measure_steps(path: str, procs: int = 2, out: str | None = None, day2: str | None = None,
                  steps=STEPS, before=None) -> dict:
    """-> {step: result} for `steps` ("first" and "restore" on `path`, the restore restoring what
    that first step stored; "day2" on `day2`, default `path`); `before()` is called before each
    timed step (the bench drops the page cache there). Removes what it wrote."""
    out = out or os.path.join(os.path.dirname(os.path.abspath(path)), ".floor-out")
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    ctx = mp.get_context("spawn")
    res = {}
    try:
        if "first" in steps or "restore" in steps:
            if before:
                before()
            wall, rs = _run(ctx, work, [(path, k, procs, out, "first") for k in range(procs)])
            if "first" in steps:
                res["first"] = _result(wall, rs, procs, "first")
        if "restore" in steps:
            target = os.path.join(out, "restored.raw")
            with open(target, "wb") as f:
                f.truncate(os.path.getsize(path))
            os.sync()  # the files just written are on the disk, not only in its cache
            if before:
                before()
            wall, rs = _run(ctx, restore_work, [(target, k, out) for k in range(procs)])
            res["restore"] = _result(wall, rs, procs, "restore")
        if "day2" in steps:
            if before:
                before()
            wall, rs = _run(ctx, work, [(day2 or path, k, procs, out, "day2") for k in range(procs)])
            res["day2"] = _result(wall, rs, procs, "day2")
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return res


def measure(path: str, procs: int = 2, out: str | None = None, step: str = "first") -> dict:
    """-> {"seconds": wall, "cpu_seconds", "read_bytes", "stored_bytes", "blocks", "procs", "step"}
    of one step; removes what it wrote. "restore" first runs "first" (untimed) to have something
    to restore, then restores it into a sparse file of the image's size."""
    if step not in STEPS:
        raise ValueError(f"step {step!r}: one of {', '.join(STEPS)}")
    return measure_steps(path, procs, out, steps=(step,))[step]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("image")
    ap.add_argument("--procs", type=int, default=2, help="processes, one per core (default 2)")
    ap.add_argument("--out", help="where the compressed files go while it runs (default: next to IMAGE)")
    ap.add_argument("--step", choices=STEPS, default="first",
                    help="first: read, hash, compress, write; day2: read and hash (a full re-read of known "
                         "blocks); restore: read what 'first' wrote, decompress, hash, write the image (default first)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    r = measure(a.image, a.procs, a.out, a.step)
    if a.json:
        print(json.dumps(r))
    else:
        print(f"floor ({r['step']}): {r['seconds']:.2f} s wall, {r['cpu_seconds']:.2f} s CPU on {r['procs']} processes; read "
              f"{r['read_bytes'] / 1e9:.2f} GB, {r['blocks']} blocks, {r['stored_bytes'] / 1e9:.3f} GB compressed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
