"""Backend selection shared by every op (NATTEN-style dispatch).

``backend`` is one of:

- ``"auto"``: the Triton kernel for CUDA tensors when Triton is installed, otherwise the fused torch path
  (which is what CPU tensors always get, interpreter or not);
- ``"triton"``: the Triton kernel; CUDA tensors, or CPU tensors when the kernels were imported under
  ``TRITON_INTERPRET=1`` (slow, for testing);
- ``"torch"``: the memory-lean PyTorch path (any device);
- ``"reference"``: the eager PyTorch ground truth in :mod:`naclip_kernels.reference`.

An explicit backend that cannot run raises :class:`BackendUnavailableError` saying why; it never silently falls
back.
"""
from __future__ import annotations

import torch

from naclip_kernels._triton_compat import HAS_TRITON, TRITON_IMPORT_ERROR, interpreter_enabled

BACKENDS = ("auto", "triton", "torch", "reference")


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run on these inputs or this machine."""


def triton_unavailable_reason(device: torch.device) -> str | None:
    """Why the Triton backend cannot run on ``device`` (``None`` when it can)."""
    if not HAS_TRITON:
        return f"Triton is not installed ({TRITON_IMPORT_ERROR}); use backend='torch'"
    if device.type == "cuda":
        return None  # compiled kernels; under the interpreter CUDA tensors go through host memory
    if device.type == "cpu":
        if interpreter_enabled():
            return None
        return (
            "the Triton backend needs CUDA tensors; CPU tensors run only under the Triton interpreter, which must "
            "be enabled with TRITON_INTERPRET=1 before naclip_kernels is imported (use backend='torch' on CPU)"
        )
    return f"the Triton backend does not support device type {device.type!r}; use backend='torch'"


def resolve_backend(backend: str, device: torch.device, op: str, auto_avoids_triton: str | None = None) -> str:
    """Validate ``backend`` and turn ``"auto"`` into a concrete backend for tensors on ``device``.

    ``auto_avoids_triton``: why the Triton kernel cannot take these particular inputs (e.g. float64), if it cannot;
    ``"auto"`` then picks the torch path. An explicit ``backend="triton"`` is not redirected: the op reports it.
    """
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type == "cuda" and HAS_TRITON and not interpreter_enabled() and auto_avoids_triton is None:
            return "triton"
        return "torch"
    if backend == "triton":
        reason = triton_unavailable_reason(device)
        if reason is not None:
            raise BackendUnavailableError(f"{op}: backend='triton' cannot run: {reason}")
    return backend
