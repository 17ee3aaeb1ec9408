"""Where a number came from: machine, library versions and git state; GPU datasheet peaks; the measured
matmul and copy rates that serve as this machine's arithmetic and bandwidth ceilings."""
from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
from typing import Any, Dict, Optional

from bench import ROOT
from bench.memory import MB
from bench.timing import measure

# Peak rates used for the GPU "floor" columns and the roofline estimates (vendor datasheet figures, dense).
GPU_PEAKS = {
    # name fragment: (fp16/bf16 dense tensor TFLOP/s, fp32 non-tensor TFLOP/s, HBM TB/s, special-function TOP/s)
    "H100 PCIE": {"label": "H100 PCIe 80GB", "tensor_tflops": 756.0, "fp32_tflops": 51.2, "hbm_tbs": 2.0,
                  "sfu_tops": 3.2},
    "H100": {"label": "H100 SXM5 80GB", "tensor_tflops": 989.4, "fp32_tflops": 66.9, "hbm_tbs": 3.35, "sfu_tops": 3.9},
    "H200": {"label": "H200 SXM 141GB", "tensor_tflops": 989.4, "fp32_tflops": 66.9, "hbm_tbs": 4.8, "sfu_tops": 3.9},
    "A100": {"label": "A100 SXM4 80GB", "tensor_tflops": 312.0, "fp32_tflops": 19.5, "hbm_tbs": 2.04, "sfu_tops": 1.25},
}



def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_info() -> Dict[str, Any]:
    """Short commit hash and whether the working tree has uncommitted changes."""
    def run(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=20)

    try:
        head = run("rev-parse", "--short", "HEAD")
        if head.returncode != 0:
            return {"commit": None, "dirty": None}
        status = run("status", "--porcelain", "--untracked-files=no")
        return {"commit": head.stdout.strip(), "dirty": bool(status.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def machine_info(device: str = "cpu") -> Dict[str, Any]:
    """Everything needed to tell where a number came from."""
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        affinity = os.cpu_count()
    mem_total = None
    try:
        with open("/proc/meminfo") as fh:
            mem_total = int(fh.readline().split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    info = {
        "platform": platform.platform(),
        "hostname": platform.node(),
        "python": platform.python_version(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": affinity,
        "torch_threads": torch.get_num_threads(),
        "memory_total_gb": None if mem_total is None else round(mem_total / 1024**3, 1),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda_runtime": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "gpu_name": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "gpu_capability": (".".join(map(str, torch.cuda.get_device_capability(0)))
                           if torch.cuda.is_available() else None),
        "device": device,
        "timestamp_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", ""),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    info.update({f"git_{k}": v for k, v in git_info().items()})
    return info


def gpu_peaks(gpu_name: Optional[str]) -> Optional[Dict[str, Any]]:
    """Datasheet peaks of a known GPU (matched by name fragment), or None."""
    if not gpu_name:
        return None
    for key, peaks in GPU_PEAKS.items():
        if key in gpu_name.upper():
            return peaks
    return None


def measure_matmul_rate(device: str = "cpu", n: int = 2048, repeats: int = 5) -> Dict[str, Any]:
    """Measured float32 (CPU) / float16 (CUDA) ``n^3`` matmul rate: the arithmetic ceiling of this machine.
    ``gflops`` from the median call, ``best_gflops`` from the fastest (what a floor should use)."""
    import torch

    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    stats = measure(lambda: a @ b, device=device, warmup=1, repeats=repeats, max_row_s=10.0)
    gflops = 2 * n**3 / stats["median_s"] / 1e9
    return {"n": n, "dtype": str(dtype).replace("torch.", ""), "median_s": stats["median_s"],
            "gflops": gflops, "best_gflops": 2 * n**3 / min(stats["times_s"]) / 1e9, "samples": stats["n"]}


def measure_copy_rate(device: str = "cpu", mbytes: int = 256, repeats: int = 5) -> Dict[str, Any]:
    """Measured memory bandwidth of a large tensor copy (read + write bytes / time): the bytes ceiling.
    ``gbps`` from the median call, ``best_gbps`` from the fastest (what a floor should use)."""
    import torch

    numel = mbytes * MB // 4
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    stats = measure(lambda: dst.copy_(src), device=device, warmup=1, repeats=repeats, max_row_s=5.0)
    return {"mbytes": mbytes, "median_s": stats["median_s"], "gbps": 2 * numel * 4 / stats["median_s"] / 1e9,
            "best_gbps": 2 * numel * 4 / min(stats["times_s"]) / 1e9}
