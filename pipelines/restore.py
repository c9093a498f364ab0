"""Restore: every version restores the same way, whatever its age.

The driver reads the manifests, locates each distinct block through the index shards and
sorts the work by pack and offset; `restore_batch` tasks read their ranges (coalescing
neighbours into one read), decode and re-hash every block (a damaged block stops the restore;
wrong data is never written) and write it at its place in a sparse file. Outputs are written
under a temporary name and renamed into place only when complete.
"""
from __future__ import annotations

import errno
import os
import time
import uuid

import numpy as np
import ray

from storage.errors import DamagedData, ObjectMissing, RestoreTargetFull, StoreError
from storage import dio, patch
from storage.index import h32
from storage.locks import store_lock
from storage.store import Store

from .faults import crash_point
from .index import IndexClient, LocalIndex

TASK_BYTES = 32 * 1024 * 1024


class RestoreError(StoreError):
    """{detail}"""


GAP = 1 << 20          # read through gaps up to this size rather than make another request
SPAN = 16 << 20        # at most this much per read
FIRST_SPAN = 1 << 20   # a task's first read: the decode starts after it, not after SPAN
# (on a backend whose requests cost more than their bytes, S3, the first read is as large as the
# backend asks: FETCHERS reads are in flight from the start, so the decode waits little anyway)
FETCHERS = 4           # reads in flight per task (S3 latency hides behind the others)
WRITE_RUN = 8 << 20    # consecutive blocks are written together, up to this much per write
# CPUs a restore task asks for ($ALIKE_RESTORE_CPUS changes it). One: a task's threads read
# ahead and write behind while it decodes, so a core needs no second task; and with two per
# core Ray starts a second worker process per CPU for every restore and stops it after (its
# idle-worker limit is one per CPU).
RESTORE_CPUS = float(os.environ.get("ALIKE_RESTORE_CPUS") or 1)
_WBUF = [np.zeros(0, np.uint8), np.zeros(0, np.uint8)]


def _write_buffer(n: int, slot: int = 0) -> np.ndarray:
    """One of this worker's two aligned write buffers, at least n bytes (kept from task to task):
    one is filled while the other is written."""
    if len(_WBUF[slot]) < n:
        _WBUF[slot] = dio.allocate(dio.round_up(max(n, WRITE_RUN + (4 << 20))))
    return _WBUF[slot]


def _open_direct(path: str):
    """An O_DIRECT descriptor on the restore target, or None (tmpfs and others refuse it, and
    $ALIKE_DIRECT_IO=0 turns it off)."""
    return dio.open_direct(path, os.O_WRONLY)


def _spans(packs, offs, lens, first: int = SPAN):
    """Group rows (sorted by pack, offset) into (first row, end row, start, end) reads: the
    first at most `first` bytes, each next one up to twice the one before, up to SPAN (a task
    decodes its first blocks while the bigger reads behind them are still on their way)."""
    out, i, n, limit = [], 0, len(offs), max(1, min(first, SPAN))
    while i < n:
        j, start, end = i + 1, int(offs[i]), int(offs[i] + lens[i])
        while j < n and packs[j] == packs[i] and int(offs[j]) - end <= GAP and int(offs[j] + lens[j]) - start <= limit:
            end = max(end, int(offs[j] + lens[j]))
            j += 1
        out.append((i, j, start, end))
        i = j
        limit = min(SPAN, limit * 2)
    return out


def _fetch_deltas(rows: dict, read, pool) -> dict:
    """The stored deltas of the patched rows, by row: read first, in few reads (the deltas of
    one backup lie next to each other in its packs)."""
    deltas = rows.get("delta")
    if deltas is None:
        return {}
    dk = np.flatnonzero(deltas != b"")
    order = np.lexsort((rows["doff"][dk], rows["dpack"][dk].astype(str)))
    dk = dk[order]
    dp, do, dl = rows["dpack"][dk], rows["doff"][dk], rows["dlen"][dk]

    def one(span):
        i, j, start, end = span
        data = read(dp[i], start, end)
        return [(int(dk[k]), data[int(do[k]) - start:int(do[k]) - start + int(dl[k])]) for k in range(i, j)]

    out = {}
    for part in pool.map(one, _spans(dp, do, dl)):
        out.update(part)
    return out


@ray.remote(max_retries=2, num_cpus=RESTORE_CPUS)
def restore_batch(store_url, paths: list[str], rows: dict) -> dict:
    """Write the blocks of `rows` (sorted by pack, offset) into the files `paths`: reads run a
    few at a time, each block is decoded and re-hashed before it is written, and a thread
    writes one run of blocks (direct I/O) while the next is decoded.
    -> {"written": bytes, "times": {seconds in this task: "wait" for reads, "decode", "write"}}"""
    from concurrent.futures import ThreadPoolExecutor

    crash_point("restore-task")
    t_start = time.perf_counter()
    times = {"wait": 0.0, "decode": 0.0, "write": 0.0}
    if not all(os.path.exists(p) for p in paths):  # the restore was given up: its files are gone
        return {"written": 0, "times": times}
    store = Store.open_cached(store_url)
    codec, bs = store.codec, store.block_size
    fds = {}
    written = 0
    packs, offs, lens, hashes, disks, blocks = (rows[k] for k in ("pack", "off", "len", "hash", "disk", "block"))
    deltas = rows.get("delta")

    def read(pack, start, end):
        try:
            return store.read_stored(pack, start, end - start)
        except ObjectMissing as e:
            raise DamagedData(f"pack {pack} is missing or truncated ({e.detail})") from None

    def fetch(span):
        i, j, start, end = span
        return span, read(packs[i], start, end)

    run = []  # consecutive blocks of one disk, written with one pwritev
    run_at = [0, 0, 0]  # disk, first block, bytes

    dfds = {}  # O_DIRECT descriptors: None where the file system refuses them
    refused = set()  # disks whose device refused an aligned direct write: buffered from then on
    writer = ThreadPoolExecutor(1)
    inflight = [None, None]  # the direct write of each of the two buffers
    slot = [0]

    def direct_write(disk, dfd, fd, buf, n, off):
        done = dio.pwrite_all(dfd, buf[:n], off)
        if done < n:  # alignment rules of another device: the rest, and what follows, buffered
            refused.add(disk)
            rest, at = memoryview(buf[done:n]), off + done
            while len(rest):
                k = os.pwrite(fd, rest, at)
                rest, at = rest[k:], at + k

    def wait(i):
        f, inflight[i] = inflight[i], None
        if f is not None:
            f.result()  # its OSError is this task's

    def put():
        nonlocal written
        if not run:
            return
        t0 = time.perf_counter()
        disk, first, n = run_at
        fd = fds.get(disk)
        if fd is None:
            fd = fds[disk] = os.open(paths[disk], os.O_WRONLY)
            dfds[disk] = _open_direct(paths[disk])
        off = first * bs
        dfd = dfds.get(disk)
        i = slot[0]
        direct = dfd is not None and not n % dio.ALIGN
        if direct:
            wait(i)  # that buffer's previous write is done (and known, if it was refused)
        if direct and disk not in refused:
            # a direct write from an aligned buffer: no page-cache copy, no write-back flood at
            # the end (buffered writes of a restore cost ~2 s of kernel CPU per GB here). Once a
            # write is refused, only the one in the other buffer may still try direct I/O.
            buf = _write_buffer(n, i)
            pos = 0
            for b in run:
                buf[pos:pos + len(b)] = np.frombuffer(b, np.uint8)
                pos += len(b)
            run.clear()
            inflight[i] = writer.submit(direct_write, disk, dfd, fd, buf, n, off)
            slot[0] = 1 - i
        while run:  # pwritev may write less than asked (a signal, a full disk raises instead)
            k = os.pwritev(fd, run, off)
            off += k
            while run and k >= len(run[0]):
                k -= len(run[0])
                run.pop(0)
            if run and k:
                run[0] = memoryview(run[0])[k:]
        written += n
        run_at[2] = 0
        times["write"] += time.perf_counter() - t0

    try:
        with ThreadPoolExecutor(FETCHERS) as pool:
            stored_deltas = _fetch_deltas(rows, read, pool)
            first = max(FIRST_SPAN, min(SPAN, getattr(store.backend, "min_request", 0)))
            spans = pool.map(fetch, _spans(packs, offs, lens, first))
            while True:
                t0 = time.perf_counter()
                try:
                    (i, j, start, end), data_span = next(spans)
                except StopIteration:
                    break
                t1 = time.perf_counter()
                times["wait"] += t1 - t0
                last_key, data = None, None
                data_span = memoryview(data_span)  # a block's bytes are decoded in place, not copied out first
                for k in range(i, j):
                    key = int(offs[k])
                    if key != last_key:  # rows of one block in several places follow each other
                        stored = data_span[key - start:key - start + int(lens[k])]
                        data = codec.decode(stored, h32(hashes[k]), where=f"in pack {packs[i]} at offset {key}")
                        last_key = key
                    block = data
                    if deltas is not None and deltas[k] != b"":  # a patched block: its base, then its delta
                        where = f"in pack {rows['dpack'][k]} at offset {int(rows['doff'][k])}"
                        block = patch.apply(data, codec.decode(stored_deltas[k], h32(deltas[k]), where=where), where)
                    disk, bno = int(disks[k]), int(blocks[k])
                    if not run or disk != run_at[0] or bno != run_at[1] + len(run) or run_at[2] >= WRITE_RUN \
                            or len(run) >= 512:
                        put()
                        run_at[0], run_at[1] = disk, bno
                    run.append(block)
                    run_at[2] += len(block)
                times["decode"] += time.perf_counter() - t1
            put()
            t0 = time.perf_counter()
            wait(0)
            wait(1)
            tail = time.perf_counter() - t0  # the last writes, after the decode loop
    except OSError as e:
        raise _target_error(e, paths[0]) from None
    finally:
        writer.shutdown(wait=True)  # no write of ours left running on a descriptor closed below
        for fd in list(fds.values()) + [d for d in dfds.values() if d is not None]:
            os.close(fd)
    times["decode"] -= times["write"]  # the writes happened inside the decode loop
    times["write"] += tail
    times["total"] = time.perf_counter() - t_start
    return {"written": written, "times": times}


def resolve_version(store: Store, vm: str, version: str | None) -> str:
    versions = [v for _, v in store.list_versions(vm)]
    if not versions:
        known = ", ".join(store.list_vms()) or "none"
        raise RestoreError(f"no VM named {vm!r} in {store.url} (VMs there: {known})")
    if version in (None, "", "latest"):
        return versions[-1]
    matches = [v for v in versions if v == version] or [v for v in versions if v.startswith(version)]
    if len(matches) != 1:
        raise RestoreError(
            f"{'no' if not matches else 'more than one'} version {version!r} of {vm}: "
            f"run `alike versions --store {store.url} --vm {vm}` to list them")
    return matches[0]


def plan(store: Store, index: IndexClient, vm: str, version: str, disks: list[int] | None = None):
    """Rows to restore, sorted by pack and offset; `disk` is the position in `disks`."""
    meta = store.read_version(vm, version)
    disks = list(range(len(meta["disks"]))) if disks is None else disks
    parts = []
    for pos, n in enumerate(disks):
        d = meta["disks"][n]
        try:
            m = store.read_manifest(vm, version, d)
        except ObjectMissing:  # version.json says it is there: the version is damaged
            raise DamagedData(f"the manifest of {vm}@{version} disk {d.get('name', n)} is missing "
                              "(restore it with `alike repair --from` the other store)") from None
        b, h, p = m.blocks, m.hashes, m.patched()
        # the blob read first: the block itself, or a patched block's base (then its delta)
        parts.append((np.full(len(b), pos, np.int32), b, np.where(p, m.bases, h), m.deltas))
    disks = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.int32)
    blocks = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.uint64)
    hashes = np.concatenate([p[2] for p in parts]) if parts else np.zeros(0, "S32")
    deltas = np.concatenate([p[3] for p in parts]) if parts else np.zeros(0, "S32")
    patched = deltas != b""
    uniq, inv = np.unique(np.concatenate([hashes, deltas[patched]]), return_inverse=True)
    found, packs, off, ln, _ = index.locate(uniq)
    if not found.all():
        missing = uniq[~found]
        damaged = index.damaged
        raise DamagedData(
            f"{len(missing)} block(s) of {vm}@{version} are not in the index "
            f"(first {missing[0].hex()[:16]})"
            + (f"; index segment(s) {', '.join(damaged[:3])} fail their check: `alike repair --from` the "
               "other store" if damaged else ""))
    n = len(hashes)
    rows = {"pack": packs[inv[:n]], "off": off[inv[:n]], "len": ln[inv[:n]], "hash": hashes, "disk": disks,
            "block": blocks}
    if patched.any():
        rows["delta"] = deltas
        di = np.zeros(n, np.int64)
        di[patched] = inv[n:]
        rows["dpack"] = np.where(patched, packs[di], "")
        rows["doff"] = np.where(patched, off[di], 0)
        rows["dlen"] = np.where(patched, ln[di], 0)
    order = np.lexsort((rows["off"], rows["pack"].astype(str)))
    return meta, {k: v[order] for k, v in rows.items()}


def _target_error(e: OSError, path: str) -> StoreError:
    """A restore target that cannot be written: one line naming it (no space: exit 4)."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return RestoreTargetFull(os.path.dirname(os.path.abspath(path)))
    return RestoreError(f"cannot write the restore target {path}: {e.strerror or e}")


def _abandon(refs: list) -> None:
    """Take the results of the write tasks of a restore that failed or was interrupted: the
    others fail the same way (a full disk), and Ray would print each error nobody retrieved
    ("Unhandled error") after our one line. Call it once the temporary files are gone: tasks
    that start then return at once (restore_batch), so the wait is at most the running batches.
    No ray.cancel: cancelling tasks while they complete trips a check in Ray 2.60's task manager
    ("Tried to complete task that was not pending") that kills the driver after our line."""
    if not refs:
        return
    try:
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=10)
        for r in ready:
            try:
                ray.get(r, timeout=0)
            except Exception:
                pass
    except Exception:
        pass


def data_bytes(store: Store, vm: str, version: str, disks: list[int]) -> list[int]:
    """-> the bytes each disk's blocks with data take in a sparse raw file (holes and zero
    blocks are never written): what a restore needs on the target's filesystem."""
    meta = store.read_version(vm, version)
    out = []
    for n in disks:
        d = meta["disks"][n]
        try:
            m = store.read_manifest(vm, version, d)
        except ObjectMissing:
            out.append(0)  # plan() says it is damaged, with the repair to run
            continue
        out.append(min(len(m.blocks) * store.block_size, int(d["size"])))
    return out


def check_targets(store: Store, vm: str, version: str, disks: list[int], targets: list[str],
                  copies: int = 1) -> None:
    """Before any data moves: each target is a file path (not a folder) in a folder that
    exists and may be written, and the folders have room for the disks' data (`copies` times:
    a qcow2/vhd/vhdx restore writes a raw file, then the converted one). A target that exists
    is only replaced once the restore is whole: its space does not count as free."""
    import shutil

    for t in targets:
        if os.path.isdir(t):
            raise RestoreError(f"{t} is a folder: give the path of a file to write (e.g. {os.path.join(t, 'disk.raw')})")
        folder = os.path.dirname(os.path.abspath(t))
        if not os.path.isdir(folder):
            raise RestoreError(f"folder {folder} does not exist: create it first")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise RestoreError(f"cannot write in folder {folder}: "
                               f"{'it is on a read-only filesystem' if _read_only(folder) else 'permission denied'} "
                               "(choose another target)")
    need: dict[int, list] = {}  # per filesystem: its free bytes, the bytes wanted, a folder on it
    for t, n in zip(targets, data_bytes(store, vm, version, disks)):
        folder = os.path.dirname(os.path.abspath(t))
        dev = os.stat(folder).st_dev
        entry = need.setdefault(dev, [shutil.disk_usage(folder).free, 0, folder])
        entry[1] += n * copies
    for free, want, folder in need.values():
        if want > free:
            raise RestoreTargetFull(f"{folder}: the restore needs {_h(want)}, {_h(free)} are free")


def _read_only(folder: str) -> bool:
    return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)


def _h(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def run_restore(store_url: str, vm: str, version: str | None, targets: list[str], force: bool = False,
                on_progress=None, node_id: str | None = None, index_actors: int = 1,
                disks: list[int] | None = None) -> dict:
    """Restore the disks `disks` (default all) of a version to the raw sparse files `targets`."""
    from .cluster import pin_here

    t0 = time.monotonic()
    store = Store.open(store_url)
    version = resolve_version(store, vm, version)
    meta = store.read_version(vm, version)
    disks = list(range(len(meta["disks"]))) if disks is None else disks
    for n in disks:
        if not 0 <= n < len(meta["disks"]):
            raise RestoreError(f"{vm}@{version} has no disk {n}: it has disks 0 to {len(meta['disks']) - 1}")
    if len(targets) != len(disks):
        raise RestoreError(f"{len(disks)} disk(s) to restore: give as many targets")
    for t in targets:
        if os.path.exists(t) and not force:
            raise RestoreError(f"{t} exists: choose another target or pass --force to overwrite it")
        folder = os.path.dirname(os.path.abspath(t))
        if not os.path.isdir(folder):
            raise RestoreError(f"folder {folder} does not exist: create it first")
    check_targets(store, vm, version, disks, targets)
    here = pin_here(node_id)
    refs, whole = [], False
    lock = store_lock(store.backend, "reader", "restore")  # before the index is read
    index = LocalIndex(store_url)
    tmps = [os.path.join(os.path.dirname(os.path.abspath(t)), f".{os.path.basename(t)}.alike-{uuid.uuid4().hex[:8]}")
            for t in targets]
    try:
        meta, rows = plan(store, index, vm, version, disks)
        index.shutdown()
        chosen = [meta["disks"][n] for n in disks]
        for tmp, d in zip(tmps, chosen):
            with open(tmp, "wb") as f:
                f.truncate(int(d["size"]))
        total = int(sum(d["size"] for d in chosen))
        t_plan = time.monotonic()
        # batches of about TASK_BYTES of stored data, never splitting a pack's run of rows
        cum = np.cumsum(rows["len"].astype(np.int64) + rows.get("dlen", np.zeros(1, np.int64)).astype(np.int64))
        refs, start, n = [], 0, len(cum)
        while start < n:
            base = cum[start - 1] if start else 0
            stop = int(np.searchsorted(cum, base + TASK_BYTES, side="right"))
            stop = max(stop, start + 1)
            refs.append(restore_batch.options(scheduling_strategy=here).remote(
                store_url, tmps, {k: v[start:stop] for k, v in rows.items()}))
            start = stop
        done = 0
        task_seconds: dict = {}
        want = max(1, len(rows["block"]) * store.block_size)
        pending = refs
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=0.5)
            for r in ready:
                res = ray.get(r)
                done += res["written"]
                for k, v in res["times"].items():
                    task_seconds[k] = round(task_seconds.get(k, 0.0) + v, 3)
            if on_progress:
                on_progress(done, want)
        t_data = time.monotonic()
        for tmp, t in zip(tmps, targets):
            fd = os.open(tmp, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
            os.replace(tmp, t)
        whole = True
        return {"vm": vm, "version": version, "targets": targets, "logical_bytes": total,
                "written_bytes": done, "blocks": int(len(rows["block"])), "task_seconds": task_seconds,
                # where the time went: plan (versions, manifests, index), data (the tasks), commit (fsync, rename)
                "phase_seconds": {"plan": round(t_plan - t0, 3), "data": round(t_data - t_plan, 3),
                                  "commit": round(time.monotonic() - t_data, 3)}}
    except ray.exceptions.RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, StoreError):
            raise cause from None
        raise
    except OSError as e:
        raise _target_error(e, e.filename or targets[0]) from None
    finally:
        for tmp in tmps:
            if os.path.exists(tmp):
                os.unlink(tmp)
        if not whole:
            _abandon(refs)
        try:
            index.shutdown()
        except Exception:
            pass
        lock.release()
