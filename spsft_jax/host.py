"""The process's host memory: what the allocator holds that the process no longer uses."""
from __future__ import annotations

import ctypes
import gc


def release_host_memory() -> None:
    """Hand memory that is free but still held by the C allocator back to the system.

    XLA's compiler leaves a few hundred MiB of freed scratch in the allocator's heap,
    where the step's own large buffers (mapped separately) cannot reuse it; returning
    it lowers the process's footprint by as much. glibc only (`malloc_trim`); a no-op
    elsewhere.
    """
    gc.collect()
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    if hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
