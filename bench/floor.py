#!/usr/bin/env python3
"""The floor of a first backup on this machine: the least work any backup of an image must do,
done with the least overhead, timed on the whole image.

    python bench/floor.py IMAGE [--procs N] [--out DIR] [--json]

What it does: N processes (default 2, the bench's Ray CPUs), each its own share of the image's
allocated 64 MiB ranges (SEEK_DATA/SEEK_HOLE), read 4 MiB at a time with direct I/O; every
non-zero 512 KiB block is hashed with keyed BLAKE3 and compressed with zstd -3 (python
`zstandard` and `blake3`, the libraries alike calls: their work is C, one call per block), and
the compressed bytes are appended to 32 MiB files under DIR written with direct I/O and fsync.
No index, no dedup lookups, no manifests, no coordination between the processes.

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


def work(path: str, k: int, n: int, out: str, q) -> None:
    import blake3
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
            z = cctx.compress(blk)
            wbuf[pos:pos + len(z)] = z
            pos += len(z)
            stored += len(z)
            blocks += 1
            if pos >= PACK:
                flush()
    if pos:
        flush()
    os.close(fd)
    q.put(dict(seconds=time.perf_counter() - t0, cpu=time.process_time() - c0, read=read, stored=stored,
               blocks=blocks, files=files))


def measure(path: str, procs: int = 2, out: str | None = None) -> dict:
    """-> {"seconds": wall, "cpu_seconds", "read_bytes", "stored_bytes", "blocks", "procs"}; removes
    what it wrote."""
    out = out or os.path.join(os.path.dirname(os.path.abspath(path)), ".floor-out")
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    try:
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        t0 = time.perf_counter()
        ps = [ctx.Process(target=work, args=(path, k, procs, out, q)) for k in range(procs)]
        for p in ps:
            p.start()
        rs = [q.get() for _ in ps]
        for p in ps:
            p.join()
        wall = time.perf_counter() - t0
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return dict(seconds=round(wall, 3), cpu_seconds=round(sum(r["cpu"] for r in rs), 3),
                read_bytes=sum(r["read"] for r in rs), stored_bytes=sum(r["stored"] for r in rs),
                blocks=sum(r["blocks"] for r in rs), procs=procs)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("image")
    ap.add_argument("--procs", type=int, default=2, help="processes, one per core (default 2)")
    ap.add_argument("--out", help="where the compressed files go while it runs (default: next to IMAGE)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    r = measure(a.image, a.procs, a.out)
    if a.json:
        print(json.dumps(r))
    else:
        print(f"floor: {r['seconds']:.2f} s wall, {r['cpu_seconds']:.2f} s CPU on {r['procs']} processes; read "
              f"{r['read_bytes'] / 1e9:.2f} GB, {r['blocks']} blocks, {r['stored_bytes'] / 1e9:.3f} GB compressed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
