"""Proxy attention (ProxyCLIP): ``softmax(A) v_h`` with ``A = gamma (xh xh^T - beta mu)``, ``A < 0`` masked.

Layers, bottom up: the Triton forward kernel ``_proxy_attention_fwd_kernel`` and its launcher
``_proxy_attention_triton``; the memory-lean torch path ``_proxy_attention_torch``; and the public functional
:func:`proxy_attention` that validates, dispatches and returns. The maths is ``SPEC.md`` section 7; the literal
eager version is :func:`naclip_kernels.reference.proxy_attention`.

What makes it cheap: the weights ``softmax(A)`` do not depend on the head, so each tile of weights is computed once
and multiplied with all heads at once (``v`` viewed as ``[M, H*D]``: one matmul); ``mu`` (the mean of all ``M * M``
similarities) is ``||sum_t xh_t||^2 / M^2``, an ``O(M*C)`` reduction. No ``M x M`` tensor is ever formed, and no
``[H, M, M]`` one. The torch path also uses the symmetry of ``S`` (each weight tile serves its transpose too).
"""
from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

from naclip_kernels import reference
from naclip_kernels._alloc import empty_output
from naclip_kernels._backend import resolve_backend
from naclip_kernels._library import define_op
from naclip_kernels._triton_compat import interpreter_enabled, tl, triton
from naclip_kernels._validation import check_proxy_attention_args
from naclip_kernels.ops.neighbour_attention import _dot

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


LOG2E = 1.4426950408889634
_MAX_GRID = 65535  # CUDA limit on grid dimensions 1 and 2 (the images go on dimension 2)


# ==============================================================================================================
# Triton kernel and launcher
# ==============================================================================================================
# Design:
#
# * The problem is one attention with a C-wide "query/key" (the VFM features) and an H*D-wide "value" (all CLIP
#   heads side by side): the weights do not depend on the head. A program owns BLOCK_M query rows and
#   CHUNKS * BLOCK_HD value columns, with CHUNKS (<= 4) separate [BLOCK_M, BLOCK_HD] accumulators. For every key
#   tile it computes the score tile ONCE (a C-loop of BLOCK_C-wide dots) and feeds it to all its column chunks, so
#   with CHUNKS * BLOCK_HD >= H*D the weights are computed exactly once per query block for all heads. Why chunks
#   and not one [BLOCK_M, H*D] accumulator: H*D = 768 is not a power of two (tl.arange needs one; padding to 1024
#   would waste a quarter of the P @ V work), and CHUNKS=3 of 256 covers it exactly. When the accumulators do not
#   fit the registers (fp32 operands, or H*D > CHUNKS * BLOCK_HD of the config), the column range is split over
#   grid dimension 1 and the score tile is recomputed per split: that costs (splits - 1) * 2 M^2 C extra flops, so
#   the autotune lists prefer the widest spill-free CHUNKS * BLOCK_HD.
# * Normalisation and mu come from a torch pre-pass in O(M*C) (inverse norms r_t = 1 / max(||x_t||, 1e-12), as
#   F.normalize, and beta * mu with mu = ||sum_t r_t x_t||^2 / M^2): memory-bound reductions that cost ~M*C reads
#   against the kernel's M^2 (C + H*D) flops, and one less kernel to specialise and AOT-check. The kernel dots the
#   RAW features (float16/bfloat16 products are exact in float32) and scales by r_t r_u afterwards, so S is as
#   accurate as float32 accumulation allows; normalising first in float16 would round xh to 11 bits and flip mask
#   decisions near the threshold.
# * Mask and softmax in the log2 domain: s2 = gamma log2(e) (S - beta mu); keep = S >= beta mu or the diagonal.
#   Proper online max, initialised with each row's diagonal score (computed in the prologue from ||x_t||^2 r_t^2,
#   always kept), so m_i is finite from the start: no (-inf) - (-inf) NaN on rows whose first tiles are fully
#   masked, and exp2(s2 - m) <= 1 on kept entries whatever rounding does to S_tt versus S_tu.
# * A key tile whose every entry is masked for all BLOCK_M rows skips the exp, the rescale and every P @ V dot
#   (real VFM features are spatially coherent: whole tiles of other regions are masked); only its score tile was
#   paid for.
# * V and the output are addressed as [M, H*D] through their strides (column j = head j // D, dim j % D), so any
#   [B, H, M, D] layout works without a copy.


@triton.jit
def _pv_chunk(acc, p, v_base, offs_n64, n_valid, col_off, col_valid, stride_vm, alpha, IEEE: tl.constexpr):
    """``acc * alpha + p @ V[keys, columns]`` for one column chunk (P rounded to V's dtype, as flash attention)."""
    vt = tl.load(v_base + offs_n64[:, None] * stride_vm + col_off[None, :],
                 mask=n_valid[:, None] & col_valid[None, :], other=0.0)
    return _dot(p.to(vt.dtype), vt, acc * alpha[:, None], IEEE)


@triton.jit
def _column_offsets(chunk, BLOCK_HD: tl.constexpr, col0, hd, head_dim, stride_vh, stride_vd):
    """Element offsets of value columns ``col0 + chunk * BLOCK_HD + [0, BLOCK_HD)`` of the [M, H*D] view."""
    cols = col0 + chunk * BLOCK_HD + tl.arange(0, BLOCK_HD)
    valid = cols < hd
    head = (cols // head_dim).to(tl.int64)
    dim = (cols % head_dim).to(tl.int64)
    return head * stride_vh + dim * stride_vd, valid


@triton.jit
def _store_chunk(o_base, offs_m64, m_valid, acc, inv_l, chunk, BLOCK_HD: tl.constexpr, col0, hd, head_dim,
                 stride_om, stride_oh, stride_od):
    off, valid = _column_offsets(chunk, BLOCK_HD, col0, hd, head_dim, stride_oh, stride_od)
    tl.store(o_base + offs_m64[:, None] * stride_om + off[None, :], (acc * inv_l[:, None]).to(o_base.dtype.element_ty),
             mask=m_valid[:, None] & valid[None, :])


@triton.jit(do_not_specialize=["M", "C", "hd", "head_dim", "gamma_log2", "m_bucket"])
def _proxy_attention_fwd_kernel(
    x_ptr, r_ptr, thr_ptr, v_ptr, o_ptr,
    stride_xb, stride_xm, stride_xc,
    stride_rb,
    stride_vb, stride_vh, stride_vm, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    M, C, hd, head_dim, gamma_log2, m_bucket,
    IEEE: tl.constexpr, CHUNKS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HD: tl.constexpr,
):
    """Proxy attention for BLOCK_M query rows and CHUNKS * BLOCK_HD value columns of one image.

    ``x`` ``[B, M, C]`` raw features, ``r`` ``[B, M]`` float32 inverse norms, ``thr`` ``[B]`` float32 ``beta * mu``,
    ``v`` / ``o`` ``[B, H, M, D]`` by strides (``hd = H * D``), ``gamma_log2 = gamma * log2(e)``. ``m_bucket`` is only
    an autotuning key. float32 accumulation; IEEE: float32 operands without TF32.
    """
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)  # int64 before stride math: B*M*C and B*H*M*D may exceed 2^31
    x_base = x_ptr + pid_b * stride_xb
    r_base = r_ptr + pid_b * stride_rb
    v_base = v_ptr + pid_b * stride_vb
    o_base = o_ptr + pid_b * stride_ob
    thr = tl.load(thr_ptr + pid_b)
    col0 = pid_c * (CHUNKS * BLOCK_HD)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_valid = offs_m < M
    offs_m64 = offs_m.to(tl.int64)
    r_q = tl.load(r_base + offs_m64, mask=m_valid, other=0.0)

    # Prologue: each row's diagonal score (never masked) starts the online max.
    sq = tl.zeros([BLOCK_M], tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        xq = tl.load(x_base + offs_m64[:, None] * stride_xm + offs_c[None, :] * stride_xc,
                     mask=m_valid[:, None] & (offs_c < C)[None, :], other=0.0).to(tl.float32)
        sq += tl.sum(xq * xq, 1)
    m_i = (sq * r_q * r_q - thr) * gamma_log2
    l_i = tl.zeros([BLOCK_M], tl.float32)

    off0, ok0 = _column_offsets(0, BLOCK_HD, col0, hd, head_dim, stride_vh, stride_vd)
    acc0 = tl.zeros([BLOCK_M, BLOCK_HD], tl.float32)
    if CHUNKS > 1:
        off1, ok1 = _column_offsets(1, BLOCK_HD, col0, hd, head_dim, stride_vh, stride_vd)
        acc1 = tl.zeros([BLOCK_M, BLOCK_HD], tl.float32)
    if CHUNKS > 2:
        off2, ok2 = _column_offsets(2, BLOCK_HD, col0, hd, head_dim, stride_vh, stride_vd)
        acc2 = tl.zeros([BLOCK_M, BLOCK_HD], tl.float32)
    if CHUNKS > 3:
        off3, ok3 = _column_offsets(3, BLOCK_HD, col0, hd, head_dim, stride_vh, stride_vd)
        acc3 = tl.zeros([BLOCK_M, BLOCK_HD], tl.float32)

    for start_n in range(0, M, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_valid = offs_n < M
        offs_n64 = offs_n.to(tl.int64)
        dots = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            c_valid = (offs_c < C)[None, :]
            xq = tl.load(x_base + offs_m64[:, None] * stride_xm + offs_c[None, :] * stride_xc,
                         mask=m_valid[:, None] & c_valid, other=0.0)
            xk = tl.load(x_base + offs_n64[:, None] * stride_xm + offs_c[None, :] * stride_xc,
                         mask=n_valid[:, None] & c_valid, other=0.0)
            dots = _dot(xq, tl.trans(xk), dots, IEEE)
        r_k = tl.load(r_base + offs_n64, mask=n_valid, other=0.0)
        sim = dots * r_q[:, None] * r_k[None, :]
        keep = ((sim >= thr) | (offs_m[:, None] == offs_n[None, :])) & n_valid[None, :]
        if tl.max(tl.max(keep.to(tl.int32), 1), 0) > 0:  # else: the whole tile is masked, nothing to add
            s2 = (sim - thr) * gamma_log2
            m_new = tl.maximum(m_i, tl.max(tl.where(keep, s2, float("-inf")), 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.where(keep, tl.exp2(s2 - m_new[:, None]), 0.0)
            l_i = l_i * alpha + tl.sum(p, 1)
            m_i = m_new
            acc0 = _pv_chunk(acc0, p, v_base, offs_n64, n_valid, off0, ok0, stride_vm, alpha, IEEE)
            if CHUNKS > 1:
                acc1 = _pv_chunk(acc1, p, v_base, offs_n64, n_valid, off1, ok1, stride_vm, alpha, IEEE)
            if CHUNKS > 2:
                acc2 = _pv_chunk(acc2, p, v_base, offs_n64, n_valid, off2, ok2, stride_vm, alpha, IEEE)
            if CHUNKS > 3:
                acc3 = _pv_chunk(acc3, p, v_base, offs_n64, n_valid, off3, ok3, stride_vm, alpha, IEEE)

    # Valid rows saw their diagonal (l_i >= ~1); padding rows may have l_i = 0 and are not stored.
    inv_l = 1.0 / tl.where(l_i > 0, l_i, 1.0)
    _store_chunk(o_base, offs_m64, m_valid, acc0, inv_l, 0, BLOCK_HD, col0, hd, head_dim, stride_om, stride_oh,
                 stride_od)
    if CHUNKS > 1:
        _store_chunk(o_base, offs_m64, m_valid, acc1, inv_l, 1, BLOCK_HD, col0, hd, head_dim, stride_om, stride_oh,
                     stride_od)
    if CHUNKS > 2:
        _store_chunk(o_base, offs_m64, m_valid, acc2, inv_l, 2, BLOCK_HD, col0, hd, head_dim, stride_om, stride_oh,
                     stride_od)
    if CHUNKS > 3:
        _store_chunk(o_base, offs_m64, m_valid, acc3, inv_l, 3, BLOCK_HD, col0, hd, head_dim, stride_om, stride_oh,
                     stride_od)


# Tuning space: (BLOCK_M, BLOCK_N, BLOCK_C, BLOCK_HD, MAX_CHUNKS, num_warps, num_stages); the first entry of each
# list is the default (the interpreter, or no autotuning). A launch uses CHUNKS <= MAX_CHUNKS accumulators of
# BLOCK_HD columns, balanced over as few column splits as possible (H*D = 768 with 128-column chunks: 2 splits of
# 3, not 4 + 2), so each entry stands for MAX_CHUNKS kernel specialisations, all of them in the AOT check.
# What is left after removing every candidate that spills (cuobjdump STACK > 0) on sm_80 or sm_90 with Triton 3.8
# or 3.9 (``python -m naclip_kernels.aot --ops proxy_attention``; reports in bench/results/aot/); removed, with the
# spilled bytes (sm_80 / sm_90, Triton 3.8 unless noted):
#   half: (32,64,64,256,3,8,2) 0/48 B; (64,32,64,256,3,8,2) -/112 B; (64,64,64,128,3,8,2) 72/0 B;
#     (64,64,64,128,4,8,2) 256/0 B; (32,64,64,128,3,4,2) 120/80 B; (64,64,32,128,3,8,2) 48/0 B;
#     (16,64,64,256,3,4,2) 320/312 B; (16,32,64,256,3,4,2) 0/8 B; (32,64,64,128,MAX_CHUNKS 4,8,2) clean on 3.8
#     but its CHUNKS=3 variant spills 0/16 B on 3.9.
#   fp32 (IEEE dots on the FMA units, operands in registers): (16,32,32,64,1,4,2) 8/8 B (at 80 registers);
#     (16,32,32,64,4,4,2) 24/376 B; (16,32,16,128,2,8,2) clean on 3.8, 0/8 B on 3.9 (CHUNKS 1 and 2).
_HALF_TUNE = (
    (32, 32, 64, 256, 3, 8, 2),   # H*D = 768 (CLIP ViT-B) in ONE program: the weights computed once for all heads
    (64, 32, 64, 128, 3, 8, 2),   # 64 rows x 384 columns: H*D = 768 in two splits
    (64, 64, 64, 128, 2, 8, 2),   # large key tiles for small H*D
)
_FP32_TUNE = (
    (16, 16, 32, 128, 2, 4, 2),
    (32, 32, 32, 64, 2, 8, 2),
)


def _tune_configs(dtype_bytes):
    return _FP32_TUNE if dtype_bytes == 4 else _HALF_TUNE


def _chunks(hd, block_hd, max_chunks):
    """Accumulators per program: the H*D columns in as few splits of <= max_chunks chunks, balanced."""
    units = max(1, triton.cdiv(hd, block_hd))
    splits = triton.cdiv(units, max_chunks)
    return triton.cdiv(units, splits)


def _specialise(base, hd):
    """A tuning entry as the concrete (BLOCK_M, BLOCK_N, BLOCK_C, BLOCK_HD, CHUNKS, num_warps, num_stages)."""
    bm, bn, bc, bh, max_chunks, nw, ns = base
    return bm, bn, bc, bh, _chunks(hd, bh, max_chunks), nw, ns


def _default_config(dtype_bytes, hd):
    return _specialise(_tune_configs(dtype_bytes)[0], hd)


def _config_tuple(c):
    kw = c.kwargs
    return kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_C"], kw["BLOCK_HD"], kw["CHUNKS"], c.num_warps, c.num_stages


def _prune_configs(configs, named_args, **kwargs):
    """Autotuner early prune: this dtype's spill-free entries, specialised to this H*D (never empty)."""
    hd = named_args["hd"]
    allowed = {_specialise(base, hd) for base in _tune_configs(named_args["v_ptr"].element_size())}
    return [c for c in configs if _config_tuple(c) in allowed]


# Every concrete specialisation of every entry: CHUNKS = 1..MAX_CHUNKS.
_TUNE_SPACE = tuple(dict.fromkeys(
    (bm, bn, bc, bh, chunks, nw, ns)
    for bm, bn, bc, bh, max_chunks, nw, ns in _HALF_TUNE + _FP32_TUNE for chunks in range(1, max_chunks + 1)))

_proxy_attention_fwd_tuned = triton.autotune(
    configs=[triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_C": bc, "BLOCK_HD": bh, "CHUNKS": ch},
                           num_warps=nw, num_stages=ns) for bm, bn, bc, bh, ch, nw, ns in _TUNE_SPACE],
    key=["m_bucket", "C", "hd", "IEEE"],
    prune_configs_by={"early_config_prune": _prune_configs},
)(_proxy_attention_fwd_kernel)


def _proxy_attention_prepass(feats: torch.Tensor, beta: float):
    """``(r [B, M], thr [B])`` float32: inverse norms as ``F.normalize`` (``1 / max(||x||, 1e-12)``) and
    ``beta * mu`` with ``mu = ||sum_t r_t x_t||^2 / M^2``. O(B * M * C)."""
    compute = torch.float64 if feats.dtype == torch.float64 else torch.float32
    x = feats.to(compute)
    r = 1.0 / torch.linalg.vector_norm(x, dim=-1).clamp_min(1e-12)
    mu = _similarity_mean(x * r[..., None])
    return r.to(torch.float32).contiguous(), (beta * mu).to(torch.float32).contiguous()


def _proxy_attention_triton(feats, v, beta, gamma, *, config=None, autotune=None):
    """Launch the fused forward kernel. Arguments as validated by :func:`proxy_attention`.

    float16 / bfloat16 / float32 inputs, any strides; output ``[B, H, M, D]`` contiguous in the input dtype.
    float32 inputs use IEEE float32 dots (no TF32: TF32's 10-bit products would flip mask decisions near the
    threshold). ``config``: ``(BLOCK_M, BLOCK_N, BLOCK_C, BLOCK_HD, CHUNKS, num_warps, num_stages)`` bypassing
    autotuning; ``autotune`` forces (True) or avoids (False) the autotuner (default: autotune unless interpreting).
    """
    if v.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"proxy_attention: backend='triton' supports float16, bfloat16 and float32 inputs, got "
                        f"{v.dtype}; use backend='torch' for {v.dtype}")
    batch, heads, n_tokens, head_dim = v.shape
    channels = feats.shape[-1]
    hd = heads * head_dim
    out = empty_output(batch, heads, n_tokens, head_dim, dtype=v.dtype, device=v.device)
    r, thr = _proxy_attention_prepass(feats, beta)
    interpreting = interpreter_enabled()
    # Under the interpreter bfloat16 dots are done on upcast operands (its NumPy dot mishandles bfloat16 storage).
    ieee = v.dtype == torch.float32 or (interpreting and v.dtype == torch.bfloat16)
    m_bucket = triton.next_power_of_2(n_tokens)
    if autotune is None:
        autotune = not interpreting
    if config is None and not autotune:
        config = _default_config(v.element_size(), hd)
    for b0 in range(0, batch, _MAX_GRID):
        b1 = min(batch, b0 + _MAX_GRID)
        xs, rs, ts, vs, os_ = feats[b0:b1], r[b0:b1], thr[b0:b1], v[b0:b1], out[b0:b1]
        args = (xs, rs, ts, vs, os_, *xs.stride(), rs.stride(0), *vs.stride(), *os_.stride(),
                n_tokens, channels, hd, head_dim, gamma * LOG2E, m_bucket)
        if config is None:
            grid = lambda meta: (triton.cdiv(n_tokens, meta["BLOCK_M"]),  # noqa: E731
                                 triton.cdiv(hd, meta["CHUNKS"] * meta["BLOCK_HD"]), b1 - b0)
            _proxy_attention_fwd_tuned[grid](*args, IEEE=ieee)
        else:
            bm, bn, bc, bh, chunks, nw, ns = config
            grid = (triton.cdiv(n_tokens, bm), triton.cdiv(hd, chunks * bh), b1 - b0)
            _proxy_attention_fwd_kernel[grid](*args, IEEE=ieee, CHUNKS=chunks, BLOCK_M=bm, BLOCK_N=bn, BLOCK_C=bc,
                                              BLOCK_HD=bh, num_warps=nw, num_stages=ns)
    return out


# ==============================================================================================================
# Torch path (CPU, or CUDA without Triton)
# ==============================================================================================================
# S is symmetric and so is the mask (one threshold per image), so the weight tile of keys j for queries i is the
# transpose of the tile of keys i for queries j: each tile pair (i, j >= i) is computed ONCE and feeds both
# (all in float32, float64 for float64 inputs):
#   slab = gamma * xh_i @ xh_j^T                 one matmul into a preallocated [T, T] slab
#   exp_(slab)                                   in place: the unnormalised weights of every entry
#   threshold_(slab, <exp(gamma beta mu), 0)     the mask, in place, on the weights (exp is monotonic); on diagonal
#                                                tiles the diagonal is saved first and restored (never masked)
#   acc_i += slab @ V_j                          ONE matmul for all heads: v viewed as [M, H*D] (no copy when v is a
#   acc_j += slab^T @ V_i                        [B, M, H, D] tensor seen as [B, H, M, D], as a ViT makes it)
#   l_i += slab.sum(1), l_j += slab.sum(0)       the row sums, in cache
#   out = acc / l                                the normalisation fused into the copy to [H, M, D]
# That is M^2 C + 2 M^2 H*D flops instead of the 2 M^2 C + 2 M^2 H*D of a row-block pass (0.75x of that at C = H*D
# = 768), and half the exps. An off-diagonal tile whose every weight is masked (queries and keys in different
# regions of a spatially coherent feature map) skips both P @ V products; the check is one pass over the slab. Accumulating tiles needs a fixed exp offset instead of a running max, which holds:
# |S| <= 1, so gamma * S <= gamma and exp cannot overflow while gamma <= _EXP_SAFE_GAMMA; the diagonal (S_tt = 1 for
# a non-zero token, 0 for a zero token, never masked) keeps every row sum >= 1 (exp(gamma * S) is the softmax
# numerator up to the row-constant factor exp(-gamma * beta * mu), which the normalisation cancels). Larger gamma
# subtract gamma first (one more pass over the slab). Rows whose sum still under/overflows (only possible with a
# huge gamma and a zero feature vector) are redone with the literal maths.
# Masking AFTER the exp, on finite arguments, matters on CPU: the vectorised exp takes a slow path on -inf
# (measured 4x slower per element than on finite values), so "mask to -inf, then exp" costs more than the mask.
# Tiles hold about this many elements: 2 MiB in float32 stays in the L2/L3 cache between the passes, and T ~ 700
# keeps the matmuls efficient and the number of ops (each a parallel region) small (2^17..2^20 measured on the
# 2-core machine: 2^19 fastest at M = 1764 and 4096, by 5-20%). Extra memory is O(T^2 + M * (C + H*D)).
_TILE_ELEMENTS = 1 << 19
_TILE_ELEMENTS_CUDA = 1 << 24
_EXP_SAFE_GAMMA = {torch.float32: 80.0, torch.float64: 700.0}


def _tile_rows(n_tokens: int, device: torch.device) -> int:
    """Tile side T: about sqrt(budget), split equally over M (no tiny tail tile: a whole extra pass over V)."""
    budget = _TILE_ELEMENTS_CUDA if device.type == "cuda" else _TILE_ELEMENTS
    side = max(16, int(budget ** 0.5))
    num_tiles = -(-n_tokens // side)
    return -(-n_tokens // num_tiles)


def _keep_threshold(mu: float, beta: float, gamma: float, shift: float, dtype: torch.dtype) -> float:
    """``t`` such that ``exp(gamma*S - shift) > t`` iff ``S >= beta*mu`` (``A >= 0`` kept), up to rounding.

    ``F.threshold`` keeps ``x > t`` (strictly), so ``t`` is the float just below ``exp(gamma*beta*mu - shift)``
    in the compute dtype: ``x > t`` is then ``x >= exp(...)``, which keeps ``A = 0`` exactly when ``S`` equals
    ``beta * mu`` (the weight is computed by the same exp from the same argument)."""
    edge = torch.tensor(gamma * (beta * mu), dtype=dtype)
    if shift:
        edge = edge - shift
    edge = edge.exp()
    return float(torch.nextafter(edge, torch.tensor(float("-inf"), dtype=dtype)))


def _literal_rows(xh, rows, mu, beta, gamma, v_flat):
    """Rows ``rows`` of one image by the literal maths (max-subtracted softmax): the fallback for rows whose sum
    under/overflowed in the fast path. Returns ``[len(rows), H*D]``."""
    scores = gamma * (xh[rows] @ xh.T - beta * mu)
    keep = scores >= 0
    keep[torch.arange(len(rows), device=xh.device), rows] = True  # the diagonal is never masked
    return torch.softmax(scores.masked_fill(~keep, float("-inf")), dim=-1) @ v_flat


def _proxy_attention_torch(feats: torch.Tensor, v: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """Tiled proxy attention using the symmetry of S; ``[B, M, C]``, ``[B, H, M, D]`` -> ``[B, H, M, D]``
    contiguous in ``v``'s dtype.

    float32 compute (float64 for float64 inputs); extra memory O(T^2 + M * (C + H*D)) per image.
    Not differentiable (in-place ops on the weight tiles).
    """
    batch, heads, n_tokens, head_dim = v.shape
    compute = torch.float64 if v.dtype == torch.float64 else torch.float32
    hd = heads * head_dim
    out = empty_output(batch, heads, n_tokens, head_dim, dtype=v.dtype, device=v.device)
    tile = _tile_rows(n_tokens, v.device)
    buf = torch.empty(tile * tile, dtype=compute, device=v.device)
    v_buf = None
    acc = torch.empty(n_tokens, hd, dtype=compute, device=v.device)
    sums = torch.empty(n_tokens, dtype=compute, device=v.device)
    shift = gamma if gamma > _EXP_SAFE_GAMMA[compute] else 0.0
    for b in range(batch):
        xh = _normalised(feats[b], compute)                                      # [M, C]
        mu = float(_similarity_mean(xh[None])[0])
        cut = _keep_threshold(mu, beta, gamma, shift, compute)
        # [H, M, D] -> [M, H, D] -> [M, H*D]: a view when the storage allows it, else one strided copy (and the
        # dtype conversion) into a buffer.
        v_mhd = v[b].transpose(0, 1)
        if v.dtype == compute and v_mhd.is_contiguous():
            v_flat = v_mhd.view(n_tokens, hd)
        else:
            if v_buf is None:
                v_buf = torch.empty(n_tokens, hd, dtype=compute, device=v.device)
            v_buf.view(n_tokens, heads, head_dim).copy_(v_mhd)
            v_flat = v_buf
        acc.zero_()
        sums.zero_()
        for i0 in range(0, n_tokens, tile):
            i1 = min(n_tokens, i0 + tile)
            for j0 in range(i0, n_tokens, tile):
                j1 = min(n_tokens, j0 + tile)
                slab = buf[: (i1 - i0) * (j1 - j0)].view(i1 - i0, j1 - j0)
                # gamma * S[i, j]; beta=0 ignores the slab's old contents (NaN included).
                torch.addmm(slab, xh[i0:i1], xh[j0:j1].T, beta=0, alpha=gamma, out=slab)
                if shift:
                    slab.sub_(shift)
                slab.exp_()
                if i0 == j0:
                    diagonal = slab.diagonal()
                    saved = diagonal.clone()
                    F.threshold_(slab, cut, 0.0)
                    diagonal.copy_(saved)                                         # never masked
                    acc[i0:i1].addmm_(slab, v_flat[j0:j1])
                    sums[i0:i1] += slab.sum(1)
                else:
                    F.threshold_(slab, cut, 0.0)
                    if not bool(slab.any()):  # fully masked (other regions of a coherent map): no P @ V at all
                        continue
                    acc[i0:i1].addmm_(slab, v_flat[j0:j1])
                    acc[j0:j1].addmm_(slab.T, v_flat[i0:i1])                      # the mirrored tile
                    sums[i0:i1] += slab.sum(1)
                    sums[j0:j1] += slab.sum(0)
        scaled = acc.view(n_tokens, heads, head_dim).transpose(0, 1)              # [H, M, D] view
        if v.dtype == compute:
            torch.div(scaled, sums[None, :, None], out=out[b])
        else:  # division in the compute dtype, one rounding to v's dtype
            out[b].copy_(scaled / sums[None, :, None])
        bad = ~(torch.isfinite(sums) & (sums > 0))
        if bool(bad.any()):
            idx = bad.nonzero().flatten()
            fixed = _literal_rows(xh, idx, mu, beta, gamma, v_flat)
            out[b, :, idx] = fixed.view(-1, heads, head_dim).transpose(0, 1).to(v.dtype)
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
        backend: ``"auto" | "triton" | "torch" | "reference"`` (see :mod:`naclip_kernels._backend`); ``"auto"``
            sends float64 CUDA tensors to the torch path.

    Returns:
        ``[B, H, M, D]`` contiguous, in the input dtype (float16, bfloat16, float32; float64 on the torch and
        reference backends). Accumulation is float32 (float64 for float64 inputs).

    Raises:
        TypeError / ValueError: bad arguments, naming the argument and the expected shape or dtype.
        BackendUnavailableError: an explicit backend that cannot run here.
    """
    beta, gamma = check_proxy_attention_args(feats, v, beta, gamma)
    # The kernel has no float64 specialisation: auto takes the torch path, an explicit backend='triton' raises.
    chosen = resolve_backend(backend, v.device, "proxy_attention",
                             auto_avoids_triton="float64 inputs" if v.dtype == torch.float64 else None)
    if chosen == "reference":
        # Plain Python on purpose, like the other ops' references: the oracle the registered op is tested against.
        return reference.proxy_attention(feats, v, beta, gamma)
    return _proxy_attention_op(feats, v, beta, gamma, chosen)


# ==============================================================================================================
# torch.library registration: naclip_kernels::proxy_attention (see naclip_kernels/_library.py)
# ==============================================================================================================
def _proxy_attention_impl(feats, v, beta, gamma, backend):
    """The op's kernel for every device; ``backend`` is the resolved ``"triton"`` or ``"torch"``."""
    if v.numel() == 0:
        return v.new_empty(v.shape)
    if backend == "triton":
        return _proxy_attention_triton(feats, v, beta, gamma)
    return _proxy_attention_torch(feats, v, beta, gamma)


def _proxy_attention_fake(feats, v, beta, gamma, backend):
    return v.new_empty(v.shape)


def _proxy_attention_differentiable(feats, v, beta, gamma, backend):
    """The backward's recompute: the eager maths of :func:`naclip_kernels.reference.proxy_attention` (the torch
    path works in place on its weight slab). It holds ``[B, M, M]`` scores for the backward, which is what
    autograd needs anyway; the mask ``A < 0`` is a step, so its gradient is zero almost everywhere."""
    return reference.proxy_attention(feats, v, beta, gamma)


_proxy_attention_op = define_op("proxy_attention", "(Tensor feats, Tensor v, float beta, float gamma, str backend) -> "
                                "Tensor", _proxy_attention_impl, _proxy_attention_fake, _proxy_attention_differentiable,
                                tensor_args=(0, 1))


# ==============================================================================================================
# AOT (GPU-readiness) configurations
# ==============================================================================================================
_AOT_DTYPES = (("fp16", torch.float16), ("bf16", torch.bfloat16), ("fp32", torch.float32))


def _aot_config(dtype_name, concrete, default):
    from naclip_kernels._aot_spec import KernelConfig

    block_m, block_n, block_c, block_hd, chunks, num_warps, num_stages = concrete
    # From the Python signature, so this also works when the kernel was decorated by the interpreter.
    params = inspect.signature(getattr(_proxy_attention_fwd_kernel, "fn", _proxy_attention_fwd_kernel)).parameters
    signature, constexprs = {}, {}
    for name, param in params.items():
        if "constexpr" in str(param.annotation):
            signature[name] = "constexpr"
        elif name in ("r_ptr", "thr_ptr"):
            signature[name] = "*fp32"
        elif name.endswith("_ptr"):
            signature[name] = "*" + dtype_name
        elif name == "gamma_log2":
            signature[name] = "fp32"
        elif name in ("stride_xc", "stride_vd", "stride_od"):
            # A contiguous last dim has stride 1, which Triton's JIT specialises to the constant 1.
            signature[name], constexprs[name] = "constexpr", 1
        else:
            signature[name] = "i32"
    constexprs.update(IEEE=dtype_name == "fp32", CHUNKS=chunks, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_C=block_c,
                      BLOCK_HD=block_hd)
    # What a real launch sees 16-divisible: torch allocations; C, D (64) and H*D (768) multiples of 16, so the
    # strides derived from them too. r's row stride is M (not assumed).
    divisible = [n for n in params if n.endswith("_ptr")] + [
        "stride_xb", "stride_xm", "stride_vb", "stride_vh", "stride_vm", "stride_ob", "stride_oh", "stride_om",
        "C", "hd", "head_dim"]
    name = (f"{dtype_name},M{block_m},N{block_n},C{block_c},HD{block_hd}x{chunks},w{num_warps},s{num_stages}")
    return KernelConfig(op="proxy_attention", name=name, kernel=_proxy_attention_fwd_kernel, signature=signature,
                        constexprs=constexprs, num_warps=num_warps, num_stages=num_stages, default=default,
                        tags={"divisible_by_16": divisible, "dtype": dtype_name, "chunks": chunks,
                              "value_columns": chunks * block_hd})


def aot_configs():
    """Every specialisation the launcher can run: dtypes fp16/bf16/fp32 x each autotune entry x CHUNKS =
    1..MAX_CHUNKS (which H*D selects). The default of a (dtype, CHUNKS) pair is the first entry's."""
    configs = []
    for dtype_name, dtype in _AOT_DTYPES:
        entries = _tune_configs(torch.empty((), dtype=dtype).element_size())
        for index, base in enumerate(entries):
            for chunks in range(1, base[4] + 1):
                concrete = base[:4] + (chunks,) + base[5:]
                configs.append(_aot_config(dtype_name, concrete, default=index == 0))
    return configs
