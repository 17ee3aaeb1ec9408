"""Proxy attention (ProxyCLIP): ``softmax(A) v_h`` with ``A = gamma (xh xh^T - beta mu)``, ``A < 0`` masked.

Layers, bottom up: the memory-lean torch path ``_proxy_attention_torch`` and the public functional
:func:`proxy_attention` that validates, dispatches and returns. The maths is ``SPEC.md`` section 7; the literal
eager version is :func:`naclip_kernels.reference.proxy_attention`.

What makes it cheap: the weights ``softmax(A)`` do not depend on the head, so each block of query rows computes its
``[block, M]`` weights once and multiplies them with all heads at once (``v`` viewed as ``[M, H*D]``: one matmul);
``mu`` (the mean of all ``M * M`` similarities) is ``||sum_t xh_t||^2 / M^2``, an ``O(M*C)`` reduction. No ``M x M``
tensor is ever formed, and no ``[H, M, M]`` one.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from naclip_kernels import reference
from naclip_kernels._alloc import empty_output
from naclip_kernels._backend import BackendUnavailableError, resolve_backend
from naclip_kernels._validation import check_proxy_attention_args

__all__ = ["proxy_attention"]


def _normalised(feats: torch.Tensor, compute: torch.dtype) -> torch.Tensor:
    """``feats / ||feats||`` over C in ``compute``, as ``F.normalize`` (the reference's and ProxyCLIP's rule: a zero
    vector stays zero)."""
    return F.normalize(feats.to(compute), dim=-1)


def _similarity_mean(xh: torch.Tensor) -> torch.Tensor:
    """Per-image mean of ``S = xh xh^T`` ``[B, M, M]`` without forming it: ``||sum_t xh_t||^2 / M^2``, ``[B]``."""
    n_tokens = xh.shape[1]
    total = xh.sum(dim=1)
    return (total * total).sum(dim=-1) / float(n_tokens * n_tokens)


# ==============================================================================================================
# Torch path (CPU, or CUDA without Triton)
# ==============================================================================================================
# Per image, per block of query rows [m0, m1) (all in float32, float64 for float64 inputs):
#   buf = (gamma xh_blk) @ xh^T                  one matmul into a preallocated [block, M] slab: gamma * S
#   threshold_(buf, <gamma * beta * mu, -inf)    the mask, in place (the diagonal is saved first and restored)
#   exp_(buf)                                    in place: the unnormalised weights, masked entries exp(-inf) = 0
#   res = buf @ [V | 1]                          ONE matmul for all heads: v as [M, H*D] plus a ones column, so the
#                                                row sums l come out of the same product (no extra pass over buf)
#   out[:, :, m0:m1] = res[:, :HD] / l           the normalisation fused into the copy to [H, block, D]
# No max subtraction: |S| <= 1, so gamma * S <= gamma and exp cannot overflow while gamma <= _EXP_SAFE_GAMMA;
# the diagonal (S_tt = 1 for a non-zero token, 0 for a zero token, never masked) keeps every row sum >= 1
# (exp(gamma * S) is the softmax numerator up to the row-constant factor exp(-gamma * beta * mu), which the
# normalisation cancels). Larger gamma subtract gamma first (one more pass over buf). Rows whose sum still
# under/overflows (only possible with a huge gamma and a zero feature vector) are redone with the literal maths.
# Slabs hold about this many elements: 2 MiB in float32 stays in the L2/L3 cache between the five passes, and
# 256+ rows keep both matmuls efficient. Extra memory is O(block * M + M * (C + H*D)).
_SLAB_ELEMENTS = 1 << 19
_SLAB_ELEMENTS_CUDA = 1 << 26
_EXP_SAFE_GAMMA = {torch.float32: 80.0, torch.float64: 700.0}


def _block_rows(n_tokens: int, device: torch.device) -> int:
    budget = _SLAB_ELEMENTS_CUDA if device.type == "cuda" else _SLAB_ELEMENTS
    rows = max(16, budget // max(1, n_tokens))
    num_blocks = -(-n_tokens // rows)
    return -(-n_tokens // num_blocks)  # equal blocks: no tiny tail block (a whole extra pass over xh and V)


def _keep_threshold(mu: float, beta: float, gamma: float, dtype: torch.dtype) -> float:
    """``t`` such that ``gamma*S > t`` iff ``S >= beta*mu`` as the reference decides it (``A >= 0`` kept).

    ``F.threshold`` keeps ``x > t`` (strictly), so ``t`` is the float just below ``gamma * beta * mu`` in the
    compute dtype: ``x > t`` is then ``x >= gamma * beta * mu``, which keeps ``A = 0`` exactly."""
    edge = torch.tensor(gamma * (beta * mu), dtype=dtype)
    return float(torch.nextafter(edge, torch.tensor(float("-inf"), dtype=dtype)))


def _literal_rows(xh, xh_rows, rows, mu, beta, gamma, v_aug, heads, head_dim):
    """Rows ``rows`` of one image by the literal maths (max-subtracted softmax): the fallback for rows whose sum
    under/overflowed in the fast path. Returns ``[len(rows), H*D]``."""
    scores = gamma * (xh_rows @ xh.T - beta * mu)
    keep = (scores >= 0)
    keep[torch.arange(len(rows), device=xh.device), rows] = True  # the diagonal is never masked
    weights = torch.softmax(scores.masked_fill(~keep, float("-inf")), dim=-1)
    return weights @ v_aug[:, : heads * head_dim]


def _proxy_attention_torch(feats: torch.Tensor, v: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """Blocked proxy attention; ``[B, M, C]``, ``[B, H, M, D]`` -> ``[B, H, M, D]`` contiguous in ``v``'s dtype.

    float32 compute (float64 for float64 inputs); extra memory O(block * M + M * (C + H*D)) per image.
    Not differentiable (in-place ops on the weight slab).
    """
    batch, heads, n_tokens, head_dim = v.shape
    compute = torch.float64 if v.dtype == torch.float64 else torch.float32
    hd = heads * head_dim
    out = empty_output(batch, heads, n_tokens, head_dim, dtype=v.dtype, device=v.device)
    block = _block_rows(n_tokens, v.device)
    buf = torch.empty(block, n_tokens, dtype=compute, device=v.device)
    res = torch.empty(block, hd + 1, dtype=compute, device=v.device)
    v_aug = torch.empty(n_tokens, hd + 1, dtype=compute, device=v.device)
    v_aug[:, hd] = 1.0
    shift = gamma > _EXP_SAFE_GAMMA[compute]
    for b in range(batch):
        xh = _normalised(feats[b], compute)                                      # [M, C]
        xq = xh * gamma                                                          # the query side carries gamma
        mu = float(_similarity_mean(xh[None])[0])
        cut = _keep_threshold(mu, beta, gamma, compute)
        # [H, M, D] -> [M, H, D] -> [M, H*D]: a strided copy (and the dtype conversion) into the augmented buffer.
        v_aug[:, :hd].view(n_tokens, heads, head_dim).copy_(v[b].transpose(0, 1))
        xh_t = xh.T
        for m0 in range(0, n_tokens, block):
            m1 = min(n_tokens, m0 + block)
            rows = m1 - m0
            slab = buf[:rows]
            torch.mm(xq[m0:m1], xh_t, out=slab)                                   # gamma * S[m0:m1]
            diagonal = slab[:, m0:m1].diagonal()
            saved = diagonal.clone()
            F.threshold_(slab, cut, float("-inf"))
            diagonal.copy_(saved)                                                 # never masked
            if shift:
                slab.sub_(gamma)
            slab.exp_()
            acc = res[:rows]
            torch.mm(slab, v_aug, out=acc)
            sums = acc[:, hd]
            bad = ~(torch.isfinite(sums) & (sums > 0))
            if bool(bad.any()):
                idx = bad.nonzero().flatten()
                acc[idx, :hd] = _literal_rows(xh, xh[m0 + idx], m0 + idx, mu, beta, gamma, v_aug, heads, head_dim)
                sums[idx] = 1.0
            scaled = acc[:, :hd].view(rows, heads, head_dim).transpose(0, 1)      # [H, rows, D] view
            if v.dtype == compute:
                torch.div(scaled, sums[None, :, None], out=out[b, :, m0:m1])
            else:  # division in the compute dtype, one rounding to v's dtype
                out[b, :, m0:m1].copy_(scaled / sums[None, :, None])
    return out


# ==============================================================================================================
# Public functional
# ==============================================================================================================
def proxy_attention(feats: torch.Tensor, v: torch.Tensor, beta: float = 1.2, gamma: float = 3.0,
                    backend: str = "auto") -> torch.Tensor:
    r"""ProxyCLIP's proxy attention: attention weights from VFM features, applied to CLIP's values of every head.

    .. math::
        \hat x_t = x_t / \lVert x_t \rVert, \quad S = \hat x \hat x^\top, \quad
        \mu = \tfrac{1}{M^2} \textstyle\sum_{t,u} S_{tu} = \lVert \sum_t \hat x_t \rVert^2 / M^2, \quad
        A = \gamma\,(S - \beta\mu), \quad \mathrm{out}_h = \mathrm{softmax}_u\big(A \text{ with } A_{tu} < 0
        \text{ set to } -\infty \text{ for } t \ne u\big)\, v_h

    ``mu`` is per image; ``A = 0`` is kept; the diagonal is never masked (``SPEC.md`` section 7). One weight
    matrix is shared by all heads and never materialised as ``M x M``.

    Args:
        feats: ``[B, M, C]`` raw VFM patch features (L2-normalised here; a zero vector stays zero, as with
            ``F.normalize``), ``1 <= C <= 1280``. Same dtype and device as ``v``; any strides.
        v: ``[B, H, M, D]`` values per head (``M`` on feats' grid, row-major); any strides.
        beta: mean-offset factor (ProxyCLIP: 1.2), any finite number.
        gamma: temperature (ProxyCLIP: 3.0), finite and > 0. No ``1/sqrt(d)`` scale.
        backend: ``"auto" | "triton" | "torch" | "reference"`` (see :mod:`naclip_kernels._backend`).

    Returns:
        ``[B, H, M, D]`` contiguous, in the input dtype (float16, bfloat16, float32; float64 on the torch and
        reference backends). Accumulation is float32 (float64 for float64 inputs).

    Raises:
        TypeError / ValueError: bad arguments, naming the argument and the expected shape or dtype.
        BackendUnavailableError: an explicit backend that cannot run here.
    """
    beta, gamma = check_proxy_attention_args(feats, v, beta, gamma)
    chosen = resolve_backend(backend, v.device, "proxy_attention")
    if chosen == "reference":
        return reference.proxy_attention(feats, v, beta, gamma)
    if v.numel() == 0:
        return torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if chosen == "triton":
        if backend == "auto":
            return _proxy_attention_torch(feats, v, beta, gamma)
        raise BackendUnavailableError("proxy_attention: the Triton kernel is not built yet; use backend='torch'")
    return _proxy_attention_torch(feats, v, beta, gamma)
