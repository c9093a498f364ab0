"""Locks on a store: who writes, and since when (`locks/` in the layout).

    locks/<kind>-<id>.json   {"id", "kind", "op", "host", "pid", "started", "heartbeat"}
    locks/<id>.vm-<hex name> empty: the writer <id> backs up that VM (claim_vms, at the end)

Lock objects are checked JSON (storage/objects.py). A lock whose object fails its check still
stands for a holder that cannot be named: it counts as live, of the kind its key names, until
the object itself is older than the stale age (the holder rewrites it at every heartbeat).

Three kinds:
- shared ("writer"): backups, vault into the store, prune. Any number at once; they only add
  objects, or remove version.json files, which never hurts another writer.
- shared ("reader"): restore, verify, vault out of the store: a gc deletes no pack they may
  still read (a repacked one) before they have finished.
- exclusive ("maintenance"): gc and repair, which rewrite the index. One at a time; a second one
  fails at once with a message naming the holder, it never waits.

Garbage collection does not exclude writers: it condemns packs first and deletes them only
once every writer that was registered when the condemnation finished has gone (see
pipelines/gc.py). So a writer must register its lock *before* it reads the index or the
previous versions, and must check, just before it commits, that its lock is still there: a
lock broken as stale means a gc may have moved on without it, and the commit is refused.

A holder refreshes its heartbeat every `HEARTBEAT` seconds from a thread. A lock is stale when
its heartbeat is older than `STALE` seconds ($ALIKE_LOCK_STALE), or at once when it belongs to
this host and its process is gone (kill -9). Stale locks are broken, with a message, by
whoever finds them.
"""
from __future__ import annotations

import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass

from .errors import DamagedData, ObjectMissing, StoreError
from .objects import open_json, seal_json

HEARTBEAT = 20.0


def stale_after() -> float:
    return float(os.environ.get("ALIKE_LOCK_STALE", "300"))


class LockBusy(StoreError):
    """{detail}"""

    exit_code = 2


class LockLost(StoreError):
    """The lock of this {detail} on the store was broken as stale (its heartbeat stopped for
    longer than $ALIKE_LOCK_STALE seconds), so nothing was committed: run it again."""

    exit_code = 1


def _host() -> str:
    return socket.gethostname()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Lock:
    """One lock object. Use `with store_lock(...)`."""

    def __init__(self, backend, kind: str, op: str):
        self.backend = backend
        self.kind = kind
        self.op = op
        self.id = f"{kind}-{time.strftime('%Y%m%d%H%M%S')}-{uuid.uuid4().hex[:12]}"
        self.key = f"locks/{self.id}.json"
        self.started = time.time()
        self._stop = threading.Event()
        self._thread = None
        self.lost = False

    def _body(self) -> bytes:
        return seal_json({"id": self.id, "kind": self.kind, "op": self.op, "host": _host(),
                          "pid": os.getpid(), "started": self.started, "heartbeat": time.time()})

    def acquire(self) -> "Lock":
        self.backend.put(self.key, self._body())
        if self.kind == "maintenance":
            # both may have written at once: the older (then smaller id) one wins
            others = [lk for lk in live_locks(self.backend, "maintenance") if lk["id"] != self.id]
            older = [lk for lk in others if (lk["started"], lk["id"]) < (self.started, self.id)]
            if older:
                self.backend.delete(self.key)
                raise LockBusy(f"another {describe(older[0])} is running on this store; "
                               "run this one when it has finished (a lock of a killed process is "
                               f"broken by itself after {stale_after():.0f} s)")
        self._thread = threading.Thread(target=self._beat, name=f"alike-lock-{self.op}", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(min(HEARTBEAT, stale_after() / 4)):
            try:
                if not self.backend.exists(self.key):
                    self.lost = True
                    return
                self.backend.put(self.key, self._body())
            except Exception:  # a store that hiccups: try again at the next beat
                pass

    def check(self) -> None:
        """Call just before committing: raises LockLost if the lock was broken meanwhile."""
        if self.lost or not self.backend.exists(self.key):
            self.lost = True
            raise LockLost(self.op)

    def release(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
        try:
            self.backend.hasty().delete(self.key)
        except Exception:  # left behind: broken as stale (at once on this host, its process gone)
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def describe(lk: dict) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(lk.get("started", 0)))
    return f"{lk.get('op', '?')} (pid {lk.get('pid')} on {lk.get('host')}, since {when})"


def read_locks(backend, strict: bool = False) -> list[dict]:
    """Every lock object; a damaged one as a lock of unknown holder (`damaged`: why), aged by
    its object's modification time. `strict` (verify, on a store of format 2): a lock without
    a check is damaged too."""
    out = []
    mtimes = None
    for key in backend.list("locks/"):
        if not key.endswith(".json"):
            continue
        try:
            raw = backend.get(key)
        except ObjectMissing:  # released between list and get
            continue
        try:
            lk = open_json(raw, key, required=strict)
        except DamagedData as e:
            if mtimes is None:
                mtimes = {k: mt for k, (_, mt) in backend.stat_all("locks/").items()}
            mt = mtimes.get(key, time.time())
            name = key.rsplit("/", 1)[-1][:-len(".json")]
            lk = {"id": name, "kind": name.split("-", 1)[0], "op": "holder unknown (its lock object is damaged)",
                  "host": None, "pid": None, "started": mt, "heartbeat": mt, "damaged": e.detail}
        lk["_key"] = key
        out.append(lk)
    return out


def is_stale(lk: dict, now: float | None = None) -> str | None:
    """Why `lk` is stale, or None when it is alive."""
    now = now or time.time()
    if lk.get("host") == _host() and isinstance(lk.get("pid"), int) and not _pid_alive(lk["pid"]):
        return "its process is gone"
    age = now - float(lk.get("heartbeat", 0))
    if age > stale_after():
        return f"no heartbeat for {age:.0f} s"
    return None


def _warn(msg: str) -> None:
    print(f"alike: {msg}", file=sys.stderr)


def live_locks(backend, kind: str | None = None, warn=_warn) -> list[dict]:
    """Locks that are alive; stale ones are broken (deleted) on the way, with a message."""
    out = []
    for lk in read_locks(backend):
        why = is_stale(lk)
        if why:
            backend.delete(lk["_key"])
            if warn:
                warn(f"broke the stale lock of {describe(lk)}: {why}")
            continue
        if kind is None or lk.get("kind") == kind:
            out.append(lk)
    return out


def store_lock(backend, kind: str, op: str, warn=_warn) -> Lock:
    """Take a lock: kind 'writer' (shared) or 'maintenance' (exclusive)."""
    if kind not in ("writer", "reader", "maintenance"):
        raise ValueError(kind)
    try:
        live_locks(backend, warn=warn)  # break stale ones first, saying so
        return Lock(backend, kind, op).acquire()
    except (StoreError, OSError):
        if kind != "reader":
            raise
        # a reader with read-only rights (an offsite copy restored with a read-only key) reads
        # without a lock: a gc running at that moment may make it fail, never return wrong data
        return NoLock()


class NoLock:
    key = None

    def check(self) -> None:
        pass

    def release(self) -> None:
        pass


# -- one writer per VM ----------------------------------------------------------------------------
# Two backups of one VM into one store at once would both commit, two versions seconds apart.
# A writer claims each VM it backs up: an empty object locks/<its lock id>.vm-<the name in hex>,
# alive as long as that lock is (its heartbeat, its process), so a killed backup's claims die
# with its lock and cost nobody a wait. The name holds everything, so the claim has no body to
# read or check, and read_locks (which reads *.json) never sees it.

@dataclass
class VMClaims:
    """What claim_vms got: the VMs this writer now holds, and for each refused one why."""

    claimed: list[str]
    busy: dict[str, str]


def _claim_key(lock_id: str, vm: str) -> str:
    return f"locks/{lock_id}.vm-{vm.encode().hex()}"


def _claims(backend) -> list[tuple[str, str, str]]:
    """-> (key, lock id, VM) of every VM claim on the store."""
    out = []
    for key in backend.list("locks/"):
        lock_id, sep, name = key[len("locks/"):].partition(".vm-")
        if not sep:
            continue
        try:
            out.append((key, lock_id, bytes.fromhex(name).decode()))
        except ValueError:
            continue
    return out


def claim_vms(backend, lock: "Lock", vms: list[str], settle: float = 3.0) -> VMClaims:
    """Claim `vms` for the writer holding `lock`. A VM another live writer claimed first is
    refused, with a message naming that writer. Two that claim at the same moment both write
    their claim, then look: the one that started later always sees the other's, and backs off
    at once; the earlier one, seeing a later claim, waits up to `settle` seconds for it to go,
    and backs off if it stays (that one did not see ours and runs)."""
    wanted = list(dict.fromkeys(vms))
    for vm in wanted:
        backend.put(_claim_key(lock.id, vm), b"")
    me = (lock.started, lock.id)
    deadline = time.monotonic() + settle
    while True:
        alive = {lk["id"]: lk for lk in live_locks(backend)}
        busy, later = {}, {}
        for key, lock_id, vm in _claims(backend):
            if lock_id == lock.id:
                continue
            if lock_id not in alive:
                backend.delete(key)  # the claim of a writer that is gone
                continue
            if vm not in wanted:
                continue
            other = alive[lock_id]
            (busy if (float(other.get("started", 0)), lock_id) < me else later)[vm] = other
        later = {vm: lk for vm, lk in later.items() if vm not in busy}
        if not later or time.monotonic() >= deadline:
            break
        time.sleep(0.2)
    busy.update(later)
    for vm in busy:
        backend.delete(_claim_key(lock.id, vm))
    why = {vm: f"{vm} is being backed up into this store already by {describe(lk)}: this backup of {vm} "
               f"was refused, nothing was written; run it when that one has finished"
           for vm, lk in busy.items()}
    return VMClaims(claimed=[vm for vm in wanted if vm not in busy], busy=why)


def release_vms(backend, lock: "Lock", vms: list[str]) -> None:
    backend = backend.hasty()
    for vm in vms:
        try:
            backend.delete(_claim_key(lock.id, vm))
        except Exception:  # the lock's own release, or its staleness, ends the claim anyway
            pass
