"""Neighbour-aware attention benchmark: ``python -m bench attention [--quick] [options]``.

Sweeps the patch grid (14x14 = one 224 window, 21x28 = a VOC image, 32x32 ... 128x128) for 12 heads (B*H = 12)
and a batched case (36 windows of 12 heads: a Cityscapes image under 224/112 slide inference), D = 64, NACLIP's
``kk`` similarity with sigma = 5 and one [CLS] token, and compares these providers:

=================  ===========================================================================================
``eager``          :func:`naclip_kernels.reference.neighbour_attention`: NACLIP's eager maths, ``[B,H,N,N]`` scores,
                   bias cached per grid (built once, before timing)
``eager_first``    the first call for a new grid as NACLIP's code does it: the bias built by convolving a Gaussian
                   window over one-hot maps (:func:`naclip_gaussian_bias`) + the eager attention; timed without a
                   same-size warm-up (every call rebuilds the bias); bounded by ``--max-first-call-s``
``sdpa``           ``F.scaled_dot_product_attention`` with the ``[N, N]`` bias materialised as a float ``attn_mask``
``flex``           ``torch.nn.attention.flex_attention`` under ``torch.compile`` with a ``score_mod`` computing the
                   Gaussian from token indices (compile time is in ``first_call_s``)
``flex_eager``     the same without ``torch.compile`` (opt-in: ``--providers ...,flex_eager``)
``torch``          our memory-lean torch path (``backend="torch"``)
``triton``         our Triton kernel (``backend="triton"``, CUDA only)
=================  ===========================================================================================
"""
from __future__ import annotations

import argparse
from typing import Any, Dict, List, Optional, Tuple

from bench import cli_args, machine, memory, results_io, sweep, tables, timing
from bench.isolation import Unavailable

TARGET = "bench.attention:run_one"
PROVIDERS = ["eager", "eager_first", "sdpa", "flex", "torch", "triton"]
OPTIONAL_PROVIDERS = ["flex_eager"]
GRIDS = [(14, 14), (21, 28), (32, 32), (48, 48), (64, 64), (96, 96), (128, 128)]
BATCHED_GRIDS = [(14, 14), (21, 28), (32, 32)]
QUICK_GRIDS = [(4, 4), (6, 8)]
QUICK_BATCHED_GRIDS = [(4, 4)]
HEADS, HEAD_DIM, SIGMA, PREFIX = 12, 64, 5.0, 1
EAGER_LIKE = {"eager", "eager_first", "flex_eager"}
NACLIP_CONV_MACS_PER_S = 4.5e9   # SPEC section 1: the 64x64 conv bias build took ~60 s on the 2-core machine


# ==============================================================================================================
# Cost models
# ==============================================================================================================
def n_tokens(grid) -> int:
    return PREFIX + grid[0] * grid[1]


def attention_flops(batch: int, heads: int, n: int, dim: int, similarity: str = "kk") -> float:
    """Matmul flops: 2 N^2 D for ``a b^T`` and 2 N^2 D for ``P v`` per head; csa has two such pairs."""
    pairs = 2 if similarity == "csa" else 1
    return pairs * 4.0 * n * n * dim * batch * heads


def attention_bytes(batch: int, heads: int, n: int, dim: int, elt: int, similarity: str = "kk") -> float:
    """Compulsory traffic: each distinct input read once, the output written once (no N x N tensor)."""
    inputs = {"kk": 2, "qq": 2, "qk": 3, "csa": 3}[similarity]
    return (inputs + 1) * batch * heads * n * dim * elt


def eager_memory_estimate(batch: int, heads: int, n: int, provider: str, grid) -> float:
    """Peak bytes of the eager-like providers: two live float32 ``[B,H,N,N]`` tensors (scores + softmax) + bias."""
    if provider == "sdpa":
        return 4.0 * n * n * 1.1          # the materialised mask; the CPU/GPU fused SDPA kernels take it as is
    if provider not in EAGER_LIKE:
        return 0.0
    scores = 4.0 * batch * heads * n * n
    est = 2 * scores + 4.0 * n * n
    if provider == "eager_first":
        hw = grid[0] * grid[1]
        est += 2 * 4.0 * hw * hw          # the one-hot stack and the conv output
    return est


def naclip_conv_macs(grid) -> float:
    h, w = grid
    return float(h * w) ** 2 * (2 * h - 1) * (2 * w - 1)


# ==============================================================================================================
# One row (runs in a fresh subprocess)
# ==============================================================================================================
def _dtype(name: str):
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
            "float64": torch.float64}[name]


def _flex_score_mod(grid, sigma, prefix):
    import torch

    h, w = grid
    inv = 1.0 / (2.0 * sigma * sigma)

    def score_mod(score, b, hh, q_idx, kv_idx):
        tq = q_idx - prefix
        tk = kv_idx - prefix
        di = (tq // w - tk // w).to(torch.float32)
        dj = (tq % w - tk % w).to(torch.float32)
        g = torch.exp(-(di * di + dj * dj) * inv)
        return score + torch.where((tq >= 0) & (tk >= 0), g, torch.zeros_like(g))

    return score_mod


def run_one(spec: Dict[str, Any]) -> Dict[str, Any]:
    """Build inputs, prepare the provider, measure. Returns the measurement fields of a row."""
    import torch
    import torch.nn.functional as F

    import naclip_kernels as nk
    from naclip_kernels import reference

    provider, device, dtype = spec["provider"], spec["device"], _dtype(spec["dtype"])
    grid = (int(spec["h"]), int(spec["w"]))
    batch, heads, dim = spec["batch"], spec["heads"], spec["dim"]
    sigma, prefix, similarity = spec["sigma"], spec["prefix"], spec["similarity"]
    n = prefix + grid[0] * grid[1]
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise Unavailable("no CUDA device")
    timing.warm_libraries(device)
    gen = torch.Generator(device="cpu").manual_seed(0)
    q = torch.randn(batch, heads, n, dim, generator=gen).to(device=device, dtype=dtype)
    k = torch.randn(batch, heads, n, dim, generator=gen).to(device=device, dtype=dtype)
    v = torch.randn(batch, heads, n, dim, generator=gen).to(device=device, dtype=dtype)
    if similarity == "kk":
        q_arg, a, b = None, k, k
    elif similarity == "qq":
        q_arg, a, b = q, q, q
    elif similarity == "qk":
        q_arg, a, b = q, q, k
    else:
        raise Unavailable(f"similarity {similarity!r}: only kk, qq, qk have a single-pair SDPA/Flex equivalent")
    scale = dim ** -0.5
    pm = memory.PeakMemory(device)
    pm.set_baseline()
    prepare = None
    warmup = spec["warmup"]

    if provider == "eager":
        def prepare():
            reference.clear_bias_cache()

        def call():
            return reference.neighbour_attention(q_arg, k, v, grid, sigma, prefix, similarity)
    elif provider == "eager_first":
        # Warm the code path on a tiny grid first (library init), never on this grid: every call rebuilds the bias.
        reference.attention_with_bias(None, k[:1, :1, :5], v[:1, :1, :5],
                                      reference.naclip_gaussian_bias((2, 2), sigma, prefix, device=device))
        warmup = 0

        def call():
            reference.clear_bias_cache()
            bias = reference.naclip_gaussian_bias(grid, sigma, prefix, device=device, dtype=torch.float32)
            return reference.attention_with_bias(q_arg, k, v, bias, similarity, scale)
    elif provider == "sdpa":
        state = {}

        def prepare():
            state["mask"] = reference.gaussian_bias(grid, sigma, prefix, device=device, dtype=dtype)

        def call():
            return F.scaled_dot_product_attention(a, b, v, attn_mask=state["mask"], scale=scale)
    elif provider in ("flex", "flex_eager"):
        try:
            from torch.nn.attention.flex_attention import flex_attention
        except ImportError as exc:
            raise Unavailable(f"torch {torch.__version__} has no flex_attention ({exc})")
        score_mod = _flex_score_mod(grid, sigma, prefix)
        if provider == "flex":
            fn = torch.compile(flex_attention, dynamic=False)
        else:
            import warnings

            warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
            fn = flex_attention

        def call():
            return fn(a, b, v, score_mod=score_mod, scale=scale)
    elif provider == "torch":
        def call():
            return nk.neighbour_attention(q_arg, k, v, grid, sigma, prefix, similarity, backend="torch")
    elif provider == "triton":
        if not device.startswith("cuda"):
            raise Unavailable("the Triton kernel is timed on CUDA only (the CPU interpreter is for correctness)")

        def call():
            return nk.neighbour_attention(q_arg, k, v, grid, sigma, prefix, similarity, backend="triton")
    else:
        raise ValueError(f"unknown provider {provider!r}")

    return timing.measure_provider(call, spec, device=device, warmup=warmup, pm=pm, prepare=prepare)


# ==============================================================================================================
# Sweep
# ==============================================================================================================
def cases(quick: bool) -> List[Tuple[str, int, List[Tuple[int, int]]]]:
    """(case name, batch, grids): B*H = 12 (one image) and 36 windows x 12 heads."""
    if quick:
        return [("B*H=12", 1, QUICK_GRIDS), ("36 windows", 36, QUICK_BATCHED_GRIDS)]
    return [("B*H=12", 1, GRIDS), ("36 windows", 36, BATCHED_GRIDS)]


CASE_ORDER = {"B*H=12": 0, "36 windows": 1}


def build_parser(parser: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    parser = cli_args.bench_parser("attention", __doc__, parser)
    parser.add_argument("--similarity", default="kk", choices=["kk", "qk", "qq"])
    parser.add_argument("--grids", default=None, help="override the grids of the B*H=12 case, e.g. 14x14,64x64")
    parser.add_argument("--max-first-call-s", type=float, default=None,
                        help="cap on the predicted duration of one eager_first call (default 90; quick 20)")
    return parser


def _parse_grids(text: str):
    return [tuple(int(x) for x in item.lower().split("x")) for item in text.split(",") if item.strip()]


def main(argv=None) -> Dict[str, Any]:
    args = build_parser().parse_args(argv)
    return run(args)


def run(args) -> Dict[str, Any]:
    cli_args.finalize_args(args, total_min=11.0)
    if args.max_first_call_s is None:
        args.max_first_call_s = 20.0 if args.quick else 90.0
    providers = args.provider_list or PROVIDERS
    phases = sweep.provider_phases(providers, PROVIDERS + OPTIONAL_PROVIDERS, baseline="eager")
    case_list = cases(args.quick)
    if args.grids:
        case_list = [(case_list[0][0], 1, _parse_grids(args.grids))] + case_list[1:]
    config = {"heads": HEADS, "dim": HEAD_DIM, "sigma": SIGMA, "prefix": PREFIX, "similarity": args.similarity,
              "providers": providers, "cases": [[c, b, [list(g) for g in gs]] for c, b, gs in case_list],
              "warmup": args.warmup, "repeats": args.repeats, "max_row_s": args.max_row_s,
              "max_call_s": args.max_call_s, "max_first_call_s": args.max_first_call_s,
              "max_memory_gb": args.max_memory_gb, "dtypes": args.dtype_list}
    driver = sweep.Sweep("attention", args, ["provider", "case", "grid", "dtype", "similarity"], config)
    driver.add_reference_rates({"matmul": machine.measure_matmul_rate(args.device, n=512 if args.quick else 2048)})
    # The batched case is cheap: run it first, so that the time budget can only cut the largest B*H=12 grids.
    for phase in phases:
        for dtype in args.dtype_list:
            for case, batch, grids in sorted(case_list, key=lambda c: -CASE_ORDER.get(c[0], 0)):
                for grid in grids:
                    n = n_tokens(grid)
                    for provider in phase:
                        row = {"provider": provider, "case": case, "grid": f"{grid[0]}x{grid[1]}", "h": grid[0],
                               "w": grid[1], "batch": batch, "heads": HEADS, "dim": HEAD_DIM, "n_tokens": n,
                               "dtype": dtype, "similarity": args.similarity, "sigma": SIGMA, "prefix": PREFIX,
                               "shape_qkv": [batch, HEADS, n, HEAD_DIM],
                               "flops": attention_flops(batch, HEADS, n, HEAD_DIM, args.similarity),
                               "bytes": attention_bytes(batch, HEADS, n, HEAD_DIM, sweep.ELEMENT_BYTES[dtype],
                                                        args.similarity),
                               "label": f"{case} {grid[0]}x{grid[1]} {dtype}"}
                        series = f"{provider}|{case}|{dtype}"
                        mem = eager_memory_estimate(batch, HEADS, n, provider, grid) or None
                        if provider == "eager_first":
                            est = naclip_conv_macs(grid) / NACLIP_CONV_MACS_PER_S
                            saved, args.max_call_s = args.max_call_s, args.max_first_call_s
                            try:
                                driver.run(row, TARGET, series=series, cost=naclip_conv_macs(grid) + batch * n * n,
                                          memory_estimate=mem, call_estimate_s=est)
                            finally:
                                args.max_call_s = saved
                        else:
                            driver.run(row, TARGET, series=series, cost=float(batch) * n * n, memory_estimate=mem)
    provider_rank = {p: i for i, p in enumerate(PROVIDERS + OPTIONAL_PROVIDERS)}
    doc = driver.finish(["case", "grid", "dtype", "similarity"], "eager",
                       sort_key=lambda r: (r.get("dtype", ""), CASE_ORDER.get(r.get("case"), 9), r.get("n_tokens", 0),
                                           provider_rank.get(r.get("provider"), 99)))
    write_outputs(doc, driver.path, plot=not args.no_plot)
    return doc


SIZE_COLS = [("case", lambda r: r["case"]), ("grid", lambda r: r["grid"]), ("N", lambda r: r["n_tokens"]),
             ("dtype", lambda r: r["dtype"])]


def markdown(doc) -> str:
    return tables.header_markdown(doc) + "\n\n" + tables.markdown_table(doc, SIZE_COLS, rate="gflops")


def write_outputs(doc, path, plot: bool = True) -> None:
    results_io.write_outputs(doc, path, markdown(doc), plot_enabled=plot,
                         x=lambda r: r["n_tokens"],
                         xlabel="tokens N (= 1 + h*w)",
                         series=lambda r: f"{r['provider']} ({r['case']}, {r['dtype']})",
                         variant=lambda r: f"{r['case']}, {r['dtype']}",
                         title="neighbour-aware attention (kk, sigma=5, 12 heads, D=64)")


if __name__ == "__main__":
    main()
