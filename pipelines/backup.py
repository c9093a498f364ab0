"""The backup DAG.

driver: run_backup() starts the index shard actors, then one SnapshotActor per VM (at most
`parallel` at once) and polls their progress.
SnapshotActor.run(): snapshots the VM through its source, loads the previous version's manifests
(the munge cache), fans out `munge_batch` read tasks over batches of blocks (bounded in flight
with ray.wait), gathers the manifests and the index entries of the packs they wrote, and
commits in the store's order: packs (written by the tasks) -> index segments -> manifests ->
version.json. It releases the snapshot and its index claims also when the backup fails.
munge_batch(): reads a batch, drops zero blocks, hashes, compares with the munge cache (an
unchanged block costs no lookup and no write), claims the rest at the index shards 16 MiB at a
time, and its packer thread compresses the blocks it claimed and writes them into packs on the
store itself, from whichever node it runs on, while the task reads and hashes on; it returns
the packs' index entries, never the data. The snapshot
actor's and the driver's work per block is a few array operations (no block bytes pass them),
so they do not limit how many nodes read and compress.
Sources are used only through their contract (alike_ray/sources/base.py, which states it):
this module never imports them and never asks what a source can do.
"""
from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
import traceback

import numpy as np
import ray

from storage import dio, patch
from storage.codec import is_zero
from storage.index import h32
from storage.errors import StoreError
from storage.locks import LockBusy, LockLost, claim_vms, release_vms, store_lock
from storage.pack import TARGET_PACK, PackBuilder
from storage.store import Store, new_version_id

from .faults import crash_point
from .index import FRESH, NEW, PENDING, IndexClient

TASK_BYTES = 64 * 1024 * 1024   # blocks per read task; its new blocks make a pack of their own
READ_BYTES = 4 * 1024 * 1024
# a read task claims its candidates at the index shards (and hands the claimed ones to its
# packer thread) each time this much of them has been hashed, and once after its first piece:
# one round trip per 16 MiB, and the compression starts after the first read instead of after
# the whole task's reads
CLAIM_BYTES = 16 * 1024 * 1024
# one packer thread per worker: two were slower on 2 cores (two compressions per core evict
# each other's tables from the cache: CPU 5.7 -> 6.1-7.0 s on 2 GiB)
# CPUs a read task asks for ($ALIKE_MUNGE_CPUS changes it). One: a task's reader threads keep
# its disk busy while it hashes (_Pieces), so it needs no second task on its core to hide the
# disk; and with two per core Ray starts a second worker process per CPU for every command and
# stops it again after (its idle-worker limit is one per CPU): measured on 2 GiB through a
# server, 0.5 took 8.9 s first / 4.2 s day-later against 6.1 s / 2.8 s with 1.
MUNGE_CPUS = float(os.environ.get("ALIKE_MUNGE_CPUS") or 1)
TASK_GRACE = 60.0  # seconds a failed run waits for its read tasks still going to end (_settle_tasks)
EMPTY = np.zeros(0, dtype="S32")


class BackupError(Exception):
    """A VM's backup failed; the message says why. Nothing partial was committed."""


# This worker's caches (here, _PACKERS, _WAITER; restore.py's _WBUF) are reached only through the
# module's functions and classes: a @ray.remote function is pickled by value (its module
# attribute is Ray's wrapper, not the function), so a list its body names directly would be a
# copy of its own, while the functions and classes it calls are the worker's imported ones.
_BUF = [np.zeros(0, np.uint8)]
_READERS: list = [None, 0]  # this worker's reader threads, and how many


def _reader_pool(n: int) -> ThreadPoolExecutor:
    """Threads that read a task's pieces ahead of its hashing (kept from task to task)."""
    if _READERS[1] != n:
        if _READERS[0] is not None:
            _READERS[0].shutdown(wait=True)
        _READERS[0], _READERS[1] = ThreadPoolExecutor(n, thread_name_prefix="alike-read"), n
    return _READERS[0]


class _Pieces:
    """Read `runs` of `disk` into consecutive slices of `whole`, in order: the first in the
    caller's thread (it opens the disk's descriptors), the rest, when the disk allows several
    reads at once (Disk.parallel_reads), by reader threads that keep that many reads in flight.
    Every read has ended (or been cancelled) once `close()` returns: the buffer is the worker's
    and the next task reuses it."""

    def __init__(self, disk, runs, block_size: int, whole: np.ndarray):
        self.disk = disk
        self.spans, at = [], 0
        for first, count in runs:
            off = first * block_size
            length = min(count * block_size, disk.size - off)
            self.spans.append((off, whole[at:at + length]))
            at += length
        depth = max(1, int(os.environ.get("ALIKE_READ_THREADS") or getattr(disk, "parallel_reads", 1)))
        self.pool = _reader_pool(depth) if depth > 1 and len(self.spans) > 1 else None
        self.futures = []

    def _read(self, k: int) -> int:
        off, buf = self.spans[k]
        return self.disk.read_into(buf, off)

    def __iter__(self):
        """-> (buffer, bytes read from disk) per run, in order."""
        for k in range(len(self.spans)):
            if self.pool is None or k == 0:
                n = self._read(k)
                if k == 0 and self.pool is not None:
                    self.futures = [self.pool.submit(self._read, j) for j in range(1, len(self.spans))]
            else:
                n = self.futures[k - 1].result()
            yield self.spans[k][1], n

    def close(self) -> None:
        for f in self.futures:
            f.cancel()
        for f in self.futures:
            if not f.cancelled():
                f.exception()  # waits; an error of a read nobody waits for is not raised again


def _task_buffer(n: int) -> np.ndarray:
    """This worker process's read buffer, at least n bytes, starting at a 4 KiB boundary (so
    that a source can read into it with direct I/O). Kept from task to task: a fresh buffer
    per read costs a page fault per 4 KiB, a quarter of a backup's kernel time. A source fills
    every byte it is asked for (Disk.read_into), so the buffer is never cleared."""
    if len(_BUF[0]) < n:
        _BUF[0] = dio.allocate(n)
    return _BUF[0][:n]


def _batches(todo: np.ndarray, per_task: int, cpus: int):
    """Split `todo` into read tasks of `per_task` blocks, smaller towards the end (down to a
    quarter) so that the cores finish together: the last tasks are spread over all of them
    instead of one core working through a whole task while the others wait."""
    i, n = 0, len(todo)
    while i < n:
        size = min(per_task, max(per_task // 4, -(-(n - i) // (2 * cpus))))
        yield todo[i:i + size]
        i += size


def _spread(todo: np.ndarray, per_task: int) -> np.ndarray:
    """`todo` reordered task by task so that consecutive tasks come from all over the disk (a
    stride of about n/phi through its n task-sized pieces; the last, short piece stays last).
    Why: a day's new data sits together (new files land in one free area), and read in disk
    order its tasks come one after another at the end, all compression and no reading, while
    the disk waits (measured on the 2 GiB day-later image: 5 of its 26 tasks held 80% of the new
    blocks, and the disk was idle for the last 0.6 s of a 1.6 s backup). Spread out, their
    compression overlaps the other tasks' reads. Within a task the reads stay in disk order."""
    n = len(todo) // per_task
    if n < 3:
        return todo
    k = max(1, round(n * 0.381966))
    while np.gcd(k, n) != 1:
        k += 1
    order = (np.arange(n) * k) % n
    parts = [todo[i * per_task:(i + 1) * per_task] for i in order]
    parts.append(todo[n * per_task:])
    return np.concatenate(parts)


def _runs(blocks: np.ndarray):
    """Split sorted block numbers into (first, count) runs of consecutive numbers."""
    if not len(blocks):
        return []
    cut = np.flatnonzero(np.diff(blocks) != 1) + 1
    starts = np.concatenate([[0], cut])
    ends = np.concatenate([cut, [len(blocks)]])
    return [(int(blocks[s]), int(e - s)) for s, e in zip(starts, ends)]


_PACKERS: list = [None]
_WAITER: list = [None]


def _off_main(fn):
    """`fn()` (a blocking `ray.get`) run in this worker's waiter thread while the caller waits
    for it. Why: a task blocked in `ray.get` on its main thread hands its CPU back to the raylet
    (Ray's guard against nested tasks deadlocking; WorkerContext::ShouldReleaseResourcesOnBlockingCalls
    holds only for the main thread), which then leases it to a queued read task: a worker
    process is started for it (~1 CPU-second of interpreter and imports on a loaded core), the
    claim's answer arrives 1-2 ms later, and the new worker idles until Ray's idle limit kills
    it. Measured on the 16 GiB first backup through a server: 1 to 8 such workers per backup,
    3-12% of the machine's CPU samples (perf). The shards are actors that need no CPU, so not
    giving the CPU back cannot deadlock."""
    if _WAITER[0] is None:
        _WAITER[0] = ThreadPoolExecutor(1, thread_name_prefix="alike-claim")
    return _WAITER[0].submit(fn).result()


class _Packer:
    """Compresses a read task's claimed blocks and writes them into packs, in one thread of the
    worker (kept from task to task), while the task's own thread reads and hashes the blocks
    after them: zstd and the pack writes leave the GIL, so the disk, the hashing and the
    compression all go on at once, as in bench/floor.py, instead of one after another.

    A pack is written as it fills, by a second thread (Store.pack_stream: on a directory store
    the file grows in 4 MiB direct writes while the next blocks are compressed), and committed
    to the index once whole and durable. Why: a 64 MiB task stores ~18 MB, one pack, and
    written in one go at the task's end the write and its fsync (12-28 ms) left the core idle
    after every task (2.3 s of the 16 GiB first backup's task time); now only the pack's last
    piece, its footer and the fsync are left then. The jobs run in the order they were given;
    after an error the later ones do nothing, and the task raises the first error. `finish` is
    called once every job has ended, `wait` before the task returns whatever happened."""

    def __init__(self, store, index):
        if _PACKERS[0] is None:
            _PACKERS[0] = (ThreadPoolExecutor(1, thread_name_prefix="alike-pack"),
                           ThreadPoolExecutor(1, thread_name_prefix="alike-pack-write"))
        self.pool, self.wpool = _PACKERS[0]
        self.store, self.codec, self.index = store, store.codec, index
        self.builder = PackBuilder()
        self.writes = []  # the write thread's jobs, in order
        self.streaming = []  # packs whose stream is open (written in part, not committed)
        self.written, self.new_blocks, self.stored_bytes, self.packs = [], 0, 0, 0
        self.t_encode = self.t_write = 0.0
        self.failed = False

    def add(self, items) -> None:
        """Compress `items` (hash, block) into the pack; hand what it added to the write thread."""
        if self.failed:
            return
        try:
            t0 = time.perf_counter()
            done = [(h, self.codec.encode_parts(buf)) for h, buf in items]
            self.t_encode += time.perf_counter() - t0
            for h, parts in done:
                self.builder.add_parts(h, parts)
                self.new_blocks += 1
                self.stored_bytes += len(parts[0]) + len(parts[1])
                if self.builder.size >= TARGET_PACK:
                    self._submit(self._write, self.builder, self.builder.take_parts(), True)
                    self.builder = PackBuilder()
            if len(self.builder):
                self._submit(self._write, self.builder, self.builder.take_parts(), False)
        except BaseException:
            self.failed = True
            raise

    def _submit(self, fn, *args) -> None:
        """At most two jobs wait for the disk: a third waits here for the oldest of them."""
        running = [w for w in self.writes if not w.done()]
        if len(running) >= 2:
            running[-2].result()
        self.writes.append(self.wpool.submit(fn, *args))

    def finish(self) -> None:
        """The last pack, once every block is in it; then every pack is written and committed
        (raises the first error of the writes)."""
        if not self.failed and len(self.builder):
            self._submit(self._write, self.builder, self.builder.take_parts(), True)
            self.builder = PackBuilder()
        for w in self.writes:
            w.result()

    def wait(self, abort: bool) -> None:
        """Every write has ended (errors are for finish to raise). With `abort` (after finish,
        or on an error) a pack left unfinished is removed (its stream aborted), never committed."""
        for w in self.writes:
            w.exception()
        if not abort:
            return
        for b in self.streaming:
            b.stream.abort()
            b.stream = None
        self.streaming = []

    def _write(self, builder: PackBuilder, parts: list, last: bool) -> None:
        """Write `parts` of the pack; with `last` its tail too, then commit it and its entries."""
        if self.failed:
            return
        try:
            t0 = time.perf_counter()
            if builder.stream is None:
                builder.stream = self.store.pack_stream(builder)
                self.streaming.append(builder)
            if not last:
                builder.stream.write(parts)
                self.t_write += time.perf_counter() - t0
                return
            builder.stream.write(parts + builder.tail_parts())
            builder.stream.commit()
            self.streaming.remove(builder)
            builder.stream = None
            crash_point("after-pack")
            e = builder.entries
            h = np.array([x[0] for x in e], dtype="S32")
            o = np.array([x[1] for x in e], dtype=np.uint64)
            l = np.array([x[2] for x in e], dtype=np.uint64)
            if self.index is not None:
                self.index.commit(h, builder.pack_id, o, l)  # now durable: other tasks and VMs of this run may use it
            crash_point("pack-committed")
            self.written.append((h, builder.pack_id, o, l))
            self.packs += 1
            self.t_write += time.perf_counter() - t0
        except BaseException:
            self.failed = True  # its stream, if open, is aborted by wait()
            raise


@ray.remote(max_retries=3, num_cpus=MUNGE_CPUS)
def munge_batch(store_url, disk, block_size: int, blocks: np.ndarray, prev: np.ndarray, index: IndexClient | None,
                owner: str, pbase: np.ndarray | None = None, pmask: np.ndarray | None = None):
    """Munge `blocks` of `disk`; `prev`: the previous version's hash of each (the munge cache).
    Where `pmask[i]` is set, block i is patched (storage/patch.py): only the granules of the mask
    are read, and stored as a delta over the whole block `pbase[i]`.
    The blocks the store lacks are claimed as `owner`, compressed, and written here into packs
    on the store, each pack then committed to the index shards: only their index entries go
    back to the snapshot actor, never the data."""
    crash_point("read-task")
    store = Store.open_cached(store_url)
    codec = store.codec
    t_start = time.perf_counter()
    t_read = t_hash = 0.0
    out_blocks, out_hashes, out_bases, out_deltas, out_grains = [], [], [], [], []
    cand_h, cand_buf, cand_patch = [], [], []   # blobs the store may lack
    read_bytes = zero = hits = patched = 0
    todo = np.arange(len(blocks))
    if pmask is not None:
        todo = np.flatnonzero(pmask == 0)
    runs = []
    for first, count in _runs(blocks[todo]):  # pieces of at most READ_BYTES
        step = max(1, READ_BYTES // block_size)
        runs += [(f, min(step, first + count - f)) for f in range(first, first + count, step)]
    pruns = []  # (position in blocks, [(offset, length)] of its granules)
    if pmask is not None:
        grain = patch.grain_size(block_size)
        for i in np.flatnonzero(pmask != 0):
            pruns.append((int(i), [(int(blocks[i]) * block_size + o, n) for o, n in patch.runs_of(pmask[i], grain)]))
    for first, count in runs:  # the disk reads ahead while we hash and compress
        disk.prefetch(first * block_size, min(count * block_size, disk.size - first * block_size))
    for _, pieces in pruns:
        for off, n in pieces:
            disk.prefetch(off, n)
    bi = -1  # position in `todo`
    whole = _task_buffer(sum(min(c * block_size, disk.size - f * block_size) for f, c in runs))
    reader = _Pieces(disk, runs, block_size, whole)
    packer = _Packer(store, index)
    jobs = []  # the packer thread's work, in order: compress the claimed blocks, write packs
    claimed = set()  # hashes this task claimed (it writes them): a repeat later in the task is not claimed again
    waits, freshes = [], []
    lookups, t_lookup = 0, 0.0

    pending = []  # the claim in flight: (hashes, their first positions, the candidates, its answers)

    def resolve():
        """Take the answers of the claim in flight and hand the blocks it claimed to the packer
        thread, which compresses and writes them while this thread reads and hashes on."""
        if not pending:
            return
        uniq, first_pos, hs, bufs, patches, answers = pending.pop()
        status = _off_main(answers)
        # a delta another VM of this run is writing too (clones given the same update): written
        # here as well, since the snapshot actor could not make it again from the disk
        own = np.array([patches[j] for j in first_pos], bool) & (status == PENDING)
        take = (status == NEW) | own
        waits.append(uniq[(status == PENDING) & ~own])
        freshes.append(uniq[status == FRESH])
        write = np.sort(first_pos[take])
        claimed.update(h32(h) for h in uniq[take])
        if len(write):
            jobs.append(packer.pool.submit(packer.add, [(hs[j], bufs[j]) for j in write]))

    def dispatch(wait: bool = False):
        """Send the claim of the candidates hashed so far; its answers are taken at the next
        dispatch (the round trip then overlaps the hashing in between), or now when `wait` is
        set or the packer thread has nothing to do yet (the task's first claim)."""
        nonlocal lookups, t_lookup
        t0 = time.perf_counter()
        resolve()  # first: a hash the claim in flight claimed is not claimed again below
        if cand_h:
            ch = np.array(cand_h, dtype="S32")
            uniq, first_pos = np.unique(ch, return_index=True)
            if claimed:
                again = np.array([h32(h) in claimed for h in uniq], bool)
                uniq, first_pos = uniq[~again], first_pos[~again]
            if len(uniq):
                lookups += len(uniq)
                if index is None:
                    answers = (lambda n=len(uniq): np.full(n, NEW, np.uint8))
                else:
                    answers = index.claim_async(uniq, owner)
                pending.append((uniq, first_pos, list(cand_h), list(cand_buf), list(cand_patch), answers))
            cand_h.clear()
            cand_buf.clear()
            cand_patch.clear()
        if wait or not jobs:
            resolve()
        t_lookup += time.perf_counter() - t0

    ok = False
    try:
        try:
            reads = iter(reader)
            for first, count in runs:
                t0 = time.perf_counter()
                buf, n = next(reads)
                read_bytes += n
                t1 = time.perf_counter()
                t_read += t1 - t0
                for k in range(count):
                    bi += 1
                    b = buf[k * block_size:(k + 1) * block_size]
                    if not len(b) or is_zero(b):
                        zero += 1
                        continue
                    h = codec.hash(b)
                    out_blocks.append(first + k)
                    out_hashes.append(h)
                    out_bases.append(b"")
                    out_deltas.append(b"")
                    out_grains.append(0)
                    if prev is not None and h32(prev[todo[bi]]) == h:
                        hits += 1
                        continue
                    cand_h.append(h)
                    cand_buf.append(b)
                    cand_patch.append(False)
                t_hash += time.perf_counter() - t1
                if len(cand_h) * block_size >= (CLAIM_BYTES if lookups else 1):
                    dispatch()  # the first piece's at once: the packer thread starts early
        finally:
            reader.close()
        for i, pieces in pruns:
            t0 = time.perf_counter()
            buf = np.zeros(sum(n for _, n in pieces), dtype=np.uint8)
            pos = 0
            for off, n in pieces:
                read_bytes += disk.read_into(buf[pos:pos + n], off)
                pos += n
            t1 = time.perf_counter()
            t_read += t1 - t0
            delta = patch.encode(grain, int(pmask[i]), buf)
            dh = codec.hash(delta)
            base = h32(pbase[i])
            h = patch.row_hash(codec, base, dh)
            out_blocks.append(int(blocks[i]))
            out_hashes.append(h)
            out_bases.append(base)
            out_deltas.append(dh)
            out_grains.append(int(pmask[i]))
            t_hash += time.perf_counter() - t1
            if prev is not None and h32(prev[i]) == h:
                hits += 1
                continue
            patched += 1
            cand_h.append(dh)
            cand_buf.append(delta)
            cand_patch.append(True)
        dispatch(wait=True)
        ok = True
    finally:
        # every job has ended before the task does: they read the worker's buffer, which the next task reuses
        for f in jobs:
            f.exception()
        packer.wait(abort=not ok)
    try:
        for f in jobs:
            f.result()  # the first error of the packer threads, if any
        packer.finish()  # the last pack, once every block is in it; every pack written
    finally:
        packer.wait(abort=True)
    written, new_blocks, stored_bytes, packs = packer.written, packer.new_blocks, packer.stored_bytes, packer.packs
    wait_h = np.unique(np.concatenate(waits)) if waits else EMPTY
    fresh_h = np.unique(np.concatenate(freshes)) if freshes else EMPTY
    logical = sum(min(c * block_size, disk.size - f * block_size) for f, c in runs) + len(pruns) * block_size
    return {
        "blocks": np.array(out_blocks, dtype=np.uint64),
        "hashes": np.array(out_hashes, dtype="S32") if out_hashes else EMPTY,
        "bases": np.array(out_bases, dtype="S32") if out_bases else EMPTY,
        "deltas": np.array(out_deltas, dtype="S32") if out_deltas else EMPTY,
        "grains": np.array(out_grains, dtype=np.uint64),
        "written": written,        # [(hashes, pack id, offsets, lengths)] of the packs this task wrote
        "wait": wait_h,            # hashes another owner was writing: located at commit
        "fresh": fresh_h,          # hashes in packs of this run: their entries are copied at commit
        "new_blocks": new_blocks,
        "stored_bytes": stored_bytes,
        "packs": packs,
        "read_bytes": read_bytes,
        "zero_blocks": zero,
        "cache_hits": hits,
        "patched_blocks": patched,
        "lookups": lookups,
        "node": ray.get_runtime_context().get_node_id(),
        "logical": int(logical),
        # seconds in this task, summed over tasks into the version's "task_seconds"
        "times": {"read": t_read, "hash": t_hash, "lookup": t_lookup, "compress": packer.t_encode, "write": packer.t_write,
                  "total": time.perf_counter() - t_start},
    }


@ray.remote(num_cpus=0, max_concurrency=4, max_restarts=0)
class SnapshotActor:
    def __init__(self, store_url: str | None = None, index: IndexClient | None = None, in_flight: int = 2,
                 lock_key: str | None = None):
        self.store = None
        if store_url is not None:
            self.reset(store_url, index, in_flight, lock_key)

    def reset(self, store_url: str, index: IndexClient, in_flight: int, lock_key: str | None = None) -> bool:
        """Ready for a backup (a new actor, or a warm one of `alike server` between backups):
        nothing of an earlier backup is kept."""
        self.store = Store.open(store_url)
        self.store_url = store_url
        self.lock_key = lock_key
        self.index = index
        self.in_flight = in_flight
        self.done = 0
        self.total = 0
        self.phases = []
        self.writer = None
        self.writes = []
        return True

    def warm(self) -> bool:
        """Nothing: lets `alike server` wait until this actor's process is up."""
        return True

    @property
    def phase(self) -> str:
        return self.phases[-1] if self.phases else "starting"

    @phase.setter
    def phase(self, name: str) -> None:
        self.phases.append(name)

    def progress(self) -> tuple[int, int, list[str]]:
        """-> (bytes done, bytes to do, every phase entered so far)."""
        return self.done, self.total, list(self.phases)

    def run(self, source, vm: str, version: str, full: bool = False, cbt: bool = True) -> dict:
        self.cbt = cbt
        self.owner = f"{vm}@{version}"
        self.pending = []
        self.read_nodes = set()
        self.tasks = 0
        t0 = time.monotonic()
        self.cpu0 = time.process_time()
        snap = None
        committed = False
        try:
            self.phase = "snapshot"
            snap = source.snapshot(vm)
            self.t_snapshot = round(time.monotonic() - t0, 3)
            crash_point("after-snapshot")
            meta = self._run(snap, vm, version, full, t0)
            committed = True
            return meta
        except StoreError:
            raise
        except BaseException as e:
            if getattr(e, "exit_code", None):
                raise
            detail = traceback.format_exc() if os.environ.get("ALIKE_DEBUG") else ""
            raise BackupError(f"backup of {vm} failed: {type(e).__name__}: {e}{detail}") from None
        finally:
            if self.writer is not None:
                self.writer.shutdown(wait=True)
            try:
                self.index.release(self.owner)
            finally:
                if snap is not None:  # the source keeps its previous CBT marker usable unless we committed
                    snap.release(failed=not committed)

    # -- the munge --------------------------------------------------------------------------
    def _previous(self, vm: str):
        """The newest version of `vm` whose metadata reads: the munge cache. A version pruned
        while we look is passed over."""
        for _, v in reversed(self.store.list_versions(vm)):
            try:
                return v, self.store.read_version(vm, v)
            except StoreError:
                continue
        return None

    def _run(self, snap, vm, version, full, t0) -> dict:
        store, bs, codec = self.store, self.store.block_size, self.store.codec
        prev = None if full else self._previous(vm)
        prev_disks = {d["name"]: d for d in prev[1]["disks"]} if prev else {}
        self.total = sum(
            sum(n for _, n in d.allocated_extents()) for d in snap.disks)
        stats = dict(read_bytes=0, zero_blocks=0, cache_hits=0, index_lookups=0, new_blocks=0,
                     stored_bytes=0, packs=0, cbt_skipped_blocks=0, patched_blocks=0)
        self.builder = PackBuilder()
        self.own = []   # (hashes, pack, offsets, lengths) written by this VM
        disks_meta = []
        manifests = []
        self.phase = "data acquisition"
        prev_list = prev[1]["disks"] if prev else []
        for dno, disk in enumerate(snap.disks):
            nblocks = (disk.size + bs - 1) // bs
            mask = np.zeros(nblocks, bool)
            for off, ln in disk.allocated_extents():
                if ln > 0:
                    mask[off // bs:(off + ln - 1) // bs + 1] = True
            prev_hash = np.zeros(nblocks, dtype="S32")
            prev_base = np.zeros(nblocks, dtype="S32")
            prev_delta = np.zeros(nblocks, dtype="S32")
            prev_grains = np.zeros(nblocks, dtype=np.uint64)
            # the same disk of the previous version: by name, else by position
            pd = prev_disks.get(disk.name) or (prev_list[dno] if dno < len(prev_list) else None)
            if pd is not None:
                try:
                    pm = store.read_manifest(vm, prev[0], pd)
                except StoreError:  # pruned meanwhile, or damaged: no munge cache for this disk
                    pd = None
                else:
                    keep = pm.blocks < nblocks
                    at = pm.blocks[keep].astype(np.int64)
                    prev_hash[at] = pm.hashes[keep]
                    prev_base[at], prev_delta[at], prev_grains[at] = pm.bases[keep], pm.deltas[keep], pm.grains[keep]
            crash_point("after-previous")
            blocks_out = [np.zeros(0, np.uint64)]
            hashes_out = [EMPTY]
            bases_out, deltas_out, grains_out = [EMPTY], [EMPTY], [np.zeros(0, np.uint64)]
            changed = None
            if prev is not None and pd is None:
                stats.setdefault("cbt_notes", []).append(f"disk {disk.name}: new since the previous version; read in full")
            if self.cbt and pd is not None and pd.get("cbt"):
                changed = disk.changed_extents(pd.get("cbt"))  # None: chain broken, read everything
                if changed is None:  # say why in the version and the job log
                    stats.setdefault("cbt_notes", []).append(disk.cbt_note or
                                                             f"disk {disk.name}: changed block tracking "
                                                             "unavailable; read in full")
            stats["cbt"] = stats.get("cbt", True) and changed is not None
            if changed is not None:
                cmask = np.zeros(nblocks, bool)
                for off, ln in changed:
                    if ln > 0:
                        cmask[off // bs:(off + ln - 1) // bs + 1] = True
                carry = mask & ~cmask & (prev_hash != b"")
                blocks_out.append(np.flatnonzero(carry).astype(np.uint64))
                hashes_out.append(prev_hash[carry])
                bases_out.append(prev_base[carry])
                deltas_out.append(prev_delta[carry])
                grains_out.append(prev_grains[carry])
                stats["cbt_skipped_blocks"] += int(carry.sum())
                self.done += int(carry.sum()) * bs
                mask &= cmask
            todo = np.flatnonzero(mask)
            pmask = self._patch_plan(disk, pd, changed, nblocks, prev_hash, prev_delta, prev_grains)
            pbase = np.where(prev_delta != b"", prev_base, prev_hash) if pmask is not None else None
            per_task = max(1, TASK_BYTES // bs)
            refs = []
            strategy = {}
            if disk.node_id:
                from .cluster import pin_here
                strategy = {"scheduling_strategy": pin_here(disk.node_id)}
            in_flight = max(2, int(self.in_flight / MUNGE_CPUS))
            try:
                for batch in _batches(_spread(todo, per_task), per_task, max(1, self.in_flight // 2)):
                    if len(refs) >= in_flight:
                        ready, refs = ray.wait(refs, num_returns=1)
                        self._absorb(ray.get(ready[0]), blocks_out, hashes_out, stats, bases_out, deltas_out,
                                     grains_out)
                    p = prev_hash[batch] if pd is not None else None
                    extra = (pbase[batch], pmask[batch]) if pmask is not None and pmask[batch].any() else ()
                    self.tasks += 1
                    refs.append(munge_batch.options(**strategy).remote(self.store_url, disk, bs, batch, p, self.index,
                                                                       f"{self.owner}/{self.tasks}", *extra))
                while refs:
                    ready, refs = ray.wait(refs, num_returns=1)
                    self._absorb(ray.get(ready[0]), blocks_out, hashes_out, stats, bases_out, deltas_out, grains_out)
            except BaseException:
                _settle_tasks(refs)
                raise
            manifests.append((np.concatenate(blocks_out), np.concatenate(hashes_out), np.concatenate(bases_out),
                              np.concatenate(deltas_out), np.concatenate(grains_out)))
            crash_point("disk-done")
            disks_meta.append({"name": disk.name, "size": disk.size, "cbt": disk.cbt_marker,
                               **({"role": disk.role} if disk.role != "disk" else {})})
        self._flush(stats, wait=True)
        t_data = time.monotonic()
        self.phase = "metadata commit"
        borrowed = self._settle(snap, manifests, stats)
        crash_point("after-settle")
        # commit order: packs (done) -> index segments -> manifests -> version.json
        crash_point("before-segments")
        entries = self.own + [borrowed]
        store.write_segments(
            np.concatenate([e[0] for e in entries]),
            [p for h, p, _, _ in self.own for _ in range(len(h))] + list(borrowed[1]),
            np.concatenate([e[2] for e in entries]),
            np.concatenate([e[3] for e in entries]))
        crash_point("before-manifests")
        for n, (blocks, hashes, bases, deltas, grains) in enumerate(manifests):
            disks_meta[n].update(store.write_manifest(vm, version, n, blocks, hashes, bases, deltas, grains))
            crash_point("manifest")
            disks_meta[n]["blocks"] = int(len(blocks))
        crash_point("before-version")
        logical = int(sum(d.size for d in snap.disks))
        seconds = time.monotonic() - t0
        # where the time went (the release of the snapshot comes after and is not counted)
        stats["phase_seconds"] = {"snapshot": self.t_snapshot, "data": round(t_data - t0 - self.t_snapshot, 3),
                                  "commit": round(time.monotonic() - t_data, 3)}
        meta = {
            "vm": vm, "version": version,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "source": snap.vm.id,
            "block_size": bs, "full": bool(full),
            "previous": prev[0] if prev else None,
            "disks": disks_meta,
            "logical_bytes": logical,
            **stats,
            "read_nodes": sorted(self.read_nodes),
            **({"notes": list(snap.vm.notes)} if snap.vm.notes else {}),  # warnings of the source
            **({"shape": dict(snap.vm.shape)} if snap.vm.shape else {}),  # for a restore into a hypervisor
            "seconds": round(seconds, 3),
            # CPU of the snapshot actor's process over this backup (the read tasks' is in task_seconds)
            "actor_cpu_seconds": round(time.process_time() - self.cpu0, 3),
        }
        if self.lock_key and not store.backend.exists(self.lock_key):
            raise LockLost("backup")  # a gc may have gone on without us: refuse to commit
        crash_point("before-commit")
        store.commit_version(vm, version, meta)
        crash_point("after-version")
        self.phase = "cleanup"
        return meta

    def _patch_plan(self, disk, pd, changed, nblocks, prev_hash, prev_delta, prev_grains):
        """-> u64 granule mask per block to patch (0: read the block whole), or None.

        A block is patched when changed block tracking says which of its granules were written
        since the previous version, the previous version has it (the base: that block, or its
        own base when it was patched itself), it is a whole block of a disk whose size did not
        change, and the union of its patched granules is at most half the block."""
        bs = self.store.block_size
        grain = patch.grain_size(bs)
        if changed is None or pd is None or bs // grain < 2 or int(pd.get("size", -1)) != disk.size:
            return None
        dirty = patch.grain_masks(changed, nblocks, bs)
        union = dirty | prev_grains
        ok = (dirty != 0) & (prev_hash != b"") & (patch.popcount(union) * 2 <= bs // grain)
        ok[disk.size // bs:] = False  # a last, partial block is read whole
        if not ok.any():
            return None
        return np.where(ok, union, np.uint64(0)).astype(np.uint64)

    def _absorb(self, r: dict, blocks_out, hashes_out, stats, bases_out, deltas_out, grains_out) -> None:
        crash_point("absorbed")
        blocks_out.append(r["blocks"])
        hashes_out.append(r["hashes"])
        bases_out.append(r["bases"])
        deltas_out.append(r["deltas"])
        grains_out.append(r["grains"])
        for k in ("read_bytes", "zero_blocks", "cache_hits", "patched_blocks", "new_blocks", "stored_bytes", "packs"):
            stats[k] += r[k]
        stats["index_lookups"] += r["lookups"]
        ts = stats.setdefault("task_seconds", {})
        for k, v in r.get("times", {}).items():
            ts[k] = round(ts.get(k, 0.0) + v, 3)
        self.done += r["logical"]
        self.read_nodes.add(r["node"])
        self.own.extend(r["written"])
        # written by another owner (or in a pack of this run): located at commit, and their
        # entries copied into this version's own segments
        self.pending.append(r["wait"])
        self.pending.append(r["fresh"])

    def _add(self, h: bytes, stored: bytes, stats) -> None:
        self.builder.add(h, stored)
        stats["new_blocks"] += 1
        stats["stored_bytes"] += len(stored)
        if self.builder.size >= TARGET_PACK:
            self._flush(stats)

    def _flush(self, stats, wait: bool = False) -> None:
        """Hand the current pack to the writer thread (at most two packs wait), so that
        absorbing task results goes on while a pack is written and fsync'd."""
        b = self.builder
        if len(b):
            self.builder = PackBuilder()
            if self.writer is None:
                self.writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pack-writer")
            self.writes.append(self.writer.submit(self._write_pack, b, stats))
        while self.writes and (wait or len(self.writes) > 2 or self.writes[0].done()):
            self.writes.pop(0).result()  # re-raises a failed write (disk full...) here

    def _write_pack(self, b: PackBuilder, stats) -> None:
        self.store.put_pack(b)
        crash_point("after-pack")
        stats["packs"] += 1
        h = np.array([e[0] for e in b.entries], dtype="S32")
        o = np.array([e[1] for e in b.entries], dtype=np.uint64)
        l = np.array([e[2] for e in b.entries], dtype=np.uint64)
        self.index.commit(h, b.pack_id, o, l)  # now durable: other VMs of this run may use it
        self.own.append((h, b.pack_id, o, l))

    def _settle(self, snap, manifests, stats):
        """Wait for blocks other VMs of this run were writing; write those they gave up on.
        -> (hashes, packs, offsets, lengths) to copy into this VM's own index segments, so that
        this version never depends on another VM's segments being committed."""
        pend = np.unique(np.concatenate(self.pending + [EMPTY]))
        # every read task has ended: a claim still held by one of them is a dead attempt's, and
        # what waited on it is written below
        self.index.release(self.owner)
        if not len(pend):
            return EMPTY, [], np.zeros(0, np.uint64), np.zeros(0, np.uint64)
        while True:
            found, packs, off, ln, pending = self.index.locate(pend)
            if not pending.any():
                break
            time.sleep(0.05)
        missing = pend[~found]
        if len(missing):
            self._rewrite(snap, manifests, missing, stats)
            found, packs, off, ln, _ = self.index.locate(pend)
        keep = found & ~np.isin(pend, np.concatenate([h for h, *_ in self.own] + [EMPTY]))
        return pend[keep], list(packs[keep]), off[keep], ln[keep]

    def _rewrite(self, snap, manifests, missing, stats):
        bs, codec = self.store.block_size, self.store.codec
        want = set(h32(h) for h in missing)
        for disk, (blocks, hashes, *_) in zip(snap.disks, manifests):
            for b, h in zip(blocks, hashes):
                h = h32(h)
                if h not in want:
                    continue
                want.discard(h)
                data = disk.read(int(b) * bs, min(bs, disk.size - int(b) * bs))
                if codec.hash(data) != h:
                    raise BackupError(f"disk {disk.name} changed during the backup (block {b}): retry")
                st = self.index.claim(np.array([h], dtype="S32"), self.owner)
                if st[0] == NEW:
                    self._add(h, codec.encode(data), stats)
        self._flush(stats, wait=True)


def _settle_tasks(refs: list, grace: float = TASK_GRACE) -> None:
    """A run that fails lets its read tasks still going end before it raises: each then aborts
    the pack it was streaming (removing its temporary file) and gives back what it claimed.
    Left running, they would be killed with this actor by the driver, mid-write, and their
    temporary files would stay on the store until a gc (a disk-full store would stay full: the
    next backup would fail too). They end soon: the failure they share (a full disk, a store
    gone) stops them at their next write; a task still going after `grace` seconds is cancelled.
    Their results are taken, so that Ray reports none of their errors."""
    if not refs:
        return
    try:
        _, late = ray.wait(refs, num_returns=len(refs), timeout=grace)
        for ref in late:
            ray.cancel(ref)
        if late:
            ray.wait(late, num_returns=len(late), timeout=grace)
        for ref in refs:
            try:
                ray.get(ref, timeout=0)
            except Exception:  # the error the run raises, or a later one of the same cause
                pass
    except Exception:
        pass


def _abandon(running: dict) -> None:
    """Stop the snapshot actors of runs this driver gives up (never reused), before the index
    shards go: left running, they would fail on the stopped shards, and Ray prints an error
    nobody retrieved ("Unhandled error ... ActorDiedError") after our one line. Their results
    are then taken, so that Ray reports none of them either."""
    for _, _, _, actor in running.values():
        try:
            ray.kill(actor)
        except Exception:  # already gone
            pass
    refs = list(running)
    if not refs:
        return
    try:
        ray.wait(refs, num_returns=len(refs), timeout=10)
        for ref in refs:
            try:
                ray.get(ref, timeout=0)
            except Exception:  # the ActorDiedError we caused, or what the run had already hit
                pass
    except Exception:
        pass


def _report_phases(on_vm, vm: str, prog, reported: dict) -> None:
    done, total, phases = prog
    for ph in phases[reported.get(vm, 0):]:
        on_vm(vm, ph, done, total)
    reported[vm] = len(phases)


def run_backup(store_url: str, jobs: list[tuple], parallel: int = 1, full: bool = False,
               index_actors: int | None = None, on_progress=None, node_id: str | None = None,
               on_vm=None, cbt: bool = True) -> list[dict]:
    """Back up each (source, vm name) of `jobs`, `parallel` VMs at once. `on_progress(done, total)`
    gets the bytes of all running VMs; `on_vm(vm, phase, done, total)` each VM's phase
    (snapshot, data acquisition, metadata commit, cleanup).
    -> one dict per job: the version's metadata, or {"vm":..., "error": message}."""
    from .cluster import cluster_cpus, pin_here
    from .service import current_pool

    store = Store.open(store_url)  # a clear error before any actor starts
    cpus = cluster_cpus()
    here = pin_here(node_id)
    # registered before the index and the previous versions are read (see storage/locks.py)
    lock = store_lock(store.backend, "writer", "backup")
    crash_point("backup-locked")
    claims = None
    try:
        # one backup of a VM at a time: a second one is refused before anything starts
        claims = claim_vms(store.backend, lock, [vm for _, vm in jobs])
        todo = [n for n, (_, vm) in enumerate(jobs) if vm in claims.claimed]
        done = _run_backup(store_url, [jobs[n] for n in todo], parallel, full, index_actors, on_progress, here,
                           on_vm, cbt, cpus, lock, current_pool()) if todo else []
        results = dict(zip(todo, done))
        for n, (_, vm) in enumerate(jobs):
            if n not in results:
                results[n] = {"vm": vm, "error": claims.busy[vm], "exit_code": LockBusy.exit_code}
                if on_vm:
                    on_vm(vm, "failed", 0, 0)
        return [results[n] for n in range(len(jobs))]
    finally:
        if claims is not None:
            release_vms(store.backend, lock, claims.claimed)
        lock.release()


def index_shards(cpus: int, asked: int | None = None) -> int:
    """How many index shard actors a backup starts on a cluster of `cpus` CPUs."""
    return asked or max(1, min(4, cpus // 2))


def _run_backup(store_url, jobs, parallel, full, index_actors, on_progress, here, on_vm, cbt, cpus, lock, pool=None):
    n_shards = index_shards(cpus, index_actors)
    if pool is not None:  # `alike server`: warm shards, reloaded now that we are registered
        index = pool.take_index(store_url, n_shards, here)
    else:  # the shards load while the snapshot actors start; their first call waits for them
        index = IndexClient.start(store_url, n_shards, here, wait=False)
    healthy = True
    results: dict[int, dict] = {}
    running: dict = {}
    reported: dict[str, int] = {}
    queue = list(enumerate(jobs))
    try:
        while queue or running:
            while queue and len(running) < max(1, parallel):
                n, (source, vm) = queue.pop(0)
                version = new_version_id()
                if pool is not None:
                    actor = pool.take_actor(here, store_url, index, 2 * cpus, lock.key)
                else:
                    actor = SnapshotActor.options(scheduling_strategy=here).remote(store_url, index, 2 * cpus,
                                                                                   lock.key)
                running[actor.run.remote(source, vm, version, full, cbt)] = (n, vm, version, actor)
                crash_point("backup-dispatched")
            ready, _ = ray.wait(list(running), num_returns=1, timeout=0.5)
            for ref in ready:
                n, vm, version, actor = running.pop(ref)
                alive = True
                try:
                    results[n] = ray.get(ref)
                except ray.exceptions.RayActorError:
                    alive = healthy = False  # the shards may have died with it: not reused either
                    index.release(f"{vm}@{version}")  # whoever waited on its blocks writes them
                    results[n] = {"vm": vm, "error": f"backup of {vm} failed: its worker died; nothing was committed"}
                except ray.exceptions.RayTaskError as e:
                    cause = e.cause if getattr(e, "cause", None) is not None else e
                    msg = getattr(cause, "message", None) or str(cause).split("\n")[0]
                    results[n] = {"vm": vm, "error": msg, "exit_code": getattr(cause, "exit_code", 1)}
                if on_vm:
                    try:
                        _report_phases(on_vm, vm, ray.get(actor.progress.remote(), timeout=5), reported)
                    except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                        pass
                    on_vm(vm, "failed" if "error" in results[n] else "done", 0, 0)
                if pool is not None and alive:
                    pool.give_actor(actor)
                else:
                    ray.kill(actor)
            if (on_progress or on_vm) and running:
                try:
                    prog = ray.get([r[3].progress.remote() for r in running.values()], timeout=5)
                    if on_progress:
                        on_progress(sum(p[0] for p in prog), sum(p[1] for p in prog))
                    if on_vm:
                        for r, p in zip(running.values(), prog):
                            _report_phases(on_vm, r[1], p, reported)
                except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                    pass  # a dying actor: its run's result tells what happened
        crash_point("backup-result")
    except BaseException:  # Ctrl-C, or an error of our own: the runs still going are abandoned
        healthy = False
        _abandon(running)
        raise
    finally:
        if pool is not None:
            pool.give_index(store_url, n_shards, index, healthy)
        else:
            index.shutdown()
    return [results[n] for n in range(len(jobs))]
