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


# Under torch.compile with dynamic shapes, sizes (and, unless specialised, Python floats) arrive as torch.SymInt /
# torch.SymFloat. They are accepted as they are: int() / float() / math.isfinite() on them would specialise the
# graph to one value (a recompile per image size) or break it; comparisons become guards that hold for every size.
_SYM_INTS = (torch.SymInt,)
_SYM_FLOATS = (torch.SymInt, torch.SymFloat)


def check_int(op: str, name: str, value, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (Integral, *_SYM_INTS)):
        raise TypeError(f"{op}: {name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{op}: {name} must be >= {minimum}, got {value}")
    return value if isinstance(value, _SYM_INTS) else int(value)


def check_positive_float(op: str, name: str, value, *, allow_none: bool) -> Optional[float]:
    if value is None:
        if allow_none:
            return None
        raise TypeError(f"{op}: {name} must be a positive number, got None")
    if isinstance(value, bool) or not isinstance(value, (Real, *_SYM_FLOATS)):
        raise TypeError(f"{op}: {name} must be a number{' or None' if allow_none else ''}, got {type(value).__name__}")
    value = value if isinstance(value, _SYM_FLOATS) else float(value)
    if not 0 < value < math.inf:  # also false for NaN
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
        if isinstance(scale, bool) or not isinstance(scale, (Real, *_SYM_FLOATS)) or not -math.inf < scale < math.inf:
            raise ValueError(f"{op}: scale must be a finite number or None, got {scale!r}")
        scale = scale if isinstance(scale, _SYM_FLOATS) else float(scale)
    return h, w, sigma, prefix_tokens, scale


MAX_PROXY_CHANNELS = 1280  # largest VFM width the kernels are specified for (ViT-H: 1280)


def check_proxy_attention_args(feats, v, beta, gamma, op: str = "proxy_attention"):
    """Validate the arguments of :func:`proxy_attention`; returns ``(beta, gamma)`` as floats.

    ``feats`` ``[B, M, C]`` (``1 <= C <= 1280``) and ``v`` ``[B, H, M, D]`` share dtype, device, ``B`` and ``M``;
    ``beta`` is any finite number, ``gamma`` a finite number > 0 (so that ``A < 0`` is the same as
    ``S < beta * mu``).
    """
    feats = check_float_tensor(op, "feats", feats, ndim=3, layout="[B, M, C]")
    v = check_float_tensor(op, "v", v, ndim=4, layout="[B, H, M, D]")
    if v.dtype != feats.dtype:
        raise TypeError(f"{op}: v has dtype {v.dtype} but feats has {feats.dtype}; they must match "
                        f"(cast feats with feats.to(v.dtype))")
    if v.device != feats.device:
        raise ValueError(f"{op}: v is on {v.device} but feats is on {feats.device}; they must be on one device")
    batch, n_tokens, channels = feats.shape
    if v.shape[0] != batch or v.shape[2] != n_tokens:
        raise ValueError(f"{op}: v must be [B, H, M, D] with B={batch} and M={n_tokens} from feats [B, M, C] = "
                         f"{tuple(feats.shape)}, got v of shape {tuple(v.shape)}")
    if channels < 1 or channels > MAX_PROXY_CHANNELS:
        raise ValueError(f"{op}: feats' channel dim C (last dim of [B, M, C]) must be in [1, {MAX_PROXY_CHANNELS}], "
                         f"got {channels}")
    if isinstance(beta, bool) or not isinstance(beta, (Real, *_SYM_FLOATS)):
        raise TypeError(f"{op}: beta must be a number, got {type(beta).__name__}")
    if not -math.inf < beta < math.inf:  # also false for NaN
        raise ValueError(f"{op}: beta must be a finite number, got {beta!r}")
    gamma = check_positive_float(op, "gamma", gamma, allow_none=False)
    return (beta if isinstance(beta, _SYM_FLOATS) else float(beta)), gamma
