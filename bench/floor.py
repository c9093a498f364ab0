#!/usr/bin/env python3
"""The floor of a backup step on this machine: the least work any tool must do for it, done
with the least overhead, timed on the whole image.

    python bench/floor.py IMAGE [--step first|day2|restore] [--day2 IMAGE2] [--procs N] [--out DIR] [--json]

What it does: N processes (default 2, the bench's Ray CPUs), each its own share of the image's
allocated 64 MiB ranges (SEEK_DATA/SEEK_HOLE), read 4 MiB at a time with direct I/O by two
threads per process (4 reads in flight on 2 processes, as alike's read tasks); every non-zero
512 KiB block is hashed with keyed BLAKE3 and, unless that process has seen its digest already,
compressed with zstd -3 (python `zstandard` and `blake3`, the libraries alike calls: their work
is C, one call per block), and the compressed bytes are appended to 32 MiB files under DIR
written with direct I/O and fsync. No index, no manifests, no coordination between the
processes: the dedup "index" is a set in each process's memory.
--step day2 does the same on the day-later image (--day2, default IMAGE itself) after an untimed
first step on IMAGE, and knows every block that step stored for free: only the day's new blocks
are compressed and written (a full re-read, as a backup without changed block tracking does).
--step restore reads back what a first step wrote (a thread reading ahead), decompresses and
hashes every block, and a thread writes the image's blocks into a sparse file with direct I/O.

Each result has two times: "seconds", from starting the processes to their end, and
"work_seconds", from the first read to the last fsync (no process start, no imports: what a
running server pays), and the CPU seconds of all processes.

Why: bench.py --large's compute limit is a sum of single-core speeds measured on a sample. This
is the same work on all the data, with real reads and writes, on all the cores at once: a tool
that does what alike, borg or restic must do for the step cannot use fewer CPU seconds, and the
floor's own wall time shows what the least work costs with the disk's reads and writes in it.
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


def tasks(path: str) -> list[list[tuple[int, int]]]:
    """The image's reads as tasks: the (offset, length) 4 MiB pieces of each 64 MiB range of
    whole blocks of its allocated extents, in the image's order. The processes take the next
    task as they are free (a shared counter), so none idles while another still has a backlog."""
    size = os.path.getsize(path)
    out: dict[int, list] = {}
    for s, e in extents(path):
        s, e = s // BS * BS, min(-(-e // BS) * BS, size)
        for a in range(s, e, PIECE):
            out.setdefault(a // TASK, []).append((a, min(PIECE, e - a)))
    return [out[t] for t in sorted(out)]


READERS = 2  # read threads per process: alike's default (ALIKE_READ_THREADS), 4 streams on 2 processes
DEPTH = 2    # buffers per read thread
DISK_THREADS = (2, 4, 8)  # the disk's read speed: the best of these numbers of reads in flight


def _known(out: str) -> set:
    """The BLAKE3 digests of every block the first step stored (all its processes): what a
    day-later backup finds in its index for free here."""
    import numpy as np

    known = set()
    for name in os.listdir(out):
        if name.endswith(".hashes.npy"):
            known.update(bytes(h) for h in np.load(os.path.join(out, name)))
    return known


def work(path: str, k: int, n: int, out: str, step: str, counter, q) -> None:
    """One process's share of a backup step. Two threads read ahead with direct I/O (DEPTH
    buffers each), each taking the next 64 MiB task of the image off `counter` (shared by the
    processes), while the process hashes every non-zero block with keyed BLAKE3; a block whose
    digest is already known (seen before in this process; for "day2" also every block the first
    step stored) is skipped, the others are compressed with zstd -3 and appended to 32 MiB files,
    which a thread writes with direct I/O and fsync while the next one fills. "first" also leaves
    the list of what it stored (for "restore") and the digests (for "day2")."""
    import threading

    import blake3
    import numpy as np
    import zstandard

    direct = getattr(os, "O_DIRECT", 0)
    fd = os.open(path, os.O_RDONLY | direct)
    todo = tasks(path)
    full: queue.Queue = queue.Queue()
    frees = []
    for _ in range(READERS):
        f = queue.Queue()
        for _ in range(DEPTH):
            f.put(mmap.mmap(-1, PIECE))
        frees.append(f)
    wfree: queue.Queue = queue.Queue()
    for _ in range(2):
        wfree.put(mmap.mmap(-1, PACK + (8 << 20)))
    wfull: queue.Queue = queue.Queue()
    werr: list = []
    wbuf = wfree.get()
    cctx = zstandard.ZstdCompressor(level=3)
    key = bytes(32)
    known = _known(out) if step == "day2" else set()
    digests = []
    read = stored = files = pos = blocks = 0
    index = []  # (image offset, compressed length) of each stored block, in the files' order
    ends = []   # blocks stored up to the end of each file

    def reader(j: int) -> None:
        try:
            while True:
                with counter.get_lock():
                    t = counter.value
                    counter.value += 1
                if t >= len(todo):
                    break
                for a, ln in todo[t]:
                    buf = frees[j].get()
                    got = os.preadv(fd, [memoryview(buf)[:-(-ln // ALIGN) * ALIGN]], a)
                    full.put((a, min(got, ln), buf, j))
        except BaseException as e:  # the main loop raises it
            full.put(e)
        full.put(None)

    def writer() -> None:
        while True:
            item = wfull.get()
            if item is None:
                return
            buf, n, name = item
            try:
                m = -(-n // ALIGN) * ALIGN
                buf[n:m] = bytes(m - n)
                wfd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | direct, 0o644)
                try:
                    os.write(wfd, memoryview(buf)[:m])
                    os.ftruncate(wfd, n)
                    os.fsync(wfd)
                finally:
                    os.close(wfd)
            except BaseException as e:
                werr.append(e)
            wfree.put(buf)

    def flush():
        nonlocal pos, files, wbuf
        wfull.put((wbuf, pos, os.path.join(out, f"{step}-{k}-{files}")))
        files += 1
        ends.append(len(index))
        pos = 0
        wbuf = wfree.get()
        if werr:
            raise werr[0]

    t0, c0 = time.monotonic(), time.process_time()
    threads = [threading.Thread(target=reader, args=(j,), daemon=True) for j in range(READERS)]
    wthread = threading.Thread(target=writer, daemon=True)
    for t in threads + [wthread]:
        t.start()
    done = 0
    while done < READERS:
        item = full.get()
        if item is None:
            done += 1
            continue
        if isinstance(item, BaseException):
            raise item
        a, got, buf, j = item
        rmv = blk = memoryview(buf)
        read += got
        for b in range(0, got, BS):
            blk = rmv[b:min(b + BS, got)]
            if not any(blk[:64]) and not blk.tobytes().strip(b"\0"):
                continue  # a zero block: nothing to hash or store
            h = blake3.blake3(blk, key=key).digest()
            blocks += 1
            if h in known:
                continue
            known.add(h)
            z = cctx.compress(blk)
            wbuf[pos:pos + len(z)] = z
            pos += len(z)
            stored += len(z)
            index.append((a + b, len(z)))
            digests.append(h)
            if pos >= PACK:
                flush()
        del rmv, blk
        frees[j].put(buf)
    if pos:
        flush()
    wfull.put(None)
    wthread.join()
    if werr:
        raise werr[0]
    t1 = time.monotonic()
    os.close(fd)
    if step == "first":
        np.save(os.path.join(out, f"{k}.index.npy"), np.array(index, np.int64).reshape(-1, 2))
        np.save(os.path.join(out, f"{k}.ends.npy"), np.array(ends, np.int64))
        np.save(os.path.join(out, f"{k}.hashes.npy"),
                np.frombuffer(b"".join(digests), np.uint8).reshape(-1, 32))
    q.put(dict(seconds=t1 - t0, start=t0, end=t1, cpu=time.process_time() - c0, read=read, stored=stored,
               blocks=blocks, files=files, new_blocks=len(index)))


def restore_work(target: str, k: int, out: str, q) -> None:
    """One process's share of a restore of what "first" stored: a thread reads its files ahead
    (direct I/O), the process decompresses every block and BLAKE3-hashes it (a restore checks
    each block it writes), and a thread writes runs of consecutive blocks into the target file
    with direct I/O."""
    import threading

    import blake3
    import numpy as np
    import zstandard

    direct = getattr(os, "O_DIRECT", 0)
    index = np.load(os.path.join(out, f"{k}.index.npy"))
    ends = np.load(os.path.join(out, f"{k}.ends.npy")).tolist()
    dctx = zstandard.ZstdDecompressor()
    key = bytes(32)
    tfd = os.open(target, os.O_WRONLY | direct)
    rfree, rfull, wfree, wfull = queue.Queue(), queue.Queue(), queue.Queue(), queue.Queue()
    for _ in range(DEPTH):
        rfree.put(mmap.mmap(-1, PACK + (8 << 20)))
    for _ in range(DEPTH + 1):
        wfree.put(mmap.mmap(-1, PIECE + BS))
    written = read = 0

    def reader() -> None:
        try:
            for f in range(len(ends)):
                name = os.path.join(out, f"first-{k}-{f}")
                size = os.path.getsize(name)
                buf = rfree.get()
                rfd = os.open(name, os.O_RDONLY | direct)
                try:
                    got = os.preadv(rfd, [memoryview(buf)[:-(-size // ALIGN) * ALIGN]], 0)
                finally:
                    os.close(rfd)
                rfull.put((buf, min(got, size)))
        except BaseException as e:
            rfull.put(e)

    def writer() -> None:
        nonlocal written
        try:
            while True:
                item = wfull.get()
                if item is None:
                    return
                buf, at, n = item
                os.pwrite(tfd, memoryview(buf)[:-(-n // ALIGN) * ALIGN], at)
                written += n
                wfree.put(buf)
        except BaseException as e:
            wfree.put(e)

    t0, c0 = time.monotonic(), time.process_time()
    threads = [threading.Thread(target=reader, daemon=True), threading.Thread(target=writer, daemon=True)]
    for t in threads:
        t.start()

    def take(qq):
        item = qq.get()
        if isinstance(item, BaseException):
            raise item
        return item

    wbuf, run_at, wpos = take(wfree), -1, 0
    first = 0
    for end in ends:
        rbuf, got = take(rfull)
        read += got
        at = 0
        for off, ln in index[first:end].tolist():
            blk = dctx.decompress(rbuf[at:at + ln], max_output_size=BS)
            at += ln
            blake3.blake3(blk, key=key).digest()
            if wpos and (off != run_at + wpos or wpos + len(blk) > PIECE):
                wfull.put((wbuf, run_at, wpos))
                wbuf, wpos = take(wfree), 0
            if not wpos:
                run_at = off
            wbuf[wpos:wpos + len(blk)] = blk
            wpos += len(blk)
        rfree.put(rbuf)
        first = end
    if wpos:
        wfull.put((wbuf, run_at, wpos))
    wfull.put(None)
    threads[1].join()
    for x in list(wfree.queue):  # a failure of the last writes
        if isinstance(x, BaseException):
            raise x
    os.fsync(tfd)
    t1 = time.monotonic()
    os.close(tfd)
    q.put(dict(seconds=t1 - t0, start=t0, end=t1, cpu=time.process_time() - c0, read=read, stored=0,
               blocks=int(len(index)), files=len(ends), written=written))


def disk_read(path: str, threads: int) -> float:
    """Seconds to read every allocated 4 MiB piece of `path` with direct I/O and nothing else,
    `threads` reads in flight: the disk's share of any backup that reads the whole image."""
    import threading

    todo = []
    for s, e in extents(path):
        for a in range(s // ALIGN * ALIGN, e, PIECE):
            todo.append((a, min(PIECE, e - a)))
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
    errors = []

    def rd(j: int) -> None:
        buf = mmap.mmap(-1, PIECE)
        try:
            for a, ln in todo[j::threads]:
                os.preadv(fd, [memoryview(buf)[:-(-ln // ALIGN) * ALIGN]], a)
        except OSError as e:
            errors.append(e)

    t0 = time.monotonic()
    ts = [threading.Thread(target=rd, args=(j,)) for j in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    dt = time.monotonic() - t0
    os.close(fd)
    if errors:
        raise errors[0]
    return dt


def disk_seconds(path: str, before=None) -> dict:
    """{"disk_seconds": the fastest of DISK_THREADS reads of the whole image, "disk_threads"}."""
    best = None
    for t in DISK_THREADS:
        if before:
            before()
        dt = disk_read(path, t)
        if best is None or dt < best[0]:
            best = (dt, t)
    return {"disk_seconds": round(best[0], 3), "disk_threads": best[1]}


STEPS = ("first", "day2", "restore")


def _run(ctx, target, argsets) -> tuple[float, list]:
    """Run `target(*args, q)` in a process per argument set; an argument None is a task counter
    shared by them all."""
    q = ctx.Queue()
    counter = ctx.Value("i", 0)
    argsets = [tuple(counter if x is None else x for x in a) for a in argsets]
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
             work_seconds=round(max(x["end"] for x in rs) - min(x["start"] for x in rs), 3),
             new_blocks=sum(x.get("new_blocks", x["blocks"]) for x in rs),
             read_bytes=sum(x["read"] for x in rs), stored_bytes=sum(x["stored"] for x in rs),
             blocks=sum(x["blocks"] for x in rs), procs=procs, step=step)
    if step == "restore":
        r["written_bytes"] = sum(x["written"] for x in rs)
    return r


def measure_steps(path: str, procs: int = 2, out: str | None = None, day2: str | None = None,
                  steps=STEPS, before=None, disk: bool = False) -> dict:
    """-> {step: result} for `steps` ("first" and "restore" on `path`, the restore restoring what
    that first step stored; "day2" on `day2`, default `path`, against the blocks the first step
    stored; the first step runs, untimed, for the others when it is not asked for); `before()` is
    called before each timed step (the bench drops the page cache there). Removes what it wrote.
    A result's "seconds" is the wall time of its processes' start to their end; "work_seconds"
    is from the first process's first read to the last one's last fsync (process start and
    imports left out, as a running server leaves them out). With `disk`, the day2 result also has
    "disk_seconds": the day-later image only read, with nothing else done (disk_seconds())."""
    out = out or os.path.join(os.path.dirname(os.path.abspath(path)), ".floor-out")
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    ctx = mp.get_context("spawn")
    res = {}
    try:
        if steps:  # "restore" restores what it stored, "day2" knows its blocks
            if before:
                before()
            wall, rs = _run(ctx, work, [(path, k, procs, out, "first", None) for k in range(procs)])
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
            wall, rs = _run(ctx, work, [(day2 or path, k, procs, out, "day2", None) for k in range(procs)])
            res["day2"] = _result(wall, rs, procs, "day2")
            if disk:  # a full re-read cannot take less than reading the image
                res["day2"].update(disk_seconds(day2 or path, before))
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return res


def measure(path: str, procs: int = 2, out: str | None = None, step: str = "first", day2: str | None = None) -> dict:
    """-> {"seconds": wall, "work_seconds", "cpu_seconds", "read_bytes", "stored_bytes", "blocks",
    "new_blocks", "procs", "step"}
    of one step; removes what it wrote. "restore" first runs "first" (untimed) to have something
    to restore, then restores it into a sparse file of the image's size."""
    if step not in STEPS:
        raise ValueError(f"step {step!r}: one of {', '.join(STEPS)}")
    return measure_steps(path, procs, out, day2=day2, steps=(step,))[step]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("image")
    ap.add_argument("--procs", type=int, default=2, help="processes, one per core (default 2)")
    ap.add_argument("--out", help="where the compressed files go while it runs (default: next to IMAGE)")
    ap.add_argument("--step", choices=STEPS, default="first",
                    help="first: read, hash, compress, write; day2: the same for a day-later image, where "
                         "only blocks the first step did not store are compressed and written; restore: read what 'first' wrote, decompress, hash, write the image (default first)")
    ap.add_argument("--day2", help="the day-later image for --step day2 (default: IMAGE)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    r = measure(a.image, a.procs, a.out, a.step, day2=a.day2)
    if a.json:
        print(json.dumps(r))
    else:
        print(f"floor ({r['step']}): {r['seconds']:.2f} s wall ({r['work_seconds']:.2f} s from first read to last "
              f"write), {r['cpu_seconds']:.2f} s CPU on {r['procs']} processes; read "
              f"{r['read_bytes'] / 1e9:.2f} GB, {r['blocks']} blocks ({r['new_blocks']} new), {r['stored_bytes'] / 1e9:.3f} GB compressed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
