"""Eager PyTorch ground truth for every op, written to follow ``SPEC.md`` literally.

Nothing here is optimised: these functions materialise the ``N x N`` scores and bias, exactly like NACLIP's own
code, and serve as (a) the correctness oracle of the tests (run in float64) and (b) the "eager PyTorch" baseline
of the benchmarks. Use :func:`naclip_kernels.neighbour_attention` / :func:`naclip_kernels.pamr` for real work.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from naclip_kernels._validation import check_attention_args, check_grid, check_int, check_positive_float

__all__ = [
    "gaussian_bias",
    "naclip_gaussian_bias",
    "neighbour_attention",
    "attention_with_bias",
    "clear_bias_cache",
    "pamr",
]


# --------------------------------------------------------------------------------------------------------------
# Neighbour-aware attention (SPEC.md section 1)
# --------------------------------------------------------------------------------------------------------------
def gaussian_bias(grid: Tuple[int, int], sigma: float, prefix_tokens: int = 1, *, device=None,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Closed-form neighbourhood bias ``omega`` as a dense ``[N, N]`` tensor, ``N = prefix_tokens + h*w``.

    ``omega[t, u] = exp(-((i_t - i_u)^2 + (j_t - j_u)^2) / (2 sigma^2))`` for patch tokens ``t, u`` (row-major on the
    ``h x w`` grid after the prefix), and 0 in every row and column of a prefix token.
    """
    op = "gaussian_bias"
    h, w = check_grid(op, grid)
    sigma = check_positive_float(op, "sigma", sigma, allow_none=False)
    prefix_tokens = check_int(op, "prefix_tokens", prefix_tokens, minimum=0)
    rows = torch.arange(h, device=device, dtype=torch.float64).repeat_interleave(w)
    cols = torch.arange(w, device=device, dtype=torch.float64).repeat(h)
    dist2 = (rows[:, None] - rows[None, :]) ** 2 + (cols[:, None] - cols[None, :]) ** 2
    n = prefix_tokens + h * w
    bias = torch.zeros(n, n, device=device, dtype=torch.float64)
    bias[prefix_tokens:, prefix_tokens:] = torch.exp(-dist2 / (2.0 * sigma * sigma))
    return bias.to(dtype)


def naclip_gaussian_bias(grid: Tuple[int, int], sigma: float, prefix_tokens: int = 1, *, device=None,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The bias built the way NACLIP's code builds it: a ``(2h-1) x (2w-1)`` Gaussian window convolved ("same"
    padding) over a one-hot map of every grid position, then zero rows/columns for the prefix tokens.

    Costs ``(h*w)^2 (2h-1)(2w-1)`` multiply-adds (about a minute for a 64x64 grid on two CPU cores); it exists to
    prove that :func:`gaussian_bias` is the same matrix and to time NACLIP's first call for a new grid size.
    """
    op = "naclip_gaussian_bias"
    h, w = check_grid(op, grid)
    sigma = check_positive_float(op, "sigma", sigma, allow_none=False)
    prefix_tokens = check_int(op, "prefix_tokens", prefix_tokens, minimum=0)
    # The window is centred: offsets -(h-1)..(h-1) by -(w-1)..(w-1), values exp(-(di^2 + dj^2) / (2 sigma^2)).
    di = torch.arange(-(h - 1), h, device=device, dtype=dtype)
    dj = torch.arange(-(w - 1), w, device=device, dtype=dtype)
    window = torch.exp(-(di[:, None] ** 2 + dj[None, :] ** 2) / (2.0 * sigma * sigma))
    one_hot = torch.eye(h * w, device=device, dtype=dtype).reshape(h * w, 1, h, w)
    patch_bias = F.conv2d(one_hot, window[None, None], padding="same").reshape(h * w, h * w)
    n = prefix_tokens + h * w
    bias = torch.zeros(n, n, device=device, dtype=dtype)
    bias[prefix_tokens:, prefix_tokens:] = patch_bias
    return bias


@lru_cache(maxsize=8)
def _cached_bias(h: int, w: int, sigma: float, prefix_tokens: int, device: torch.device,
                 dtype: torch.dtype) -> torch.Tensor:
    # NACLIP caches its bias per grid size; the reference does the same so that the "bias cached" baseline is fair.
    return gaussian_bias((h, w), sigma, prefix_tokens, device=device, dtype=dtype)


def clear_bias_cache() -> None:
    """Drop the reference's cached ``N x N`` biases (they can be large: 67 MB for a 64x64 grid in float32)."""
    _cached_bias.cache_clear()


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # SPEC: accumulate in float32 whatever the input dtype; float64 inputs stay float64 (the test oracle).
    return torch.float64 if dtype == torch.float64 else torch.float32


def attention_with_bias(q: Optional[torch.Tensor], k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor],
                        similarity: str = "kk", scale: Optional[float] = None) -> torch.Tensor:
    """``softmax(scale * a b^T + bias) v`` for the similarity's ``(a, b)`` pair(s), with a materialised bias.

    ``bias`` is ``[N, N]`` (or ``None``); ``csa`` sums the ``qq`` and ``kk`` attentions. Computes in float32
    (float64 for float64 inputs) and returns the input dtype.
    """
    if scale is None:
        scale = k.shape[-1] ** -0.5
    compute = _compute_dtype(k.dtype)
    pairs = {"qk": [(q, k)], "kk": [(k, k)], "qq": [(q, q)], "csa": [(q, q), (k, k)]}[similarity]
    v_c = v.to(compute)
    bias_c = None if bias is None else bias.to(compute)
    out = None
    for a, b in pairs:
        scores = scale * (a.to(compute) @ b.to(compute).transpose(-1, -2))
        if bias_c is not None:
            scores = scores + bias_c
        term = torch.softmax(scores, dim=-1) @ v_c
        out = term if out is None else out + term
    return out.to(v.dtype)


def neighbour_attention(q: Optional[torch.Tensor], k: torch.Tensor, v: torch.Tensor, grid: Tuple[int, int],
                        sigma: Optional[float] = 5.0, prefix_tokens: int = 1, similarity: str = "kk",
                        scale: Optional[float] = None, backend: str = "reference") -> torch.Tensor:
    """Eager ground truth of :func:`naclip_kernels.neighbour_attention` (same arguments and semantics).

    Materialises the ``[B, H, N, N]`` scores and the ``[N, N]`` bias (cached per grid, like NACLIP).
    ``backend`` is accepted so that calls can be switched between implementations; only ``"reference"`` and
    ``"auto"`` are meaningful here.
    """
    if backend not in ("reference", "auto"):
        raise ValueError(f"reference.neighbour_attention: backend must be 'reference' (or 'auto'), got {backend!r}")
    h, w, sigma, prefix_tokens, scale = check_attention_args(
        q, k, v, grid, sigma, prefix_tokens, similarity, scale, op="reference.neighbour_attention")
    bias = None
    if sigma is not None:
        bias = _cached_bias(h, w, sigma, prefix_tokens, k.device, _compute_dtype(k.dtype))
    return attention_with_bias(q, k, v, bias, similarity, scale)


# --------------------------------------------------------------------------------------------------------------
# PAMR (SPEC.md section 3)
# --------------------------------------------------------------------------------------------------------------
