"""Handing freed memory back to the operating system, for the compile's memory-heavy steps.

Freeing tensors is not enough for a process's resident memory to fall: glibc's allocator serves most tensor-sized
allocations from its heap once its dynamic mmap threshold has risen (up to 32 MB on 64-bit systems, mallopt(3)) and
keeps freed heap pages resident. Measured: after Q/DQ insertion dropped DiT-XL/2's float weights the compile still
held 4.6 GB resident where about 1.5 GB were live; and in reconstruction the resident memory at each DiT-S/2
block's start grew by ~70 MB a block while the live tensors grew by 2-3 MB (~3 MB a block with this call;
bench_reconstruct.py --memory, docs/benchmarks.md).
"""

from __future__ import annotations

import contextlib
import gc


def release_freed_memory() -> None:
    """Collect cycles (fx modules, the exporter's programs leave them), then ask glibc to trim its heap
    (``malloc_trim(0)``). Elsewhere than glibc only the collection runs."""
    import ctypes

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@contextlib.contextmanager
def older_objects_frozen():
    """Freeze (``gc.freeze``) the objects that exist on entry and thaw them on exit, so that repeated
    :func:`release_freed_memory` calls inside scan only what was made since: a full collection in a process
    holding 3 million objects took 0.64 s (measured), enough to eat a short ``--time-budget``. ``gc.unfreeze``
    thaws every frozen object, so where objects are frozen already (a pre-forking server's own ``gc.freeze``)
    this neither freezes nor thaws."""
    freeze = gc.get_freeze_count() == 0
    if freeze:
        gc.freeze()
    try:
        yield
    finally:
        if freeze:
            gc.unfreeze()
