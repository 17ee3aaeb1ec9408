"""GPU report without a GPU: ``python -m bench.gpu_report [--skip-aot] [--defaults-only] [--gpu H100] [--json F]``.

1. **Ahead-of-time compile report** (measured, by compilation): every Triton kernel configuration compiled for
   sm_80 and sm_90 by :func:`naclip_kernels.aot.run_aot`: registers, spills (stack + local bytes) and shared memory
   per config, plus the occupancy those imply (CTAs per SM from registers, shared memory and warps).
2. **Roofline estimate** (NOT a measurement): for each size of the attention and PAMR sweeps, the time floor on an
   H100 SXM from its flop, byte and exponential counts and the datasheet peaks (989 dense fp16/bf16 tensor TFLOP/s,
   3.35 TB/s HBM3, ~3.9 TOP/s of special functions (exp2) as quoted in the FlashAttention-3 paper).
   ``floor = max(flops / tensor peak, bytes / HBM peak, exps / SFU peak)``. Real kernels reach a fraction of it.
   The eager reference's floor counts the ``N x N`` score traffic it materialises (scores written, scaled, biased,
   soft-maxed and read back: about 9 passes of ``4 B*H*N^2`` bytes), which is why it is memory-bound on a GPU.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from bench import machine, results_io, tables
from bench.attention import (BATCHED_GRIDS, GRIDS, HEAD_DIM, HEADS, attention_bytes, attention_flops, n_tokens)
from bench.pamr import DILATIONS, IMAGES, NUM_ITER, QUERIES, pamr_bytes, pamr_flops
from bench.proxy import CASES as PROXY_CASES
from bench.proxy import HEAD_DIM as PROXY_HEAD_DIM
from bench.proxy import HEADS as PROXY_HEADS
from bench.proxy import proxy_bytes, proxy_flops

# Per-SM limits used for the occupancy estimate (CUDA occupancy calculator figures).
SM_LIMITS = {
    "sm_80": {"regs": 65536, "smem": 167936, "warps": 64, "ctas": 32, "label": "A100"},
    "sm_90": {"regs": 65536, "smem": 233472, "warps": 64, "ctas": 32, "label": "H100"},
}
EAGER_SCORE_PASSES = 9   # QK^T write; scale read+write; +bias read+write; softmax read+write; PV read
# ProxyCLIP's original, bytes per M^2 entry: S written (4), read for the mean (4), subtract and scale (2 x 8), the
# mask compare and fill (~8), the cast to the values' dtype (4 + 2); then per head the repeated mask written (2),
# soft-maxed (2 + 2) and read by the bmm (2).
PROXY_ORIGINAL_BYTES_PER_ENTRY = 38.0
PROXY_ORIGINAL_BYTES_PER_HEAD_ENTRY = 8.0


# ==============================================================================================================
# AOT compile report
# ==============================================================================================================
def occupancy(row: Dict[str, Any]) -> Optional[Dict[str, int]]:
    """CTAs per SM allowed by registers (allocated per warp in units of 256), shared memory and warps."""
    limits = SM_LIMITS.get(row.get("target"))
    regs, warps = row.get("registers"), row.get("num_warps")
    if not limits or not regs or not warps:
        return None
    regs_per_warp = int(math.ceil(regs * 32 / 256.0) * 256)
    by_regs = limits["regs"] // (regs_per_warp * warps)
    shared = row.get("shared_bytes") or 0
    by_smem = limits["smem"] // shared if shared else limits["ctas"]
    by_warps = limits["warps"] // warps
    ctas = max(0, min(by_regs, by_smem, by_warps, limits["ctas"]))
    return {"ctas_per_sm": ctas, "by_regs": by_regs, "by_smem": by_smem, "by_warps": by_warps,
            "warps_per_sm": ctas * warps}


def aot_section(defaults_only: bool, jobs: Optional[int], ops: Optional[List[str]] = None,
                head_dims: Optional[List[int]] = None) -> Dict[str, Any]:
    """Run the AOT compile report through its public function; never raises (returns the reason instead)."""
    try:
        from naclip_kernels.aot import run_aot
    except ImportError as exc:
        return {"available": False, "reason": f"naclip_kernels.aot is not available ({exc})", "rows": []}
    try:
        rows = run_aot(ops=ops, defaults_only=defaults_only, head_dims=head_dims, targets=(80, 90), jobs=jobs)
    except Exception as exc:  # noqa: BLE001 - report, do not crash
        return {"available": False, "reason": f"{type(exc).__name__}: {exc}", "rows": []}
    for r in rows:
        r["occupancy"] = occupancy(r)
    return {"available": True, "reason": None, "rows": rows}


def aot_markdown(section: Dict[str, Any]) -> str:
    if not section["available"]:
        return f"AOT compile report unavailable: {section['reason']}"
    if not section["rows"]:
        return "AOT compile report: no Triton kernel configurations are registered yet (aot_configs() is empty)."
    lines = ["| op | kernel | config | default | target | warps | stages | registers | spill bytes | shared bytes "
             "| CTAs/SM (limit) | compiled |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in section["rows"]:
        occ = r.get("occupancy")
        if occ:
            limit = min(("regs", occ["by_regs"]), ("smem", occ["by_smem"]), ("warps", occ["by_warps"]),
                        key=lambda kv: kv[1])[0]
            occ_txt = f"{occ['ctas_per_sm']} ({limit})"
        else:
            occ_txt = "-"
        ok = "yes" if r.get("ok") else f"no: {str(r.get('error'))[:80]}"
        cells = [r.get("op"), r.get("kernel"), r.get("config"), "*" if r.get("default") else "", r.get("target"),
                 r.get("num_warps"), r.get("num_stages"), r.get("registers"), r.get("spill_bytes"),
                 r.get("shared_bytes"), occ_txt, ok]
        lines.append("| " + " | ".join("" if c is None else str(c).replace("|", "/") for c in cells) + " |")
    spilling = [r for r in section["rows"] if (r.get("spill_bytes") or 0) > 0]
    lines.append("")
    lines.append(f"{len(section['rows'])} (config, target) pairs compiled; "
                 f"{sum(1 for r in section['rows'] if r.get('ok'))} ok; {len(spilling)} with spills.")
    return "\n".join(lines)


# ==============================================================================================================
# Roofline estimate
# ==============================================================================================================
def _floors(flops: float, nbytes: float, exps: float, peaks: Dict[str, float], tensor: bool = True) -> Dict[str, Any]:
    compute_peak = (peaks["tensor_tflops"] if tensor else peaks["fp32_tflops"]) * 1e12
    t_compute = flops / compute_peak
    t_bytes = nbytes / (peaks["hbm_tbs"] * 1e12)
    t_sfu = exps / (peaks["sfu_tops"] * 1e12)
    floor = max(t_compute, t_bytes, t_sfu)
    bound = {t_compute: "tensor" if tensor else "fp32", t_bytes: "HBM", t_sfu: "exp (SFU)"}[floor]
    return {"compute_s": t_compute, "bytes_s": t_bytes, "sfu_s": t_sfu, "floor_s": floor, "bound": bound,
            "intensity": flops / nbytes if nbytes else None}


def attention_estimates(peaks: Dict[str, float], dtype_bytes: int = 2, exps_per_score: float = 1.0) -> List[Dict]:
    rows = []
    for case, batch, grids in (("B*H=12", 1, GRIDS), ("36 windows", 36, BATCHED_GRIDS)):
        for grid in grids:
            n = n_tokens(grid)
            flops = attention_flops(batch, HEADS, n, HEAD_DIM)
            nbytes = attention_bytes(batch, HEADS, n, HEAD_DIM, dtype_bytes)
            exps = exps_per_score * batch * HEADS * n * n
            ours = _floors(flops, nbytes, exps, peaks)
            eager_bytes = nbytes + EAGER_SCORE_PASSES * 4.0 * batch * HEADS * n * n + 4.0 * n * n
            eager = _floors(flops, eager_bytes, batch * HEADS * n * n, peaks)
            rows.append({"kernel": "neighbour_attention fwd (kk)", "case": case, "grid": f"{grid[0]}x{grid[1]}",
                         "n_tokens": n, "flops": flops, "bytes": nbytes, "exps": exps, **ours,
                         "eager_bytes": eager_bytes, "eager_floor_s": eager["floor_s"],
                         "eager_bound": eager["bound"], "eager_scores_gb": 4.0 * batch * HEADS * n * n / 1e9})
    return rows


def pamr_estimates(peaks: Dict[str, float]) -> List[Dict]:
    rows = []
    taps = 8 * len(DILATIONS)
    for height, width in IMAGES:
        for classes in QUERIES:
            flops = pamr_flops(classes, height, width)
            nbytes = pamr_bytes(classes, height, width, 4)
            exps = float(taps * height * width)          # affinity softmax, once
            ours = _floors(flops, nbytes, exps, peaks, tensor=False)
            # The original: per iteration the [C, 8L, H, W] stack is written by the conv, read+written by the
            # product with the affinity and read by the sum (about 4 passes), plus the mask itself.
            ref_bytes = nbytes + NUM_ITER * 4 * 4.0 * taps * classes * height * width
            ref = _floors(flops, ref_bytes, exps, peaks, tensor=False)
            rows.append({"kernel": "pamr (affinity + 10 propagations, fp32)", "image": f"{height}x{width}",
                         "classes": classes, "flops": flops, "bytes": nbytes, **ours,
                         "reference_bytes": ref_bytes, "reference_floor_s": ref["floor_s"]})
    return rows


def proxy_estimates(peaks: Dict[str, float], dtype_bytes: int = 2) -> List[Dict]:
    """Proxy attention (ProxyCLIP) at the ``bench proxy`` cases, CLIP's 12 heads x 64, one window, fp16.

    The default half-precision config covers H*D = 768 in one program, so the kernel's matmul flops are the floor
    ``2 M^2 (C + H*D)`` (no recomputed score tiles); one exp2 per score (masked entries too: SIMT lanes); HBM bytes
    are the compulsory ones (features, values, output: K/V tiles are re-read from L2, ~M (C + H*D) * 2 B per
    image, which fits it). Key tiles skipped as fully masked take the kernel below this floor on real features."""
    rows = []
    hd = PROXY_HEADS * PROXY_HEAD_DIM
    for case, h, w, channels in PROXY_CASES:
        m = h * w
        flops = proxy_flops(m, channels, hd)
        nbytes = proxy_bytes(m, channels, hd, dtype_bytes)
        ours = _floors(flops, nbytes, float(m * m), peaks)
        original_bytes = nbytes + (PROXY_ORIGINAL_BYTES_PER_ENTRY + PROXY_ORIGINAL_BYTES_PER_HEAD_ENTRY
                                   * PROXY_HEADS) * m * m
        original = _floors(flops, original_bytes, float(PROXY_HEADS * m * m), peaks)
        rows.append({"kernel": "proxy_attention fwd", "case": case, "grid": f"{h}x{w}", "n_tokens": m,
                     "channels": channels, "flops": flops, "bytes": nbytes, "exps": float(m * m), **ours,
                     "original_bytes": original_bytes, "original_floor_s": original["floor_s"],
                     "original_bound": original["bound"],
                     "original_mask_gb": PROXY_HEADS * m * m * dtype_bytes / 1e9})
    return rows


def proxy_roofline_markdown(rows: List[Dict]) -> str:
    f = tables.fmt_time
    out = ["Proxy attention (ProxyCLIP), 12 heads x 64, one window, fp16 (weights once for all heads; one exp2 per "
           "score; **ESTIMATE**):", "",
           "| case | grid | M | C | GFLOP | MB moved | flop/byte | tensor floor | HBM floor | exp floor | estimate "
           "(bound) | original's floor (its M^2 traffic) | original's repeated mask |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['case']} | {r['grid']} | {r['n_tokens']} | {r['channels']} | {r['flops'] / 1e9:.2f} | "
                   f"{r['bytes'] / 1e6:.1f} | {r['intensity']:.0f} | {f(r['compute_s'])} | {f(r['bytes_s'])} | "
                   f"{f(r['sfu_s'])} | {f(r['floor_s'])} ({r['bound']}) | {f(r['original_floor_s'])} "
                   f"({r['original_bound']}) | {r['original_mask_gb']:.2f} GB |")
    return "\n".join(out)


def roofline_markdown(att: List[Dict], pam: List[Dict], peaks: Dict[str, float]) -> str:
    f = tables.fmt_time
    out = [f"**ESTIMATE, not a measurement**: roofline floors on an {peaks['label']} from flop/byte/exp counts "
           f"({peaks['tensor_tflops']:g} TFLOP/s dense fp16 tensor, {peaks['fp32_tflops']:g} TFLOP/s fp32, "
           f"{peaks['hbm_tbs']:g} TB/s HBM, {peaks['sfu_tops']:g} TOP/s exp). Real kernels reach a fraction of the "
           "floor; no GPU was used to produce these figures.", "",
           "Attention, kk, 12 heads, D=64, fp16 (one exp2 per score: the kernel builds the Gaussian from per-row/"
           "per-column factors, not per score):", "",
           "| case | grid | N | GFLOP | MB moved | flop/byte | tensor floor | HBM floor | exp floor | estimate "
           "(bound) | eager floor (its N^2 traffic) | eager score tensor |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in att:
        out.append(f"| {r['case']} | {r['grid']} | {r['n_tokens']} | {r['flops'] / 1e9:.2f} | {r['bytes'] / 1e6:.1f} | "
                   f"{r['intensity']:.0f} | {f(r['compute_s'])} | {f(r['bytes_s'])} | {f(r['sfu_s'])} | "
                   f"{f(r['floor_s'])} ({r['bound']}) | {f(r['eager_floor_s'])} ({r['eager_bound']}) | "
                   f"{r['eager_scores_gb']:.2f} GB |")
    out += ["", "PAMR, 10 iterations, dilations (8, 16), float32 mask (propagation is fp32 FMA, not tensor-core):", "",
            "| image | queries | GFLOP | MB moved (floor) | HBM floor | fp32 floor | estimate (bound) | "
            "original's floor (its 16x stack traffic) |",
            "|---|---|---|---|---|---|---|---|"]
    for r in pam:
        out.append(f"| {r['image']} | {r['classes']} | {r['flops'] / 1e9:.2f} | {r['bytes'] / 1e6:.0f} | "
                   f"{f(r['bytes_s'])} | {f(r['compute_s'])} | {f(r['floor_s'])} ({r['bound']}) | "
                   f"{f(r['reference_floor_s'])} |")
    return "\n".join(out)


def build(gpu: str = "H100", skip_aot: bool = False, defaults_only: bool = False, jobs: Optional[int] = None,
          ops: Optional[List[str]] = None, head_dims: Optional[List[int]] = None) -> Dict[str, Any]:
    peaks = machine.GPU_PEAKS[gpu]
    doc: Dict[str, Any] = {"machine": machine.machine_info("cpu"), "gpu_assumed": peaks,
                           "roofline_is_estimate": True}
    doc["attention_estimates"] = attention_estimates(peaks)
    doc["pamr_estimates"] = pamr_estimates(peaks)
    doc["proxy_estimates"] = proxy_estimates(peaks)
    doc["aot"] = {"available": False, "reason": "skipped (--skip-aot)", "rows": []} if skip_aot else \
        aot_section(defaults_only, jobs, ops, head_dims)
    return doc


def roofline_section_markdown(doc: Dict[str, Any]) -> str:
    peaks = doc["gpu_assumed"]
    return (f"### Roofline estimate on {peaks['label']} (ESTIMATE)\n\n"
            + roofline_markdown(doc["attention_estimates"], doc["pamr_estimates"], peaks)
            + "\n\n" + proxy_roofline_markdown(doc["proxy_estimates"]))


def aot_section_markdown(doc: Dict[str, Any]) -> str:
    return ("### Ahead-of-time compile report (sm_80, sm_90; measured by compiling, no GPU needed)\n\n"
            + aot_markdown(doc["aot"]))


def markdown(doc: Dict[str, Any]) -> str:
    return aot_section_markdown(doc) + "\n\n" + roofline_section_markdown(doc)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", default="H100", choices=sorted(machine.GPU_PEAKS), help="GPU for the estimate")
    parser.add_argument("--skip-aot", action="store_true", help="only the roofline estimate (instant)")
    parser.add_argument("--defaults-only", action="store_true", help="compile only the default config per kernel")
    parser.add_argument("--ops", default=None, help="comma-separated ops for the AOT report (default: all)")
    parser.add_argument("--head-dims", default=None, help="comma-separated head dims for the AOT report")
    parser.add_argument("--jobs", type=int, default=None, help="parallel compile processes")
    parser.add_argument("--json", type=Path, default=None,
                        help="also write the report as JSON + .md (e.g. bench/results/gpu_report.json)")
    args = parser.parse_args(argv)
    peaks = machine.GPU_PEAKS[args.gpu]
    # The estimate is instant: print it first; the AOT compile of every config takes minutes on a small CPU.
    doc = build(args.gpu, skip_aot=True)
    print(roofline_section_markdown(doc), flush=True)
    if not args.skip_aot:
        print("\n(compiling every kernel configuration for sm_80 and sm_90: this takes minutes...)\n", flush=True)
        doc["aot"] = aot_section(args.defaults_only, args.jobs,
                                 None if args.ops is None else args.ops.split(","),
                                 None if args.head_dims is None else [int(x) for x in args.head_dims.split(",")])
        print(aot_section_markdown(doc), flush=True)
    if args.json:
        results_io.save_results(args.json, doc)
        args.json.with_suffix(".md").write_text(markdown(doc) + "\n")
        print(f"\nwrote {args.json} and {args.json.with_suffix('.md')}")
    del peaks
    return 0


if __name__ == "__main__":
    sys.exit(main())
