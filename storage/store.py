"""A store (ADS or ODS) on a backend: its config, packs, index segments and versions.

See `storage/__init__.py` for the layout and the commit order this class keeps.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import re
import secrets
import uuid

import numpy as np
import pyarrow as pa

from . import index as _index
from .backend import Backend, open_backend
from .codec import DEFAULT_BLOCK, Codec, check_block_size
from .errors import BadConfig, DamagedData, NotAStore, ObjectMissing, StoreExists, InvalidValue
from .objects import check_in_key, digest, has_check, open_json, parquet_bytes, read_parquet, seal_json
from .pack import TARGET_PACK, PackBuilder, pack_key

# 2: every object carries a check of its own bytes (storage/objects.py). Format 1 still reads.
FORMAT = 2
READS = (1, 2)
SEGMENT_WRITERS = 8  # segments a backup writes at once (write_segments)
VM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_vm_name(name: str) -> str:
    if not VM_NAME.match(name or ""):
        raise InvalidValue(
            f"VM name {name!r} is not allowed: use letters, digits, '.', '_' and '-' "
            "(up to 128, starting with a letter or digit)"
        )
    return name


def new_version_id(now: _dt.datetime | None = None) -> str:
    now = now or _dt.datetime.now(_dt.timezone.utc)
    return now.strftime("%Y%m%d-%H%M%S-") + f"{now.microsecond // 1000:03d}"


class Manifest(tuple):
    """One disk of a version: `blocks` (u64, ascending) and their `hashes` (S32); for patched
    blocks (storage/patch.py) also `bases`, `deltas` (S32, empty for a block stored whole) and
    `grains` (u64 granule masks, 0 for a block stored whole). Unpacks as (blocks, hashes)."""

    def __new__(cls, blocks, hashes, bases=None, deltas=None, grains=None):
        self = super().__new__(cls, (blocks, hashes))
        n = len(blocks)
        self.blocks, self.hashes = blocks, hashes
        self.bases = bases if bases is not None else np.zeros(n, "S32")
        self.deltas = deltas if deltas is not None else np.zeros(n, "S32")
        self.grains = grains if grains is not None else np.zeros(n, np.uint64)
        return self

    def patched(self) -> np.ndarray:
        """bool per row: stored as base + delta."""
        return self.deltas != b""

    def blobs(self) -> np.ndarray:
        """The stored blobs this disk needs (not distinct): each whole block's hash, each
        patched block's base and delta."""
        p = self.patched()
        if not p.any():
            return self.hashes
        return np.concatenate([self.hashes[~p], self.bases[p], self.deltas[p]])


class PackSink:
    """Blocks, already stored (compressed), gathered into new packs of a store: each pack is put
    once it reaches TARGET_PACK, and `after_put()` is called after each (the crash tests stop
    there). `entries()` -> (hashes S32, pack ids, offsets, lengths) of every block written; they
    are in no index segment yet."""

    def __init__(self, store: "Store", after_put=None):
        self.store = store
        self.after_put = after_put
        self.builder = PackBuilder()
        self.h, self.p, self.o, self.n = [], [], [], []
        self.nbytes = 0

    def add(self, h: bytes, stored: bytes) -> None:
        self.builder.add(h, stored)
        self.nbytes += len(stored)
        if self.builder.size >= TARGET_PACK:
            self.flush()

    def flush(self) -> None:
        b = self.builder
        if len(b):
            self.store.put_pack(b)
            if self.after_put:
                self.after_put()
            for h, off, ln, _ in b.entries:
                self.h.append(h)
                self.p.append(b.pack_id)
                self.o.append(off)
                self.n.append(ln)
            self.builder = PackBuilder()

    def entries(self):
        self.flush()
        return (np.array(self.h, dtype="S32"), np.array(self.p, dtype="U32"),
                np.array(self.o, dtype=np.uint64), np.array(self.n, dtype=np.uint64))


class Store:
    def __init__(self, backend: Backend, config: dict):
        self.backend = backend
        self.config = config
        self.block_size = int(config["block_size"])
        self.codec = Codec(bytes.fromhex(config["hash_key"]), int(config.get("zstd_level", 3)))
        self.url = backend.url
        # format 1 stores hold objects written before checks: those are taken as they are
        self.strict = int(config.get("format", 1)) >= 2

    # -- checked objects (storage/objects.py) -----------------------------------------------------
    def put_json(self, key: str, obj: dict) -> None:
        self.backend.put(key, seal_json(obj))

    def get_json(self, key: str) -> dict:
        """A JSON object of the store, checked: DamagedData naming `key` when it fails."""
        return open_json(self.backend.get(key), key, required=self.strict)

    # -- creation and opening -------------------------------------------------------------
    @classmethod
    def init(cls, url, block_size: int = DEFAULT_BLOCK, zstd_level: int = 3) -> "Store":
        check_block_size(block_size)
        if not 1 <= zstd_level <= 19:
            raise InvalidValue(f"zstd level {zstd_level} is not allowed: use 1 to 19")
        backend = open_backend(url)
        url = backend.url
        if hasattr(backend, "check_bucket"):
            backend.check_bucket()
        if backend.exists("config.json"):
            raise StoreExists(url)
        path = backend.local_path("")
        if not path and any(True for _ in backend.list("")):
            raise InvalidValue(f"{url} holds objects and is not a store: give an empty prefix")
        if path and os.path.isdir(path) and os.listdir(path):
            raise InvalidValue(f"{url} is a folder that is not empty and not a store: give an empty or new folder")
        if path and os.path.exists(path) and not os.path.isdir(path):
            raise InvalidValue(f"{url} exists and is not a folder")
        config = {
            "format": FORMAT,
            "store_id": uuid.uuid4().hex,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "block_size": block_size,
            "hash": "blake3-256-keyed",
            "hash_key": secrets.token_hex(32),
            "hash_key_id": None,
            "compression": "zstd",
            "zstd_level": zstd_level,
            "encryption": "none",
        }
        config["hash_key_id"] = Codec(bytes.fromhex(config["hash_key"])).hash(b"alike-hash-key-id").hex()[:16]
        backend.put("config.json", seal_json(config))
        return cls(backend, config)

    @staticmethod
    def parse_config(raw: bytes) -> dict:
        """config.json's object, checked; DamagedData when it fails its check, BadConfig when it
        is of a format this alike does not read."""
        if has_check(raw):
            config = open_json(raw, "config.json")
        else:  # written before checks: only format 1 may lack one
            try:
                config = json.loads(raw)
            except Exception:
                raise DamagedData("config.json does not parse") from None
            if not isinstance(config, dict) or config.get("format") != 1:
                raise DamagedData("config.json has no check of its own bytes")
        if config.get("format") not in READS:
            raise BadConfig(f"format {config.get('format')!r}, this alike reads formats {', '.join(map(str, READS))}")
        try:
            check_block_size(int(config["block_size"]))
            if len(bytes.fromhex(config["hash_key"])) != 32:
                raise ValueError("hash key is not 32 bytes")
        except BadConfig:
            raise
        except Exception as e:  # any malformed value
            raise BadConfig(f"{type(e).__name__}: {e}") from None
        return config

    @classmethod
    def open(cls, url) -> "Store":
        """Open a store from its spec (a path, or see backend.store_spec)."""
        if not url:
            raise InvalidValue("no store given: pass --store PATH or set ALIKE_STORE")
        backend = open_backend(url)
        url = backend.url
        path = backend.local_path("")
        if path and not os.path.exists(path):
            raise InvalidValue(f"store {url} does not exist: create it with `alike init --store {url}`")
        try:
            raw = backend.get("config.json")
        except ObjectMissing:
            raise NotAStore(url) from None
        return cls(backend, cls.parse_config(raw))

    _cache: dict = {}

    @classmethod
    def open_cached(cls, spec) -> "Store":
        """`open` once per process and spec: Ray workers run many tasks, and an S3 client costs
        a few hundred milliseconds to make. The cached store is used only while its config.json
        is still the one it was opened with (read again at each call: one small read): a store
        created anew at the same place has another hash key, and a task that hashed with the
        old one would record hashes that match nothing (a warm worker of `alike server` outlives
        the store it first saw)."""
        key = repr(sorted(spec.items())) if isinstance(spec, dict) else spec
        st = cls._cache.get(key)
        if st is not None:
            try:
                raw = st.backend.get("config.json")
            except ObjectMissing:
                raise NotAStore(st.url) from None
            if raw == st._config_raw:
                return st
        st = cls.open(spec)
        st._config_raw = st.backend.get("config.json")
        cls._cache[key] = st
        return st

    # -- packs ------------------------------------------------------------------------------
    def put_pack(self, builder: PackBuilder) -> str:
        self.backend.put_parts(pack_key(builder.pack_id), builder.finish_parts())
        return builder.pack_id

    def pack_stream(self, builder: PackBuilder):
        """A Backend.put_stream of the pack being built: write its take_parts as they come,
        then its tail_parts, then commit (the pack is then as durable as put_pack's)."""
        return self.backend.put_stream(pack_key(builder.pack_id))

    def read_stored(self, pack_id: str, offset: int, length: int) -> bytes:
        return self.backend.get_range(pack_key(pack_id), int(offset), int(length))

    def list_packs(self) -> list[str]:
        return [k.rsplit("/", 1)[1] for k in self.backend.list("packs/")]

    # -- index segments ---------------------------------------------------------------------
    def write_segments(self, hashes: np.ndarray, packs: list[str], offsets, lengths) -> list[str]:
        """Write one immutable segment per shard touched (up to 16), all at once, and return once
        every one is durable (else raise the first error). Call only once the packs are durable.
        Why at once: on S3 each put is a PUT's round trip, and 16 one after another were 16 round
        trips (116 -> 61 ms on a local S3 server). A directory store gains nothing (~23 ms for 16
        either way: the fsyncs serialize in the file system's journal)."""
        if not len(hashes):
            return []
        from concurrent.futures import ThreadPoolExecutor

        shards = _index.shard_of(hashes)
        packs = np.array(packs, dtype=object)
        offsets = np.asarray(offsets)
        lengths = np.asarray(lengths)

        def put(s: int) -> str:
            m = shards == s
            return self.put_segment(s, _index.segment_bytes(hashes[m], list(packs[m]), offsets[m], lengths[m]))

        todo = [int(s) for s in np.unique(shards)]
        if len(todo) == 1:
            return [put(todo[0])]
        with ThreadPoolExecutor(min(len(todo), SEGMENT_WRITERS), thread_name_prefix="alike-segment") as pool:
            futures = [pool.submit(put, s) for s in todo]
            return [f.result() for f in futures]  # the pool's exit waits for every put, failed or not

    def segment_keys(self, shard: int | None = None) -> list[str]:
        prefix = "index/" if shard is None else f"index/{shard:x}/"
        return [k for k in self.backend.list(prefix) if k.endswith(".parquet")]

    def put_segment(self, shard: int, data: bytes) -> str:
        """Store a segment under the key that carries its check: index/<x>/<blake3>.parquet."""
        key = _index.segment_key(shard, digest(data))
        self.backend.put(key, data)
        return key

    def read_segment(self, key: str):
        raw = self.backend.get(key)  # an unreachable or refusing store raises its own error here
        t = read_parquet(raw, f"index segment {key}", check_in_key(key), required=self.strict)
        try:
            return _index.segment_arrays(t)
        except Exception as e:
            raise DamagedData(f"index segment {key} does not parse ({e})") from None

    def read_index(self, keys: list[str] | None = None, threads: int = 8):
        """Every entry of the given segments (default: all) as flat arrays:
        -> (segment keys read, hashes S32, pack ids (array of str), offsets u64, lengths u64)."""
        from concurrent.futures import ThreadPoolExecutor

        keys = self.segment_keys() if keys is None else keys
        hs, ps, offs, lens = [np.zeros(0, "S32")], [np.zeros(0, "U32")], [np.zeros(0, np.uint64)], [np.zeros(0, np.uint64)]
        with ThreadPoolExecutor(threads) as pool:
            for h, (names, idx), o, n in pool.map(self.read_segment, keys):
                hs.append(h)
                ps.append(np.asarray(names, dtype="U32")[idx] if len(h) else np.zeros(0, "U32"))
                offs.append(o.astype(np.uint64))
                lens.append(n.astype(np.uint64))
        return keys, np.concatenate(hs), np.concatenate(ps), np.concatenate(offs), np.concatenate(lens)

    def rewrite_index(self, drop_packs=(), drop_entries=None, add=None, on_progress=None) -> dict:
        """Rewrite the index shard by shard: drop entries of `drop_packs` and the (pack, offset)
        pairs of `drop_entries`, add the (hashes, packs, offsets, lengths) of `add`, and compact
        each shard touched into one segment. Hold the maintenance lock (storage/locks.py).

        Crash-safe: a shard's new segment is written before the segments it replaces are
        deleted; in between both are there, and duplicate entries are harmless. Segments that
        writers add meanwhile are not read, so never deleted: what they say stays."""
        drop_packs = np.asarray(sorted(drop_packs), dtype="U32")
        drop_pairs = set(drop_entries or ())
        add_h = add[0] if add is not None else np.zeros(0, "S32")
        add_shards = _index.shard_of(add_h) if len(add_h) else np.zeros(0, np.int64)
        stats = {"segments_read": 0, "segments_written": 0, "entries_dropped": 0, "entries_added": 0}
        for shard in range(_index.N_SHARDS):
            keys = self.segment_keys(shard)
            m_add = add_shards == shard
            if not keys and not m_add.any():
                continue
            _, h, p, o, n = self.read_index(keys)
            keep = ~np.isin(p, drop_packs) if len(drop_packs) else np.ones(len(h), bool)
            if drop_pairs:
                keep &= np.array([(str(pp), int(oo)) not in drop_pairs for pp, oo in zip(p, o)], dtype=bool)
            touched = (not keep.all()) or m_add.any() or len(keys) > 1
            if not touched:
                continue
            h, p, o, n = h[keep], p[keep], o[keep], n[keep]
            stats["entries_dropped"] += int((~keep).sum())
            if m_add.any():
                h = np.concatenate([h, add_h[m_add]])
                p = np.concatenate([p, np.asarray(add[1], dtype="U32")[m_add]])
                o = np.concatenate([o, np.asarray(add[2], np.uint64)[m_add]])
                n = np.concatenate([n, np.asarray(add[3], np.uint64)[m_add]])
                stats["entries_added"] += int(m_add.sum())
            if len(h):
                # one entry per (hash, pack, offset)
                rec = np.rec.fromarrays([h, p, o], names="h,p,o")
                _, first = np.unique(rec, return_index=True)
                first.sort()
                h, p, o, n = h[first], p[first], o[first], n[first]
                new = self.put_segment(shard, _index.segment_bytes(h, list(p), o, n))
                stats["segments_written"] += 1
            else:
                new = None
            for k in keys:
                if k != new:  # the same content is the same key: that one is the new segment
                    self.backend.delete(k)
            stats["segments_read"] += len(keys)
            if on_progress:
                on_progress(shard + 1, _index.N_SHARDS)
        return stats

    # -- versions ---------------------------------------------------------------------------
    def list_vms(self) -> list[str]:
        vms = set()
        for k in self.backend.list("versions/"):
            parts = k.split("/")
            if len(parts) == 4 and parts[3] == "version.json":
                vms.add(parts[1])
        return sorted(vms)

    def list_versions(self, vm: str | None = None) -> list[tuple[str, str]]:
        """Committed versions as (vm, version), oldest first. Uncommitted folders are ignored."""
        out = []
        prefix = f"versions/{vm}/" if vm else "versions/"
        for k in self.backend.list(prefix):
            parts = k.split("/")
            if len(parts) == 4 and parts[3] == "version.json":
                out.append((parts[1], parts[2]))
        return sorted(out, key=lambda t: (t[1], t[0]))

    def read_version(self, vm: str, version: str) -> dict:
        meta = self.get_json(f"versions/{vm}/{version}/version.json")
        if not isinstance(meta.get("disks", []), list):
            raise DamagedData(f"versions/{vm}/{version}/version.json has no list of disks")
        return meta

    def write_manifest(self, vm: str, version: str, disk_no: int, blocks: np.ndarray, hashes: np.ndarray,
                       bases: np.ndarray | None = None, deltas: np.ndarray | None = None,
                       grains: np.ndarray | None = None) -> dict:
        """One disk's manifest: block number -> hash, and for patched blocks (storage/patch.py)
        their base, delta and granule mask (columns written only when a block is patched).
        -> {"manifest": name, "manifest_blake3": its check}, for the disk's entry in version.json."""
        name = f"disk-{disk_no}.parquet"
        order = np.argsort(blocks, kind="stable")
        cols = {"block": pa.array(np.asarray(blocks, np.uint64)[order]),
                "hash": _index.hashes_to_arrow(np.asarray(hashes, "S32")[order])}
        if deltas is not None and (np.asarray(deltas, "S32") != b"").any():
            cols["base"] = _index.hashes_to_arrow(np.asarray(bases, "S32")[order])
            cols["delta"] = _index.hashes_to_arrow(np.asarray(deltas, "S32")[order])
            cols["grains"] = pa.array(np.asarray(grains, np.uint64)[order])
        data = parquet_bytes(pa.table(cols))
        self.backend.put(f"versions/{vm}/{version}/{name}", data)
        return {"manifest": name, "manifest_blake3": digest(data)}

    def _disk_entry(self, vm: str, version: str, disk) -> dict:
        if isinstance(disk, dict):
            return disk
        for d in self.read_version(vm, version).get("disks", []):
            if isinstance(d, dict) and d.get("manifest") == disk:
                return d
        raise DamagedData(f"versions/{vm}/{version}/version.json names no manifest {disk}")

    def read_manifest_bytes(self, vm: str, version: str, disk) -> bytes:
        """A manifest's bytes, checked against the BLAKE3 its version.json records. `disk` is the
        disk's entry of version.json (or the manifest's name: version.json is read then)."""
        d = self._disk_entry(vm, version, disk)
        key = f"versions/{vm}/{version}/{d['manifest']}"
        raw = self.backend.get(key)
        check = d.get("manifest_blake3")
        if check is not None and digest(raw) != check:
            raise DamagedData(f"manifest {key} fails its check (BLAKE3 of its bytes)")
        if check is None and self.strict:
            raise DamagedData(f"manifest {key} has no check in its version.json")
        return raw

    def read_manifest(self, vm: str, version: str, disk) -> "Manifest":
        """-> the Manifest of the non-zero blocks, in block order; it unpacks as (blocks, hashes).
        `disk`: the disk's entry of version.json, or the manifest's name."""
        d = self._disk_entry(vm, version, disk)
        key = f"versions/{vm}/{version}/{d['manifest']}"
        raw = self.read_manifest_bytes(vm, version, d)
        t = read_parquet(raw, f"manifest {key}", None, required=False)  # checked just above
        try:
            blocks, hashes = t.column("block").to_numpy(), _index.arrow_to_hashes(t.column("hash"))
            if "delta" in t.column_names:
                return Manifest(blocks, hashes, _index.arrow_to_hashes(t.column("base")),
                                _index.arrow_to_hashes(t.column("delta")), t.column("grains").to_numpy())
            return Manifest(blocks, hashes)
        except Exception as e:
            raise DamagedData(f"manifest {key} does not parse ({e})") from None

    def delete_version(self, vm: str, version: str, between=None) -> None:
        """Remove a version: version.json first (it vanishes at once and whole), then its manifests.
        A crash in between leaves manifests that nothing reads; gc removes them. `between()` is
        called in between (the crash tests stop there)."""
        base = f"versions/{vm}/{version}/"
        self.backend.delete(base + "version.json")
        if between:
            between()
        for key in list(self.backend.list(base)):
            self.backend.delete(key)

    # -- pins: a pinned version is never pruned ----------------------------------------------
    def pin(self, vm: str, version: str, note: str = "") -> None:
        self.put_json(f"pins/{vm}/{version}.json",
                      {"vm": vm, "version": version, "note": note,
                       "pinned": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")})

    def read_pin(self, vm: str, version: str) -> dict:
        return self.get_json(f"pins/{vm}/{version}.json")

    def unpin(self, vm: str, version: str) -> None:
        self.backend.delete(f"pins/{vm}/{version}.json")

    def pins(self) -> set[tuple[str, str]]:
        out = set()
        for k in self.backend.list("pins/"):
            parts = k.split("/")
            if len(parts) == 3 and parts[2].endswith(".json"):
                out.add((parts[1], parts[2][:-5]))
        return out

    def commit_version(self, vm: str, version: str, meta: dict) -> None:
        """The last step of a backup: the version becomes visible, atomically."""
        self.put_json(f"versions/{vm}/{version}/version.json", meta)
