"""ProxyCLIP proxy-attention benchmark: ``python -m bench proxy [--quick] [options]``.

Attention part (this module): ``softmax(gamma (xh xh^T - beta mu), masked) v`` for CLIP's 12 heads x 64 on the
VFM grids ProxyCLIP uses, one window (B = 1, the original's sliding inference):

=================  ==========================  ====================================================
case               VFM grid, features          meaning
=================  ==========================  ====================================================
``dino_b16_224``   14 x 14, C = 768            a small size (DINO ViT-B/16 on a 224 window)
``dino_b8_336``    42 x 42, C = 768            DINO ViT-B/8 at ProxyCLIP's 336 window (the default)
``sam_b_1024``     64 x 64, C = 256            SAM ViT-B at 1024 x 1024 (M = 4096)
=================  ==========================  ====================================================

each with two feature maps: ``random`` (i.i.d. Gaussian: about half of every row masked, no structure) and
``regions`` (piecewise-constant regions on the grid plus noise, like a VFM's: whole key tiles masked, which the
Triton kernel skips). Providers:

=============  ==================================================================================================
``original``   :func:`naclip_kernels.reference.proxyclip_original_attention`: ProxyCLIP's eager maths (einsum,
               mask, repeat over heads, softmax over ``[H, M, M]``, bmm)
``reference``  :func:`naclip_kernels.reference.proxy_attention` (opt-in: ``--providers ...,reference``)
``torch``      our blocked torch path (``backend="torch"``)
``triton``     our Triton kernel (``backend="triton"``, CUDA only)
=============  ==================================================================================================

The floor column is the matrix-product floor ``2 M^2 C + 2 M^2 H D`` flops at the matmul rate measured in the same
run (``x floor`` = median / floor). The whole-segmenter half of ``bench proxy`` (images/s and peak memory vs an
eager one-window loop) is :func:`segmenter_part`, which runs ``bench.proxy_segment`` when that module exists.
"""
from __future__ import annotations

import argparse
from typing import Any, Dict, List, Optional

from bench import cli_args, machine, memory, results_io, sweep, tables, timing
from bench.isolation import Unavailable

TARGET = "bench.proxy:run_one"
PROVIDERS = ["original", "torch", "triton"]
OPTIONAL_PROVIDERS = ["reference"]
# (case, grid h, grid w, VFM channels)
CASES = [("dino_b16_224", 14, 14, 768), ("dino_b8_336", 42, 42, 768), ("sam_b_1024", 64, 64, 256)]
QUICK_CASES = [("quick_4x4", 4, 4, 32), ("quick_8x8", 8, 8, 64)]
FEATURES = ["random", "regions"]
HEADS, HEAD_DIM, BETA, GAMMA = 12, 64, 1.2, 3.0
QUICK_HEADS, QUICK_HEAD_DIM = 2, 16
REGION_GRID, REGION_NOISE = 3, 0.3


def proxy_flops(n_tokens: int, channels: int, hd: int) -> float:
    """The matrix-product floor: ``2 M^2 C`` for ``S`` plus ``2 M^2 (H*D)`` for ``P V`` (the weights once)."""
    return 2.0 * n_tokens * n_tokens * (channels + hd)


def proxy_bytes(n_tokens: int, channels: int, hd: int, elt: int) -> float:
    """Compulsory traffic with no ``M x M`` tensor: features and values read once, the output written once."""
    return float(n_tokens * (channels + 2 * hd) * elt)


def original_memory_estimate(n_tokens: int, heads: int, elt: int) -> float:
    """The original's peak: ``S`` and its masked copy ``[M, M]`` float32, the repeated ``[H, M, M]`` mask and its
    softmax in the values' dtype (SPEC.md section 7: 2 x 400 MB in float16 at 64 x 64)."""
    return 1.1 * (3 * 4.0 * n_tokens * n_tokens + 2.0 * heads * n_tokens * n_tokens * elt)


def region_feature_map(h: int, w: int, channels: int, generator, regions: int = REGION_GRID,
                       noise: float = REGION_NOISE):
    """``[1, h*w, C]`` features constant on a ``regions x regions`` layout of rectangles of the grid, plus noise."""
    import torch

    centres = torch.randn(regions * regions, channels, generator=generator)
    rows = (torch.arange(h) * regions) // h
    cols = (torch.arange(w) * regions) // w
    label = (rows[:, None] * regions + cols[None, :]).flatten()
    return (centres[label] + noise * torch.randn(h * w, channels, generator=generator))[None]


# ==============================================================================================================
# One row (runs in a fresh subprocess)
# ==============================================================================================================
def run_one(spec: Dict[str, Any]) -> Dict[str, Any]:
    import torch

    import naclip_kernels as nk
    from naclip_kernels import reference

    provider, device = spec["provider"], spec["device"]
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
             "float64": torch.float64}[spec["dtype"]]
    h, w, channels, heads, dim = spec["h"], spec["w"], spec["channels"], spec["heads"], spec["dim"]
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise Unavailable("no CUDA device")
    if provider == "triton" and not device.startswith("cuda"):
        raise Unavailable("the Triton kernel is timed on CUDA only (the CPU interpreter is for correctness)")
    timing.warm_libraries(device)
    gen = torch.Generator().manual_seed(0)
    if spec["features"] == "regions":
        feats = region_feature_map(h, w, channels, gen)
    else:
        feats = torch.randn(1, h * w, channels, generator=gen)
    feats = feats.to(device=device, dtype=dtype)
    # CLIP's values as a ViT produces them: [B, M, H, D] storage viewed as [B, H, M, D].
    v = torch.randn(1, h * w, heads, dim, generator=gen).to(device=device, dtype=dtype).transpose(1, 2)
    if provider in ("torch", "triton"):
        # The first call of a torch.library op imports its dispatch machinery (~80 MB RSS, once per process): a
        # tiny call before the baseline keeps that out of the op's peak memory, as warm_libraries does for BLAS.
        nk.proxy_attention(feats[:, :4, :8], v[:, :2, :4, :8], beta=BETA, gamma=GAMMA, backend=provider)
    pm = memory.PeakMemory(device)
    pm.set_baseline()
    if provider == "original":
        def call():
            return reference.proxyclip_original_attention(feats, v, BETA, GAMMA)
    elif provider == "reference":
        def call():
            return reference.proxy_attention(feats, v, BETA, GAMMA)
    elif provider in ("torch", "triton"):
        def call():
            return nk.proxy_attention(feats, v, beta=BETA, gamma=GAMMA, backend=provider)
    else:
        raise ValueError(f"unknown provider {provider!r}")
    return timing.measure_provider(call, spec, device=device, warmup=spec["warmup"], pm=pm)


# ==============================================================================================================
# Sweep
# ==============================================================================================================
def build_parser(parser: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    parser = cli_args.bench_parser("proxy", __doc__, parser)
    parser.add_argument("--cases", default=None, help="comma-separated subset of the cases, e.g. dino_b8_336")
    parser.add_argument("--features", default=None, help="comma-separated subset of random,regions")
    parser.add_argument("--no-segmenter", action="store_true", help="only the attention part")
    parser.add_argument("--segmenter-only", action="store_true", help="only the whole-segmenter part")
    return parser


def main(argv=None) -> Dict[str, Any]:
    args = build_parser().parse_args(argv)
    if args.segmenter_only and args.no_segmenter:
        raise SystemExit("--segmenter-only and --no-segmenter exclude each other")
    if args.segmenter_only:
        finalize(args)
        return {"segmenter": segmenter_part(args)}
    doc = run(args)
    if not args.no_segmenter:
        segmenter_part(args)
    return doc


def finalize(args) -> None:
    cli_args.finalize_args(args, gpu_dtypes="float16,bfloat16", total_min=15.0)


def run(args) -> Dict[str, Any]:
    finalize(args)
    providers = args.provider_list or PROVIDERS
    phases = sweep.provider_phases(providers, PROVIDERS + OPTIONAL_PROVIDERS, baseline="original")
    cases = QUICK_CASES if args.quick else CASES
    if args.cases:
        wanted = {c.strip() for c in args.cases.split(",") if c.strip()}
        cases = [c for c in CASES + QUICK_CASES if c[0] in wanted]
    features = [f.strip() for f in args.features.split(",")] if args.features else FEATURES
    heads, dim = (QUICK_HEADS, QUICK_HEAD_DIM) if args.quick else (HEADS, HEAD_DIM)
    config = {"cases": [list(c) for c in cases], "features": features, "heads": heads, "head_dim": dim,
              "beta": BETA, "gamma": GAMMA, "batch": 1, "providers": providers,
              "regions": f"{REGION_GRID}x{REGION_GRID} rectangles + {REGION_NOISE} noise",
              "v_layout": "[B, M, H, D] storage viewed as [B, H, M, D]", "warmup": args.warmup,
              "repeats": args.repeats, "max_row_s": args.max_row_s, "max_call_s": args.max_call_s,
              "max_memory_gb": args.max_memory_gb, "dtypes": args.dtype_list}
    driver = sweep.Sweep("proxy", args, ["provider", "case", "features", "dtype"], config)
    driver.add_reference_rates({"matmul": machine.measure_matmul_rate(args.device, n=512 if args.quick else 2048),
                               "copy": machine.measure_copy_rate(args.device, mbytes=32 if args.quick else 256)})
    hd = heads * dim
    for phase in phases:
        for dtype in args.dtype_list:
            elt = sweep.ELEMENT_BYTES[dtype]
            for case, h, w, channels in cases:
                n_tokens = h * w
                for feat in features:
                    for provider in phase:
                        row = {"provider": provider, "case": case, "features": feat, "h": h, "w": w, "M": n_tokens,
                               "channels": channels, "heads": heads, "dim": dim, "dtype": dtype,
                               "flops": proxy_flops(n_tokens, channels, hd),
                               "bytes": proxy_bytes(n_tokens, channels, hd, elt),
                               "label": f"{case} {h}x{w} C={channels} {feat} {dtype}"}
                        mem = original_memory_estimate(n_tokens, heads, elt) if provider == "original" else None
                        driver.run(row, TARGET, series=f"{provider}|{feat}|{dtype}",
                                   cost=float(n_tokens) ** 2 * (channels + hd), memory_estimate=mem)
    rank = {p: i for i, p in enumerate(PROVIDERS + OPTIONAL_PROVIDERS)}
    doc = driver.finish(["case", "features", "dtype"], "original",
                        sort_key=lambda r: (r.get("dtype", ""), r.get("M", 0), r.get("features", ""),
                                            rank.get(r.get("provider"), 99)))
    add_floor(doc)
    results_io.save_results(driver.path, doc)
    write_outputs(doc, driver.path, plot=not args.no_plot)
    return doc


def add_floor(doc: Dict[str, Any]) -> None:
    """``floor_matmul_s`` (the row's flops at this run's measured matmul rate), ``x_floor`` and the extra peak
    memory relative to the original's row of the same case (``mem_vs_original``)."""
    rate = doc.get("reference_rates", {}).get("matmul", {}).get("gflops")
    original = {(r["case"], r["features"], r["dtype"]): r for r in doc["rows"]
                if r.get("provider") == "original" and r.get("status") == "ok"}
    for r in doc["rows"]:
        if r.get("status") != "ok":
            continue
        if rate and r.get("flops"):
            r["floor_matmul_s"] = r["flops"] / (rate * 1e9)
            r["x_floor"] = r["median_s"] / r["floor_matmul_s"]
        base = original.get((r.get("case"), r.get("features"), r.get("dtype")))
        if base and base.get("peak_mb") and r.get("peak_mb") is not None:  # a 0 MB baseline has no ratio
            r["mem_vs_original"] = r["peak_mb"] / base["peak_mb"]


def _x(value, fmt="{:.2f}x") -> str:
    return "-" if value is None else fmt.format(value)


def summary_markdown(doc: Dict[str, Any]) -> str:
    """The targets at a glance: speedup over the original, extra peak memory against it, and time vs the floor."""
    lines = ["| case | M | C | features | dtype | provider | median | x floor | speedup vs original | "
             "extra peak mem (vs original) |", "|" + "---|" * 10]
    for r in doc["rows"]:
        if r.get("status") != "ok" or r.get("provider") == "original":
            continue
        mem = tables.fmt_mb(r.get("peak_mb"))
        if r.get("mem_vs_original") is not None:
            mem += f" ({100 * r['mem_vs_original']:.1f}%)"
        lines.append(f"| {r['case']} | {r['M']} | {r['channels']} | {r['features']} | {r['dtype']} | "
                     f"{r['provider']} | {tables.fmt_time(r['median_s'])} | {_x(r.get('x_floor'))} | "
                     f"{_x(r.get('speedup'))} | {mem} |")
    return "\n".join(lines)


SIZE_COLS = [("case", lambda r: r["case"]), ("M", lambda r: r["M"]), ("C", lambda r: r["channels"]),
             ("features", lambda r: r["features"]), ("dtype", lambda r: r["dtype"])]


def markdown(doc) -> str:
    rate = doc.get("reference_rates", {}).get("matmul", {})
    floor = (f"Floor: 2 M^2 C + 2 M^2 H D flops at the measured {rate.get('gflops', 0):.0f} GFLOP/s matmul rate."
             if rate else "")
    return "\n\n".join([tables.header_markdown(doc), floor, summary_markdown(doc),
                        tables.markdown_table(doc, SIZE_COLS, rate="gflops")])


def write_outputs(doc, path, plot: bool = True) -> None:
    results_io.write_outputs(doc, path, markdown(doc), plot_enabled=plot, x=lambda r: r["M"],
                             xlabel="tokens M (VFM grid h*w)",
                             series=lambda r: f"{r['provider']} ({r['features']}, {r['dtype']})",
                             variant=lambda r: r["features"],
                             title=f"Proxy attention ({doc['config']['heads']} heads x {doc['config']['head_dim']})")


# ==============================================================================================================
# Whole segmenter (the segmenter work's half of `bench proxy`)
# ==============================================================================================================
def segmenter_part(args) -> Optional[List[Dict[str, Any]]]:
    """Hook for the whole-segmenter benchmark (ProxyCLIP images/s and peak memory vs an eager one-window loop).

    It lives in ``bench/proxy_segment.py`` (``main(args)``), written with the segmenter; until that module exists
    ``bench proxy`` runs the attention part only and says so.
    """
    try:
        from bench import proxy_segment
    except ImportError:
        print("[proxy] whole-segmenter part: bench/proxy_segment.py not present; attention part only", flush=True)
        return None
    return proxy_segment.main(args)


if __name__ == "__main__":
    main()
