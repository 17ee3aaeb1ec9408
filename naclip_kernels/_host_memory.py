"""Host (CPU) memory for the compiled kernels: transparent-huge-page hints and per-call scratch mappings.

Why: a fresh buffer costs a page fault per 4 KiB page when it is first written, and again when it is freed. On
the dev machine (Linux 6.18 VM) writing a fresh 34 MB float32 buffer took 6.7 ms with 4 KiB pages and 1.2 ms with
2 MiB transparent huge pages, against 0.4 ms for writing it again; PAMR's 56-query 336x448 mask is such a buffer,
and glibc hands out every allocation above 32 MB as a fresh mapping. So the big CPU buffers of the compiled PAMR
path are hinted with ``madvise(MADV_HUGEPAGE)`` before their first write (what PyTorch's own
``THP_MEM_ALLOC_ENABLE=1`` does for every allocation).

Only the 2 MiB-aligned interior of a buffer is hinted, so a huge page never extends past memory the buffer owns
(its resident size stays what is written). The hint is a no-op where transparent huge pages are off or absent
(other systems than Linux); ``NACLIP_KERNELS_HUGE_PAGES=0`` turns it off.

:func:`mapped_empty` maps a buffer directly (anonymous ``mmap``) instead of going through the process's malloc:
the mapping is returned to the system when its last view dies. Through glibc, PAMR's output and scratch at 21
queries, 336x448 (12 MB each) stayed resident after a call and fragmented the heap: the resident-set peak of
repeated calls reached 2-3x that of one call.
"""
from __future__ import annotations

import functools
import math
import mmap
import os
import sys
from typing import Sequence

import torch

HUGE_PAGE_BYTES = 1 << 21
# Buffers smaller than this are left alone: at most one aligned huge page would fit inside.
_MIN_HINT_BYTES = 2 * HUGE_PAGE_BYTES
_MADV_HUGEPAGE = getattr(mmap, "MADV_HUGEPAGE", 14)


def huge_pages_enabled() -> bool:
    """False when ``NACLIP_KERNELS_HUGE_PAGES`` is ``0``/``off``/``false``/``no`` or the system is not Linux."""
    flag = os.environ.get("NACLIP_KERNELS_HUGE_PAGES", "1").strip().lower()
    return sys.platform.startswith("linux") and flag not in ("0", "off", "false", "no")


@functools.lru_cache(maxsize=1)
def _madvise():
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.madvise
    except (OSError, AttributeError):  # pragma: no cover - no libc madvise
        return None
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return fn


def advise_huge_pages(tensor: torch.Tensor) -> bool:
    """Hint the 2 MiB-aligned interior of a CPU tensor's memory for transparent huge pages; call it before the
    memory is first written (pages already resident keep their size). True if a range was hinted; a refused hint
    (``madvise`` failing, THP absent) is ignored, as the buffer works either way."""
    nbytes = tensor.numel() * tensor.element_size()
    if tensor.device.type != "cpu" or nbytes < _MIN_HINT_BYTES or not huge_pages_enabled():
        return False
    fn = _madvise()
    if fn is None:  # pragma: no cover
        return False
    start = tensor.data_ptr()
    first = -(-start // HUGE_PAGE_BYTES) * HUGE_PAGE_BYTES
    last = (start + nbytes) // HUGE_PAGE_BYTES * HUGE_PAGE_BYTES
    return last > first and fn(first, last - first, _MADV_HUGEPAGE) == 0


def mapped_empty(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised contiguous CPU tensor in its own private anonymous mapping (zero pages, hinted for huge
    pages), unmapped as soon as the tensor and every view of it are gone, so it never stays resident in the
    process's malloc heap after its last use. Like ``torch.from_numpy``'s tensors it is not resizable."""
    shape = tuple(int(n) for n in shape)
    if any(n < 0 for n in shape):
        raise ValueError(f"mapped_empty: shape must be non-negative, got {shape}")
    count = math.prod(shape)
    nbytes = count * torch.empty(0, dtype=dtype).element_size()
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    if hasattr(mmap, "MAP_PRIVATE"):
        # Private: a shared anonymous mapping is shmem, which takes huge pages only where shmem_enabled says so.
        region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE)
    else:  # pragma: no cover - Windows: anonymous mappings there are private already
        region = mmap.mmap(-1, nbytes)
    tensor = torch.frombuffer(region, dtype=dtype, count=count)
    advise_huge_pages(tensor)
    return tensor.view(shape)
