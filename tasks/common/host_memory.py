"""Keep freed host memory inside the process while a run computes on the CPU.

glibc's malloc serves every block above its mmap threshold (128 KiB at first, raised only as far as the largest block
freed so far) with a fresh `mmap` and returns it to the kernel on `free`, and it trims free memory off the top of its
heap. A CPU training step allocates and frees tensors of a few MiB by the dozen, so each step maps them again and the
kernel zero-fills every page on first touch: thousands of page faults a step, and a large share of the time of
memory-bound work such as the optimiser's update. With the threshold at glibc's ceiling (32 MiB) and the heap trimmed
only when more than 1 GiB lies free at its top, freed blocks are reused as they are, which is what tcmalloc and
jemalloc, the allocators recommended for CPU training, do by design. The resident memory stays at the run's peak
instead of falling between steps.

Only CPU runs ask for it: on a GPU the tensors live in device memory, and loader workers (forked from the main
process, which would inherit the setting) are better off returning their image buffers.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import sys

log = logging.getLogger(__name__)

# mallopt(3) parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
LARGEST_HEAP_BLOCK = 32 * 1024 * 1024  # DEFAULT_MMAP_THRESHOLD_MAX on 64-bit glibc; larger blocks stay mapped
TRIM_THRESHOLD = 1024 * 1024 * 1024  # free memory at the top of the heap that is kept rather than returned


@functools.cache
def keep_freed_host_memory() -> bool:
    """Set glibc's malloc to reuse freed blocks up to `LARGEST_HEAP_BLOCK` (see the module docstring), once per
    process. Returns whether it was set: False where the C library is not glibc (macOS, musl)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt, glibc_version = libc.mallopt, libc.gnu_get_libc_version
    except (OSError, AttributeError):
        return False
    glibc_version.restype = ctypes.c_char_p
    kept = mallopt(_M_MMAP_THRESHOLD, LARGEST_HEAP_BLOCK) == 1 and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    if kept:
        log.debug("glibc %s: freed host blocks up to %d MiB are reused", glibc_version().decode(),
                  LARGEST_HEAP_BLOCK >> 20)
    return kept


def keep_freed_host_memory_for(device_type: str) -> bool:
    """`keep_freed_host_memory` for a run that computes on `device_type` ("cpu", "cuda", ...): only CPU runs ask for
    it (see the module docstring). Returns whether it is set."""
    return device_type == "cpu" and keep_freed_host_memory()


__all__ = ["keep_freed_host_memory", "keep_freed_host_memory_for"]
