"""The deduplicating block store.

Layout (identical on a directory and on S3, so that an ODS is a copy of an ADS)::

    config.json                 store id, format version, block size, hash key, compression
    packs/<xx>/<pack-id>        zstd-compressed blocks appended, then a footer index
    index/<x>/<blake3>.parquet  immutable (hash -> pack, offset, length) segments, by hash nibble
    versions/<vm>/<version>/    disk-<n>.parquet manifests (block number -> hash; for a patched
                                block also base, delta, granule mask: storage/patch.py), version.json last
                                (it names each manifest with its BLAKE3)
    locks/<kind>-<id>.json      who writes or reads, and since when (storage/locks.py)
    locks/<id>.vm-<hex name>    empty: that writer backs up that VM (one backup of a VM at a time)
    pins/<vm>/<version>.json    pinned versions: never pruned
    gc/<id>.json (+.entries)    a gc's condemned packs, until its sweep is done (pipelines/gc.py)
    validation/<time>-<blake3>  packs found intact by verify, and when (append-only)
    jobs/<name>/runs/<id>.json  job runs (alike_ray/jobs.py)

Invariants:
- every object is written atomically (a reader sees all of it or nothing);
- every object carries a check of its own bytes, verified on every read (storage/objects.py:
  checked JSON; Parquet with page checksums and its BLAKE3 in its key or in the object naming
  it; packs by block hashes and a footer crc over the pack id); an object that fails it is
  damaged data (DamagedData, exit 3), named, never used. Stores of format 1 still read;
- a version is visible only once its version.json exists, and version.json is written after
  its manifests, which are written after the index segments naming their blocks, which are
  written after the packs holding those blocks. A crash therefore leaves only unreferenced
  objects behind, never a visible partial version;
- a version is removed version.json first, so it vanishes whole;
- a pack is deleted only by gc, after its index entries are gone and every writer that could
  have seen them has finished; a block some committed version uses is never deleted;
- the blocks a version uses are its manifests' whole blocks plus, for each patched block, its
  base (always a whole block) and its delta (`Manifest.blobs`): a restore of any block reads at
  most two stored blocks.

`storage` imports neither `pipelines` nor `alike_ray`.
"""
