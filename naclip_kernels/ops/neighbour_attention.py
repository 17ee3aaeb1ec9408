"""Neighbour-aware attention: ``softmax(scale * a b^T + omega) v`` with NACLIP's 2D Gaussian bias on the fly.

Layers, bottom up: the Triton forward kernel ``_neighbour_attention_fwd_kernel`` and its launcher
``_neighbour_attention_triton``; the CPU-friendly torch path ``_neighbour_attention_torch``; and the public
functional :func:`neighbour_attention` that validates, dispatches and returns. The maths is ``SPEC.md`` section 1.

Why the bias is cheap here: ``omega(t, u) = g(i_t - i_u) * g(j_t - j_u)`` with ``g(d) = exp(-d^2 / (2 sigma^2))``.
Neither path ever forms an ``N x N`` bias: the torch path builds one ``[M, N]`` slice per query block from two tiny
``h x h`` / ``w x w`` tables, and the Triton kernel derives it in registers from token indices.
"""
from __future__ import annotations

import inspect
from typing import Optional, Tuple

import torch

from naclip_kernels import reference
from naclip_kernels._alloc import empty_output
from naclip_kernels._backend import resolve_backend
from naclip_kernels._library import define_op
from naclip_kernels._triton_compat import AUTOTUNE_CACHE_KWARGS, interpreter_enabled, tl, triton
from naclip_kernels._validation import check_attention_args

__all__ = ["neighbour_attention"]

LOG2E = 1.4426950408889634

# Pairs (a, b) whose similarity a b^T is soft-maxed; csa sums two attentions.
_PAIRS = {"qk": (("q", "k"),), "kk": (("k", "k"),), "qq": (("q", "q"),), "csa": (("q", "q"), ("k", "k"))}


# ==============================================================================================================
# Triton kernel and launcher
# ==============================================================================================================
# Design (why the bias costs ~2 ALU ops per score and no exp):
#
# * omega is separable, omega(t, u) = g(i_t - i_u) * g(j_t - j_u), so keys are not visited in flat token order but
#   as 2-D tiles of the patch grid: a key tile is ROWS grid rows x BLOCK_W columns (BLOCK_N = ROWS * BLOCK_W).
#   Softmax with online rescaling is independent of the key order, so this order is exact.
# * Ej[m, n] = g(j_m - col_n) * log2(e) depends only on the column: it is computed once per column chunk (once per
#   program when w <= BLOCK_W) and reused for all h / ROWS tile rows.
# * Ei is ROWS vectors of BLOCK_M values per tile (one exp2 per query per grid row, not per score), expanded to the
#   tile by a compile-time chain of ROWS-1 selects.
# * BLOCK_W = clamp(next_pow2(w), 16, BLOCK_N): the common 14x14 / 16x16 grids pack 4 rows into a 64-key tile, so
#   only 1/8 of the tile is padding, where a per-row tile (BLOCK_W = BLOCK_N) would waste 78% of the MMA and softmax
#   work on w = 14. Wider grids (w > BLOCK_N) use ROWS = 1 and several column chunks.
# * The prefix tokens ([CLS]) are visited first in a plain flat loop (omega = 0 there); without a bias
#   (sigma=None) the whole key range is one flat loop.
# * Scores live in the log2 domain: s2 = (a . b) * scale * log2(e) + omega * log2(e), softmax via exp2.
_MAX_GRID_Y = 65535  # CUDA limit on grid dimension 1 (batch * heads goes there)


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    """``a @ b (+ acc)`` in float32. IEEE: operands upcast to float32 and multiplied without TF32 (exact float32
    products; float16/bfloat16 products are exact in float32 too, so upcasting them changes only the summation
    order). Otherwise the native tensor-core dot of the operand dtype."""
    if IEEE:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _online_softmax_update(s, v, m_i, l_i, acc, IEEE: tl.constexpr):
    """One key tile of the online softmax (log2 domain): rescale the running state, add ``exp2(s - m) @ v``.

    P is rounded to v's dtype before the P @ V dot (as in flash attention; float32 inputs keep float32 P)."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)  # m_i = -inf on the first tile gives 0; every tile has >= 1 valid key per row
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], IEEE)
    return m_new, l_i, acc


@triton.jit(do_not_specialize=["N", "h", "w", "prefix", "n_bucket", "w_bucket"])
def _neighbour_attention_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    n_heads, N, h, w, prefix, head_dim,
    qk_scale_log2, gauss_c,
    n_bucket, w_bucket,
    CSA: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_D: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """Forward neighbour-aware attention for one block of ``BLOCK_M`` queries of one (batch, head).

    Single pair (``CSA=False``): ``o = softmax(s * q k^T + omega) v``; the launcher passes ``(q, k) = (q, k)``,
    ``(k, k)`` or ``(q, q)`` for ``qk``, ``kk``, ``qq``. ``CSA=True``: ``o = softmax(s * q q^T + omega) v +
    softmax(s * k k^T + omega) v`` in one pass that shares the V tiles and the bias (two m_i / l_i / acc sets).

    ``qk_scale_log2 = s * log2(e)``; ``gauss_c = log2(e) / (2 sigma^2)`` so ``g(d) = exp2(-d^2 gauss_c)``.
    ``n_bucket`` / ``w_bucket`` are only autotuning keys. Shapes ``[B, H, N, D]`` by strides; ``D = head_dim``
    padded to ``BLOCK_D`` (power of two) with masks unless ``EVEN_D``.
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)  # int64 before stride math: B*H*N*D may exceed 2^31
    off_b = pid_bh // n_heads
    off_h = pid_bh % n_heads
    q_base = q_ptr + off_b * stride_qb + off_h * stride_qh
    k_base = k_ptr + off_b * stride_kb + off_h * stride_kh
    v_base = v_ptr + off_b * stride_vb + off_h * stride_vh
    o_base = o_ptr + off_b * stride_ob + off_h * stride_oh

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < N
    if EVEN_D:
        d_valid = offs_d < BLOCK_D  # constant-true: lets the compiler drop the mask along D
    else:
        d_valid = offs_d < head_dim
    md_mask = m_valid[:, None] & d_valid[None, :]
    offs_m64 = offs_m.to(tl.int64)

    # Query-side operands, loaded once per program.
    a1 = tl.load(q_base + offs_m64[:, None] * stride_qn + offs_d[None, :] * stride_qd, mask=md_mask, other=0.0)
    if CSA:
        a2 = tl.load(k_base + offs_m64[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=md_mask, other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if CSA:
        m_i2 = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i2 = tl.zeros([BLOCK_M], tl.float32)
        acc2 = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    # ---- flat key loop: the prefix keys when there is a bias (omega = 0 there), else every key ----------------
    # The prefix is tiny (CLIP: 1 token), so it gets 16-key tiles (the smallest MMA N), not a full BLOCK_N tile:
    # at N = 197 a 64-key tile for [CLS] alone would add ~25% to the work of the whole row.
    if HAS_BIAS:
        flat_end = prefix
        FLAT_N: tl.constexpr = 16
    else:
        flat_end = N
        FLAT_N: tl.constexpr = BLOCK_N
    for start_n in range(0, flat_end, FLAT_N):
        offs_n = start_n + tl.arange(0, FLAT_N)
        n_valid = offs_n < flat_end
        offs_n64 = offs_n.to(tl.int64)
        nd_mask = n_valid[:, None] & d_valid[None, :]
        vt = tl.load(v_base + offs_n64[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=nd_mask, other=0.0)
        if CSA:
            b1 = tl.load(q_base + offs_n64[:, None] * stride_qn + offs_d[None, :] * stride_qd, mask=nd_mask,
                         other=0.0)
        else:
            b1 = tl.load(k_base + offs_n64[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=nd_mask,
                         other=0.0)
        s = _dot(a1, tl.trans(b1), None, IEEE)
        s = tl.where(n_valid[None, :], s * qk_scale_log2, float("-inf"))
        m_i, l_i, acc = _online_softmax_update(s, vt, m_i, l_i, acc, IEEE)
        if CSA:
            b2 = tl.load(k_base + offs_n64[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=nd_mask,
                         other=0.0)
            s2 = _dot(a2, tl.trans(b2), None, IEEE)
            s2 = tl.where(n_valid[None, :], s2 * qk_scale_log2, float("-inf"))
            m_i2, l_i2, acc2 = _online_softmax_update(s2, vt, m_i2, l_i2, acc2, IEEE)

    # ---- patch keys in 2-D grid tiles with the separable Gaussian bias -------------------------------------
    if HAS_BIAS:
        ROWS: tl.constexpr = BLOCK_N // BLOCK_W
        tile_n = tl.arange(0, BLOCK_N)
        tile_row = tile_n // BLOCK_W  # power-of-two constexpr: shifts, once per program
        tile_col = tile_n % BLOCK_W
        # Query grid coordinates, integer // and % on the BLOCK_M vector only.
        is_patch = (offs_m >= prefix) & m_valid
        patch = tl.where(is_patch, offs_m - prefix, 0)
        i_q = (patch // w).to(tl.float32)
        j_q = (patch % w).to(tl.float32)
        for c0 in range(0, w, BLOCK_W):
            cols = c0 + tile_col
            col_ok = cols < w
            dj = j_q[:, None] - cols.to(tl.float32)[None, :]
            ej = tl.exp2(-(dj * dj) * gauss_c) * 1.4426950408889634  # omega's column factor, log2 domain
            for r0 in range(0, h, ROWS):
                rows = r0 + tile_row
                key_ok = col_ok & (rows < h)
                tok = (prefix + rows * w + cols).to(tl.int64)
                nd_mask = key_ok[:, None] & d_valid[None, :]
                vt = tl.load(v_base + tok[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=nd_mask,
                             other=0.0)
                # Row factor: one exp2 per query per grid row; prefix queries get 0 (omega = 0 in their rows).
                di = i_q - r0
                ei = tl.where(is_patch, tl.exp2(-(di * di) * gauss_c), 0.0)
                if ROWS == 1:
                    bias = ei[:, None] * ej
                else:
                    ei_tile = tl.broadcast_to(ei[:, None], [BLOCK_M, BLOCK_N])
                    for rr in tl.static_range(1, ROWS):
                        di_r = i_q - (r0 + rr)
                        ei_r = tl.where(is_patch, tl.exp2(-(di_r * di_r) * gauss_c), 0.0)
                        ei_tile = tl.where(tile_row[None, :] == rr, ei_r[:, None], ei_tile)
                    bias = ei_tile * ej
                if CSA:
                    b1 = tl.load(q_base + tok[:, None] * stride_qn + offs_d[None, :] * stride_qd, mask=nd_mask,
                                 other=0.0)
                else:
                    b1 = tl.load(k_base + tok[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=nd_mask,
                                 other=0.0)
                s = _dot(a1, tl.trans(b1), None, IEEE)
                s = tl.where(key_ok[None, :], s * qk_scale_log2 + bias, float("-inf"))
                m_i, l_i, acc = _online_softmax_update(s, vt, m_i, l_i, acc, IEEE)
                if CSA:
                    b2 = tl.load(k_base + tok[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=nd_mask,
                                 other=0.0)
                    s2 = _dot(a2, tl.trans(b2), None, IEEE)
                    s2 = tl.where(key_ok[None, :], s2 * qk_scale_log2 + bias, float("-inf"))
                    m_i2, l_i2, acc2 = _online_softmax_update(s2, vt, m_i2, l_i2, acc2, IEEE)

    # ---- normalise and store (padding rows have l_i > 0 too: they saw the masked-in keys) ------------------
    out = acc / l_i[:, None]
    if CSA:
        out = out + acc2 / l_i2[:, None]
    tl.store(o_base + offs_m64[:, None] * stride_on + offs_d[None, :] * stride_od, out.to(o_ptr.dtype.element_ty),
             mask=md_mask)


# Autotuning space, (BLOCK_M, BLOCK_N, num_warps, num_stages) per specialisation class; the first entry of each list
# is the default (no autotuning: the interpreter, or an explicit config). These lists are what is left of a wider
# space after removing every config that spills registers (cuobjdump STACK > 0) on sm_80 or sm_90 for any head dim
# of its class in the AOT check (``python -m naclip_kernels.aot``, with each Triton release setup.py admits: 3.8 and
# 3.9, see naclip_kernels/_versions.py and bench/results/aot/; the kernel's live state is acc
# [M, D] + the score tile [M, N] + the bias column factor [M, N], doubled acc/scores for csa). Removed (spills):
#   half, D<=64, pair: (128,64,4,2) 24-208 B with bias; (64,64,4,2) 8 B at BLOCK_W=64; (128,32,4,2) 8 B with
#     bias at BLOCK_W=32.
#   half, D<=64, csa: (64,32,4,2) 8 B without bias at D=32; with bias (128,64,8,2) 32-160 B, (64,64,8,2)
#     24-152 B, (128,32,4,2) 232-344 B.
#   half, D=80/128, pair: (128,64,8,2) 8 B and (128,64,8,3) 8 B with bias; (64,64,8,2) 16 B without bias at
#     D=80; (64,64,4,2) 8-80 B; (128,32,4,2) 8-224 B.
#   half, D=80/128, csa: (64,32,4,2) 8-224 B; (64,64,8,2) 8-256 B; BLOCK_M=128 up to 13 KB.
#   fp32 (FMA dots, operands in registers): every BLOCK_M >= 64 config with 4 warps (1-13 KB); (32,32,4,2) 8 B
#   (D=32) and 32-80 B (csa); (32,32,8,2) pair 8-32 B; (16,32,4,2) 8 B at D=80 without bias and 24-88 B for csa
#   at D=128; (16,16,4,2) 16 B at D=80 with bias, and (Triton 3.8 only) 8 B at D=80 for csa without bias on
#   sm_80, so that class runs (16,16,8,2): 101-104 registers, 0 B on both Triton releases. (16,16,4,1) 512-560 B;
#   (16,32,8,2) 8 B on sm_80. (ptxas spills a few bytes even at ~96-128 registers in some.)
_HALF_TUNE = {
    # (BLOCK_D <= 64, csa, has_bias) -> configs
    (True, False, False): ((128, 64, 8, 2), (128, 64, 8, 3), (64, 64, 8, 2), (128, 32, 4, 2), (64, 32, 4, 2)),
    (True, False, True): ((128, 64, 8, 2), (128, 64, 8, 3), (64, 64, 8, 2), (64, 32, 4, 2)),
    (True, True, False): ((64, 32, 8, 2), (128, 64, 8, 2), (64, 64, 8, 2)),
    (True, True, True): ((64, 32, 4, 2), (64, 32, 8, 2)),
    (False, False, False): ((64, 32, 4, 2), (64, 32, 8, 2), (32, 32, 4, 2)),
    (False, False, True): ((64, 64, 8, 2), (64, 32, 4, 2), (64, 32, 8, 2), (32, 32, 4, 2)),
    (False, True, False): ((64, 32, 8, 2), (32, 32, 4, 2)),
    (False, True, True): ((64, 32, 8, 2), (32, 32, 4, 2)),
}
_FP32_TUNE = {
    # (BLOCK_D <= 64, csa, has_bias) -> configs. IEEE float32 dots run on the FMA units with both operands in
    # registers, so only small tiles fit; float32 is the accuracy path, not the fast one.
    (True, False, False): ((16, 32, 4, 2),),
    (True, False, True): ((16, 32, 4, 2),),
    (False, False, False): ((16, 16, 4, 2),),
    (False, False, True): ((16, 32, 4, 2),),
    (True, True, False): ((32, 32, 8, 2),),
    (True, True, True): ((32, 32, 8, 2),),
    (False, True, False): ((16, 16, 8, 2),),
    (False, True, True): ((16, 16, 4, 2),),
}
_WIDE_TUNE = ((32, 32, 4, 2),)  # BLOCK_D = 256 (head dims 129..256): not in the AOT list, one conservative config


def _tune_configs(block_d, csa, has_bias, dtype_bytes):
    """Spill-free autotune configs for one specialisation class, the default first."""
    if block_d > 128:
        return _WIDE_TUNE
    if dtype_bytes == 4:
        return _FP32_TUNE[(block_d <= 64, bool(csa), bool(has_bias))]
    return _HALF_TUNE[(block_d <= 64, bool(csa), bool(has_bias))]


_TUNE_SPACE = tuple(dict.fromkeys(
    cfg for table in (_HALF_TUNE.values(), _FP32_TUNE.values(), (_WIDE_TUNE,)) for cfgs in table for cfg in cfgs))


def _config_allowed(block_m, block_n, num_warps, num_stages, block_d, csa, has_bias, dtype_bytes):
    """Whether a tuning config is in the (spill-pruned) autotune list for this specialisation."""
    return (block_m, block_n, num_warps, num_stages) in _tune_configs(block_d, csa, has_bias, dtype_bytes)


def _default_config(block_d, csa, has_bias, dtype_bytes):
    """The fixed (BLOCK_M, BLOCK_N, num_warps, num_stages) used without autotuning (and under the interpreter)."""
    return _tune_configs(block_d, csa, has_bias, dtype_bytes)[0]


def _block_w(w, block_n, has_bias):
    """Columns per key tile: next_pow2(w) clamped to [16, BLOCK_N] (several grid rows per tile when w is small)."""
    if not has_bias:
        return block_n
    return min(max(triton.next_power_of_2(w), 16), block_n)


def _block_d(head_dim):
    return max(16, triton.next_power_of_2(head_dim))  # tl.dot needs K >= 16


def _prune_configs(configs, named_args, **kwargs):
    """Autotuner early prune: keep the spill-free configs of this specialisation (never empty)."""
    allowed = _tune_configs(kwargs["BLOCK_D"], kwargs["CSA"], kwargs["HAS_BIAS"], named_args["v_ptr"].element_size())
    return [c for c in configs
            if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in allowed]


_neighbour_attention_fwd_tuned = triton.autotune(
    configs=[triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=nw, num_stages=ns)
             for bm, bn, nw, ns in _TUNE_SPACE],
    key=["n_bucket", "w_bucket", "BLOCK_D", "CSA", "HAS_BIAS", "EVEN_D"],
    prune_configs_by={"early_config_prune": _prune_configs},
    **AUTOTUNE_CACHE_KWARGS,  # tune once per machine, not once per process (see _triton_compat)
)(triton.heuristics({"BLOCK_W": lambda a: _block_w(a["w"], a["BLOCK_N"], a["HAS_BIAS"])})(
    _neighbour_attention_fwd_kernel))


def _neighbour_attention_triton(q, k, v, h, w, sigma, prefix_tokens, similarity, scale, *, config=None,
                                autotune=None):
    """Launch the fused forward kernel. Arguments as validated by :func:`neighbour_attention`.

    Inputs float16 / bfloat16 / float32 ``[B, H, N, D]`` with any strides; output ``[B, H, N, D]`` contiguous in
    the input dtype. Accumulation is float32. float32 inputs use IEEE float32 dot products (no TF32), so results
    match the float64 reference to ~1e-6 (slower than TF32 on tensor cores; use float16/bfloat16 for speed).
    float64 is not supported by the kernel (TypeError; use backend='torch').

    ``config``: optional ``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` that bypasses autotuning (tests use it to
    cover small tiles). Without it: autotuning on GPU, the default config under the Triton interpreter.
    ``autotune=True`` forces the autotuner path (``triton.autotune`` + heuristics + early pruning) even under the
    interpreter, so a test can run the code path a GPU user's first call takes; default: autotune unless
    interpreting.
    """
    if v.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"neighbour_attention: backend='triton' supports float16, bfloat16 and float32 inputs, got "
                        f"{v.dtype}; use backend='torch' for {v.dtype}")
    batch, heads, n_tokens, head_dim = v.shape
    if heads > _MAX_GRID_Y:
        raise ValueError(f"neighbour_attention: backend='triton' supports at most {_MAX_GRID_Y} heads, got {heads}")
    # Map the similarity onto the kernel's operands: one pair softmax(s * q k^T) with (q, k) chosen here, or csa.
    csa = similarity == "csa"
    a_op, b_op = {"qk": (q, k), "kk": (k, k), "qq": (q, q), "csa": (q, k)}[similarity]
    out = empty_output(batch, heads, n_tokens, head_dim, dtype=v.dtype, device=v.device)
    has_bias = sigma is not None
    # g(d) = exp2(-d^2 gauss_c); clamped so a tiny sigma gives 0 * 1e30 = 0 on the diagonal, never 0 * inf = NaN.
    gauss_c = min(LOG2E / (2.0 * sigma * sigma), 1e30) if has_bias else 0.0
    block_d = _block_d(head_dim)
    # IEEE float32 dots for float32 inputs (no TF32). Under the interpreter also for bfloat16: its NumPy dot
    # multiplies bfloat16's raw uint16 storage (Triton 3.9), so the operands are upcast first (same products).
    interpreting = interpreter_enabled()
    ieee = v.dtype == torch.float32 or (interpreting and v.dtype == torch.bfloat16)
    flags = dict(CSA=csa, HAS_BIAS=has_bias, EVEN_D=head_dim == block_d, IEEE=ieee, BLOCK_D=block_d)
    n_bucket = triton.next_power_of_2(n_tokens)
    w_bucket = min(max(triton.next_power_of_2(w), 16), 256)
    if autotune is None:
        autotune = not interpreting
    if config is None and not autotune:
        config = _default_config(block_d, csa, has_bias, v.element_size())

    # Grid dim 1 is limited to 65535: launch over batch chunks (slices keep the strides).
    chunk = max(1, _MAX_GRID_Y // heads)
    for b0 in range(0, batch, chunk):
        b1 = min(batch, b0 + chunk)
        qa, kb, vv, oo = a_op[b0:b1], b_op[b0:b1], v[b0:b1], out[b0:b1]
        args = (qa, kb, vv, oo, *qa.stride(), *kb.stride(), *vv.stride(), *oo.stride(),
                heads, n_tokens, h, w, prefix_tokens, head_dim, scale * LOG2E, gauss_c, n_bucket, w_bucket)
        if config is None:
            grid = lambda meta: (triton.cdiv(n_tokens, meta["BLOCK_M"]), (b1 - b0) * heads)  # noqa: E731
            _neighbour_attention_fwd_tuned[grid](*args, **flags)
        else:
            bm, bn, nw, ns = config
            grid = (triton.cdiv(n_tokens, bm), (b1 - b0) * heads)
            _neighbour_attention_fwd_kernel[grid](*args, **flags, BLOCK_M=bm, BLOCK_N=bn,
                                                  BLOCK_W=_block_w(w, bn, has_bias), num_warps=nw, num_stages=ns)
    return out


# ==============================================================================================================
# Torch path (CPU, or CUDA without Triton)
# ==============================================================================================================
# The fused SDPA kernel (flash attention on CPU, memory-efficient attention on CUDA) does the heavy lifting; it
# takes an additive float mask, so it is fed the bias one block of queries at a time: an [M, N] slice built in a
# single multiply, never the N x N matrix. Measured on 2 CPU cores, 12 heads, 64x64 grid: 0.29 s for the fused
# kernel with a full N x N mask, 0.38 s blocked with the old gather-built slices (85 ms of them), ~0.30 s with
# outer-product slices (6 ms); the earlier matmul + softmax + matmul slabs took 0.45 s.
# Bias slices hold at most this many elements (16 MiB in float32): extra memory is O(M * N), not O(N^2).
_BIAS_SLICE_ELEMENTS = 1 << 22
_BIAS_SLICE_ELEMENTS_CUDA = 1 << 26  # a GPU wants large launches; 256 MiB is still far below N^2 at large grids


def _gaussian_table(length: int, sigma: float, device, dtype) -> torch.Tensor:
    """``[length, length]`` table ``g(a - b) = exp(-(a - b)^2 / (2 sigma^2))`` over one grid axis."""
    pos = torch.arange(length, device=device, dtype=torch.float64)
    return torch.exp(-(pos[:, None] - pos[None, :]) ** 2 / (2.0 * sigma * sigma)).to(dtype)


class _BiasRows:
    """Builds rows ``[m0, m1)`` of the ``N x N`` bias on demand from the separable per-axis tables.

    Keys follow the patch grid row-major after the prefix, so the patch part of query ``m``'s bias row is the outer
    product ``g(i_m - r) * g(j_m - c)`` over grid rows ``r`` and columns ``c``: one broadcast multiply writes the
    whole slice (15x faster than gathering ``N``-wide rows from both tables).
    """

    def __init__(self, h: int, w: int, sigma: float, prefix_tokens: int, device, dtype):
        patch = (torch.arange(prefix_tokens + h * w, device=device) - prefix_tokens).clamp(min=0)
        self.h, self.w, self.prefix = h, w, prefix_tokens
        self.n_tokens = prefix_tokens + h * w
        self.row = patch // w
        self.col = patch % w
        self.table_row = _gaussian_table(h, sigma, device, dtype)
        self.table_col = _gaussian_table(w, sigma, device, dtype)

    def __call__(self, m0: int, m1: int) -> torch.Tensor:
        rows = m1 - m0
        bias = torch.empty(rows, self.n_tokens, device=self.table_row.device, dtype=self.table_row.dtype)
        bias[:, : self.prefix] = 0
        row_factor = self.table_row[self.row[m0:m1]]
        row_factor[: max(0, self.prefix - m0)] = 0  # prefix queries: omega = 0 in their rows
        col_factor = self.table_col[self.col[m0:m1]]
        torch.mul(row_factor[:, :, None], col_factor[:, None, :],
                  out=bias[:, self.prefix:].view(rows, self.h, self.w))
        return bias


def _neighbour_attention_torch(q, k, v, h, w, sigma, prefix_tokens, similarity, scale):
    """Exact attention through the fused SDPA kernel, with the bias fed one ``[M, N]`` query-block slice at a time.

    Extra memory is O(M * N + B*H*N*D) (the bias slice and float32 copies of the inputs), never ``[B, H, N, N]`` or
    ``[N, N]``. Differentiable (SDPA and slice assignment both support autograd).
    """
    batch, heads, n_tokens, head_dim = k.shape
    compute = torch.float64 if k.dtype == torch.float64 else torch.float32
    operands = {name: t.to(compute) for name, t in (("q", q), ("k", k)) if t is not None}
    value = v.to(compute)
    pairs = _PAIRS[similarity]

    def attend(m0: int, m1: int, bias: Optional[torch.Tensor]) -> torch.Tensor:
        total = None
        for a_name, b_name in pairs:
            term = torch.nn.functional.scaled_dot_product_attention(
                operands[a_name][:, :, m0:m1], operands[b_name], value, attn_mask=bias, scale=scale)
            total = term if total is None else total + term
        return total

    if sigma is None:
        return attend(0, n_tokens, None).to(v.dtype)  # no bias: one fused call over everything, no block buffer
    out = empty_output(batch, heads, n_tokens, head_dim, device=k.device, dtype=compute)
    bias_rows = _BiasRows(h, w, sigma, prefix_tokens, k.device, compute)
    budget = _BIAS_SLICE_ELEMENTS_CUDA if k.device.type == "cuda" else _BIAS_SLICE_ELEMENTS
    # Equal blocks under the budget: N = 1 + 64*64 would otherwise end in a 1-query block (a whole extra pass over
    # K and V for one row).
    num_blocks = -(-n_tokens // max(1, budget // n_tokens))
    block_m = -(-n_tokens // num_blocks)
    for m0 in range(0, n_tokens, block_m):
        m1 = min(n_tokens, m0 + block_m)
        out[:, :, m0:m1] = attend(m0, m1, bias_rows(m0, m1))
    return out.to(v.dtype)


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

    PyTorch integration: the ``"torch"`` / ``"triton"`` backends run the registered op
    ``torch.ops.naclip_kernels.neighbour_attention`` (one node under ``torch.compile`` / ``torch.export``, with a
    fake kernel for symbolic shapes). Autograd: gradients w.r.t. ``q``, ``k`` and ``v`` from every backend. The
    Triton kernel is forward-only; the backward (``naclip_kernels::neighbour_attention_backward``) recomputes the
    forward through the differentiable torch path (SDPA per query block) and differentiates that: the same maths,
    so the gradients are the torch backend's, at the cost of one extra forward. ``"reference"`` is plain eager
    PyTorch with its own autograd.
    """
    h, w, sigma, prefix_tokens, scale = check_attention_args(q, k, v, grid, sigma, prefix_tokens, similarity, scale)
    # The kernel has no float64 specialisation: auto takes the torch path, an explicit backend='triton' raises.
    chosen = resolve_backend(backend, k.device, "neighbour_attention",
                             auto_avoids_triton="float64 inputs" if k.dtype == torch.float64 else None)
    if chosen == "reference":
        # The eager ground truth stays plain Python: it is the oracle the registered op is tested against, and it
        # is made of aten ops that torch.compile/export trace and autograd differentiates as they are.
        return reference.neighbour_attention(q, k, v, (h, w), sigma, prefix_tokens, similarity, scale)
    return _neighbour_attention_op(q, k, v, h, w, sigma, prefix_tokens, similarity, scale, chosen)


# ==============================================================================================================
# torch.library registration: naclip_kernels::neighbour_attention (see naclip_kernels/_library.py)
# ==============================================================================================================
def _neighbour_attention_impl(q, k, v, h, w, sigma, prefix_tokens, similarity, scale, backend):
    """The op's kernel for every device; ``backend`` is the resolved ``"triton"`` or ``"torch"``."""
    if k.numel() == 0:
        return v.new_empty(v.shape)
    if backend == "triton":
        return _neighbour_attention_triton(q, k, v, h, w, sigma, prefix_tokens, similarity, scale)
    # SDPA keeps the layout of strided inputs (e.g. [B, N, H, D] transposed views); the op always returns
    # contiguous [B, H, N, D], which is what its fake kernel promises.
    return _neighbour_attention_torch(q, k, v, h, w, sigma, prefix_tokens, similarity, scale).contiguous()


def _neighbour_attention_fake(q, k, v, h, w, sigma, prefix_tokens, similarity, scale, backend):
    return v.new_empty(v.shape)


def _neighbour_attention_differentiable(q, k, v, h, w, sigma, prefix_tokens, similarity, scale, backend):
    """The backward's recompute: the torch path (SDPA per query block), differentiable for every backend."""
    return _neighbour_attention_torch(q, k, v, h, w, sigma, prefix_tokens, similarity, scale)


def _neighbour_attention_twice_differentiable(q, k, v, h, w, sigma, prefix_tokens, similarity, scale, backend):
    """For ``create_graph=True`` only: the eager reference (matmul + softmax, ``[B, H, N, N]`` scores), whose
    backward is differentiable again (the fused SDPA kernels have no double backward)."""
    return reference.neighbour_attention(q, k, v, (h, w), sigma, prefix_tokens, similarity, scale)


_neighbour_attention_op = define_op(
    "neighbour_attention",
    "(Tensor? q, Tensor k, Tensor v, SymInt h, SymInt w, float? sigma, SymInt prefix_tokens, str similarity, "
    "float scale, str backend) -> Tensor",
    _neighbour_attention_impl, _neighbour_attention_fake, _neighbour_attention_differentiable, tensor_args=(0, 1, 2),
    twice_differentiable=_neighbour_attention_twice_differentiable)


# ==============================================================================================================
# AOT (GPU-readiness) configurations
# ==============================================================================================================
_AOT_DTYPES = (("fp16", torch.float16), ("bf16", torch.bfloat16), ("fp32", torch.float32))
_AOT_HEAD_DIMS = (32, 64, 80, 128)


def _aot_config(dtype_name, head_dim, csa, has_bias, block_w, block_m, block_n, num_warps, num_stages, default):
    from naclip_kernels._aot_spec import KernelConfig

    block_d = _block_d(head_dim)
    # From the Python signature, so this also works when the kernel was decorated by the interpreter.
    params = inspect.signature(getattr(_neighbour_attention_fwd_kernel, "fn", _neighbour_attention_fwd_kernel))
    names = list(params.parameters)
    constexpr_args = {n for n, p in params.parameters.items() if "constexpr" in str(p.annotation)}
    signature, constexprs = {}, {}
    for name in names:
        if name in constexpr_args:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*" + dtype_name
        elif name in ("qk_scale_log2", "gauss_c"):
            signature[name] = "fp32"
        elif name.startswith("stride_") and name.endswith("d"):
            # A contiguous last dim has stride 1, which Triton's JIT specialises to the constant 1.
            signature[name], constexprs[name] = "constexpr", 1
        else:
            signature[name] = "i32"
    constexprs.update(CSA=csa, HAS_BIAS=has_bias, EVEN_D=head_dim == block_d, IEEE=dtype_name == "fp32",
                      BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_W=block_w)
    # What a real launch sees 16-divisible: torch allocations and strides that are multiples of D (D % 16 == 0).
    divisible = [n for n in names if n.endswith("_ptr") or (n.startswith("stride_") and n[-1] in "bhn")]
    if head_dim % 16 == 0:
        divisible.append("head_dim")
    sim = "csa" if csa else "pair"
    bias = f"bias,W{block_w}" if has_bias else "nobias"
    name = f"{dtype_name},D{head_dim},{sim},{bias},M{block_m},N{block_n},w{num_warps},s{num_stages}"
    return KernelConfig(op="neighbour_attention", name=name, kernel=_neighbour_attention_fwd_kernel,
                        signature=signature, constexprs=constexprs, num_warps=num_warps, num_stages=num_stages,
                        default=default,
                        tags={"divisible_by_16": divisible, "dtype": dtype_name, "head_dim": head_dim,
                              "similarity": sim, "has_bias": has_bias, "block_w": block_w})


def _aot_enumerate(include_pruned=False):
    configs = []
    for dtype_name, dtype in _AOT_DTYPES:
        nbytes = torch.empty((), dtype=dtype).element_size()
        for head_dim in _AOT_HEAD_DIMS:
            block_d = _block_d(head_dim)
            for csa in (False, True):
                for block_m, block_n, num_warps, num_stages in _TUNE_SPACE:
                    cfg = (block_m, block_n, num_warps, num_stages)
                    # BLOCK_W values the heuristic can produce: powers of two in [16, BLOCK_N]; none without bias.
                    variants = [(False, block_n)]
                    bw = 16
                    while bw <= block_n:
                        variants.append((True, bw))
                        bw *= 2
                    for has_bias, block_w in variants:
                        if not include_pruned and not _config_allowed(*cfg, block_d, csa, has_bias, nbytes):
                            continue
                        default = cfg == _default_config(block_d, csa, has_bias, nbytes)
                        configs.append(_aot_config(dtype_name, head_dim, csa, has_bias, block_w, *cfg,
                                                   default=default))
    return configs


def aot_configs():
    """Every specialisation the launcher can run: dtypes fp16/bf16/fp32 x head dims 32/64/80/128 x {single pair,
    csa} x {no bias, bias with each BLOCK_W} x the autotune configs left after spill pruning (plus the default).

    The single-pair similarities ``qk``, ``kk``, ``qq`` share one specialisation (the launcher picks the operands).
    """
    return _aot_enumerate()
