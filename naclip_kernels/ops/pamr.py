"""PAMR: pixel-adaptive mask refinement (Araslanov & Roth, CVPR 2020) without the 16x neighbour stack.

The maths is ``SPEC.md`` section 3. With ``L = len(dilations)`` and the ``8 L`` offsets ``o_n = (a d, b d)``,
``(a, b) in {-1, 0, 1}^2 minus (0, 0)``, ``d in dilations`` (order: dilation-major, then
``(-1,-1) (-1,0) (-1,1) (0,-1) (0,1) (1,-1) (1,0) (1,1)``), every neighbour clamped to the image border:

    std(p, c) = unbiased std of the 9 L samples x_c(p + (a d, b d)), a, b in {-1, 0, 1} (centre once per d)
    a(p, n)   = softmax_n( mean_c( -|x_c(p) - x_c(p + o_n)| / (1e-8 + 0.1 std(p, c)) ) )
    m_c(p)   <- sum_n a(p, n) m_c(p + o_n)                                  (num_iter times)

The affinities depend on the image only, so both fast paths compute them once into ``[B, 8 L, H, W]`` (float32, or
float64 on the torch path for float64 inputs) and then run ``num_iter`` propagation sweeps that each read the mask
once and write it once. Extra memory is ``O(B (C + 8 L) H W)``, never the original's ``B C 8 L H W``.

Layers, bottom up: the Triton kernels ``_pamr_affinity_fwd_kernel`` / ``_pamr_propagate_fwd_kernel`` and their
launcher ``_pamr_triton``; the CPU path ``_pamr_torch``, which runs the compiled C kernels of
``naclip_kernels/csrc/pamr_cpu.c`` (``_pamr_native``, built on first use by :mod:`naclip_kernels.native`) and
falls back to eager tensor ops (``_pamr_eager``) where they cannot run; the public functional :func:`pamr`; and
:func:`aot_configs` for the ahead-of-time GPU-readiness check.
"""
from __future__ import annotations

import functools
import math
from numbers import Integral
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from naclip_kernels import reference
from naclip_kernels._alloc import empty_output, poison, poisoning
from naclip_kernels._backend import BackendUnavailableError, resolve_backend
from naclip_kernels._host_memory import mapped_empty
from naclip_kernels._library import define_op
from naclip_kernels._triton_compat import tl, triton
from naclip_kernels._validation import check_float_tensor, check_int

__all__ = ["pamr", "check_pamr_params", "check_pamr_args", "aot_configs"]

# Unit offsets (row, column) of the 8 neighbours of one dilation, in the order of SPEC.md and the original code.
_UNIT_OFFSETS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))
_EPS = 1e-8
_STD_SCALE = 0.1


# ==============================================================================================================
# Validation
# ==============================================================================================================
def check_pamr_params(num_iter, dilations, op: str = "pamr") -> Tuple[int, Tuple[int, ...]]:
    """Validate ``num_iter`` (int >= 1) and ``dilations`` (an int >= 1 or a non-empty sequence of them).

    Returns ``(num_iter, dilations_tuple)``. Used by :func:`pamr`, :func:`naclip_kernels.reference.pamr` and the
    :class:`naclip_kernels.PAMR` module (at construction).
    """
    num_iter = check_int(op, "num_iter", num_iter, minimum=1)
    if isinstance(dilations, Integral) and not isinstance(dilations, bool):
        dilations = (dilations,)
    if isinstance(dilations, (str, bytes)) or not isinstance(dilations, Sequence):
        raise TypeError(f"{op}: dilations must be a non-empty sequence of ints >= 1 such as (8, 16), "
                        f"got {type(dilations).__name__}")
    if len(dilations) == 0:
        raise ValueError(f"{op}: dilations must be a non-empty sequence of ints >= 1 such as (8, 16), got empty "
                         f"{dilations!r}")
    return num_iter, tuple(check_int(op, f"dilations[{i}]", d, minimum=1) for i, d in enumerate(dilations))


def check_pamr_args(image, mask, num_iter, dilations, op: str = "pamr") -> Tuple[int, Tuple[int, ...]]:
    """Validate every argument of :func:`pamr`; returns ``(num_iter, dilations_tuple)``.

    ``image``: floating ``[B, K, H, W]`` with ``K, H, W >= 1``; ``mask``: floating ``[B, C, h, w]`` on the same device
    with the same ``B`` and, when ``C > 0``, ``h, w >= 1``. The dtypes may differ (the output takes the mask's).
    """
    image = check_float_tensor(op, "image", image, ndim=4, layout="[B, K, H, W]")
    mask = check_float_tensor(op, "mask", mask, ndim=4, layout="[B, C, h, w]")
    if image.device != mask.device:
        raise ValueError(f"{op}: mask is on {mask.device} but image is on {image.device}; they must be on one device")
    batch, channels, height, width = image.shape
    if channels < 1 or height < 1 or width < 1:
        raise ValueError(f"{op}: image [B, K, H, W] needs K, H, W >= 1, got shape {tuple(image.shape)}")
    if mask.shape[0] != batch:
        raise ValueError(f"{op}: mask [B, C, h, w] must have the image's batch size B={batch}, got shape "
                         f"{tuple(mask.shape)} (image {tuple(image.shape)})")
    if mask.shape[1] > 0 and batch > 0 and (mask.shape[2] < 1 or mask.shape[3] < 1):
        raise ValueError(f"{op}: mask [B, C, h, w] needs h, w >= 1 to be resized to the image, got shape "
                         f"{tuple(mask.shape)}")
    return check_pamr_params(num_iter, dilations, op)


def _offsets(dilations: Sequence[int]) -> List[Tuple[int, int]]:
    """The ``8 L`` neighbour offsets ``(row, column)``, dilation-major."""
    return [(a * d, b * d) for d in dilations for a, b in _UNIT_OFFSETS]


# ==============================================================================================================
# Torch path (CPU, or CUDA without Triton)
# ==============================================================================================================
def _pamr_affinity_torch(image: torch.Tensor, dilations: Sequence[int], compute: torch.dtype) -> torch.Tensor:
    """``[B, K, H, W]`` image -> ``[B, 8 L, H, W]`` softmaxed affinities in ``compute``, without the ``9 L`` stack.

    Each neighbour difference ``x(p + o_n) - x(p)`` is a slice of one replicate-padded copy of the image, recomputed
    in each of three sweeps (mean deviation, squared deviations, affinities) rather than stored: that keeps the
    extra memory at a few ``[B, K, H, W]`` planes plus the output. The spread is the exact two-pass variance of the
    samples shifted by the centre value (the centre contributes a zero deviation once per dilation).
    """
    x = image.to(compute)
    batch, channels, height, width = x.shape
    pad = max(dilations)
    padded = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    offsets = _offsets(dilations)
    samples = 9 * len(dilations)

    def diff(dy: int, dx: int) -> torch.Tensor:
        return padded[:, :, pad + dy:pad + dy + height, pad + dx:pad + dx + width] - x

    mean = torch.zeros_like(x)
    for dy, dx in offsets:
        mean += diff(dy, dx)
    mean /= samples
    # Squared deviations from the mean; the L centre samples deviate by exactly -mean each.
    var = mean.square() * len(dilations)
    for dy, dx in offsets:
        var += (diff(dy, dx) - mean).square_()
    # -1 / (K (1e-8 + 0.1 std)): folds the channel mean and the sign into one per-(p, c) factor.
    scale = var.div_(samples - 1).sqrt_().mul_(_STD_SCALE).add_(_EPS).mul_(channels).reciprocal_().neg_()
    del mean
    logits = torch.empty(batch, len(offsets), height, width, dtype=compute, device=x.device)
    for n, (dy, dx) in enumerate(offsets):
        torch.sum(diff(dy, dx).abs_().mul_(scale), dim=1, out=logits[:, n])
    # Softmax over the neighbours in place (torch.softmax would hold a second [B, 8 L, H, W] at the peak).
    logits.sub_(logits.amax(dim=1, keepdim=True)).exp_()
    return logits.div_(logits.sum(dim=1, keepdim=True))


# The propagation runs every sweep of one chunk of whole channel planes before moving to the next chunk (channels
# never mix), so the chunk and its two padded buffers stay in the L2/L3 cache for all num_iter * 8 L multiply-adds
# and the mask crosses main memory about once, not once per sweep. A chunk is about this many elements (2 MiB in
# float32; 3 planes at 336x448): the Python loop then costs nothing next to the arithmetic.
_CHUNK_ELEMENTS = 1 << 19


def _replicate_border(buf: torch.Tensor, pad: int, height: int, width: int) -> None:
    """Fill the ``pad``-wide frame of ``buf [..., H + 2 pad, W + 2 pad]`` from its interior, in place.

    The result is exactly ``F.pad(interior, (pad,) * 4, mode="replicate")`` (clamped coordinates, corners included)
    for any ``pad``, also ``pad >= H`` or ``W``, at the cost of writing the frame only.
    """
    rows = slice(pad, pad + height)
    buf[..., rows, :pad].copy_(buf[..., rows, pad:pad + 1].expand(*buf.shape[:-2], height, pad))
    buf[..., rows, pad + width:].copy_(buf[..., rows, pad + width - 1:pad + width].expand(*buf.shape[:-2], height, pad))
    buf[..., :pad, :].copy_(buf[..., pad:pad + 1, :].expand(*buf.shape[:-2], pad, buf.shape[-1]))
    buf[..., pad + height:, :].copy_(buf[..., pad + height - 1:pad + height, :].expand(*buf.shape[:-2], pad,
                                                                                       buf.shape[-1]))


def _align_corners_source(n_out: int, n_in: int, device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per output index of ``F.interpolate(..., align_corners=True)`` along one axis: the source coordinate
    ``i (n_in - 1) / (n_out - 1)`` (``0`` when ``n_out == 1``) as its int64 floor ``lo`` (at most ``n_in - 1``) and
    its float64 fraction. Both CPU paths resize from these (the eager one as a matrix, the compiled one as tables)."""
    scale = (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
    src = torch.arange(n_out, dtype=torch.float64, device=device) * scale
    lo = src.floor().clamp_(max=n_in - 1)
    return lo.long(), src - lo


def _align_corners_matrix(n_out: int, n_in: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``[n_out, n_in]`` linear-interpolation matrix of ``F.interpolate(..., align_corners=True)`` along one axis:
    row ``i`` holds ``1 - w`` at ``lo`` and ``w`` at ``lo + 1`` (clamped), from :func:`_align_corners_source`."""
    lo, frac = _align_corners_source(n_out, n_in, device)
    rows = torch.arange(n_out, device=device)
    matrix = torch.zeros(n_out, n_in, dtype=torch.float64, device=device)
    matrix.index_put_((rows, lo), 1 - frac, accumulate=True)
    matrix.index_put_((rows, (lo + 1).clamp_(max=n_in - 1)), frac, accumulate=True)
    return matrix.to(dtype)


def _sweep_torch(padded: torch.Tensor, weights: Sequence[torch.Tensor], offsets: Sequence[Tuple[int, int]], pad: int,
                 out: torch.Tensor) -> None:
    """``out_c(p) = sum_n a(p, n) padded_c(pad + p + o_n)``: one multiply then ``8 L - 1`` in-place multiply-adds.

    ``padded`` ``[b, k, H + 2 pad, W + 2 pad]`` (replicate frame filled), ``weights[n]`` ``[b, 1, H, W]``, ``out``
    ``[b, k, H, W]`` in ``padded``'s dtype (any strides, distinct memory). Each neighbour is a strided view of
    ``padded``; the rows stay contiguous, so every op streams whole rows with vector loads.
    """
    height, width = out.shape[-2:]
    for n, (dy, dx) in enumerate(offsets):
        neighbour = padded[..., pad + dy:pad + dy + height, pad + dx:pad + dx + width]
        if n == 0:
            torch.mul(neighbour, weights[n], out=out)
        else:
            out.addcmul_(neighbour, weights[n])


def _pamr_torch(image: torch.Tensor, mask: torch.Tensor, num_iter: int, dilations: Tuple[int, ...]) -> torch.Tensor:
    """The ``"torch"`` backend: the compiled CPU kernels (:func:`_pamr_native`) for CPU tensors when they can be
    built here and nothing is float64, else the eager path (:func:`_pamr_eager`: CUDA without Triton, float64,
    no C compiler, or ``NACLIP_KERNELS_NATIVE=0``). Both compute the same maths in the same precision."""
    if mask.device.type == "cpu" and torch.float64 not in (image.dtype, mask.dtype):
        from naclip_kernels import native

        lib = native.load("pamr", _native_defines(dilations))
        if lib is not None:
            return _pamr_native(image, mask, num_iter, dilations, lib)
    return _pamr_eager(image, mask, num_iter, dilations)


def _pamr_eager(image: torch.Tensor, mask: torch.Tensor, num_iter: int, dilations: Tuple[int, ...]) -> torch.Tensor:
    """Memory-lean PAMR in eager PyTorch: affinities once, then all ``num_iter`` sweeps chunk of channels by chunk.

    A chunk of whole channel planes is resized (when the mask is smaller than the image) straight into the interior
    of a replicate-padded buffer; each sweep writes the interior of a second padded buffer and fills its frame
    (:func:`_replicate_border`), the two swap, and the last sweep writes the output's planes. Extra memory (besides
    the inputs): the output, the ``[B, 8 L, H, W]`` affinities and two padded chunks, about 1.3x the float32 mask
    at NACLIP's settings (56 queries, 336x448), against the original's 16x neighbour stack.
    """
    compute = torch.float64 if torch.float64 in (image.dtype, mask.dtype) else torch.float32
    batch, _, height, width = image.shape
    channels = mask.shape[1]
    affinity = _pamr_affinity_torch(image, dilations, compute)
    out = empty_output(batch, channels, height, width, dtype=mask.dtype, device=mask.device)
    pad = max(dilations)
    offsets = _offsets(dilations)
    per_chunk = max(1, _CHUNK_ELEMENTS // (height * width))
    # Small problems (the whole batch fits one chunk) run as one chunk: 8 L ops per sweep whatever B is.
    batch_step = batch if batch * channels <= per_chunk else 1
    chan_step = channels if batch_step > 1 else min(channels, per_chunk)
    shape = (batch_step, chan_step, height + 2 * pad, width + 2 * pad)
    # Two padded buffers ping-pong; the last sweep writes the output directly, or, for a mask dtype other than the
    # compute dtype, accumulates in the buffer it does not read and rounds once into the output.
    count = 2 if num_iter > 1 or mask.dtype != compute else 1
    buffers = [torch.empty(shape, dtype=compute, device=mask.device) for _ in range(count)]
    resize = mask.shape[-2:] != (height, width)
    if resize:
        # The bilinear resize as two small matrix products (rows, then columns): separable, so it equals
        # F.interpolate(align_corners=True) up to rounding (its weights come from float64 coordinates, so it is a
        # little closer to the float64 reference), and it is cheaper than the interpolation kernel's per-pixel
        # index arithmetic (56 queries at 336x448, single-threaded: 7 ms vs 18 ms for the 19 chunks).
        resize_rows = _align_corners_matrix(height, mask.shape[-2], compute, mask.device)
        resize_cols_t = _align_corners_matrix(width, mask.shape[-1], compute, mask.device).t()
    interior = (slice(None), slice(None), slice(pad, pad + height), slice(pad, pad + width))
    for b0 in range(0, batch, batch_step):
        b1 = b0 + batch_step
        weights = [affinity[b0:b1, n:n + 1] for n in range(len(offsets))]
        for c0 in range(0, channels, chan_step):
            c1 = min(channels, c0 + chan_step)
            src, *spare = [buf[:, :c1 - c0] for buf in buffers]
            chunk = mask[b0:b1, c0:c1]
            if resize:
                chunk = torch.matmul(torch.matmul(resize_rows, chunk.to(compute)), resize_cols_t)
            src[interior].copy_(chunk)
            _replicate_border(src, pad, height, width)
            for it in range(num_iter):
                if it == num_iter - 1:
                    target = out[b0:b1, c0:c1]
                    acc = target if mask.dtype == compute else spare[0][interior]
                    _sweep_torch(src, weights, offsets, pad, acc)
                    if acc is not target:
                        target.copy_(acc)
                else:
                    dst = spare[0]
                    _sweep_torch(src, weights, offsets, pad, dst[interior])
                    _replicate_border(dst, pad, height, width)
                    src, spare[0] = dst, src
    return out


# ==============================================================================================================
# Compiled CPU path (naclip_kernels/csrc/pamr_cpu.c, built by naclip_kernels.native)
# ==============================================================================================================
# A ring chunk holds as many channels as keep their rings (2 max(dilations) / gcd(dilations) + 3 padded rows per
# channel, see pamr_cpu.c) within this share of one core's L2 cache.
_L2_FRACTION = 0.5
# ... or, when one register block's rings do not fit L2, within this share of the L3 cache (see _ring_chunk_limit).
_L3_FRACTION = 0.3
_DEFAULT_CACHE_BYTES = {2: 1 << 20, 3: 8 << 20}
# Sweeps fused into one pass over the mask (nk_pamr_sweep_f32): each mask row crosses memory once per pass, but
# every extra sweep adds a ring per channel (smaller chunks, so more affinity reads) and a few border-strip rows.
# Measured on the dev CPU (minimum of alternating runs, ring chunks in whole register blocks, 10 iterations) against
# 3 (passes 3, 3, 2, 2) and 10 (one pass): 5 (passes 5, 5) was fastest at 336x448 with 21 / 56 / 171 queries
# (11.3 / 23.6 / 67.0 ms against 12.5 / 26.7 / 73.7 for 3).
_SWEEPS_PER_PASS = 5
# Images whose rings of one register block at _SWEEPS_PER_PASS sweeps do not fit L2 (1024 columns and more at
# (8, 16) on a 1 MB L2) fuse up to this many sweeps per pass instead (one pass for 10 iterations): their rings live
# in L3 anyway, and each pass saved is a read and write of the whole mask and a read of the affinities per chunk.
# Measured on the dev CPU (minimum of alternating runs, 10 iterations): 10 per pass against 5 was 7-10% faster at
# 1024x2048 (21 and 56 queries) and 13% at 768x1024 / 56, equal at 512x683 / 56, and 8-10% slower at 336x448
# (which keeps 5).
_WIDE_SWEEPS_PER_PASS = 10
_MAX_SWEEPS_PER_PASS = 10    # NK_MAX_LEVELS in pamr_cpu.c
# Masks in another dtype than float32 are swept in float32 groups of this many planes per thread, each rounded
# into the output: the float32 staging stays a few planes, not a float32 copy of the whole mask.
_STAGING_PLANES_PER_THREAD = 16


@functools.lru_cache(maxsize=4)
def _cache_bytes(level: int) -> int:
    """Linux's sysfs size of cpu0's level-``level`` data (or unified) cache; the ``_DEFAULT_CACHE_BYTES`` guess
    when sysfs does not say (other systems, some containers)."""
    import glob
    import os

    for index in sorted(glob.glob("/sys/devices/system/cpu/cpu0/cache/index*")):
        try:
            found = open(os.path.join(index, "level"), encoding="ascii").read().strip()
            kind = open(os.path.join(index, "type"), encoding="ascii").read().strip()
            text = open(os.path.join(index, "size"), encoding="ascii").read().strip().upper()
        except OSError:
            continue
        if found == str(level) and kind in ("Data", "Unified"):
            units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
            try:
                return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)
            except ValueError:
                break
    return _DEFAULT_CACHE_BYTES[level]


def _rings_fit_l2(ring_bytes_per_channel: int, block: int) -> bool:
    """Whether the rings of one register block of channels fit one core's L2 cache (else the image is "wide":
    its rings work from L3)."""
    return block * ring_bytes_per_channel <= _cache_bytes(2)


def _ring_chunk_limit(ring_bytes_per_channel: int, block: int, threads: int) -> int:
    """The most channels one sweep job keeps rings for at a time, in whole register blocks (at least one).

    While one block's rings fit one core's L2 cache, as many channels as fill ``_L2_FRACTION`` of it: the rings
    stay in L2. Wider images (1024 columns and more at (8, 16)) cannot keep even one block's rings there, so they
    work from L3 anyway; their chunks then share ``_L3_FRACTION`` of the L3 cache between the threads. Larger
    chunks read each affinity row from memory once for more channels. Measured on the dev CPU (32 MB L3, 2
    threads; minimum of alternating runs): 7-10% faster than one block at 768x1024 / 56 and 1024x2048 / 56 and
    171; a share of 0.5 was a little slower than 0.3, the whole L3 50% slower. At 336x448 and 512x683, whose blocks
    fit L2, chunks sized by L3 were 12-25% slower than the L2 rule.
    """
    if _rings_fit_l2(ring_bytes_per_channel, block):
        budget = _L2_FRACTION * _cache_bytes(2)
    else:
        budget = _L3_FRACTION * _cache_bytes(3) / max(1, threads)
    return max(block, int(budget // ring_bytes_per_channel) // block * block)


# Dilation tuples up to this long get a library compiled for them (all tap offsets constants: the unrolled sweep
# kernel of pamr_cpu.c, 13-16% faster than the generic loop on the dev CPU); longer ones use the generic build.
_MAX_FIXED_DILATIONS = 4


def _native_defines(dilations: Tuple[int, ...]) -> dict:
    """Preprocessor macros of the compiled PAMR library for ``dilations`` (see ``NK_FIXED_DILATIONS``)."""
    if len(dilations) > _MAX_FIXED_DILATIONS:
        return {}
    return {"NK_FIXED_DILATIONS": ",".join(map(str, dilations)),
            "NK_FIXED_ROW_STEP": functools.reduce(math.gcd, dilations), "NK_FIXED_PAD": max(dilations)}


def _bind_native(lib) -> None:
    """Declare the C signatures once per loaded library (ctypes then converts and checks every argument)."""
    if getattr(lib, "_nk_pamr_bound", False):
        return
    import ctypes

    i64, i32, ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
    for name, args, res in [
        ("nk_vector_width", [], i32), ("nk_channel_block", [], i32), ("nk_fixed_taps", [], i32),
        ("nk_barrier_wait", [ptr, i32], i32), ("nk_barrier_abort", [ptr], None),
        ("nk_fixed_channel_block", [], i32),
        ("nk_fixed_kernel_applies", [ptr, ptr, i32, i32, i32], i32),
        ("nk_affinity_floats", [i32, i32, i32], i64), ("nk_ring_row_floats", [i32, i32], i64),
        ("nk_pamr_sweep_scratch_floats", [i32, i32, i32, i32, i32], i64),
        ("nk_pamr_affinity_f32", [ptr, i64, i64, i32, i32, i32, i32, i32, ptr, ptr, i32, i32, ptr, i32, i32], i32),
        ("nk_pamr_resize_columns_f32", [ptr, i64, i32, i32, i32, ptr, ptr, ptr], i32),
        ("nk_pamr_save_borders_f32", [ptr, i64, i64, i64, i32, i32, i32, ptr, i32, ptr, ptr, ptr, i64, i32], i32),
        ("nk_pamr_border_history_f32", [ptr, i64, i64, i64, i32, i32, ptr, ptr, ptr, i32, i32, i32, i32, ptr, i64,
                                        ptr, i32, ptr, ptr, ptr, ptr, i32, ptr, i64], i32),
        ("nk_pamr_pad_image_f32", [ptr, i64, i64, i64, i32, i32, i32, i32, i32, ptr, i64], i32),
        ("nk_pamr_sweep_f32", [ptr, i64, i64, i64, i32, i32, ptr, ptr, ptr, i32, i32, i32, i32, i32, i32, ptr, i64,
                               ptr, i32, ptr, ptr, i32, ptr, i64], i32),
    ]:
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, res
    lib._nk_pamr_bound = True


def _run_phases(phases: Sequence[Sequence], lib) -> None:
    """Run ``phases`` one after the other and the zero-argument callables of each in parallel: job ``i`` of every
    phase on thread ``i`` (ctypes drops the GIL in the C calls), then raise the first error.

    Thread 0 is the calling thread, so a one-job phase (a torch op between C rounds) runs where it would without
    threads. The threads are started once per call and meet at ``lib``'s barrier (``nk_barrier_wait``, C, spinning
    briefly) between phases. On the dev VM a thread start and join per phase cost about 75 us and a Python
    ``threading.Barrier`` about 35 us; a 336x448 call has five phases. Nothing survives the call, so nothing leaks
    into a forked DataLoader worker. A failing job aborts the barrier: the other threads stop at the end of their
    current phase instead of waiting for it.
    """
    import ctypes
    import threading

    width = max((len(phase) for phase in phases), default=0)
    if width <= 1:
        for phase in phases:
            for job in phase:
                job()
        return
    state = (ctypes.c_int64 * 3)()                 # arrivals, generation, aborted (see nk_barrier_wait)
    address = ctypes.addressof(state)
    errors = []

    def worker(index):
        try:
            for phase in phases:
                if index < len(phase):
                    phase[index]()
                if lib.nk_barrier_wait(address, width) != 0:
                    return
        except BaseException as exc:  # noqa: BLE001 - re-raised in the calling thread
            errors.append(exc)
            lib.nk_barrier_abort(address)

    threads = [threading.Thread(target=worker, args=(index,), daemon=True) for index in range(1, width)]
    for thread in threads:
        thread.start()
    worker(0)
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


def _chain(*calls):
    """One job that runs ``calls`` in order (two jobs of one thread in one phase)."""
    def run():
        for call in calls:
            call()
    return run


def _merge_phases(*phases):
    """One phase whose job ``i`` runs job ``i`` of each of ``phases`` in turn (for work that has no order between
    threads, e.g. the affinity rows and the column resize)."""
    width = max(len(phase) for phase in phases)
    return [_chain(*(phase[i] for phase in phases if i < len(phase))) for i in range(width)]


def _split(total: int, parts: int) -> List[Tuple[int, int]]:
    """``total`` items as at most ``parts`` contiguous, near-equal, non-empty ``(start, stop)`` ranges."""
    parts = max(1, min(parts, total))
    bounds = [total * i // parts for i in range(parts + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(parts) if bounds[i + 1] > bounds[i]]


def _resize_tables(n_out: int, n_in: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`_align_corners_source` as the C kernels read it: int32 source index, float32 fraction."""
    lo, frac = _align_corners_source(n_out, n_in)
    return lo.to(torch.int32), frac.to(torch.float32)


def _pass_levels(num_iter: int, per_pass: int) -> List[int]:
    """The sweeps of each pass over the mask: ``num_iter`` split into the fewest passes of at most ``per_pass``
    sweeps (capped at ``_MAX_SWEEPS_PER_PASS``), as equal as they go (10 at 5 per pass: 5, 5; at 3 per pass: 3, 3,
    2, 2)."""
    fused = max(1, min(per_pass, _MAX_SWEEPS_PER_PASS))
    count = -(-num_iter // fused)
    return [num_iter // count + (1 if i < num_iter % count else 0) for i in range(count)]


def _round_floats(count: int) -> int:
    """``count`` rounded up to whole 64-byte lines of float32 (the scratch parts start on cache lines)."""
    return -(-count // 16) * 16


def _check_native(code: int, what: str) -> None:
    if code != 0:
        raise RuntimeError(f"pamr: the compiled CPU kernel rejected its arguments in {what} (code {code}); this is "
                           f"a bug in naclip_kernels, please report it with the input shapes")


class _NativePlan(NamedTuple):
    """Everything :func:`_pamr_native` derives from the shapes alone (see :func:`_native_plan`). Shared by the
    calls of a shape: nothing in it is written after it is made."""
    n_taps: int
    pad: int
    row_step: int
    dy: torch.Tensor                 # int32 [8 L] tap offsets, read by the C kernels only
    dx: torch.Tensor
    resize: bool
    row_lo: Optional[torch.Tensor]   # align_corners tables of the mask's resize (None: same size)
    row_frac: Optional[torch.Tensor]
    col_lo: Optional[torch.Tensor]
    col_frac: Optional[torch.Tensor]
    group: int
    ring_row: int
    classes: int
    by_class: bool
    passes: List[int]
    most: int
    max_chunks: Dict[int, int]
    history_split: List[Tuple[int, int]]
    history_chunk: int
    strip_border_at: int
    history_rings_at: int
    ring_floats: int
    x_rs: int
    xpad_floats: int
    xpad_in_output: bool
    sizes: Dict[str, int]


def _job_chunk(count: int, limit: int) -> int:
    """The channels a sweep job of ``count`` channels takes at a time: equal chunks of at most ``limit``."""
    return -(-count // -(-count // limit))


def _plan_tunables() -> tuple:
    """The module settings a plan depends on (part of its cache key: tests and tuning change them)."""
    return (_SWEEPS_PER_PASS, _WIDE_SWEEPS_PER_PASS, _L2_FRACTION, _L3_FRACTION, _STAGING_PLANES_PER_THREAD,
            _cache_bytes(2), _cache_bytes(3))


@functools.lru_cache(maxsize=32)
def _native_plan(lib, image_channels: int, channels: int, height: int, width: int, mask_h: int, mask_w: int,
                 mask_dtype: torch.dtype, num_iter: int, dilations: Tuple[int, ...], threads: int,
                 tunables: tuple) -> _NativePlan:
    """The schedule and memory layout of a :func:`_pamr_native` call: pass split, ring chunks, border-history
    chunks, scratch sizes, the tap and resize tables. A function of the shapes, the library and ``tunables``
    (:func:`_plan_tunables`) only, so it is computed once per shape: it took 0.4-0.6 ms of Python per call (with
    the caches cold after the previous call), 5% of a 336x448 / 21-query call on the dev CPU. The returned tensors
    are read-only inputs of the C kernels."""
    del tunables  # in the key only; the functions below read the module settings
    offsets = _offsets(dilations)
    n_taps, pad = len(offsets), max(dilations)
    row_step = functools.reduce(math.gcd, dilations)
    dy = torch.tensor([o[0] for o in offsets], dtype=torch.int32)
    dx = torch.tensor([o[1] for o in offsets], dtype=torch.int32)
    vector = int(lib.nk_vector_width())
    # Channels per register block of the sweep kernel that will run (ring chunks are whole blocks).
    fixed = bool(lib.nk_fixed_kernel_applies(dy.data_ptr(), dx.data_ptr(), n_taps, pad, row_step))
    block = int(lib.nk_fixed_channel_block() if fixed else lib.nk_channel_block())
    resize = (mask_h, mask_w) != (height, width)
    row_lo = row_frac = col_lo = col_frac = None
    if resize:
        row_lo, row_frac = _resize_tables(height, mask_h)
        col_lo, col_frac = _resize_tables(width, mask_w)
    group = channels if mask_dtype == torch.float32 else min(channels, threads * _STAGING_PLANES_PER_THREAD)
    ring_row = int(lib.nk_ring_row_floats(width, pad))
    classes = min(row_step, height)
    by_class = threads > 1 and classes >= threads

    def ring_bytes(levels: int) -> int:
        """Ring bytes per channel of a `levels`-sweep pass."""
        return 4 * int(lib.nk_pamr_sweep_scratch_floats(1, width, pad, row_step, levels))

    narrow = _rings_fit_l2(ring_bytes(_SWEEPS_PER_PASS), block)
    passes = _pass_levels(num_iter, _SWEEPS_PER_PASS if narrow else _WIDE_SWEEPS_PER_PASS)
    most = max(passes)
    max_chunks = {levels: _ring_chunk_limit(ring_bytes(levels), block, threads) for levels in set(passes) | {1}}
    history_split = _split(group, threads)                  # channel ranges of the border-history jobs
    strip_rows = min(height, (most - 1) * pad + 1)

    # Each thread's ring slot holds the rings of any sweep job it may run, and before a fused pass the border
    # history's strips, strip borders and single-level rings for `history_chunk` channels at a time: as many as
    # fit in the rings, so the strips cost no memory of their own.
    job_counts = set()                               # the channel counts the sweep jobs can have
    for g0 in range(0, channels, group):
        count = min(group, channels - g0)
        job_counts.add(count)                                             # a by-class job: the whole group
        job_counts.update(c1 - c0 for c0, c1 in _split(count, threads))   # a by-channel job: its share
    ring_floats = max(int(lib.nk_pamr_sweep_scratch_floats(_job_chunk(n, max_chunks[levels]), width, pad, row_step,
                                                           levels))
                      for levels in set(passes) for n in job_counts)

    def history_layout(chunk: int) -> Tuple[int, int, int]:
        """Offsets of the strip border and the rings in a slot, and the floats used, for `chunk` channels."""
        strip_border_at = _round_floats(chunk * strip_rows * width)
        rings_at = strip_border_at + _round_floats(chunk * 2 * ring_row)
        return strip_border_at, rings_at, rings_at + int(lib.nk_pamr_sweep_scratch_floats(
            min(chunk, max_chunks[1]), width, pad, row_step, 1))

    history_chunk = max(c1 - c0 for c0, c1 in history_split)
    while history_chunk > 1 and history_layout(history_chunk)[2] > ring_floats:
        history_chunk -= 1
    strip_border_at, history_rings_at, history_floats = history_layout(history_chunk)
    if most > 1:
        ring_floats = max(ring_floats, history_floats)
    # The image, replicate-padded once (in C, so that no torch op runs between the C phases): the
    # affinity loop then reads every neighbour (and the whole last vector of a row) without clamping. It lives in the
    # output's memory when that fits (the output is only written after the affinities), else in the phase region.
    x_rs = -(-width // vector) * vector + 2 * pad
    xpad_floats = image_channels * (height + 2 * pad) * x_rs
    out_bytes = channels * height * width * mask_dtype.itemsize
    xpad_in_output = out_bytes >= 4 * xpad_floats + 64
    # The parts of the call's one scratch mapping, in floats. The "phase" region holds in turn the padded image
    # (affinity pass; when it is not in the output) and the column resize (first sweep).
    sizes = {"affinity": int(lib.nk_affinity_floats(height, width, n_taps)),
             "border": group * most * 2 * ring_row,          # rows 0 and H - 1 of each plane after each sweep of a pass
             "staging": 0 if mask_dtype == torch.float32 else group * height * width,
             "rings": threads * ring_floats,
             "phase": max(0 if xpad_in_output else xpad_floats, group * mask_h * width if resize else 0)}
    return _NativePlan(n_taps, pad, row_step, dy, dx, resize, row_lo, row_frac, col_lo, col_frac, group, ring_row,
                       classes, by_class, passes, most, max_chunks, history_split, history_chunk, strip_border_at,
                       history_rings_at, ring_floats, x_rs, xpad_floats, xpad_in_output, sizes)


def _pamr_native(image: torch.Tensor, mask: torch.Tensor, num_iter: int, dilations: Tuple[int, ...],
                 lib) -> torch.Tensor:
    """PAMR with the compiled CPU kernels of ``naclip_kernels/csrc/pamr_cpu.c``: float32 affinities and sweeps, the
    output in the mask's dtype.

    CPU tensors only, neither of them float64 (the caller checks). Schedule: affinities once; the mask's column
    resize into a small ``[C, h, W]`` buffer (the row resize happens on the fly in the first pass, so the resized
    mask is never written and read back); then ``num_iter`` sweeps in passes of up to ``_SWEEPS_PER_PASS``
    (``_WIDE_SWEEPS_PER_PASS`` for wide images; :func:`_pass_levels`), in place in the output, each pass preceded by
    its border history. Work is split over ``torch.get_num_threads()`` Python threads (the C calls drop the GIL):
    the affinity pass by rows, the resize and the border history by channels, and each pass by residue classes of
    rows modulo ``gcd(dilations)`` when there are at least as many classes as threads (the affinities are then read
    once per pass), else by channels. The threads start once per call and run the schedule as phases with a C
    barrier between them (:func:`_run_phases`); work that reads only its own thread's channels (a first pass split
    by channels: its column resize, border rows and sweep) shares one phase. At 336x448 / 21 queries that is 5
    phases where there were 6 thread rounds and 2 serial C calls; on the dev CPU (alternating calls, median and
    fastest) 9-13% faster there, 5-9% at 512x683 / 21, 3% at 56 queries. Only C runs in the parallel phases
    (no torch op, which would leave torch's OpenMP threads spinning on the cores the C jobs need).

    Memory: the output and one scratch buffer per call, both from :func:`naclip_kernels._host_memory.mapped_empty`
    (huge-page mappings, cached between calls: fresh pages cost more than the sweeps on the dev VM). The scratch
    holds the ``[H, ~W, 8 L]`` affinities, the rows 0 and ``H - 1`` of each plane after each sweep of a pass, each
    thread's rings (about half its L2 cache, or its share of L3 for wide images, see :func:`_ring_chunk_limit`;
    before a pass they hold the border-history strips), the ``[C, h, W]`` column resize, and for masks that are not
    float32 a few float32 staging planes per thread. The padded image lives in the output's memory when it fits
    there (else where the column resize goes): the output is only written after the affinity pass. At 21 queries,
    336x448, the peak is 1.95x the mask, of which the output is 1x and the affinities 0.76x.
    """
    _bind_native(lib)
    batch, image_channels, height, width = image.shape
    channels, (mask_h, mask_w) = mask.shape[1], mask.shape[-2:]
    threads = max(1, torch.get_num_threads())
    (n_taps, pad, row_step, dy, dx, resize, row_lo, row_frac, col_lo, col_frac, group, ring_row, classes, by_class,
     passes, most, max_chunks, history_split, history_chunk, strip_border_at, history_rings_at, ring_floats, x_rs,
     xpad_floats, xpad_in_output, sizes) = _native_plan(lib, image_channels, channels, height, width, mask_h, mask_w,
                                                        mask.dtype, num_iter, tuple(dilations), threads,
                                                        _plan_tunables())
    out = empty_output(batch, channels, height, width, dtype=mask.dtype, device=mask.device, own_mapping=True)
    image32 = image if image.dtype == torch.float32 else image.float()

    # One scratch mapping for the whole call (see naclip_kernels._host_memory; sizes: _native_plan).
    arena, parts, at = mapped_empty([sum(_round_floats(n) for n in sizes.values())], torch.float32), {}, 0
    for name, floats in sizes.items():
        parts[name], at = arena[at:at + floats], at + _round_floats(floats)
    affinity, phase = parts["affinity"], parts["phase"]
    border = parts["border"].view(group, most, 2, ring_row)
    staging = None if mask.dtype == torch.float32 else parts["staging"].view(group, height, width)
    rings = [parts["rings"][i * ring_floats:(i + 1) * ring_floats] for i in range(threads)]
    hres = phase[:group * mask_h * width].view(group, mask_h, width) if resize else None

    def source_args(c0, from_resize):
        """The C kernels' (hres, h, row_lo, row_frac) for planes from c0 on: the first pass of a resized mask reads
        the resize on the fly (hres + the row tables) instead of the planes."""
        if not from_resize:
            return None, 0, None, None
        return hres[c0].data_ptr(), mask_h, row_lo.data_ptr(), row_frac.data_ptr()

    def sweep_job(planes, c0, c1, k0, k1, levels, from_resize, slot):
        count = c1 - c0
        chunk = _job_chunk(count, max_chunks[levels])
        target, saved, scratch = planes[c0:c1], border[c0:c1], rings[slot]
        source = source_args(c0, from_resize)

        def run():
            _check_native(lib.nk_pamr_sweep_f32(
                target.data_ptr(), target.stride(0), target.stride(1), count, height, width, affinity.data_ptr(),
                dy.data_ptr(), dx.data_ptr(), n_taps, pad, row_step, k0, k1, levels, saved.data_ptr(),
                saved.stride(0), *source, chunk, scratch.data_ptr(), scratch.numel()), "a sweep")
        return run

    def history_job(planes, c0, c1, levels, from_resize, slot):
        """border[c0:c1, l] = rows 0 and H - 1 after l sweeps, 0 < l < levels (nk_pamr_border_history_f32)."""
        slot_floats = rings[slot]
        strip, strip_border, scratch = slot_floats, slot_floats[strip_border_at:], slot_floats[history_rings_at:]

        def run():
            for k0 in range(c0, c1, history_chunk):
                count = min(history_chunk, c1 - k0)
                _check_native(lib.nk_pamr_border_history_f32(
                    planes[k0].data_ptr(), planes.stride(0), planes.stride(1), count, height, width,
                    affinity.data_ptr(), dy.data_ptr(), dx.data_ptr(), n_taps, pad, row_step, levels,
                    border[k0].data_ptr(), border.stride(0), *source_args(k0, from_resize), strip.data_ptr(),
                    strip_border.data_ptr(), min(count, max_chunks[1]), scratch.data_ptr(), scratch.numel()),
                    "the border rows of a pass")
        return run

    def save_job(planes, c0, c1, from_resize):
        """border[c0:c1, 0] = rows 0 and H - 1 before the pass (nk_pamr_save_borders_f32)."""
        def run():
            _check_native(lib.nk_pamr_save_borders_f32(
                planes[c0].data_ptr(), planes.stride(0), planes.stride(1), c1 - c0, height, width, pad,
                *source_args(c0, from_resize), border[c0].data_ptr(), border.stride(0), 3), "saving the border rows")
        return run

    def pad_job(b, xb):
        def run():
            _check_native(lib.nk_pamr_pad_image_f32(
                image32[b].data_ptr(), image32.stride(1), image32.stride(2), image32.stride(3), image_channels,
                height, width, pad, pad, xb.data_ptr(), x_rs), "padding the image")
        return run

    def affinity_job(xb, y0, y1):
        def run():
            _check_native(lib.nk_pamr_affinity_f32(
                xb.data_ptr(), xb.stride(0), xb.stride(1), xb.shape[0], height, width, pad, pad,
                dy.data_ptr(), dx.data_ptr(), n_taps, len(dilations), affinity.data_ptr(), y0, y1),
                "the affinity pass")
        return run

    def resize_job(b, g0, c0, c1):
        def run():
            _check_native(lib.nk_pamr_resize_columns_f32(
                low_res[b, g0 + c0].data_ptr(), c1 - c0, mask_h, mask_w, width, col_lo.data_ptr(),
                col_frac.data_ptr(), hres[c0].data_ptr()), "the resize")
        return run

    # The whole call as phases of per-thread jobs (_run_phases). Only C runs in the multi-job phases: a torch op
    # there would leave torch's OpenMP threads spinning on the cores the C jobs need. Torch ops (copies, the poison
    # of tests) are one-job phases of the calling thread.
    low_res = mask.float().contiguous() if resize else None
    phases = []
    for b in range(batch):
        if xpad_in_output:
            raw = out[b].view(-1).view(torch.uint8)
            skip = (-raw.data_ptr()) % 64
            xb = raw[skip:skip + 4 * xpad_floats].view(torch.float32)
        else:
            xb = phase[:xpad_floats]
        xb = xb.view(image_channels, height + 2 * pad, x_rs)
        phases.append([pad_job(b, xb)])
        # The affinity rows share a phase with the first group's column resize when the padded image is not in
        # the region the resize writes.
        pending = [affinity_job(xb, y0, y1) for y0, y1 in _split(height, threads)]
        if xpad_in_output and poisoning():
            phases += [pending, [functools.partial(poison, out[b])]]  # poison what the sweeps must overwrite
            pending = []
        for g0 in range(0, channels, group):
            g1 = min(channels, g0 + group)
            planes = out[b, g0:g1] if staging is None else staging[:g1 - g0]
            count = g1 - g0
            # The last phase holds only this group's column resize, split by channels like the first pass's sweeps.
            resize_alone = False
            if resize:
                resizes = [resize_job(b, g0, c0, c1) for c0, c1 in _split(count, threads)]
                if pending and xpad_in_output:
                    phases.append(_merge_phases(pending, resizes))
                else:
                    phases += [pending, resizes] if pending else [resizes]
                    resize_alone = True
            else:
                if pending:
                    phases.append(pending)
                phases.append([functools.partial(planes.copy_, mask[b, g0:g1])])
            pending = []
            for index, levels in enumerate(passes):
                from_resize = resize and index == 0
                # The first pass writes the output's pages first: split by channels there, as threads that split
                # a fresh page's rows by class would fault the same pages and contend for them (with the pages
                # cached from an earlier call the two splits measured the same).
                split_by_class = by_class and not (from_resize and staging is None)
                if split_by_class:
                    jobs = [sweep_job(planes, 0, count, k0, k1, levels, from_resize, slot)
                            for slot, (k0, k1) in enumerate(_split(classes, threads))]
                else:
                    jobs = [sweep_job(planes, c0, c1, 0, classes, levels, from_resize, slot)
                            for slot, (c0, c1) in enumerate(_split(count, threads))]
                # Each thread saves the border rows of its history channels, then computes their history.
                history_ranges = [(c0, min(c1, count)) for c0, c1 in history_split if c0 < count]
                borders = [_chain(save_job(planes, c0, c1, from_resize),
                                  *([history_job(planes, c0, c1, levels, from_resize, slot)] if levels > 1 else []))
                           for slot, (c0, c1) in enumerate(history_ranges)]
                if not split_by_class and history_ranges == _split(count, threads):
                    # Each thread's sweep reads only the border rows (and column resize) of its own channels, so
                    # they share a phase: no barrier between them.
                    merged = _merge_phases(borders, jobs)
                    if from_resize and resize_alone:
                        phases[-1] = _merge_phases(phases[-1], merged)
                    else:
                        phases.append(merged)
                else:
                    phases += [borders, jobs]
            if staging is not None:
                phases.append([functools.partial(out[b, g0:g1].copy_, planes)])
    _run_phases(phases, lib)
    return out


# ==============================================================================================================
# Triton kernels and launcher
# ==============================================================================================================
# The neighbour axis is padded to a power of two NPAD >= 8 L and held, with a block of BLOCK_P pixels, in one
# [BLOCK_P, NPAD] register tile; BLOCK_P * NPAD is kept at _TILE elements (16 per thread at 4 warps) so that the
# few live tiles (offsets, affinities, gathered values) fit in registers whatever L is.
_TILE = 2048
# NPAD <= 128. Longer dilation tuples (no PAMR user has more than a handful) run on the torch path: at NPAD = 512 the
# affinity kernel spilled (255 registers + 216-248 bytes of stack on sm_80/sm_90).
_MAX_DILATIONS = 16
# Channels are split over programs until the grid has about this many: ~30 per SM on an H100 (132 SMs), so that
# the last wave is short; each extra channel group only re-reads the block's affinities (8 L floats per pixel).
_TARGET_PROGRAMS = 4096
_MAX_GRID_Z = 65535          # CUDA's limit on grid dimensions 1 and 2


@triton.jit
def _pamr_neighbour_offsets(dil_ptr, num_dil, NPAD: tl.constexpr):
    """Row/column offsets ``(dy, dx)`` of the ``NPAD`` neighbour slots (zero beyond ``8 * num_dil``) and the mask."""
    n = tl.arange(0, NPAD)
    n_ok = n < 8 * num_dil
    d = tl.load(dil_ptr + n // 8, mask=n_ok, other=0)
    tap = n % 8
    tap = tap + (tap >= 4).to(tl.int32)  # 3x3 raster index, skipping the centre (4)
    return (tap // 3 - 1) * d, (tap % 3 - 1) * d, n_ok


@triton.jit
def _pamr_affinity_fwd_kernel(
    x_ptr, dil_ptr, aff_ptr,
    K, H, W, num_dil,
    stride_xb, stride_xk, stride_xh, stride_xw,
    BLOCK_P: tl.constexpr, NPAD: tl.constexpr,
):
    """``aff[b, n, p] = softmax_n(mean_k(-|x_k(p) - x_k(p + o_n)| / (1e-8 + 0.1 std_k(p))))``, float32.

    Grid ``(cdiv(H W, BLOCK_P), B)``. ``x`` ``[B, K, H, W]`` (fp32/fp16/bf16, any strides), ``dil`` int32 ``[L]``,
    ``aff`` contiguous float32 ``[B, 8 L, H, W]``. Per image channel the ``8 L`` clamped neighbours of a pixel block
    are gathered once into a ``[BLOCK_P, NPAD]`` tile; the spread is the two-pass unbiased variance of the deviations
    from the centre (the ``L`` centre samples deviate by 0), all in float32.
    """
    pid_p = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = p < H * W
    row = p // W
    col = p % W
    dy, dx, n_ok = _pamr_neighbour_offsets(dil_ptr, num_dil, NPAD)
    nrow = tl.minimum(tl.maximum(row[:, None] + dy[None, :], 0), H - 1)
    ncol = tl.minimum(tl.maximum(col[:, None] + dx[None, :], 0), W - 1)
    centre_off = row.to(tl.int64) * stride_xh + col.to(tl.int64) * stride_xw
    nbr_off = nrow.to(tl.int64) * stride_xh + ncol.to(tl.int64) * stride_xw
    tile_ok = p_ok[:, None] & n_ok[None, :]
    samples = 9 * num_dil
    acc = tl.zeros((BLOCK_P, NPAD), dtype=tl.float32)
    for k in range(K):
        base = x_ptr + b * stride_xb + k * stride_xk
        xc = tl.load(base + centre_off, mask=p_ok, other=0.0).to(tl.float32)
        xn = tl.load(base + nbr_off, mask=tile_ok, other=0.0).to(tl.float32)
        dev = tl.where(n_ok[None, :], xn - xc[:, None], 0.0)
        mean = tl.sum(dev, axis=1) / samples
        cen = tl.where(n_ok[None, :], dev - mean[:, None], 0.0)
        var = (tl.sum(cen * cen, axis=1) + num_dil * mean * mean) / (samples - 1)
        inv = 1.0 / (1e-8 + 0.1 * tl.sqrt(var))
        acc += tl.abs(dev) * inv[:, None]
    logits = tl.where(n_ok[None, :], -acc / K, float("-inf"))
    e = tl.exp(logits - tl.max(logits, axis=1)[:, None])
    aff = e / tl.sum(e, axis=1)[:, None]
    num_n = 8 * num_dil
    out = aff_ptr + b * num_n * H * W + tl.arange(0, NPAD)[None, :].to(tl.int64) * (H * W) + p[:, None]
    tl.store(out, aff, mask=tile_ok)


@triton.jit
def _pamr_propagate_fwd_kernel(
    src_ptr, aff_ptr, dil_ptr, dst_ptr,
    C, H, W, num_dil, channels_per_program,
    stride_sb, stride_sc, stride_sh, stride_sw,
    stride_db, stride_dc,
    BLOCK_P: tl.constexpr, NPAD: tl.constexpr,
):
    """One sweep ``dst[b, c, p] = sum_n aff[b, n, p] * src[b, c, clamp(p + o_n)]``, accumulated in float32.

    Grid ``(cdiv(H W, BLOCK_P), cdiv(C, channels_per_program), B)``. ``src`` ``[B, C, H, W]`` (fp32/fp16/bf16, any
    strides), ``aff`` contiguous float32 ``[B, 8 L, H, W]``, ``dst`` ``[B, C, H, W]`` with contiguous planes
    (``stride_w = 1``, ``stride_h = W``). The affinity tile and the clamped gather offsets of the pixel block are
    built once and reused for every channel, so each channel costs one gather (neighbour rows are shared with
    nearby blocks and hit L1/L2) and one store: the mask is read once and written once per sweep.
    """
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = p < H * W
    row = p // W
    col = p % W
    dy, dx, n_ok = _pamr_neighbour_offsets(dil_ptr, num_dil, NPAD)
    # [NPAD, BLOCK_P] so that the sum over neighbours reduces the leading axis.
    nrow = tl.minimum(tl.maximum(row[None, :] + dy[:, None], 0), H - 1)
    ncol = tl.minimum(tl.maximum(col[None, :] + dx[:, None], 0), W - 1)
    nbr_off = nrow.to(tl.int64) * stride_sh + ncol.to(tl.int64) * stride_sw
    tile_ok = n_ok[:, None] & p_ok[None, :]
    num_n = 8 * num_dil
    aff_off = b * num_n * H * W + tl.arange(0, NPAD)[:, None].to(tl.int64) * (H * W) + p[None, :]
    aff = tl.load(aff_ptr + aff_off, mask=tile_ok, other=0.0)
    c_start = pid_c * channels_per_program
    c_end = tl.minimum(c_start + channels_per_program, C)
    # 64-bit channel base pointers, advanced by one plane per channel.
    src_c = src_ptr + b * stride_sb + c_start.to(tl.int64) * stride_sc
    dst_c = dst_ptr + b * stride_db + c_start.to(tl.int64) * stride_dc
    for _ in range(c_start, c_end):
        vals = tl.load(src_c + nbr_off, mask=tile_ok, other=0.0)
        out = tl.sum(aff * vals.to(tl.float32), axis=0)
        tl.store(dst_c + p, out.to(dst_ptr.dtype.element_ty), mask=p_ok)
        src_c += stride_sc
        dst_c += stride_dc


def _block_config(num_dil: int, kernel: str) -> Tuple[int, int, int]:
    """``(NPAD, BLOCK_P, num_warps)`` of ``kernel`` (``"affinity"`` or ``"propagate"``) for ``num_dil`` dilations.

    The one heuristic the launcher and the AOT list share. The affinity kernel keeps about five
    ``[BLOCK_P, NPAD]`` tiles live (offsets, gathered values, deviations, accumulator), so it gets half the tile of
    the propagation kernel (three live tiles): at 2048 elements it compiled to 246-251 registers for NPAD >= 32.
    """
    npad = triton.next_power_of_2(8 * num_dil)
    tile = _TILE // 2 if kernel == "affinity" else _TILE
    block_p = max(16, tile // npad)
    num_warps = 4 if npad * block_p <= tile else 8
    return npad, block_p, num_warps


@functools.lru_cache(maxsize=32)
def _dilation_table(dilations: Tuple[int, ...], device: torch.device) -> torch.Tensor:
    """The int32 ``[L]`` dilation table the kernels read, cached so repeated calls skip a host-to-device copy."""
    return torch.tensor(dilations, dtype=torch.int32, device=device)


def _pamr_triton(image: torch.Tensor, mask: torch.Tensor, num_iter: int, dilations: Tuple[int, ...]) -> torch.Tensor:
    """Launch the affinity kernel once and the propagation kernel ``num_iter`` times.

    Buffers: float32 affinities ``[B, 8 L, H, W]``; the float32 resized mask when ``(h, w) != (H, W)``; float32
    ping-pong buffers between sweeps (the output doubles as one for float32 masks); the output in the mask's dtype.
    """
    batch, _, height, width = image.shape
    channels = mask.shape[1]
    device = mask.device
    if image.dtype == torch.float64:
        image = image.float()  # the kernels read fp32/fp16/bf16; the image is small (K planes)
    num_dil = len(dilations)
    npad, block_p, num_warps = _block_config(num_dil, "affinity")
    dil = _dilation_table(dilations, device)
    num_n = 8 * num_dil
    hw = height * width
    p_blocks = triton.cdiv(hw, block_p)
    affinity = torch.empty(batch, num_n, height, width, dtype=torch.float32, device=device)
    for b0 in range(0, batch, _MAX_GRID_Z):
        b1 = min(batch, b0 + _MAX_GRID_Z)
        x = image[b0:b1]
        _pamr_affinity_fwd_kernel[(p_blocks, b1 - b0)](
            x, dil, affinity[b0:b1], image.shape[1], height, width, num_dil,
            x.stride(0), x.stride(1), x.stride(2), x.stride(3),
            BLOCK_P=block_p, NPAD=npad, num_warps=num_warps, num_stages=1)

    npad, block_p, num_warps = _block_config(num_dil, "propagate")
    p_blocks = triton.cdiv(hw, block_p)
    src = mask
    owned = []
    if mask.shape[-2:] != (height, width):
        # contiguous(): interpolate keeps a channels-last input's layout, and this buffer is reused as a
        # destination, which the propagation kernel writes as contiguous planes.
        src = F.interpolate(mask.float(), size=(height, width), mode="bilinear", align_corners=True).contiguous()
        owned.append(src)
    groups = max(1, min(channels, triton.cdiv(_TARGET_PROGRAMS, p_blocks * min(batch, _MAX_GRID_Z))))
    groups = min(groups, _MAX_GRID_Z)
    per_program = triton.cdiv(channels, groups)
    groups = triton.cdiv(channels, per_program)
    for it in range(num_iter):
        last = it == num_iter - 1
        if last and mask.dtype != torch.float32:
            dst = empty_output(batch, channels, height, width, dtype=mask.dtype, device=device)
        else:
            free = [buf for buf in owned if buf is not src]
            if free:
                dst = free[0]
            else:
                dst = empty_output(batch, channels, height, width, dtype=torch.float32, device=device)
                owned.append(dst)
        for b0 in range(0, batch, _MAX_GRID_Z):
            b1 = min(batch, b0 + _MAX_GRID_Z)
            s, o = src[b0:b1], dst[b0:b1]
            _pamr_propagate_fwd_kernel[(p_blocks, groups, b1 - b0)](
                s, affinity[b0:b1], dil, o, channels, height, width, num_dil, per_program,
                s.stride(0), s.stride(1), s.stride(2), s.stride(3), o.stride(0), o.stride(1),
                BLOCK_P=block_p, NPAD=npad, num_warps=num_warps, num_stages=1)
        src = dst
    return src


# ==============================================================================================================
# Public functional
# ==============================================================================================================
def pamr(image: torch.Tensor, mask: torch.Tensor, num_iter: int = 10, dilations: Sequence[int] = (8, 16),
         backend: str = "auto") -> torch.Tensor:
    r"""Pixel-adaptive mask refinement (PAMR) of ``mask`` guided by ``image``, exactly as ``SPEC.md`` section 3.

    .. math::
        a(p, n) = \mathrm{softmax}_n\Big(\frac{1}{K}\sum_c \frac{-|x_c(p) - x_c(p + o_n)|}{10^{-8} + 0.1\,
        \mathrm{std}(p, c)}\Big), \qquad m_c(p) \leftarrow \sum_n a(p, n)\, m_c(p + o_n)\ \ (\texttt{num\_iter}
        \text{ times})

    over the ``8 * len(dilations)`` offsets ``o_n`` (the 8 neighbours at each dilation, clamped to the border);
    ``std`` is the unbiased standard deviation of the ``9 * len(dilations)`` samples around ``p`` (centre once per
    dilation). The mask is first resized to the image's ``H x W`` (bilinear, ``align_corners=True``) when its size
    differs.

    Args:
        image: ``[B, K, H, W]`` floating tensor (``K >= 1``; NACLIP: the normalised RGB image at output size).
        mask: ``[B, C, h, w]`` floating tensor (logits or probabilities), same device; any strides.
        num_iter: number of propagation sweeps, ``>= 1`` (NACLIP: 10).
        dilations: non-empty sequence of ints ``>= 1`` (NACLIP: ``(8, 16)``); dilations larger than the image are
            fine (clamping).
        backend: ``"auto" | "triton" | "torch" | "reference"`` (see :mod:`naclip_kernels._backend`). ``"auto"`` takes
            the torch path for float64 masks and for more than 16 dilations, which the Triton kernels do not take.
            On CPU tensors the torch path runs compiled C kernels (built once per machine with the system C
            compiler, see :mod:`naclip_kernels.native`; ``NACLIP_KERNELS_NATIVE=0`` switches them off). Where they
            cannot run (no compiler, a float64 image or mask, CUDA tensors without Triton), it runs eager PyTorch
            ops with the same maths, several times slower.

    Returns:
        ``[B, C, H, W]`` in the mask's dtype. Accumulation is float32 (float64 on the torch path when the image or
        the mask is float64). Extra memory: the output plus ``O(8 L H W)`` affinities and, on the compiled CPU path,
        a few rows per channel (the eager and Triton paths also hold one or two float32 mask-sized buffers). The
        compiled CPU path gives the output and its scratch their own memory mappings, hinted for transparent huge
        pages and returned to the system when freed (see :mod:`naclip_kernels._host_memory`;
        ``NACLIP_KERNELS_HUGE_PAGES=0`` drops the hint); that output cannot be resized in place, like the tensors
        of ``torch.from_numpy``.

    Raises:
        TypeError / ValueError: bad arguments, naming the argument and the expected shape or dtype.
        BackendUnavailableError: an explicit backend that cannot run here.

    PyTorch integration: the ``"torch"`` / ``"triton"`` backends run the registered op
    ``torch.ops.naclip_kernels.pamr`` (one node under ``torch.compile`` / ``torch.export``, with a fake kernel
    for symbolic shapes). Autograd: gradients w.r.t. ``mask`` and ``image`` from every backend. The Triton kernels
    and the in-place torch path are forward-only; the backward (``naclip_kernels::pamr_backward``) recomputes the
    forward with out-of-place torch ops (the same maths) and differentiates that, at the cost of one extra
    forward and ``~num_iter`` mask-sized saved tensors. ``"reference"`` is plain eager PyTorch with its own autograd.
    """
    num_iter, dilations = check_pamr_args(image, mask, num_iter, dilations)
    triton_reason = None
    if mask.dtype == torch.float64:
        triton_reason = "the Triton kernels take float32/float16/bfloat16 masks, not float64"
    elif len(dilations) > _MAX_DILATIONS:
        triton_reason = f"the Triton kernels take at most {_MAX_DILATIONS} dilations, got {len(dilations)}"
    chosen = resolve_backend(backend, mask.device, "pamr", auto_avoids_triton=triton_reason)
    if chosen == "triton" and triton_reason is not None:
        raise BackendUnavailableError(f"pamr: backend='triton' cannot run: {triton_reason}; use backend='torch'")
    if chosen == "reference":
        # Plain Python on purpose, like reference.neighbour_attention: the oracle the registered op is tested
        # against, made of aten ops that compile/export trace and autograd differentiates as they are.
        return reference.pamr(image, mask, num_iter, dilations)
    return _pamr_op(image, mask, num_iter, list(dilations), chosen)


# ==============================================================================================================
# torch.library registration: naclip_kernels::pamr (see naclip_kernels/_library.py)
# ==============================================================================================================
def _pamr_impl(image, mask, num_iter, dilations, backend):
    """The op's kernel for every device; ``backend`` is the resolved ``"triton"`` or ``"torch"``."""
    batch, _, height, width = image.shape
    if batch == 0 or mask.shape[1] == 0:
        return mask.new_empty(batch, mask.shape[1], height, width)
    dilations = tuple(dilations)
    if backend == "triton":
        out = _pamr_triton(image, mask, num_iter, dilations)
    else:
        out = _pamr_torch(image, mask, num_iter, dilations)
    return out.contiguous()  # what the fake kernel promises (a no-op for the buffers both paths allocate)


def _pamr_fake(image, mask, num_iter, dilations, backend):
    return mask.new_empty(image.shape[0], mask.shape[1], image.shape[2], image.shape[3])


def _pamr_differentiable(image, mask, num_iter, dilations, backend):
    """The backward's recompute: the same maths in out-of-place torch ops, differentiable in ``image`` and ``mask``.

    Affinities from :func:`naclip_kernels.reference.pamr_affinity` (its ``[B, K, 9 L, H, W]`` stack is small: ``K``
    image channels), then ``num_iter`` sweeps of ``8 L`` slices of one replicate-padded mask each. Autograd keeps
    one padded mask per sweep (``~num_iter x`` the mask), not the original's ``8 L``-fold neighbour stack.
    """
    compute = torch.float64 if torch.float64 in (image.dtype, mask.dtype) else torch.float32
    height, width = image.shape[-2:]
    affinity = reference.pamr_affinity(image.to(compute), tuple(dilations))
    m = mask.to(compute)
    if m.shape[-2:] != (height, width):
        m = F.interpolate(m, size=(height, width), mode="bilinear", align_corners=True)
    pad = max(dilations)
    for _ in range(num_iter):
        padded = F.pad(m, (pad, pad, pad, pad), mode="replicate")
        total = None
        for n, (dy, dx) in enumerate(_offsets(dilations)):
            term = affinity[:, n:n + 1] * padded[:, :, pad + dy:pad + dy + height, pad + dx:pad + dx + width]
            total = term if total is None else total + term  # out of place: autograd saves only views
        m = total
    return m.to(mask.dtype)


_pamr_op = define_op("pamr", "(Tensor image, Tensor mask, int num_iter, int[] dilations, str backend) -> Tensor",
                     _pamr_impl, _pamr_fake, _pamr_differentiable, tensor_args=(0, 1))


# ==============================================================================================================
# Ahead-of-time compile list
# ==============================================================================================================
_TRITON_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def aot_configs():
    """Every specialisation the launcher can pick: both kernels for each neighbour padding ``NPAD`` (8 to 128, i.e.
    1 to 16 dilations), the affinity kernel for each image dtype, and the propagation kernel for each (source,
    destination) dtype pair a sweep can see (mask dtype -> float32, float32 -> float32, float32 -> mask dtype,
    mask -> mask). There is no autotuning: :func:`_block_config` picks exactly one configuration per NPAD, so every
    entry is a default (``default=True``); NACLIP's ``(8, 16)`` is NPAD = 16 (tag ``max_dilations=2``).
    """
    from naclip_kernels._aot_spec import KernelConfig

    configs = []
    names = sorted(set(_TRITON_DTYPES.values()), key=["fp32", "fp16", "bf16"].index)
    pairs = [("fp32", "fp32")] + [pair for dt in names[1:] for pair in ((dt, "fp32"), ("fp32", dt), (dt, dt))]
    num_dil = 1
    while num_dil <= _MAX_DILATIONS:
        npad, block_p, num_warps = _block_config(num_dil, "affinity")
        constexprs = {"BLOCK_P": block_p, "NPAD": npad}
        for dt in names:
            sig = {"x_ptr": f"*{dt}", "dil_ptr": "*i32", "aff_ptr": "*fp32", "K": "i32", "H": "i32", "W": "i32",
                   "num_dil": "i32", "stride_xb": "i32", "stride_xk": "i32", "stride_xh": "i32", "stride_xw": "i32",
                   "BLOCK_P": "constexpr", "NPAD": "constexpr"}
            configs.append(KernelConfig(op="pamr", name=f"pamr_affinity_{dt}_npad{npad}",
                                        kernel=_pamr_affinity_fwd_kernel, signature=sig, constexprs=constexprs,
                                        num_warps=num_warps, num_stages=1, default=True,
                                        tags={"image_dtype": dt, "max_dilations": npad // 8}))
        npad, block_p, num_warps = _block_config(num_dil, "propagate")
        constexprs = {"BLOCK_P": block_p, "NPAD": npad}
        for src_dt, dst_dt in pairs:
            sig = {"src_ptr": f"*{src_dt}", "aff_ptr": "*fp32", "dil_ptr": "*i32", "dst_ptr": f"*{dst_dt}",
                   "C": "i32", "H": "i32", "W": "i32", "num_dil": "i32", "channels_per_program": "i32",
                   "stride_sb": "i32", "stride_sc": "i32", "stride_sh": "i32", "stride_sw": "i32",
                   "stride_db": "i32", "stride_dc": "i32", "BLOCK_P": "constexpr", "NPAD": "constexpr"}
            configs.append(KernelConfig(op="pamr", name=f"pamr_propagate_{src_dt}_to_{dst_dt}_npad{npad}",
                                        kernel=_pamr_propagate_fwd_kernel, signature=sig, constexprs=constexprs,
                                        num_warps=num_warps, num_stages=1, default=True,
                                        tags={"src_dtype": src_dt, "dst_dtype": dst_dt, "max_dilations": npad // 8}))
        num_dil = npad // 8 + 1
    return configs
