"""PAMR benchmark: ``python -m bench pamr [--quick] [options]``.

Images 336x448 (VOC, short side 336), 512x683 and 1024x2048 (Cityscapes at full size), 21 / 56 / 150 / 171 queries
(VOC21, VOC21 with synonyms, ADE20K, COCO-Stuff), NACLIP's settings: 10 iterations, dilations (8, 16). The mask is
the low-resolution patch logits ``[1, C, H/16, W/16]`` that NACLIP upsamples, so the bilinear resize is included.
Each row makes one tiny torch-path call before its memory baseline (the registered op's one-off initialisation is
not counted as the provider's memory; see :func:`run_one`).

=============  ==============================================================================================
``reference``  :func:`naclip_kernels.reference.pamr`: the original algorithm, ``[B, C, 16, H, W]`` per iteration
``torch``      our torch path (``backend="torch"``)
``triton``     our Triton kernels (``backend="triton"``, CUDA only)
=============  ==============================================================================================
"""
from __future__ import annotations

import argparse
from typing import Any, Dict, Optional

from bench import cli_args, machine, memory, results_io, sweep, tables, timing
from bench.isolation import Unavailable

TARGET = "bench.pamr:run_one"
PROVIDERS = ["reference", "torch", "triton"]
IMAGES = [(336, 448), (512, 683), (1024, 2048)]
QUERIES = [21, 56, 150, 171]
QUICK_IMAGES = [(48, 64), (96, 128)]
QUICK_QUERIES = [3, 8]
NUM_ITER, DILATIONS, CHANNELS, PATCH = 10, (8, 16), 3, 16


def pamr_flops(classes: int, height: int, width: int, num_iter: int = NUM_ITER, dilations=DILATIONS) -> float:
    """Propagation multiply-adds (2 flops each): ``num_iter * 8L * C * H * W``; the affinity pass is not counted."""
    return 2.0 * num_iter * 8 * len(dilations) * classes * height * width


def pamr_bytes(classes: int, height: int, width: int, elt: int = 4, num_iter: int = NUM_ITER,
               dilations=DILATIONS) -> float:
    """Compulsory traffic of an unfused-iteration implementation: image read + affinities written once, then per
    iteration the mask and the ``8L`` affinities read and the mask written (neighbour re-reads assumed cached)."""
    hw = height * width
    taps = 8 * len(dilations)
    return float(CHANNELS * hw * elt + taps * hw * 4 + classes * hw * elt
                 + num_iter * (2 * classes * hw * elt + taps * hw * 4))


def reference_memory_estimate(classes: int, height: int, width: int, dilations=DILATIONS) -> float:
    """The original's neighbour stack ``[C, 8L, H, W]`` float32, ~3.7 of them live at the peak (SPEC: 6 GB at 171
    queries, 336x448)."""
    return 3.7 * 4.0 * 8 * len(dilations) * classes * height * width


def run_one(spec: Dict[str, Any]) -> Dict[str, Any]:
    import torch

    import naclip_kernels as nk

    provider, device = spec["provider"], spec["device"]
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
             "float64": torch.float64}[spec["dtype"]]
    height, width, classes = spec["height"], spec["width"], spec["classes"]
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise Unavailable("no CUDA device")
    timing.warm_libraries(device)
    # This row's floors (see add_floors), probed in its own process right before it: the dev VM's throughput drifts
    # by tens of per cent within a run, and a floor probed minutes earlier would move the ratio with it.
    row_rates = None
    if provider != "reference" and not device.startswith("cuda") and spec.get("probe_matmul_n"):
        row_rates = {"matmul": machine.measure_matmul_rate(device, n=spec["probe_matmul_n"], repeats=7),
                     "copy": machine.measure_copy_rate(device, mbytes=spec["probe_copy_mbytes"], repeats=7)}
    # One tiny call of the registered op (torch path: no Triton compile) before the baseline: the first call through
    # torch.library initialises its dispatch machinery, ~80 MB of resident memory kept for the process's life,
    # which is not the provider's working memory (that one-off would otherwise be most of peak_mb).
    nk.pamr(torch.randn(1, CHANNELS, 8, 8, device=device), torch.randn(1, 2, 4, 4, device=device), num_iter=1,
            dilations=(1,), backend="torch")
    gen = torch.Generator().manual_seed(0)
    image = torch.randn(1, CHANNELS, height, width, generator=gen).to(device)            # normalised image, float32
    mask = torch.randn(1, classes, spec["mask_h"], spec["mask_w"], generator=gen).to(device=device, dtype=dtype)
    pm = memory.PeakMemory(device)
    pm.set_baseline()
    dil = tuple(spec["dilations"])
    if provider == "reference":
        try:
            from naclip_kernels.reference import pamr as ref_pamr
        except ImportError as exc:
            raise Unavailable(f"naclip_kernels.reference.pamr is not available yet ({exc})")

        def call():
            return ref_pamr(image, mask, num_iter=spec["num_iter"], dilations=dil)
    elif provider in ("torch", "triton"):
        if provider == "triton" and not device.startswith("cuda"):
            raise Unavailable("the Triton kernels are timed on CUDA only (the CPU interpreter is for correctness)")

        def call():
            return nk.pamr(image, mask, num_iter=spec["num_iter"], dilations=dil, backend=provider)
    else:
        raise ValueError(f"unknown provider {provider!r}")
    result = timing.measure_provider(call, spec, device=device, warmup=spec["warmup"], pm=pm)
    if row_rates is not None:
        result["row_rates"] = row_rates
    return result


def build_parser(parser: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    parser = cli_args.bench_parser("pamr", __doc__, parser)
    parser.add_argument("--images", default=None, help="override image sizes, e.g. 336x448,512x683")
    parser.add_argument("--queries", default=None, help="override query counts, e.g. 21,171")
    return parser


def main(argv=None) -> Dict[str, Any]:
    return run(build_parser().parse_args(argv))


def run(args) -> Dict[str, Any]:
    cli_args.finalize_args(args, gpu_dtypes="float32,float16", total_min=7.0)
    providers = args.provider_list or PROVIDERS
    phases = sweep.provider_phases(providers, PROVIDERS, baseline="reference")
    images = QUICK_IMAGES if args.quick else IMAGES
    queries = QUICK_QUERIES if args.quick else QUERIES
    if args.images:
        images = [tuple(int(x) for x in s.lower().split("x")) for s in args.images.split(",") if s.strip()]
    if args.queries:
        queries = [int(x) for x in args.queries.split(",") if x.strip()]
    config = {"num_iter": NUM_ITER, "dilations": list(DILATIONS), "images": [list(i) for i in images],
              "queries": queries, "providers": providers, "mask": "[1, C, ceil(H/16), ceil(W/16)] logits",
              "warmup": args.warmup, "repeats": args.repeats, "max_row_s": args.max_row_s,
              "max_call_s": args.max_call_s, "max_memory_gb": args.max_memory_gb, "dtypes": args.dtype_list}
    driver = sweep.Sweep("pamr", args, ["provider", "image", "classes", "dtype"], config)
    probe = {"probe_matmul_n": 512 if args.quick else 2048, "probe_copy_mbytes": 32 if args.quick else 256}
    driver.add_reference_rates({"matmul": machine.measure_matmul_rate(args.device, n=probe["probe_matmul_n"]),
                               "copy": machine.measure_copy_rate(args.device, mbytes=probe["probe_copy_mbytes"])})
    for phase in phases:
        for dtype in args.dtype_list:
            for height, width in images:
                for classes in queries:
                    for provider in phase:
                        mask_h, mask_w = -(-height // PATCH), -(-width // PATCH)
                        row = {"provider": provider, "image": f"{height}x{width}", "height": height, "width": width,
                               "classes": classes, "mask_h": mask_h, "mask_w": mask_w, "dtype": dtype,
                               "num_iter": NUM_ITER, "dilations": list(DILATIONS),
                               "shape_image": [1, CHANNELS, height, width], "shape_mask": [1, classes, mask_h, mask_w],
                               "flops": pamr_flops(classes, height, width),
                               "bytes": pamr_bytes(classes, height, width, sweep.ELEMENT_BYTES[dtype]),
                               "label": f"{height}x{width} C={classes} {dtype}", **probe}
                        mem = reference_memory_estimate(classes, height, width) if provider == "reference" else None
                        driver.run(row, TARGET, series=f"{provider}|{dtype}", cost=float(classes + 8) * height * width,
                                  memory_estimate=mem)
    rank = {p: i for i, p in enumerate(PROVIDERS)}
    doc = driver.finish(["image", "classes", "dtype"], "reference", compute_peak="fp32_tflops",
                       sort_key=lambda r: (r.get("dtype", ""), r.get("height", 0) * r.get("width", 0),
                                           r.get("classes", 0), rank.get(r.get("provider"), 99)))
    add_floors(doc)
    driver.save()
    write_outputs(doc, driver.path, plot=not args.no_plot)
    return doc


def add_floors(doc: Dict[str, Any]) -> None:
    """Per ok row: the time floor of this machine and how far the row is above it.

    ``floor_fma_s`` = the propagation's multiply-adds (:func:`pamr_flops`) at the measured matmul rate (the
    machine's fused multiply-add throughput), ``floor_copy_s`` = the compulsory traffic (:func:`pamr_bytes`) at the
    measured copy bandwidth, ``floor_s`` = the larger, ``x_floor`` = median / floor. The rates are the row's own
    (``row_rates``, probed in its process just before it), else the run's, each from its probe's fastest call (a
    floor is a bound: a probe's median taken in a slow moment gave a floor above a measured time). CPU runs only:
    on CUDA the measured matmul is float16 on tensor cores, not the sweeps' float32 rate, and the datasheet-peak
    floor columns of :func:`bench.sweep.add_derived` apply instead.
    """
    if str(doc["machine"].get("device", "cpu")).startswith("cuda"):
        return
    for r in doc["rows"]:
        rates = r.get("row_rates") or doc.get("reference_rates", {})
        matmul = rates.get("matmul", {}).get("best_gflops") or rates.get("matmul", {}).get("gflops")
        copy = rates.get("copy", {}).get("best_gbps") or rates.get("copy", {}).get("gbps")
        if r.get("status") != "ok" or not matmul or not copy:
            continue
        r["floor_matmul_gflops"], r["floor_copy_gbps"] = matmul, copy
        r["floor_fma_s"] = r["flops"] / (matmul * 1e9)
        r["floor_copy_s"] = r["bytes"] / (copy * 1e9)
        r["floor_s"] = max(r["floor_fma_s"], r["floor_copy_s"])
        r["x_floor"] = r["median_s"] / r["floor_s"]


def floors_markdown(doc: Dict[str, Any]) -> str:
    """Our providers' rows against the machine's floors (see :func:`add_floors`)."""
    rows = [r for r in doc["rows"] if r.get("floor_s") and r.get("provider") != "reference"]
    if not rows:
        return ""
    lines = ["Floors: the multiply-adds at the measured float32 matmul rate and the compulsory traffic at the measured "
             "copy bandwidth, both probed in the row's process just before it (fastest of 7 calls each); the larger "
             "is the floor. The traffic is that of an implementation that reads and writes the mask once per "
             "iteration (pamr_bytes); the compiled CPU path fuses 5 or 10 iterations per pass and moves less, so a "
             "row can come in under its traffic floor, and the last column sets the median against the "
             "multiply-add floor alone.", "",
             "| image | queries | dtype | provider | median | matmul | copy | FMA floor | traffic floor | x floor "
             "| x FMA floor | speedup |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        speedup = "-" if r.get("speedup") is None else f"{r['speedup']:.0f}x"
        lines.append(f"| {r['image']} | {r['classes']} | {r['dtype']} | {r['provider']} | "
                     f"{tables.fmt_time(r['median_s'])} | {r['floor_matmul_gflops']:.0f} GFLOP/s | "
                     f"{r['floor_copy_gbps']:.1f} GB/s | {tables.fmt_time(r['floor_fma_s'])} | "
                     f"{tables.fmt_time(r['floor_copy_s'])} | {r['x_floor']:.1f}x | "
                     f"{r['median_s'] / r['floor_fma_s']:.1f}x | {speedup} |")
    return "\n".join(lines)


SIZE_COLS = [("image", lambda r: r["image"]), ("queries", lambda r: r["classes"]), ("dtype", lambda r: r["dtype"])]


def markdown(doc) -> str:
    floors = floors_markdown(doc)
    return (tables.header_markdown(doc) + "\n\n" + tables.markdown_table(doc, SIZE_COLS, rate="gbps")
            + ("\n\n" + floors if floors else ""))


def write_outputs(doc, path, plot: bool = True) -> None:
    results_io.write_outputs(doc, path, markdown(doc), plot_enabled=plot,
                         x=lambda r: r["classes"] * r["height"] * r["width"],
                         xlabel="queries x pixels (C*H*W)",
                         series=lambda r: f"{r['provider']} ({r['dtype']})",
                         variant=lambda r: r["dtype"],
                         title="PAMR (10 iterations, dilations (8, 16))")


if __name__ == "__main__":
    main()
