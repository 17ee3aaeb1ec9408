"""Host (CPU) memory for the compiled kernels: private mappings, transparent huge pages, and a small cache of them.

Why. Fresh memory is expensive. Every 4 KiB page costs a fault when it is first written, and in a VM it can cost a
lot more: on the dev machine (a Firecracker VM, Linux 6.18) writing a fresh 34 MB buffer took 6.7 ms with 4 KiB
pages, 1.2 ms with 2 MiB transparent huge pages, and 0.4 ms for writing it again. At times, when the host had
taken the guest's freed memory back, faulting PAMR's 21-query 336x448 buffers in (23 MB) cost 5-20 ms of system
time per call, more than the kernels. malloc is no help. glibc hands out every allocation above 32 MB as a fresh
mapping. Smaller ones it keeps in its heap, but the heap fragments: over repeated PAMR calls, the resident-set peak
reached 2-3x that of one call.

So the compiled CPU PAMR path takes its output and its scratch from :func:`mapped_empty`:

* Each buffer is a private anonymous mapping. Its length is a whole number of huge pages, so it starts on a
  huge-page boundary. It is hinted with ``madvise(MADV_HUGEPAGE)`` up to its last whole huge page. A huge page
  therefore never reaches past what the buffer uses, and the buffer's resident size stays what is written.
* When the last view of a buffer dies, its mapping goes back to a cache of at most ``_MAX_CACHED`` mappings
  instead of being unmapped. The next call of a similar size then finds its pages resident and pays no faults.
  This is the host-side counterpart of PyTorch's CUDA caching allocator.
* :func:`empty_cpu_cache` unmaps the cached mappings (``naclip_kernels.empty_cpu_cache()``).
  ``NACLIP_KERNELS_CPU_CACHE=0`` turns the cache off, and ``NACLIP_KERNELS_HUGE_PAGES=0`` turns off the hint.
  The hint is a no-op where transparent huge pages are off or absent (systems other than Linux).

Tensors from :func:`mapped_empty` are ordinary CPU tensors, except that, like ``torch.from_numpy``'s, they cannot
be resized in place.
"""
from __future__ import annotations

import ctypes
import functools
import math
import mmap
import os
import sys
import threading
import weakref
from typing import List, Sequence

import torch

from naclip_kernels._env import switch_on

HUGE_PAGE_BYTES = 1 << 21
# Buffers smaller than this are left alone: at most one aligned huge page would fit inside.
_MIN_HINT_BYTES = 2 * HUGE_PAGE_BYTES
_MADV_HUGEPAGE = getattr(mmap, "MADV_HUGEPAGE", 14)
# Free mappings kept for reuse. A PAMR call holds two at a time (its output and its scratch), and a caller usually
# holds on to the previous output, so four covers the steady state of a loop.
_MAX_CACHED = 4
# A cached mapping serves a request of at least this fraction of its length (a much smaller buffer would pin a
# much larger resident mapping).
_MIN_FILL = 0.5


def huge_pages_enabled() -> bool:
    """False when ``NACLIP_KERNELS_HUGE_PAGES`` is ``0``/``off``/``false``/``no`` or the system is not Linux."""
    return sys.platform.startswith("linux") and switch_on("NACLIP_KERNELS_HUGE_PAGES")


def cpu_cache_enabled() -> bool:
    """False when ``NACLIP_KERNELS_CPU_CACHE`` is ``0``/``off``/``false``/``no``."""
    return switch_on("NACLIP_KERNELS_CPU_CACHE")


@functools.lru_cache(maxsize=1)
def _madvise():
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):  # pragma: no cover - no libc madvise
        return None
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return fn


def advise_huge_pages(tensor: torch.Tensor) -> bool:
    """Hint the 2 MiB-aligned interior of a CPU tensor's memory for transparent huge pages; call it before the
    memory is first written (pages already resident keep their size). True if a range was hinted; a refused hint
    (``madvise`` failing, THP absent) is ignored, as the buffer works either way."""
    start, nbytes = tensor.data_ptr(), tensor.numel() * tensor.element_size()
    fn = _madvise() if tensor.device.type == "cpu" and huge_pages_enabled() and nbytes >= _MIN_HINT_BYTES else None
    if fn is None:
        return False
    first = -(-start // HUGE_PAGE_BYTES) * HUGE_PAGE_BYTES
    last = (start + nbytes) // HUGE_PAGE_BYTES * HUGE_PAGE_BYTES
    return last > first and fn(first, last - first, _MADV_HUGEPAGE) == 0


# ---- the cache -------------------------------------------------------------------------------------------------
_lock = threading.RLock()     # re-entrant: a finalizer (_give_back) may run while this thread holds it
_free: List[mmap.mmap] = []          # oldest first


def _reset_after_fork() -> None:
    """A forked child starts with an empty cache and a fresh lock (another thread may have held it)."""
    global _lock
    _lock = threading.RLock()
    _free.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


def _new_region(nbytes: int) -> mmap.mmap:
    # A length in whole huge pages: Linux then starts the mapping on a huge-page boundary, so only the buffer's
    # tail, not also its head, is left to 4 KiB pages. The unused end is address space, never resident.
    length = -(-nbytes // HUGE_PAGE_BYTES) * HUGE_PAGE_BYTES if nbytes >= _MIN_HINT_BYTES else nbytes
    if hasattr(mmap, "MAP_PRIVATE"):
        # Private: a shared anonymous mapping is shmem, which takes huge pages only where shmem_enabled says so.
        return mmap.mmap(-1, length, flags=mmap.MAP_PRIVATE)
    return mmap.mmap(-1, length)  # pragma: no cover - Windows: anonymous mappings there are private already


def _take_region(nbytes: int) -> mmap.mmap:
    """The smallest cached mapping that fits ``nbytes`` well (see ``_MIN_FILL``), else a new one."""
    with _lock:
        fits = [r for r in _free if nbytes <= len(r) and nbytes >= _MIN_FILL * len(r)]
        if fits:
            region = min(fits, key=len)
            _free.remove(region)
            return region
    return _new_region(nbytes)


def _give_back(region: mmap.mmap) -> None:
    """Called when the last view of a buffer dies: keep its mapping for reuse, or let it be unmapped."""
    if not cpu_cache_enabled():
        return
    with _lock:
        _free.append(region)
        del _free[:-_MAX_CACHED]


def empty_cpu_cache() -> int:
    """Unmap the cached free mappings of the compiled CPU kernels (buffers in use are not touched). Returns the
    bytes of address space released (their resident part is at most that)."""
    with _lock:
        released = cached_bytes()
        _free.clear()
    return released


def cached_bytes() -> int:
    """Bytes of address space held by the cache's free mappings."""
    with _lock:
        return sum(len(r) for r in _free)


def mapped_empty(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised contiguous CPU tensor in a private anonymous mapping of its own, hinted for huge pages and
    taken from (and, when its last view dies, returned to) the cache. Not resizable, like ``torch.from_numpy``'s
    tensors. A mapping fresh from the system reads as zeros; a cached one holds its previous contents."""
    shape = tuple(int(n) for n in shape)
    if any(n < 0 for n in shape):
        raise ValueError(f"mapped_empty: shape must be non-negative, got {shape}")
    count = math.prod(shape)
    nbytes = count * torch.empty(0, dtype=dtype).element_size()
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    region = _take_region(nbytes)
    block = (ctypes.c_char * len(region)).from_buffer(region)
    # torch.frombuffer keeps `block` alive for as long as any view of the tensor lives; when it dies, the
    # mapping goes back to the cache.
    weakref.finalize(block, _give_back, region)
    tensor = torch.frombuffer(block, dtype=dtype, count=count)
    advise_huge_pages(tensor)
    return tensor.view(shape)
