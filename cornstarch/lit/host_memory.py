"""Host memory between train steps: glibc's ``malloc`` made to keep freed blocks for the next step.

A CPU train step frees its gradients at ``zero_grad`` (``set_to_none``, torch's and Lightning's default) and
allocates them again in the next backward. glibc returns a freed block to the kernel when the free memory at the top
of its heap exceeds a *trim threshold* that it raises only as far as twice the largest block freed so far; with two
gradients of ~31 MiB each (a 32k × 256 embedding and LM head) both can be given back at ``zero_grad``, and the next
backward page-faults them in again: on the Llava-shaped bench model on a 2-core CPU, 8 000 page faults and 88.1 ms
per step against none and 81.5 ms with this module's setting (``python bench/host_memory.py``).
:func:`keep_freed_host_memory` fixes the thresholds: blocks up to 32 MiB come from the heap, and up to 1 GiB of free
heap can stay in the process for reuse. ``cornstarch fit`` (every ``cornstarch`` subcommand) calls it at start
(``CORNSTARCH_KEEP_FREED_MEMORY=0`` keeps glibc's defaults); an accelerator's memory is not affected.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (glibc's malloc.h)
MMAP_THRESHOLD = 32 << 20  # glibc's largest: blocks above it are always mapped afresh and unmapped when freed
TRIM_THRESHOLD = 1 << 30  # free memory kept at the top of the heap
USER_SETTINGS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")
OPT_OUT = "CORNSTARCH_KEEP_FREED_MEMORY"  # "0": leave glibc's defaults
applied = False


def on_glibc() -> bool:
    """Whether this process runs on Linux with glibc's ``malloc`` (the only one :func:`keep_freed_host_memory`
    tunes)."""
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def keep_freed_host_memory(trim_threshold: int = TRIM_THRESHOLD) -> bool:
    """Make glibc's ``malloc`` keep freed memory for reuse: blocks up to 32 MiB come from the heap, and up to
    ``trim_threshold`` bytes of free heap stay in the process instead of being returned to the kernel (and
    page-faulted in again at the next allocation). Process-wide; it changes no result, only where memory comes from.

    Args:
        trim_threshold: bytes of free memory at the top of the heap that stay in the process (at most 2 GiB - 1).

    Returns:
        True when applied; False where it does not apply (not Linux with glibc), when the environment already sets
        one of glibc's ``MALLOC_*_`` tunables (the user's choice is kept), or with ``CORNSTARCH_KEEP_FREED_MEMORY=0``
        (glibc's defaults kept).

    >>> MMAP_THRESHOLD >> 20, TRIM_THRESHOLD >> 30  # MiB, GiB
    (32, 1)
    """
    global applied
    if not on_glibc() or os.environ.get(OPT_OUT) == "0":
        return False
    if any(name in os.environ for name in USER_SETTINGS):
        log.info("glibc malloc tunables set in the environment (%s): kept as they are",
                 ", ".join(name for name in USER_SETTINGS if name in os.environ))
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    ok = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    ok = libc.mallopt(M_TRIM_THRESHOLD, min(trim_threshold, (1 << 31) - 1)) == 1 and ok
    applied = applied or ok
    return ok
