"""Argument checks shared by the public functionals.

Every check raises ``TypeError`` (wrong kind of object or dtype) or ``ValueError`` (wrong value or shape) with a
message that starts with the op name and names the offending argument and what was expected, so that bad input
never surfaces as an error deep inside torch or Triton.
"""
from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Optional, Sequence, Tuple

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
SIMILARITIES = ("qk", "kk", "qq", "csa")
MAX_HEAD_DIM = 256


def check_int(op: str, name: str, value, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{op}: {name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{op}: {name} must be >= {minimum}, got {value}")
    return int(value)


def check_positive_float(op: str, name: str, value, *, allow_none: bool) -> Optional[float]:
    if value is None:
        if allow_none:
            return None
        raise TypeError(f"{op}: {name} must be a positive number, got None")
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{op}: {name} must be a number{' or None' if allow_none else ''}, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{op}: {name} must be a finite number > 0, got {value}")
    return value


def check_grid(op: str, grid) -> Tuple[int, int]:
    if not isinstance(grid, Sequence) or isinstance(grid, str) or len(grid) != 2:
        raise TypeError(f"{op}: grid must be a pair (h, w) of patch-grid rows and columns, got {grid!r}")
    h = check_int(op, "grid[0] (h)", grid[0], minimum=1)
    w = check_int(op, "grid[1] (w)", grid[1], minimum=1)
    return h, w


def check_float_tensor(op: str, name: str, tensor, *, ndim: int, layout: str) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor of shape {layout}, got {type(tensor).__name__}")
    if tensor.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{op}: {name} must be a floating tensor (float16, bfloat16, float32 or float64), got {tensor.dtype}"
        )
    if tensor.dim() != ndim:
        raise ValueError(f"{op}: {name} must be {ndim}-D {layout}, got shape {tuple(tensor.shape)}")
    return tensor


def check_same_dtype_device(op: str, named: Sequence[Tuple[str, torch.Tensor]]) -> None:
    first_name, first = named[0]
    for name, tensor in named[1:]:
        if tensor.dtype != first.dtype:
            raise TypeError(f"{op}: {name} has dtype {tensor.dtype} but {first_name} has {first.dtype}; they must match")
        if tensor.device != first.device:
            raise ValueError(
                f"{op}: {name} is on {tensor.device} but {first_name} is on {first.device}; they must be on one device"
            )


def check_attention_args(q, k, v, grid, sigma, prefix_tokens, similarity, scale, op: str = "neighbour_attention"):
    """Validate the arguments of :func:`neighbour_attention`; returns ``(h, w, sigma, prefix_tokens, scale)``.

    ``scale`` is resolved to ``D ** -0.5`` when ``None``.
    """
    if not isinstance(similarity, str) or similarity not in SIMILARITIES:
        raise ValueError(f"{op}: similarity must be one of {SIMILARITIES}, got {similarity!r}")
    layout = "[B, H, N, D]"
    k = check_float_tensor(op, "k", k, ndim=4, layout=layout)
    v = check_float_tensor(op, "v", v, ndim=4, layout=layout)
    named = [("k", k), ("v", v)]
    if q is None:
        if similarity != "kk":
            raise TypeError(f"{op}: q may be None only for similarity='kk', got None with similarity={similarity!r}")
    else:
        q = check_float_tensor(op, "q", q, ndim=4, layout=layout)
        named.insert(0, ("q", q))
    check_same_dtype_device(op, named)
    if q is not None and q.shape != k.shape:
        raise ValueError(f"{op}: q and k must have the same shape [B, H, N, D], got {tuple(q.shape)} and {tuple(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(
            f"{op}: v must have the shape of k [B, H, N, D] = {tuple(k.shape)}, got {tuple(v.shape)}"
        )
    head_dim = k.shape[-1]
    if head_dim < 1 or head_dim > MAX_HEAD_DIM:
        raise ValueError(f"{op}: head_dim (last dim of q/k/v) must be in [1, {MAX_HEAD_DIM}], got {head_dim}")
    h, w = check_grid(op, grid)
    prefix_tokens = check_int(op, "prefix_tokens", prefix_tokens, minimum=0)
    n_tokens = k.shape[2]
    if n_tokens != prefix_tokens + h * w:
        raise ValueError(
            f"{op}: N (dim 2 of q/k/v) must equal prefix_tokens + h*w = {prefix_tokens} + {h}*{w} = "
            f"{prefix_tokens + h * w} for grid={tuple(grid)}, got N={n_tokens}"
        )
    sigma = check_positive_float(op, "sigma", sigma, allow_none=True)
    if scale is None:
        scale = head_dim ** -0.5
    else:
        if isinstance(scale, bool) or not isinstance(scale, Real) or not math.isfinite(float(scale)):
            raise ValueError(f"{op}: scale must be a finite number or None, got {scale!r}")
        scale = float(scale)
    return h, w, sigma, prefix_tokens, scale
