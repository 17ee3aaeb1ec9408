"""Output allocation for every launcher, with NaN poisoning for the tests.

Kernels write their outputs into buffers from :func:`empty_output`. Under :func:`poison_outputs` those buffers are
filled with NaN first, so an element a kernel forgot to write shows up as NaN in the comparison with the
reference instead of passing by luck with whatever memory ``torch.empty`` returned.
"""
from __future__ import annotations

import contextlib
import threading

import torch

_state = threading.local()


def _poisoning() -> bool:
    return getattr(_state, "poison", False)


@contextlib.contextmanager
def poison_outputs():
    """Within this context every kernel output buffer starts as NaN (integer buffers as -1)."""
    previous = _poisoning()
    _state.poison = True
    try:
        yield
    finally:
        _state.poison = previous


def empty_output(*shape, dtype: torch.dtype, device) -> torch.Tensor:
    """``torch.empty`` for kernel outputs; NaN-filled under :func:`poison_outputs`."""
    out = torch.empty(*shape, dtype=dtype, device=device)
    if _poisoning():
        out.fill_(float("nan") if out.is_floating_point() else -1)
    return out
