"""The dedup index as Ray actors, each holding some of the 16 on-store shards in compact form
(`storage.index.CompactIndex`, 44 bytes per unique block).

A shard holds the entries of the store's segments, and apart from them the entries of packs
written during this run ("fresh": durable in a pack, but in no committed segment yet, so a
version that uses one must copy its entry into its own segments). It also keeps claims: hashes
that a running backup is about to write. Claims are transient and bounded by the data in
flight, so they live in a plain dict; they let two VMs backed up at once, and two read tasks of
one VM, store a shared block once. The owner of a claim is a read task, named
"<vm>@<version>/<task>": a retry of the task (its worker died) claims its own hashes again. The
driver or the snapshot actor releases a dead owner's claims ("<vm>@<version>" releases every task
of that backup), and whoever waited on them writes the blocks itself.
"""
from __future__ import annotations

import numpy as np
import ray

from storage.index import N_SHARDS, CompactIndex, h32, shard_of
from storage.store import Store

from .faults import crash_point

NEW, DURABLE, PENDING, FRESH = 0, 1, 2, 3


def load_segments(store: Store, shards, index: CompactIndex, details: list | None = None) -> list[str]:
    """Read the segments of `shards` (None: all) several at a time (on S3 each is a request),
    adding them as they come. A segment that fails its check is left out -> the keys of those.
    Leaving one out is safe for the readers that call this: a backup then stores its blocks
    again, a restore refuses the versions whose blocks only it indexed (gc and repair read the
    whole index, strictly). `details` gains a (key, what is wrong) for each.

    A gc or repair may compact the index meanwhile (Store.rewrite_index): it writes a shard's
    new segment before it deletes the ones it replaces. So a listed segment that is gone when
    read has been replaced by one that a fresh listing shows: list again and read what is new,
    until a listing holds nothing that vanished."""
    from concurrent.futures import ThreadPoolExecutor

    from storage.errors import DamagedData, ObjectMissing

    def listing():
        if shards is None:
            return store.segment_keys()
        return [k for s in shards for k in store.segment_keys(s)]

    def one(key):
        try:
            return store.read_segment(key)
        except (DamagedData, ObjectMissing) as e:
            return e

    damaged, seen = [], set()
    for attempt in range(RELIST):
        keys = [k for k in listing() if k not in seen]
        gone = None
        with ThreadPoolExecutor(8) as pool:
            for key, seg in zip(keys, pool.map(one, keys)):
                if isinstance(seg, ObjectMissing):
                    gone = seg
                    continue
                seen.add(key)
                if isinstance(seg, DamagedData):
                    damaged.append(key)
                    if details is not None:
                        details.append((key, seg.detail))
                else:
                    index.add(*seg)
        if gone is None:
            return damaged
    raise gone


RELIST = 8  # listings of the index a reader makes while segments keep vanishing under it


@ray.remote(num_cpus=0)
class IndexShard:
    def __init__(self, store_url: str | None, shards: list[int]):
        """`store_url` None: an empty shard, started ahead for whichever store comes (`alike
        server`); reload() gives it a store."""
        self.shards = shards
        if store_url is None:
            self.clear()
        else:
            self.reload(store_url)

    def reload(self, store_url: str) -> int:
        """Forget everything and load the shards' segments afresh (a warm shard of `alike server`
        does this at the start of every backup, after the backup registered as a writer)."""
        store = Store.open(store_url)
        self.index = CompactIndex()
        self.fresh = CompactIndex()
        self.claims: dict[bytes, str] = {}
        load_segments(store, self.shards, self.index)
        crash_point("index-loaded")
        return len(self.index)

    def ready(self) -> int:
        return len(self.index)

    def clear(self) -> None:
        """Drop the loaded index (an idle warm shard keeps its process, not the memory)."""
        self.index = CompactIndex()
        self.fresh = CompactIndex()
        self.claims = {}

    def stats(self) -> dict:
        return {"entries": len(self.index), "fresh": len(self.fresh), "bytes": self.index.nbytes(),
                "claims": len(self.claims)}

    def lookup(self, hashes: np.ndarray) -> np.ndarray:
        return self.index.lookup(hashes)[0] | self.fresh.lookup(hashes)[0]

    def claim(self, hashes: np.ndarray, owner: str) -> np.ndarray:
        """-> per hash: NEW (now claimed by `owner`: write it; also when `owner` claimed it
        before, as a retried task does), DURABLE (in a committed segment), FRESH (in a pack of
        this run: the caller copies its entry into its own segments), PENDING (another owner is
        writing it: wait for it at commit)."""
        found = self.index.lookup(hashes)[0]
        fresh = self.fresh.lookup(hashes)[0] & ~found
        out = np.where(found, DURABLE, np.where(fresh, FRESH, NEW)).astype(np.uint8)
        for i in np.flatnonzero(~found & ~fresh):
            h = h32(hashes[i])
            o = self.claims.get(h)
            if o is None:
                self.claims[h] = owner
            elif o != owner:
                out[i] = PENDING
        return out

    def commit(self, hashes: np.ndarray, pack: str, offsets, lengths) -> None:
        """The blocks `hashes` are durable in `pack` (not yet in a segment)."""
        self.fresh.add(hashes, pack, offsets, lengths)
        for h in hashes:
            self.claims.pop(h32(h), None)

    def release(self, owner: str) -> int:
        """Drop the claims of `owner`, and of its tasks ("<owner>/...")."""
        sub = owner + "/"
        dead = [h for h, o in self.claims.items() if o == owner or o.startswith(sub)]
        for h in dead:
            del self.claims[h]
        return len(dead)

    def locate(self, hashes: np.ndarray):
        """-> (found, pack ids, offsets, lengths, pending): in a segment or a pack of this run."""
        found, packs, off, ln = self.index.locate(hashes)
        if len(self.fresh.runs) and not found.all():
            miss = np.flatnonzero(~found)
            f2, p2, o2, l2 = self.fresh.locate(hashes[miss])
            at = miss[f2]
            found[at], off[at], ln[at] = True, o2[f2], l2[f2]
            for k, p in zip(at, (p for p, f in zip(p2, f2) if f)):
                packs[k] = p
        pending = np.array([not f and h32(h) in self.claims for f, h in zip(found, hashes)], bool)
        return found, packs, off, ln, pending


class IndexClient:
    """Routes batches of hashes to the shard actors; picklable, so read tasks carry it."""

    damaged: list = []  # segments left out for failing their check (the shards do not say)

    def __init__(self, actors: list):
        self.actors = actors

    @classmethod
    def start(cls, store_url: str, n_actors: int, scheduling_strategy=None, wait: bool = True) -> "IndexClient":
        n_actors = max(1, min(N_SHARDS, n_actors))
        opts = {"scheduling_strategy": scheduling_strategy} if scheduling_strategy else {}
        actors = [IndexShard.options(**opts).remote(store_url, [s for s in range(N_SHARDS) if s % n_actors == a])
                  for a in range(n_actors)]
        if wait:
            ray.get([a.ready.remote() for a in actors])
        return cls(actors)

    def _split(self, hashes: np.ndarray):
        owner = shard_of(hashes) % len(self.actors)
        return [(a, np.flatnonzero(owner == a)) for a in range(len(self.actors)) if (owner == a).any()]

    def _send(self, method: str, hashes: np.ndarray, *args):
        parts = self._split(hashes)
        return parts, [getattr(self.actors[a], method).remote(hashes[idx], *args) for a, idx in parts]

    def _fan(self, method: str, hashes: np.ndarray, *args):
        parts, refs = self._send(method, hashes, *args)
        return parts, ray.get(refs)

    def lookup(self, hashes: np.ndarray) -> np.ndarray:
        found = np.zeros(len(hashes), bool)
        for (a, idx), res in zip(*self._fan("lookup", hashes)):
            found[idx] = res
        return found

    def claim(self, hashes: np.ndarray, owner: str) -> np.ndarray:
        return self.claim_async(hashes, owner)()

    def claim_async(self, hashes: np.ndarray, owner: str):
        """`claim`, sent now: -> a function that waits for the answers and returns them."""
        parts, refs = self._send("claim", hashes, owner)

        def answers() -> np.ndarray:
            out = np.zeros(len(hashes), np.uint8)
            for (a, idx), res in zip(parts, ray.get(refs)):
                out[idx] = res
            return out
        return answers

    def commit(self, hashes: np.ndarray, pack: str, offsets, lengths) -> None:
        offsets, lengths = np.asarray(offsets), np.asarray(lengths)
        parts = self._split(hashes)
        ray.get([self.actors[a].commit.remote(hashes[idx], pack, offsets[idx], lengths[idx]) for a, idx in parts])

    def release(self, owner: str) -> None:
        for ref in [a.release.remote(owner) for a in self.actors]:
            try:
                ray.get(ref)
            except ray.exceptions.RayActorError:  # a dead shard holds no claims any more
                pass

    def locate(self, hashes: np.ndarray):
        n = len(hashes)
        found = np.zeros(n, bool)
        pending = np.zeros(n, bool)
        packs = np.empty(n, dtype=object)
        off = np.zeros(n, np.uint64)
        ln = np.zeros(n, np.uint64)
        for (a, idx), (f, p, o, l, pe) in zip(*self._fan("locate", hashes)):
            found[idx], off[idx], ln[idx], pending[idx] = f, o, l, pe
            packs[idx] = p
        return found, packs, off, ln, pending

    def stats(self) -> list[dict]:
        return ray.get([a.stats.remote() for a in self.actors])

    def clear(self) -> None:
        for a in self.actors:
            a.clear.remote()

    def reload(self, store_url: str) -> None:
        """Every shard reloads from the store; returns once all have (raises RayActorError when
        one has died)."""
        ray.get([a.reload.remote(store_url) for a in self.actors])

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a)


class LocalIndex:
    """The whole index loaded in this process, with IndexClient's read interface: for one-shot
    readers (restore, verify, vault) that would otherwise pay an actor's start-up."""

    def __init__(self, store_url):
        store = Store.open(store_url)
        self.index = CompactIndex()
        self.damaged = load_segments(store, None, self.index)

    def lookup(self, hashes: np.ndarray) -> np.ndarray:
        return self.index.lookup(hashes)[0]

    def locate(self, hashes: np.ndarray):
        found, packs, off, ln = self.index.locate(hashes)
        arr = np.empty(len(hashes), dtype=object)
        arr[:] = packs
        return found, arr, off.astype(np.uint64), ln.astype(np.uint64), np.zeros(len(hashes), bool)

    def shutdown(self) -> None:
        pass
