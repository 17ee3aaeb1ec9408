"""Whole-segmenter benchmark: ``python -m bench segment [--quick] [options]``.

Images per second and peak memory of :class:`naclip.Segmenter` (open_clip ViT-B/16 with **random weights**:
timing does not depend on the weights) on two workloads from NACLIP's benchmarks:

* ``voc``: a VOC-like 336x448 image, whole-image inference (no sliding window), the 56 queries of VOC21, PAMR on;
* ``cityscapes``: a Cityscapes-like 560x1120 image, 224/112 slide inference (36 windows), 19 queries, PAMR on.

===================  ========================================================================================
``fast``             ``backend="auto"`` (Triton on CUDA, our torch paths on CPU), the segmenter's per-device
                     ``window_batch_size`` (16 windows per pass on CUDA, ~800 tokens per pass on CPU: 4 CLIP
                     windows; ``--window-batch-size`` overrides; rows record ``window_batch_size_used``)
``fast_one_window``  the same with ``window_batch_size=1``: shows whether the per-device batch beats one window
                     per pass
``reference``        ``backend="reference"`` (eager attention + original PAMR) with ``window_batch_size=1``:
                     NACLIP's one-window-at-a-time loop
===================  ========================================================================================

Text embeddings (56 / 19 queries x 80 templates) are computed once per row before timing, with the disk cache off;
their first-run encoding time is reported separately (``text_encode_s``), as is model construction (``init_s``).
Timed calls therefore use cached text embeddings, as a deployed segmenter does. ``peak_mb`` is the extra peak over
the model, the text embeddings and the input image. ``stage_median_s`` holds the median of the segmenter's own
per-stage timings (preprocess, encode, pamr, postprocess).
"""
from __future__ import annotations

import argparse
import os
import tempfile
from typing import Any, Dict, List, Optional

from bench import cli_args, machine, memory, results_io, stats, sweep, tables, timing
from bench.isolation import Unavailable

TARGET = "bench.segment:run_one"
PROVIDERS = ["reference", "fast", "fast_one_window"]
WORKLOADS = {
    # name: (height, width, slide, short_side, preset for the class list, queries)
    "voc": (336, 448, None, 336, "voc21", 56),
    "cityscapes": (560, 1120, (224, 112), 560, "cityscapes", 19),
}
QUICK_WORKLOADS = {
    "voc": (64, 96, None, 64, "voc21", 6),
    "cityscapes": (64, 128, (32, 32), 64, "cityscapes", 3),
}
MODEL = "ViT-B-16"
QUICK_MODEL = "ViT-S-16"          # quick smoke runs only: smaller and faster to build
QUICK_TEMPLATES = ["a photo of a {}."]


def _class_lines(preset: str, queries: int) -> List[str]:
    """The preset's class lines when they have exactly ``queries`` query names, else synthetic names."""
    try:
        from naclip import presets

        lines = list(presets.get_preset(preset).classes)
        if presets.count_queries(lines) == queries:
            return lines
    except Exception:  # noqa: BLE001 - presets are a convenience only
        pass
    return [f"object {i}" for i in range(queries)]


def pamr_reference_memory(classes: int, height: int, width: int) -> float:
    from bench.pamr import reference_memory_estimate

    return reference_memory_estimate(classes, height, width)


def run_one(spec: Dict[str, Any]) -> Dict[str, Any]:
    import time
    import warnings

    import torch

    if spec["device"].startswith("cuda") and not torch.cuda.is_available():
        raise Unavailable("no CUDA device")
    try:
        from naclip import Segmenter
    except ImportError as exc:
        raise Unavailable(f"naclip.Segmenter is not available ({exc})")
    device = spec["device"]
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[spec["dtype"]]
    provider = spec["provider"]
    backend = "reference" if provider == "reference" else "auto"
    timing.warm_libraries(device)
    kwargs = dict(model=spec["model"], pretrained=None, classes=spec["class_lines"], device=device, dtype=dtype,
                  slide=None if spec["slide"] is None else tuple(spec["slide"]), short_side=spec["short_side"],
                  pamr=True, backend=backend, window_batch_size=spec["window_batch_size"], cache_dir=False)
    # Other whole-segmenter benchmarks reuse this row runner with their method's settings (bench/proxy_segment.py:
    # method="proxyclip", vfm=..., pamr=False).
    kwargs.update(spec.get("segmenter_kwargs") or {})
    if spec.get("templates"):
        kwargs["templates"] = spec["templates"]
    torch.manual_seed(0)                          # same random weights in every row: shared text embeddings stay valid
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # "RANDOM weights" warning: intended here
        try:
            seg = Segmenter(**kwargs)
        except ImportError as exc:
            raise Unavailable(f"the segmenter needs open_clip ({exc})")
    init_s = time.perf_counter() - t0
    cache_file = spec.get("text_cache_file")
    text_note = "encoded in this row"
    text_encode_s = None
    if cache_file and os.path.exists(cache_file):
        # Encoding 56 queries x 80 prompts takes minutes on a 2-core CPU: once per workload is enough (same seed,
        # same weights); later rows start from the cached embeddings, as a deployed segmenter does.
        cached = torch.load(cache_file, map_location=device)
        if hasattr(seg, "_query_embeddings") and cached.shape[0] == len(seg.queries):
            seg._query_embeddings = cached
            text_note = "reused from the first row of this workload"
    if text_note == "encoded in this row":
        timing.sync(device)
        t0 = time.perf_counter()
        text = seg.query_embeddings               # first-run text encoding (80 templates per query)
        timing.sync(device)
        text_encode_s = time.perf_counter() - t0
        if cache_file:
            torch.save(text.detach().cpu(), cache_file)
    text = seg.query_embeddings
    gen = torch.Generator().manual_seed(0)
    image = torch.rand(3, spec["height"], spec["width"], generator=gen)
    pm = memory.PeakMemory(device)
    pm.set_baseline()
    stages: Dict[str, List[float]] = {}

    def call():
        result = seg(image)
        for name, value in result.timings.items():
            stages.setdefault(name, []).append(value)
        return result

    out = timing.measure(call, device=device, warmup=spec["warmup"], repeats=spec["repeats"],
                         max_row_s=spec["max_row_s"], pm=pm)
    # Keep the stage timings of the timed calls only (the last n of them).
    n = out["n"]
    out["stage_median_s"] = {name: stats.percentile(values[-n:], 50) for name, values in stages.items()}
    out["images_per_s"] = 1.0 / out["median_s"]
    out["init_s"] = init_s
    out["text_encode_s"] = text_encode_s
    out["text_encode_note"] = text_note
    out["num_queries"] = int(text.shape[0])
    out["threads"] = torch.get_num_threads()
    out["window_batch_size_used"] = seg.window_batch_size
    return out


def build_parser(parser: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    parser = cli_args.bench_parser("segment", __doc__, parser)
    parser.add_argument("--workloads", default=None, help="comma-separated subset of: " + ", ".join(WORKLOADS))
    parser.add_argument("--model", default=None, help=f"open_clip model name (default {MODEL})")
    parser.add_argument("--window-batch-size", type=int, default=None,
                        help="windows per forward pass for 'fast' (default: the segmenter's per-device default, "
                             "16 on CUDA, about 800 tokens per pass on CPU)")
    return parser


def main(argv=None) -> Dict[str, Any]:
    return run(build_parser().parse_args(argv))


def run(args) -> Dict[str, Any]:
    cli_args.finalize_args(args, gpu_dtypes="float16", total_min=7.0)
    providers = args.provider_list or PROVIDERS
    phases = sweep.provider_phases(providers, PROVIDERS, baseline="reference", ours=("fast", "fast_one_window"))
    workloads = dict(QUICK_WORKLOADS if args.quick else WORKLOADS)
    if args.workloads:
        workloads = {k: v for k, v in workloads.items() if k in args.workloads.split(",")}
    model = args.model or (QUICK_MODEL if args.quick else MODEL)
    # None: the segmenter's own per-device default (what a user gets); each row records the value it used.
    config = {"model": model, "pretrained": None, "workloads": {k: list(map(str, v)) for k, v in workloads.items()},
              "providers": providers, "fast_window_batch_size": args.window_batch_size or "segmenter default",
              "reference_window_batch_size": 1, "pamr": {"num_iter": 10, "dilations": [8, 16]},
              "warmup": args.warmup, "repeats": args.repeats, "max_row_s": args.max_row_s,
              "max_call_s": args.max_call_s, "max_memory_gb": args.max_memory_gb, "dtypes": args.dtype_list}
    driver = sweep.Sweep("segment", args, ["provider", "workload", "dtype", "model"], config)
    driver.add_reference_rates({"matmul": machine.measure_matmul_rate(args.device, n=512 if args.quick else 2048)})
    text_dir = tempfile.mkdtemp(prefix="naclip_bench_text_")
    for phase in phases:
        for dtype in args.dtype_list:
            for name, (height, width, slide, short_side, preset, queries) in workloads.items():
                text_cache = os.path.join(text_dir, f"{name}_{dtype}.pt")
                lines = _class_lines(preset, queries)
                for provider in phase:
                    row = {"provider": provider, "workload": name, "image": f"{height}x{width}", "height": height,
                           "width": width, "slide": None if slide is None else list(slide), "short_side": short_side,
                           "queries": queries, "class_lines": lines, "model": model, "dtype": dtype,
                           "backend": "reference" if provider == "reference" else "auto",
                           "window_batch_size": args.window_batch_size if provider == "fast" else 1,
                           "templates": QUICK_TEMPLATES if args.quick else None,
                           "label": f"{name} {height}x{width} Q={queries}"}
                    mem = pamr_reference_memory(queries, height, width) if provider == "reference" else None
                    # Generous subprocess timeout: the first row of a workload also encodes 56 x 80 prompts.
                    driver.run(row, TARGET, series=f"{provider}|{name}|{dtype}", cost=1.0, memory_estimate=mem,
                              extra_spec={"text_cache_file": text_cache}, timeout_s=1800.0)
    rank = {p: i for i, p in enumerate(PROVIDERS)}
    order = {name: i for i, name in enumerate(workloads)}
    doc = driver.finish(["workload", "dtype", "model"], "reference",
                       sort_key=lambda r: (r.get("dtype", ""), order.get(r.get("workload"), 99),
                                           rank.get(r.get("provider"), 99)))
    import shutil

    shutil.rmtree(text_dir, ignore_errors=True)
    write_outputs(doc, driver.path, plot=not args.no_plot)
    return doc


SIZE_COLS = [("workload", lambda r: r["workload"]), ("image", lambda r: r["image"]),
             ("mode", lambda r: "whole" if r.get("slide") is None else f"slide {r['slide'][0]}/{r['slide'][1]}"),
             ("queries", lambda r: r["queries"]), ("dtype", lambda r: r["dtype"])]


def _text_cell(r) -> str:
    if r.get("text_encode_s") is not None:
        return tables.fmt_time(r["text_encode_s"])
    return "(reused, see the first row)" if r.get("text_encode_note", "").startswith("reused") else "-"


def markdown(doc) -> str:
    table = tables.markdown_table(doc, SIZE_COLS, rate=None)
    # Second table: throughput, stage split and the one-off costs.
    lines = ["| workload | provider | images/s | encode | pamr | first-run text encoding | model build |",
             "|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        if r.get("status") != "ok":
            continue
        st = r.get("stage_median_s", {})
        lines.append(f"| {r['workload']} | {r['provider']} | {r['images_per_s']:.3f} | "
                     f"{tables.fmt_time(st.get('encode'))} | {tables.fmt_time(st.get('pamr'))} | "
                     f"{_text_cell(r)} | {tables.fmt_time(r.get('init_s'))} |")
    return tables.header_markdown(doc) + "\n\n" + table + "\n\n" + "\n".join(lines)


def write_outputs(doc, path, plot: bool = True) -> None:
    results_io.write_outputs(doc, path, markdown(doc), plot_enabled=plot,
                         x=lambda r: r["height"] * r["width"],
                         xlabel="image pixels",
                         series=lambda r: f"{r['provider']} ({r['dtype']})",
                         variant=lambda r: r["dtype"],
                         title=f"NACLIP segmenter ({doc['config']['model']}, random weights), PAMR on",
                         ylabel_time="median time per image (s)")


if __name__ == "__main__":
    main()
