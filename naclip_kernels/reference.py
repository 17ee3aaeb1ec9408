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

from naclip_kernels._validation import (check_attention_args, check_grid, check_int, check_positive_float,
                                        check_proxy_attention_args)

__all__ = [
    "gaussian_bias",
    "naclip_gaussian_bias",
    "neighbour_attention",
    "attention_with_bias",
    "clear_bias_cache",
    "pamr",
    "pamr_affinity",
    "proxy_attention",
    "proxyclip_original_attention",
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
# Proxy attention (SPEC.md section 7)
# --------------------------------------------------------------------------------------------------------------
def proxy_attention(feats: torch.Tensor, v: torch.Tensor, beta: float = 1.2, gamma: float = 3.0,
                    backend: str = "reference") -> torch.Tensor:
    r"""Eager ground truth of :func:`naclip_kernels.proxy_attention` (ProxyCLIP's proxy attention, SPEC.md section 7).

    .. math::
        \hat x = x / \lVert x \rVert, \quad S = \hat x \hat x^\top, \quad \mu = \mathrm{mean}(S), \quad
        A = \gamma (S - \beta \mu), \quad A_{tu} \leftarrow -\infty \text{ where } A_{tu} < 0,\ t \ne u, \quad
        \mathrm{out}_h = \mathrm{softmax}(A)\, v_h

    ``feats`` ``[B, M, C]`` (raw VFM features; L2-normalised here with ``F.normalize``, i.e. a zero vector stays
    zero), ``v`` ``[B, H, M, D]``; returns ``[B, H, M, D]`` in ``v``'s dtype. ``mu`` is per image (the mean of all
    ``M * M`` entries); ``A = 0`` exactly is kept; the diagonal is never masked (where ProxyCLIP's own code gives a
    NaN row, this gives ``out_t = v_t``); one ``[M, M]`` weight matrix is shared by all ``H`` heads. Computes in
    float32 (float64 for float64 inputs) and materialises ``[B, M, M]`` scores and weights.
    """
    if backend not in ("reference", "auto"):
        raise ValueError(f"reference.proxy_attention: backend must be 'reference' (or 'auto'), got {backend!r}")
    beta, gamma = check_proxy_attention_args(feats, v, beta, gamma, op="reference.proxy_attention")
    compute = _compute_dtype(v.dtype)
    xh = F.normalize(feats.to(compute), dim=-1)
    similarity = xh @ xh.transpose(-1, -2)                                       # [B, M, M]
    mu = similarity.mean(dim=(-2, -1), keepdim=True)                             # per image
    scores = gamma * (similarity - beta * mu)
    n_tokens = feats.shape[1]
    off_diagonal = ~torch.eye(n_tokens, dtype=torch.bool, device=feats.device)
    scores = scores.masked_fill((scores < 0) & off_diagonal, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    return (weights.unsqueeze(1) @ v.to(compute)).to(v.dtype)                    # same weights for every head


def proxyclip_original_attention(feats: torch.Tensor, v: torch.Tensor, beta: float = 1.2,
                                 gamma: float = 3.0) -> torch.Tensor:
    """The proxy attention computed the way ProxyCLIP's own code (mc-lan/ProxyCLIP, ``custom_attn``) computes it.

    The baseline of the benchmarks and the "original" the tests hold :func:`proxy_attention` to: normalise over
    ``C``, one einsum for ``S``, ``mu`` over the whole batch (its HEAD; per image is the same at batch size 1, the
    only size its sliding inference sends), ``A < 0 -> -inf`` with no exception for the diagonal (a row whose
    every entry is masked comes out NaN), the ``[M, M]`` weights repeated over the ``H`` heads in ``v``'s dtype,
    a softmax over ``[B*H, M, M]`` and one ``bmm``. ``feats`` ``[B, M, C]``, ``v`` ``[B, H, M, D]`` ->
    ``[B, H, M, D]``, all in the input dtype (no float32 upcast, as in the original).
    """
    beta, gamma = check_proxy_attention_args(feats, v, beta, gamma, op="reference.proxyclip_original_attention")
    batch, heads, n_tokens, head_dim = v.shape
    feats_bcm = F.normalize(feats.transpose(1, 2), dim=1)                        # [B, C, M], as ex_feats.flatten(2)
    similarity = torch.einsum("b c m, b c n -> b m n", feats_bcm, feats_bcm)
    similarity = (similarity - similarity.mean() * beta) * gamma
    similarity[similarity < 0.0] = float("-inf")
    mask = similarity.to(v.dtype).unsqueeze(1).repeat(1, heads, 1, 1).reshape(batch * heads, n_tokens, n_tokens)
    weights = F.softmax(mask, dim=-1)
    out = torch.bmm(weights, v.reshape(batch * heads, n_tokens, head_dim))
    return out.view(batch, heads, n_tokens, head_dim)


# --------------------------------------------------------------------------------------------------------------
# PAMR (SPEC.md section 3)
# --------------------------------------------------------------------------------------------------------------
def _pamr_shift_kernels(centre: float, neighbour: float, with_centre_tap: bool, dtype, device) -> torch.Tensor:
    """3x3 conv kernels of the original PAMR code, one output channel per tap.

    Taps in the order of ``SPEC.md``: ``(-1,-1) (-1,0) (-1,1) (0,-1) (0,1) (1,-1) (1,0) (1,1)`` (row, column), times
    the dilation. Each kernel holds ``neighbour`` at its tap and ``centre`` at the centre, so a dilated conv over the
    replicate-padded input gives ``centre * x(p) + neighbour * x(p + o)`` (or just ``x(p + o)`` with ``centre=0``).
    ``with_centre_tap`` adds a 9th kernel picking the centre itself (the local-spread samples), placed in raster
    order like the original ``LocalStDev``.
    """
    taps = [(i, j) for i in range(3) for j in range(3) if with_centre_tap or (i, j) != (1, 1)]
    weight = torch.zeros(len(taps), 1, 3, 3, dtype=dtype, device=device)
    for out_channel, (i, j) in enumerate(taps):
        if (i, j) != (1, 1):
            weight[out_channel, 0, 1, 1] = centre
        weight[out_channel, 0, i, j] += neighbour
    return weight


def _pamr_local(x: torch.Tensor, weight: torch.Tensor, dilations) -> torch.Tensor:
    """``[B, K, H, W]`` -> ``[B, K, T * len(dilations), H, W]``: every 3x3 dilated tap of ``weight`` (``T`` kernels)
    over the input with replicate padding, exactly as the original ``LocalAffinity`` module computes it."""
    batch, channels, height, width = x.shape
    flat = x.reshape(batch * channels, 1, height, width)
    per_dilation = []
    for d in dilations:
        padded = F.pad(flat, [d] * 4, mode="replicate")
        per_dilation.append(F.conv2d(padded, weight, dilation=d))
    return torch.cat(per_dilation, 1).reshape(batch, channels, -1, height, width)


def pamr_affinity(image: torch.Tensor, dilations=(8, 16)) -> torch.Tensor:
    """The PAMR affinities ``[B, 8*len(dilations), H, W]`` of an image ``[B, K, H, W]`` (``SPEC.md`` section 3).

    ``a(p, n) = softmax_n( mean_c( -|x_c(p) - x_c(p + o_n)| / (1e-8 + 0.1 * std(p, c)) ) )`` with ``std`` the
    unbiased standard deviation of the ``9 * len(dilations)`` samples ``x_c(p + (a d, b d))``, ``a, b in {-1,0,1}``.
    Computed in the image's dtype promoted to float32 (float64 stays float64). Materialises
    ``[B, K, 9 * len(dilations), H, W]`` like the original.
    """
    x = image.to(_compute_dtype(image.dtype))
    std = _pamr_local(x, _pamr_shift_kernels(0.0, 1.0, True, x.dtype, x.device), dilations).std(2, keepdim=True)
    diff = _pamr_local(x, _pamr_shift_kernels(1.0, -1.0, False, x.dtype, x.device), dilations).abs()
    logits = (-diff / (1e-8 + 0.1 * std)).mean(1)
    return F.softmax(logits, 1)


def pamr(image: torch.Tensor, mask: torch.Tensor, num_iter: int = 10, dilations=(8, 16),
         backend: str = "reference") -> torch.Tensor:
    """Eager ground truth of :func:`naclip_kernels.pamr`: the original PAMR algorithm (Araslanov & Roth) as written.

    ``image`` ``[B, K, H, W]``, ``mask`` ``[B, C, h, w]`` (resized to ``H x W`` with bilinear, ``align_corners=True``
    when ``(h, w) != (H, W)``). Affinities from :func:`pamr_affinity`, then ``num_iter`` times
    ``m_c(p) <- sum_n a(p, n) m_c(p + o_n)`` with replicate (clamped) borders.

    Like the original it materialises the ``[B, C, 8 * len(dilations), H, W]`` neighbour stack every iteration
    (about 3 GiB at NACLIP's settings for 150+ queries): this is the slow, memory-hungry baseline. Computes in
    float32 (float64 when the mask or image is float64) and returns the mask's dtype.
    """
    from naclip_kernels.ops.pamr import check_pamr_args  # lazy: ops.pamr imports this module

    if backend not in ("reference", "auto"):
        raise ValueError(f"reference.pamr: backend must be 'reference' (or 'auto'), got {backend!r}")
    num_iter, dilations = check_pamr_args(image, mask, num_iter, dilations, op="reference.pamr")
    compute = torch.float64 if torch.float64 in (image.dtype, mask.dtype) else torch.float32
    batch, _, height, width = image.shape
    if mask.shape[1] == 0 or batch == 0:
        return mask.new_empty(batch, mask.shape[1], height, width)
    affinity = pamr_affinity(image.to(compute), dilations).unsqueeze(1)          # [B, 1, 8L, H, W]
    m = mask.to(compute)
    if m.shape[-2:] != (height, width):
        m = F.interpolate(m, size=(height, width), mode="bilinear", align_corners=True)
    copy = _pamr_shift_kernels(0.0, 1.0, False, compute, m.device)
    for _ in range(num_iter):
        m = (_pamr_local(m, copy, dilations) * affinity).sum(2)                  # [B, C, 8L, H, W] -> [B, C, H, W]
    return m.to(mask.dtype)
