"""Warm Ray actors for a long-lived driver (`alike server`).

A backup started by a fresh `alike backup` process pays for a new Ray job: its worker processes,
its snapshot actor and its index shard actors all start (Python, Ray, numpy, pyarrow imports) before
the first block is read - about 2-3 s on 2 cores, more than a whole CBT backup of a quiet VM costs.
A long-lived driver keeps them between backups:

- snapshot actors: after a backup that ended normally (committed or failed with an error) the
  actor is reset (`SnapshotActor.reset`) and kept; one whose process died is never reused;
- index shards, per (store, number of shards): after the backup, kept (their processes, not the
  index they held: it is dropped at once); the next backup of that store (else of another store,
  with as many shards: a shard's reload forgets everything it held) takes them and they reload the
  whole index from the store (`IndexShard.reload`) after it has registered as a writer, exactly as
  new shards would load: the gc protocol of storage/locks.py is unchanged. Shards of a backup
  that went wrong are killed;
- read-task workers: Ray keeps a job's idle workers (up to the node's CPUs), so the second
  backup's tasks run in processes that have imported everything already.

Leases are per backup and thread-safe: concurrent backups never share actors.
"""
from __future__ import annotations

import threading

import ray

_POOL = None


def current_pool():
    """The pool of this process (set by `alike server`), else None: every backup starts its own."""
    return _POOL


def install(pool) -> None:
    global _POOL
    _POOL = pool


@ray.remote(max_retries=0)
def _warm_task(modules: tuple[str, ...] = ()) -> bool:
    """Runs in a read-task worker: import what a read task needs, so the first backup does not:
    the pipeline, the codec, and the `modules` of the sources whose disks it will read (named
    by the caller: pipelines never import a source)."""
    import importlib

    import pipelines.backup  # noqa: F401
    import storage.codec  # noqa: F401

    for m in modules:
        importlib.import_module(m)
    return True


class WarmPool:
    def __init__(self, max_idle_actors: int = 4, max_idle_indexes: int = 4):
        self.lock = threading.Lock()
        self.actors: list = []
        self.indexes: dict[tuple[str, int], list] = {}
        self.max_idle_actors = max_idle_actors
        self.max_idle_indexes = max_idle_indexes
        self.counts = dict(actors_started=0, actors_reused=0, indexes_started=0, indexes_reused=0)

    # -- start-up ------------------------------------------------------------------------------
    def prewarm(self, scheduling_strategy=None, actors: int = 1, modules: tuple[str, ...] = (),
                index_shards: int = 0) -> None:
        """Start `actors` snapshot actors, one read-task worker per CPU and, when `index_shards`,
        a set of that many empty index shards for the first backup of whichever store comes
        (it reloads them with its store's segments), and wait for them; the workers import
        `modules` (the sources' modules) beforehand."""
        from .backup import SnapshotActor
        from .cluster import cluster_cpus
        from .index import IndexClient

        opts = {"scheduling_strategy": scheduling_strategy} if scheduling_strategy else {}
        new = [SnapshotActor.options(**opts).remote() for _ in range(actors)]
        index = IndexClient.start(None, index_shards, scheduling_strategy, wait=False) if index_shards else None
        ray.get([a.warm.remote() for a in new] + [_warm_task.remote(tuple(modules)) for _ in range(cluster_cpus())]
                + ([a.ready.remote() for a in index.actors] if index else []))
        with self.lock:
            self.actors += new
            self.counts["actors_started"] += len(new)
            if index is not None:
                self.indexes.setdefault((None, len(index.actors)), []).append(index)
                self.counts["indexes_started"] += 1

    # -- snapshot actors -----------------------------------------------------------------------
    def take_actor(self, scheduling_strategy, store_url, index, in_flight, lock_key):
        from .backup import SnapshotActor

        with self.lock:
            actor = self.actors.pop() if self.actors else None
            self.counts["actors_reused" if actor else "actors_started"] += 1
        if actor is not None:
            try:
                ray.get(actor.reset.remote(store_url, index, in_flight, lock_key))
                return actor
            except ray.exceptions.RayActorError:  # died while idle: start another
                with self.lock:
                    self.counts["actors_started"] += 1
        return SnapshotActor.options(scheduling_strategy=scheduling_strategy).remote(store_url, index, in_flight,
                                                                                    lock_key)

    def give_actor(self, actor) -> None:
        with self.lock:
            if len(self.actors) < self.max_idle_actors:
                self.actors.append(actor)
                return
        ray.kill(actor)

    # -- index shards --------------------------------------------------------------------------
    def take_index(self, store_url: str, n: int, scheduling_strategy):
        from .index import IndexClient

        with self.lock:  # this store's idle shards, else another store's with as many shards
            key = (store_url, n) if self.indexes.get((store_url, n)) else \
                next((k for k, v in self.indexes.items() if k[1] == n and v), None)
            index = self.indexes[key].pop() if key else None
        if index is not None:
            try:
                index.reload(store_url)
                with self.lock:
                    self.counts["indexes_reused"] += 1
                return index
            except ray.exceptions.RayActorError:
                index.shutdown()
            except BaseException:  # the store's index cannot be loaded: no shards are left behind
                index.shutdown()
                raise
        with self.lock:
            self.counts["indexes_started"] += 1
        return IndexClient.start(store_url, n, scheduling_strategy, wait=False)

    def give_index(self, store_url: str, n: int, index, healthy: bool) -> None:
        if healthy:
            with self.lock:
                if sum(map(len, self.indexes.values())) < self.max_idle_indexes:
                    index.clear()
                    self.indexes.setdefault((store_url, n), []).append(index)
                    return
        index.shutdown()

    # -- reports and the end -------------------------------------------------------------------
    def stats(self) -> dict:
        with self.lock:
            return dict(self.counts, idle_actors=len(self.actors),
                        idle_indexes={f"{u or 'any store'} ({n} shards)": len(v)
                                      for (u, n), v in self.indexes.items() if v})

    def shutdown(self) -> None:
        with self.lock:
            actors, self.actors = self.actors, []
            indexes, self.indexes = [i for v in self.indexes.values() for i in v], {}
        for a in actors:
            ray.kill(a)
        for i in indexes:
            i.shutdown()
