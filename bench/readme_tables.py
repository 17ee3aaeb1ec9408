"""Render the README's performance tables from the results JSON: ``python -m bench.readme_tables [options]``.

Reads ``bench/results/{attention,pamr,segment,proxy,proxy_segment}_{cpu,cuda}.json`` (``--quick`` for the ``*_quick.json`` smoke files,
``--dir`` for another directory) and prints compact pivot tables (one line per size, one column per provider:
median time, speedup over the eager reference of the same run, and peak memory), each with the machine line it
was measured on. Paste the output between the README's performance markers. Where no CUDA results exist it says
so and prints the H100 roofline estimate of ``bench.gpu_report`` instead, labelled as an estimate.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from bench import results_io, segment, tables

ATTENTION_PROVIDERS = [("eager", "eager (bias cached)"), ("eager_first", "eager, first call (bias built)"),
                       ("sdpa", "SDPA + bias mask"), ("flex", "FlexAttention (compiled)"),
                       ("flex_eager", "FlexAttention (eager)"), ("torch", "ours: torch"), ("triton", "ours: Triton")]
PAMR_PROVIDERS = [("reference", "reference (original)"), ("torch", "ours: torch"), ("triton", "ours: Triton")]
SEGMENT_PROVIDERS = [("reference", "reference (eager, 1 window at a time)"), ("fast", "all fast paths"),
                     ("fast_one_window", "all fast paths, 1 window at a time")]
PROXY_SEGMENT_PROVIDERS = [("reference", "reference (eager proxy attention, 1 window at a time)"),
                           ("fast", "all fast paths")]


def _cell_time(r: Optional[Dict[str, Any]]) -> str:
    if r is None:
        return "-"
    if r.get("status") != "ok":
        return {"skipped": "skipped", "unavailable": "n/a"}.get(r.get("status"), str(r.get("status")))
    txt = tables.fmt_time(r["median_s"])
    if r.get("speedup") is not None and r.get("provider") not in ("eager", "reference"):
        txt += f" ({r['speedup']:.1f}x)"
    return txt


def _cell_mem(r: Optional[Dict[str, Any]]) -> str:
    if r is None or r.get("status") != "ok":
        return "-"
    return tables.fmt_mb(r.get("peak_mb"))


def pivot(doc: Dict[str, Any], size_cols: Sequence[tuple], providers: Sequence[tuple],
          cell: Callable[[Optional[Dict[str, Any]]], str]) -> str:
    present = [(p, name) for p, name in providers if any(r.get("provider") == p for r in doc["rows"])]
    sizes: List[tuple] = []
    by_key: Dict[tuple, Dict[str, Dict[str, Any]]] = {}
    for r in doc["rows"]:
        key = tuple(fn(r) for _, fn in size_cols)
        if key not in by_key:
            sizes.append(key)
            by_key[key] = {}
        by_key[key][r.get("provider")] = r
    head = [h for h, _ in size_cols] + [name for _, name in present]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key in sizes:
        lines.append("| " + " | ".join([str(k) for k in key] + [cell(by_key[key].get(p)) for p, _ in present])
                     + " |")
    return "\n".join(lines)


def skipped_notes(doc: Dict[str, Any]) -> str:
    reasons = {}
    for r in doc["rows"]:
        if r.get("status") in ("skipped", "unavailable", "error", "timeout", "killed", "oom"):
            reasons.setdefault(f"{r.get('provider')}: {r.get('status')} ({r.get('reason')})", []).append(
                r.get("label", ""))
    if not reasons:
        return ""
    return "\n".join(f"- {k}: {', '.join(v)}" for k, v in reasons.items())


def render_proxy(doc: Dict[str, Any]) -> str:
    """Proxy attention: the acceptance view (speedup, memory share and time against the floor per row)."""
    from bench import proxy

    cfg = doc.get("config", {})
    out = [f"#### Proxy attention (ProxyCLIP; {cfg.get('heads', 12)} heads x {cfg.get('head_dim', 64)}, one weight "
           "matrix shared by all heads)", "", f"_{tables.header_markdown(doc)}_", ""]
    rate = doc.get("reference_rates", {}).get("matmul", {}).get("gflops")
    if rate:
        out += [f"Floor: 2 M^2 C + 2 M^2 H D flops at the {rate:.0f} GFLOP/s matmul rate measured in the same run. "
                "`original` is ProxyCLIP's eager maths (einsum, mask, repeat over heads, softmax, bmm): it is the "
                "row every speedup and memory share is taken against.", ""]
    out += [proxy.summary_markdown(doc), ""]
    originals = [r for r in doc["rows"] if r.get("provider") == "original" and r.get("status") == "ok"]
    if originals:
        out += ["| case | M | C | features | original: median | original: extra peak memory |", "|---|---|---|---|---|---|"]
        out += [f"| {r['case']} | {r['M']} | {r['channels']} | {r['features']} | {tables.fmt_time(r['median_s'])} | "
                f"{tables.fmt_mb(r.get('peak_mb'))} |" for r in originals]
        out.append("")
    return "\n".join(out)


def render(doc: Dict[str, Any], bench: str) -> str:
    if bench == "proxy":
        notes = skipped_notes(doc)
        return render_proxy(doc) + (f"\nRows not measured:\n\n{notes}\n" if notes else "")
    if bench == "attention":
        size_cols = [("case", lambda r: r["case"]), ("grid", lambda r: r["grid"]), ("N", lambda r: r["n_tokens"])]
        providers = ATTENTION_PROVIDERS
        title = "Neighbour-aware attention (kk, sigma=5, 12 heads, D=64)"
    elif bench == "pamr":
        size_cols = [("image", lambda r: r["image"]), ("queries", lambda r: r["classes"])]
        providers = PAMR_PROVIDERS
        title = "PAMR (10 iterations, dilations (8, 16))"
    elif bench == "proxy_segment":
        cfg = doc.get("config", {})
        size_cols = [("workload", lambda r: f"{r['workload']} {r['image']}"), ("queries", lambda r: r["queries"])]
        providers = PROXY_SEGMENT_PROVIDERS
        # The rows record the batch the segmenter chose (window_batch_size_used) when the config left it to it.
        used = sorted({r["window_batch_size_used"] for r in doc.get("rows", [])
                       if r.get("provider") == "fast" and r.get("window_batch_size_used") is not None})
        batch = "/".join(map(str, used)) if used else cfg.get("fast_window_batch_size")
        title = (f"Whole ProxyCLIP segmenter ({cfg.get('model', 'ViT-B-16')} + {cfg.get('vfm', 'dino_vitb8')}, "
                 f"random weights, no PAMR; fast: {batch} window(s) per pass)")
    else:
        size_cols = [("workload", lambda r: f"{r['workload']} {r['image']}"), ("queries", lambda r: r["queries"])]
        providers = SEGMENT_PROVIDERS
        title = f"Whole segmenter ({doc.get('config', {}).get('model', 'ViT-B-16')}, random weights, PAMR on)"
    dtypes = sorted({r.get("dtype") for r in doc["rows"]})
    out = [f"#### {title}", "", f"_{tables.header_markdown(doc)}_", ""]
    for dtype in dtypes:
        sub = dict(doc, rows=[r for r in doc["rows"] if r.get("dtype") == dtype])
        out += [f"{dtype}: median time per call (speedup over the eager reference, same run)", "",
                pivot(sub, size_cols, providers, _cell_time), "",
                f"{dtype}: peak memory over the inputs (see 'How memory is measured')", "",
                pivot(sub, size_cols, providers, _cell_mem), ""]
    if bench in ("segment", "proxy_segment"):
        lines = ["| workload | provider | images/s | first-run text encoding (not in the timings) |", "|---|---|---|---|"]
        for r in doc["rows"]:
            if r.get("status") == "ok":
                lines.append(f"| {r['workload']} {r['image']} | {r['provider']} | {r['images_per_s']:.3f} | "
                             f"{segment._text_cell(r)} |")
        out += lines + [""]
    if bench == "pamr":
        from bench import pamr

        floors = pamr.floors_markdown(doc)
        if floors:
            out += [floors, ""]
    notes = skipped_notes(doc)
    if notes:
        out += ["Rows not measured:", "", notes, ""]
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.readme_tables", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=results_io.RESULTS_DIR)
    parser.add_argument("--quick", action="store_true", help="render the *_quick.json smoke results")
    parser.add_argument("--benches", default="attention,pamr,segment,proxy,proxy_segment")
    args = parser.parse_args(argv)
    found_cuda = False
    for bench in args.benches.split(","):
        for device in ("cpu", "cuda"):
            path = results_io.results_path(bench, device, args.quick, args.dir)
            doc = results_io.load_results(path)
            if doc is None:
                if device == "cpu":
                    print(f"<!-- no {path.name} yet: run python -m bench {bench} -->\n")
                continue
            found_cuda |= device == "cuda"
            print(render(doc, bench))
    if not found_cuda:
        from bench import gpu_report

        doc = gpu_report.build(skip_aot=True)
        print("#### GPU\n\nNo GPU results have been measured yet: the GPU figures below are a roofline ESTIMATE "
              "(`python -m bench.gpu_report`), not measurements.\n")
        print(gpu_report.roofline_section_markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
