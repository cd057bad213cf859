"""Keep freed memory in the process while training on CPU (glibc malloc), instead of page-faulting it back in.

glibc's ``malloc`` serves a request above its mmap threshold (128 KiB, raised automatically up to 32 MiB) with a
fresh ``mmap`` and hands it back to the kernel on ``free``; the kernel then zero-fills every 4 KiB page again at
its first touch. A CPU training step allocates the same large tensors every micro-batch - the logits alone are
micro batch x sequence length x vocabulary x 4 bytes (4 x 256 x 49,152 x 4 = 192 MiB for the quickstart), and
their softmax and gradients as many again - so each micro-batch pays tens of thousands of page faults and the
kernel's zeroing, about a fifth of the quickstart's iteration time on a 2-core machine (``docs/benchmarks.md``,
"Keeping freed memory on CPU").

:func:`reuse_freed_memory` sets two of glibc's ``mallopt`` parameters for the duration of a CPU run (documented
in ``mallopt(3)``): ``M_MMAP_MAX = 0`` (large blocks come from the heap too, where freed blocks are reused) and
``M_TRIM_THRESHOLD`` at its maximum (free memory at the top of the heap is kept, not returned). The process's
resident memory then stays near its peak while training, as a caching allocator's does; on exit large blocks are
mmapped again (above 32 MiB: where glibc's dynamic threshold ends up, see ``AFTER_MMAP_THRESHOLD``) and
``malloc_trim(0)`` returns the free memory to the system. Elsewhere (musl,
macOS, Windows: no ``mallopt``) it does nothing and says so. PyTorch's own knob for this,
``THP_MEM_ALLOC_ENABLE=1`` (transparent huge pages for large CPU tensors), is read once at its first allocation,
so it cannot be set from inside a running process.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import platform
from typing import Iterator

# glibc <malloc.h>
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4
DEFAULT_MMAP_MAX = 65536
# Setting any of these turns off glibc's dynamic thresholds for the rest of the process (there is no call to turn
# them back on), and their static defaults (128 KiB) would then mmap every block above 128 KiB. On exit they are
# set where the dynamic ones end up after large blocks were freed: the mmap threshold at its 64-bit maximum
# (DEFAULT_MMAP_THRESHOLD_MAX, 32 MiB) and the trim threshold at twice that, as glibc's free() sets them.
AFTER_MMAP_THRESHOLD, AFTER_TRIM_THRESHOLD = 32 * 1024 * 1024, 64 * 1024 * 1024
KEEP_ALL = 2**31 - 1  # mallopt takes an int: the largest trim threshold it accepts


def glibc():
    """The C library as a ``ctypes.CDLL`` when it is glibc with ``mallopt`` and ``malloc_trim``, else None."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    if not (hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim")):
        return None
    libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    return libc


@contextlib.contextmanager
def reuse_freed_memory(enabled: bool = True) -> Iterator[bool]:
    """While active, large freed blocks stay in the process for the next allocation (see the module docstring).
    Yields True when the allocator was tuned (glibc, ``enabled``), False otherwise. Process-wide: every thread's
    allocations are affected while it is active."""
    libc = glibc() if enabled else None
    if libc is None:
        yield False
        return
    tuned = bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, KEEP_ALL))
    try:
        yield tuned
    finally:
        libc.mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
        libc.mallopt(M_MMAP_THRESHOLD, AFTER_MMAP_THRESHOLD)
        libc.mallopt(M_TRIM_THRESHOLD, AFTER_TRIM_THRESHOLD)
        libc.malloc_trim(0)
