"""The one tolerance table of the test suite, with the reason for every entry.

Every fast path is compared with the float64 reference (``naclip_kernels.reference`` run on the inputs upcast to
float64). A tolerance is ``(atol, rtol)`` applied as ``|fast - ref| <= atol + rtol * |ref|`` elementwise, the
``torch.testing.assert_close`` rule. Keys are ``(op, backend, dtype)``. Add new entries here, never inline.
"""
from __future__ import annotations

from typing import Dict, NamedTuple, Tuple

import torch


class Tol(NamedTuple):
    atol: float
    rtol: float
    reason: str


TOLERANCES: Dict[Tuple[str, str, torch.dtype], Tol] = {
    # ---------------------------------------------------------------- neighbour attention
    # Outputs are convex combinations of v rows (|out| <= max |v| ~ 4 for randn), so absolute error is the measure.
    ("attention", "torch", torch.float64): Tol(1e-10, 1e-10, "same maths as the reference in float64; only the "
                                               "summation order of the blocked softmax differs"),
    ("attention", "torch", torch.float32): Tol(2e-5, 2e-5, "float32 compute (eps 1.2e-7) over N <= ~600 keys: "
                                               "softmax normalisation and a length-N dot product, ~100 eps"),
    ("attention", "torch", torch.float16): Tol(4e-3, 4e-3, "inputs quantised to float16 before the op (the float64 "
                                               "reference sees the same quantised inputs) and the output rounded "
                                               "to float16: half an ulp of |out| <= 4 is 2e-3"),
    ("attention", "torch", torch.bfloat16): Tol(3e-2, 2e-2, "output rounded to bfloat16 (8-bit mantissa): half an "
                                                "ulp of |out| <= 4 is 1.6e-2"),
    ("attention", "triton", torch.float32): Tol(5e-5, 5e-5, "float32 (IEEE, no TF32) dot products; online softmax "
                                                "rescaling adds a few eps per key block over the torch path"),
    ("attention", "triton", torch.float16): Tol(8e-3, 8e-3, "P is cast to float16 before the P@V tensor-core dot "
                                                "(as in flash attention): one float16 rounding of probabilities "
                                                "plus the output rounding"),
    ("attention", "triton", torch.bfloat16): Tol(6e-2, 4e-2, "P cast to bfloat16 before P@V (8-bit mantissa) plus "
                                                 "the bfloat16 output rounding"),
}


def tol(op: str, backend: str, dtype: torch.dtype) -> Tol:
    try:
        return TOLERANCES[(op, backend, dtype)]
    except KeyError:
        raise KeyError(f"no tolerance for {(op, backend, dtype)}: add one with its reason to tests/tolerances.py")


def assert_close_to_reference(actual: torch.Tensor, expected: torch.Tensor, op: str, backend: str,
                              dtype: torch.dtype, msg: str = "") -> None:
    """Compare ``actual`` (any dtype) with the float64 ``expected`` under the table's tolerance."""
    t = tol(op, backend, dtype)
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)} {msg}"
    assert actual.dtype == dtype, f"output dtype {actual.dtype} != input dtype {dtype} {msg}"
    assert torch.isfinite(actual).all(), f"non-finite output (unwritten/poisoned elements?) {msg}"
    torch.testing.assert_close(actual.double(), expected.double(), atol=t.atol, rtol=t.rtol,
                               msg=lambda m: f"{op}/{backend}/{dtype}: {m} {msg} [tolerance: {t.reason}]")
