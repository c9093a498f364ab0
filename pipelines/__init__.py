"""The data plane: Ray DAGs for backup, restore and verify. Imports `storage`, never `alike_ray`."""


def _keep_freed_memory() -> None:
    """glibc gives freed memory back to the kernel as soon as 1 MiB is free at the heap's top;
    a task that decodes or compresses 512 KiB blocks in runs then takes a page fault for every
    4 KiB of every block (on this 2-core VM ~3 s of kernel CPU per 5 GB restored). Keep up to
    128 MiB of freed heap per process (a task's peak is below it: 4 reads of 16 MiB and
    8 MiB of decoded blocks), and serve allocations up to 32 MiB from the heap.
    Every process that imports the data plane (Ray workers, the driver) does this once;
    $ALIKE_MALLOC_TUNE=0 leaves glibc's defaults."""
    import ctypes
    import os
    import sys

    if not sys.platform.startswith("linux") or os.environ.get("ALIKE_MALLOC_TUNE", "1") == "0":
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-1, 128 << 20)  # M_TRIM_THRESHOLD
        libc.mallopt(-3, 32 << 20)   # M_MMAP_THRESHOLD (the largest glibc takes)
    except (OSError, AttributeError):  # not glibc (musl...): its defaults
        pass


_keep_freed_memory()
