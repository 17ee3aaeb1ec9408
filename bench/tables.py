"""Markdown rendering of results: time and size formatting, the per-row table and the machine header line."""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence


def fmt_time(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    if seconds >= 10:
        return f"{seconds:.1f} s"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    ms = seconds * 1e3
    if ms >= 100:
        return f"{ms:.0f} ms"
    if ms >= 10:
        return f"{ms:.1f} ms"
    if ms >= 1:
        return f"{ms:.2f} ms"
    us = ms * 1e3
    return f"{us:.0f} us" if us >= 10 else f"{us:.2f} us"


def fmt_mb(mb: Optional[float]) -> str:
    if mb is None:
        return "-"
    if mb >= 1024:
        return f"{mb / 1024:.2f} GB"
    if mb >= 10:
        return f"{mb:.0f} MB"
    return f"{mb:.1f} MB"


def markdown_table(doc: Dict[str, Any], size_cols: Sequence[tuple], *, rate: str = "gflops") -> str:
    """One markdown table of every row: size columns, provider, median, p20-p80, first call, peak, speedup, rate."""
    is_cuda = doc["machine"].get("device", "cpu").startswith("cuda")
    headers = [h for h, _ in size_cols] + ["provider", "median", "p20-p80", "n", "first call", "peak mem",
                                          "speedup"]
    if rate == "gflops":
        headers.append("TFLOP/s (% of peak)" if is_cuda else "GFLOP/s (% of matmul)")
    elif rate == "gbps":
        headers.append("GB/s (% of peak)" if is_cuda else "GB/s (% of copy)")
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for r in doc["rows"]:
        cells = [str(fn(r)) for _, fn in size_cols] + [r.get("provider", "")]
        if r.get("status") == "ok":
            cells += [fmt_time(r["median_s"]), f"{fmt_time(r['p20_s'])} - {fmt_time(r['p80_s'])}", str(r["n"]),
                      fmt_time(r.get("first_call_s")), fmt_mb(r.get("peak_mb")),
                      "-" if r.get("speedup") is None else f"{r['speedup']:.2f}x"]
            if rate == "gflops":
                if r.get("gflops") is None:
                    cells.append("-")
                elif is_cuda:
                    pct = r.get("pct_of_compute_peak")
                    cells.append(f"{r['gflops'] / 1e3:.1f}" + ("" if pct is None else
                                 f" ({pct:.0f}%, floor {fmt_time(r.get('floor_compute_s'))})"))
                else:
                    pct = r.get("pct_of_matmul")
                    cells.append(f"{r['gflops']:.1f}" + ("" if pct is None else f" ({pct:.0f}%)"))
            elif rate == "gbps":
                pct = r.get("pct_of_bandwidth_peak") if is_cuda else r.get("pct_of_copy")
                floor = f", floor {fmt_time(r.get('floor_bytes_s'))}" if is_cuda and r.get("floor_bytes_s") else ""
                cells.append("-" if r.get("gbps") is None else
                             f"{r['gbps']:.1f}" + ("" if pct is None else f" ({pct:.0f}%{floor})"))
        else:
            extra = 1 if rate else 0
            reason = (r.get("reason") or "").replace("|", "/")
            cells += [f"{r.get('status')}: {reason[:120]}"] + [""] * (5 + extra)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def header_markdown(doc: Dict[str, Any]) -> str:
    m = doc["machine"]
    dev = m.get("gpu_name") if m.get("device", "cpu").startswith("cuda") else \
        f"{m.get('cpu_model')} ({m.get('cpu_affinity')} cores, {m.get('torch_threads')} torch threads)"
    commit = f"{m.get('git_commit')}{'-dirty' if m.get('git_dirty') else ''}"
    rates = doc.get("reference_rates", {})
    quick = " (QUICK smoke run, not a result)" if doc.get("quick") else ""
    parts = [f"{doc['benchmark']} on {dev}; torch {m.get('torch')}, triton {m.get('triton')}, "
             f"CUDA {m.get('cuda_runtime')}; commit {commit}; {m.get('timestamp_utc')}{quick}"]
    if rates.get("matmul"):
        parts.append(f"measured {rates['matmul']['dtype']} {rates['matmul']['n']}^3 matmul: "
                     f"{rates['matmul']['gflops']:.0f} GFLOP/s")
    if rates.get("copy"):
        parts.append(f"measured copy bandwidth: {rates['copy']['gbps']:.1f} GB/s")
    return "; ".join(parts)
