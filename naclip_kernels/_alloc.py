"""Output allocation for every launcher, with NaN poisoning for the tests.

Kernels write their outputs into buffers from :func:`empty_output`. Under :func:`poison_outputs` those buffers are
filled with NaN first, so an element a kernel forgot to write shows up as NaN in the comparison with the
reference instead of passing by luck with whatever memory ``torch.empty`` returned.
"""
from __future__ import annotations

import contextlib
import threading

import torch

from naclip_kernels._host_memory import mapped_empty

_state = threading.local()


def poisoning() -> bool:
    """True within :func:`poison_outputs` (for launchers that borrow an output's memory as scratch first and must
    poison it again before the kernel that writes it)."""
    return getattr(_state, "poison", False)


@contextlib.contextmanager
def poison_outputs():
    """Within this context every kernel output buffer starts as NaN (integer buffers as -1)."""
    previous = poisoning()
    _state.poison = True
    try:
        yield
    finally:
        _state.poison = previous


def poison(out: torch.Tensor) -> None:
    """Fill ``out`` as :func:`empty_output` does under :func:`poison_outputs`."""
    out.fill_(float("nan") if out.is_floating_point() else -1)


def empty_output(*shape, dtype: torch.dtype, device, own_mapping: bool = False) -> torch.Tensor:
    """``torch.empty`` for kernel outputs; NaN-filled under :func:`poison_outputs`. ``own_mapping`` (CPU): the
    buffer gets its own memory mapping, hinted for huge pages and returned to a small cache when freed
    (:func:`naclip_kernels._host_memory.mapped_empty`; not resizable)."""
    if own_mapping and torch.device(device).type == "cpu":
        out = mapped_empty(shape, dtype)
    else:
        out = torch.empty(*shape, dtype=dtype, device=device)
    if poisoning():
        poison(out)
    return out
