"""Copying stored blocks from one store into new packs of another (vault, repair): sorted by
source pack and offset, neighbours read in one ranged read, each block decoded and checked
against its hash before it is written. Both stores share the hash key. `copy_blocks` does it in
one process; `run_copy_tasks` fans it out as Ray tasks over slices of the blocks."""
from __future__ import annotations

from typing import Callable

import numpy as np
import ray

from storage.errors import ObjectMissing, StoreError
from storage.index import h32
from storage.store import PackSink, Store

SPAN_GAP = 1 << 20    # read neighbours together when less than this apart
SPAN_MAX = 64 << 20   # and no more than this at once
TASK_BYTES = 128 << 20  # stored bytes per copy task


def copy_blocks(src: Store, dst: Store, packs, offs, lens, hashes, after_put=None):
    """Copy the blocks (sorted by source pack and offset). A span that cannot be read is tried
    block by block. -> (new entries (hashes, packs, offsets, lengths), damaged hashes, bytes)."""
    sink = PackSink(dst, after_put)
    damaged = []
    i, n = 0, len(offs)
    while i < n:
        j = i + 1
        end = int(offs[i] + lens[i])
        while (j < n and packs[j] == packs[i] and int(offs[j]) - end < SPAN_GAP
               and int(offs[j] + lens[j]) - int(offs[i]) < SPAN_MAX):
            end = max(end, int(offs[j] + lens[j]))
            j += 1
        start = int(offs[i])
        try:
            span = src.read_stored(packs[i], start, end - start)
        except ObjectMissing:  # a missing or truncated pack: what can be read, block by block
            span = None
        for k in range(i, j):
            h = h32(hashes[k])
            try:
                if span is not None:
                    o = int(offs[k]) - start
                    stored = span[o:o + int(lens[k])]
                else:
                    stored = src.read_stored(packs[k], int(offs[k]), int(lens[k]))
                src.codec.decode(stored, h)
            except StoreError:
                damaged.append(hashes[k])
                continue
            sink.add(h, stored)
        i = j
    return sink.entries(), np.array(damaged, dtype="S32"), sink.nbytes


def run_copy_tasks(task, src_spec, dst_spec, packs, offs, lens, hashes, absorb: Callable,
                   died: Callable[[str], StoreError], task_bytes: int = TASK_BYTES) -> None:
    """Run `task.remote(src_spec, dst_spec, packs, offs, lens, hashes)` over consecutive slices
    of the blocks (sorted by source pack and offset) of about `task_bytes` stored bytes each, at
    most two per cluster CPU in flight, and hand each task's result to `absorb` as it arrives.
    A task that raised a StoreError raises it here as it is; a task whose worker died more often
    than it is retried raises `died(name of the Ray error)`, a StoreError that says what that
    leaves behind (so the CLI prints one line, not a traceback)."""
    from .cluster import cluster_cpus

    refs = []
    cum = np.cumsum(lens.astype(np.int64))
    start, in_flight = 0, 2 * cluster_cpus()
    try:
        while start < len(hashes):
            base = cum[start - 1] if start else 0
            stop = max(start + 1, int(np.searchsorted(cum, base + task_bytes, side="right")))
            if len(refs) >= in_flight:
                ready, refs = ray.wait(refs, num_returns=1)
                absorb(ray.get(ready[0]))
            refs.append(task.remote(src_spec, dst_spec, packs[start:stop], offs[start:stop], lens[start:stop],
                                    hashes[start:stop]))
            start = stop
        while refs:
            ready, refs = ray.wait(refs, num_returns=1)
            absorb(ray.get(ready[0]))
    except ray.exceptions.RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, StoreError):
            raise cause from None
        raise
    except (ray.exceptions.WorkerCrashedError, ray.exceptions.RayActorError, ray.exceptions.NodeDiedError) as e:
        raise died(type(e).__name__) from None
