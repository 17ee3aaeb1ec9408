"""Command-line options shared by every benchmark, and their defaults (which depend on --quick and the device)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

from bench.results_io import RESULTS_DIR


def default_max_memory_gb() -> float:
    try:
        with open("/proc/meminfo") as fh:
            total = int(fh.readline().split()[1]) / 1024**2
        return round(min(16.0, 0.6 * total), 1)
    except (OSError, ValueError, IndexError):  # pragma: no cover
        return 16.0


def bench_parser(name: str, description: str, parser=None):
    """The argument parser of ``python -m bench <name>`` (or ``parser``, given by a caller that embeds it) with the
    common options added; each benchmark adds its own after."""
    import argparse

    parser = parser or argparse.ArgumentParser(prog=f"python -m bench {name}", description=description,
                                               formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    return parser


def add_common_args(parser) -> None:
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available, else cpu)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes and few repeats: a smoke test of the machinery (writes *_quick.json)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls before timing (default 1)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per row at most (default 10)")
    parser.add_argument("--max-row-s", type=float, default=None,
                        help="stop timing a row after this many seconds of timed calls (default 10)")
    parser.add_argument("--max-call-s", type=float, default=None,
                        help="skip rows whose single call is predicted to take longer (default 45)")
    parser.add_argument("--max-memory-gb", type=float, default=None,
                        help="skip rows whose estimated peak memory is larger (default: CPU min(16, 60%% of RAM), "
                             "CUDA 80%% of the GPU's memory)")
    parser.add_argument("--max-total-min", type=float, default=None,
                        help="stop starting new rows after this many minutes (remaining rows are recorded as "
                             "skipped); default per benchmark, 0 = no limit")
    parser.add_argument("--providers", default=None, help="comma-separated subset of providers")
    parser.add_argument("--dtypes", default=None, help="comma-separated dtypes (default float32 on CPU, "
                                                        "float16,bfloat16 on CUDA)")
    parser.add_argument("--out", type=Path, default=None, help="results directory (default bench/results)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the ok rows of an existing results file and run only the missing ones")
    parser.add_argument("--no-isolate", action="store_true",
                        help="run rows in this process (faster start-up; memory figures less clean)")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG plot")


def finalize_args(args, gpu_dtypes: str = "float16,bfloat16", cpu_dtypes: str = "float32",
                  total_min: float = 0.0) -> None:
    import torch

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    quick = args.quick
    defaults = {"warmup": 1, "repeats": 3 if quick else 10, "max_row_s": 2.0 if quick else 10.0,
                "max_call_s": 20.0 if quick else 45.0, "max_memory_gb": 2.0 if quick else default_max_memory_gb()}
    defaults["max_total_min"] = 0.0 if quick else total_min
    if args.device.startswith("cuda") and not quick and torch.cuda.is_available():
        # On a GPU the budget is the device's memory (80% of it), not the host's.
        defaults["max_memory_gb"] = round(0.8 * torch.cuda.get_device_properties(0).total_memory / 1024**3, 1)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.dtypes is None:
        args.dtypes = gpu_dtypes if args.device.startswith("cuda") else cpu_dtypes
    args.dtype_list = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    args.provider_list = None if args.providers is None else [p.strip() for p in args.providers.split(",") if p.strip()]
    if args.out is None and quick:
        args.out = RESULTS_DIR
    if os.environ.get("TRITON_INTERPRET") == "1" and args.no_isolate:
        print("warning: TRITON_INTERPRET=1 with --no-isolate: Triton kernels would run interpreted; unset it for "
              "benchmarks", file=sys.stderr)
