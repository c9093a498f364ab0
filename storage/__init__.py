"""The deduplicating block store.

Layout (identical on a directory and, later, on S3, so that an ODS is a copy of an ADS)::

    config.json                 store id, format version, block size, hash key, compression
    packs/<xx>/<pack-id>        zstd-compressed blocks appended, then a footer index
    index/<x>/<segment>.parquet immutable (hash -> pack, offset, length) segments, by hash nibble
    versions/<vm>/<version>/    disk-<n>.parquet manifests (block number -> hash), version.json last
    locks/                      who writes, and since when

Invariants:
- every object is written atomically (a reader sees all of it or nothing);
- a version is visible only once its version.json exists, and version.json is written after
  its manifests, which are written after the index segments naming their blocks, which are
  written after the packs holding those blocks. A crash therefore leaves only unreferenced
  objects behind, never a visible partial version.

`storage` imports neither `pipelines` nor `alike_ray`.
"""
