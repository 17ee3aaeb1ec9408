"""Whole-segmenter half of ``python -m bench proxy``: ProxyCLIP images/s and peak memory.

:class:`naclip.Segmenter` with ``method="proxyclip"``: open_clip ViT-B/16 and DINO ViT-B/8 (``dino_vitb8``), both
with **random weights** at their real size (timing does not depend on the weights), ProxyCLIP's settings (no PAMR,
logit scale 40), on two workloads:

* ``voc``: a VOC-like 336x448 image, ProxyCLIP's VOC21 setting (short side 336, 336/112 windows: 2 windows,
  a 42 x 42 DINO grid each), the 56 queries of VOC21;
* ``ade20k``: an ADE20K-like 448x597 image (short side 448, 336/112 windows: 8 windows), 150 queries.

=============  ==============================================================================================
``fast``       ``backend="auto"`` (Triton on CUDA, our torch path on CPU), the segmenter's default window
               batching (16 windows per pass on CUDA, ~800 tokens per pass on CPU; ``--window-batch-size``
               overrides): CLIP and the VFM run on the same batch of windows
``reference``  ``backend="reference"`` (the eager proxy attention with its ``M x M`` weights) with
               ``window_batch_size=1``: the original's one-window-at-a-time loop
=============  ==============================================================================================

Rows run through :func:`bench.segment.run_one` (same timing, text-embedding reuse and peak-memory method as
``bench segment``): ``peak_mb`` is the extra peak over the models, the text embeddings and the input image.
``--quick`` uses ViT-S-16 with a small timm ViT (``vit_tiny_patch16_224``) as the VFM on 64 px images.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any, Dict

from bench import machine, results_io, sweep
from bench import segment as whole

TARGET = "bench.segment:run_one"
PROVIDERS = ["reference", "fast"]
WORKLOADS = {
    # name: (height, width, slide, short_side, preset for the class list, queries)
    "voc": (336, 448, (336, 112), 336, "voc21", 56),
    "ade20k": (448, 597, (336, 112), 448, "ade20k", 150),
}
QUICK_WORKLOADS = {"voc": (64, 96, (64, 32), 64, "voc21", 6)}
MODEL, VFM = "ViT-B-16", "dino_vitb8"
QUICK_MODEL, QUICK_VFM = "ViT-S-16", "vit_tiny_patch16_224"


def main(args) -> Dict[str, Any]:
    """Run the rows for ``args`` (the parsed and finalised options of ``python -m bench proxy``; its
    ``--providers`` select attention providers and do not apply here)."""
    workloads = dict(QUICK_WORKLOADS if args.quick else WORKLOADS)
    model, vfm = (QUICK_MODEL, QUICK_VFM) if args.quick else (MODEL, VFM)
    # The fast row is what a user gets by default: the segmenter's per-device window batching (16 on CUDA; on a CPU
    # about 800 tokens per pass, one window with a DINO ViT-B/8), unless --window-batch-size overrides it. None
    # leaves the choice to the segmenter; each row records the value it used (window_batch_size_used).
    wbs = getattr(args, "window_batch_size", None)
    phases = sweep.provider_phases(PROVIDERS, PROVIDERS, baseline="reference", ours=("fast",))
    config = {"model": model, "vfm": vfm, "pretrained": None, "method": "proxyclip", "pamr": False,
              "workloads": {k: list(map(str, v)) for k, v in workloads.items()}, "providers": PROVIDERS,
              "fast_window_batch_size": wbs or "segmenter default", "reference_window_batch_size": 1,
              "warmup": args.warmup,
              "repeats": args.repeats, "max_row_s": args.max_row_s, "max_call_s": args.max_call_s,
              "max_memory_gb": args.max_memory_gb, "dtypes": args.dtype_list}
    driver = sweep.Sweep("proxy_segment", args, ["provider", "workload", "dtype", "model"], config)
    driver.add_reference_rates({"matmul": machine.measure_matmul_rate(args.device, n=512 if args.quick else 2048)})
    text_dir = tempfile.mkdtemp(prefix="naclip_bench_proxy_text_")
    try:
        for phase in phases:
            for dtype in args.dtype_list:
                for name, (height, width, slide, short_side, preset, queries) in workloads.items():
                    for provider in phase:
                        row = {"provider": provider, "workload": name, "image": f"{height}x{width}",
                               "height": height, "width": width, "slide": list(slide), "short_side": short_side,
                               "queries": queries, "class_lines": whole._class_lines(preset, queries),
                               "model": model, "vfm": vfm, "dtype": dtype,
                               "backend": "reference" if provider == "reference" else "auto",
                               "window_batch_size": 1 if provider == "reference" else wbs,
                               "templates": whole.QUICK_TEMPLATES if args.quick else None,
                               "segmenter_kwargs": {"method": "proxyclip", "vfm": vfm, "vfm_pretrained": None,
                                                    "pamr": False},
                               "label": f"{name} {height}x{width} Q={queries}"}
                        driver.run(row, TARGET, series=f"{provider}|{name}|{dtype}", cost=1.0,
                                   extra_spec={"text_cache_file": os.path.join(text_dir, f"{name}_{dtype}.pt")},
                                   timeout_s=1800.0)
    finally:
        shutil.rmtree(text_dir, ignore_errors=True)
    rank = {p: i for i, p in enumerate(PROVIDERS)}
    order = {name: i for i, name in enumerate(workloads)}
    doc = driver.finish(["workload", "dtype", "model"], "reference",
                        sort_key=lambda r: (r.get("dtype", ""), order.get(r.get("workload"), 99),
                                            rank.get(r.get("provider"), 99)))
    results_io.write_outputs(doc, driver.path, whole.markdown(doc), plot_enabled=not args.no_plot,
                             x=lambda r: r["height"] * r["width"], xlabel="image pixels",
                             series=lambda r: f"{r['provider']} ({r['dtype']})", variant=lambda r: r["dtype"],
                             title=f"ProxyCLIP segmenter ({model} + {vfm}, random weights)",
                             ylabel_time="median time per image (s)")
    return doc
