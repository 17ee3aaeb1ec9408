"""Shared benchmark machinery: timing, memory, machine info, isolation, results files, tables and plots.

Measurement protocol (every benchmark, every row)
-------------------------------------------------
* Each ``(provider, size)`` row runs in a **fresh Python subprocess** (``python -m bench._worker``) unless
  ``--no-isolate`` is given, so that one row's allocations, caches and compiled code cannot leak into another's
  memory figure, and a crash or out-of-memory kill costs one row, not the run.
* Timing: ``warmup`` untimed calls, then timed calls until ``repeats`` samples or ``max_row_s`` seconds of timed
  work (whichever first; at least one sample). Reported: median, p20 and p80 (linear interpolation), the number of
  samples, and the duration of the very first call (compilation, caches, bias build). On CUDA each call is
  bracketed by ``torch.cuda.synchronize()``.
* Peak memory, CPU: Linux ``VmHWM`` (the kernel's high-water mark of the process's resident set, read from
  ``/proc/self/status``), reset by writing ``5`` to ``/proc/self/clear_refs`` just before the timed calls, after
  ``malloc_trim(0)`` has handed freed heap pages back to the OS. ``peak_mb`` = VmHWM after the timed calls minus
  the process RSS measured right after the inputs were allocated (before any provider call): the *extra peak
  resident memory over the inputs* in steady state, including whatever the provider keeps between calls (e.g. a
  cached bias). ``transient_mb`` = the same high-water mark minus the RSS just before the timed calls (the per-call
  working set only); ``first_call_peak_mb`` = the high-water mark of the first call over the inputs (compilation,
  cache builds). Where ``clear_refs`` is not available a 1 ms RSS-sampling thread (psutil) stands in; the method
  used is recorded in every row (``memory_method``).
* Peak memory, CUDA: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, minus the bytes
  allocated once the inputs exist (the same three figures).
* Speedup = median of the eager reference row / median of the row, both from the same results file.
"""
from __future__ import annotations

import ctypes
import datetime as _dt
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"
MB = 1024 * 1024
SCHEMA_VERSION = 1

# Peak rates used for the GPU "floor" columns and the roofline estimates (vendor datasheet figures, dense).
GPU_PEAKS = {
    # name fragment: (fp16/bf16 dense tensor TFLOP/s, fp32 non-tensor TFLOP/s, HBM TB/s, special-function TOP/s)
    "H100 PCIE": {"label": "H100 PCIe 80GB", "tensor_tflops": 756.0, "fp32_tflops": 51.2, "hbm_tbs": 2.0,
                  "sfu_tops": 3.2},
    "H100": {"label": "H100 SXM5 80GB", "tensor_tflops": 989.4, "fp32_tflops": 66.9, "hbm_tbs": 3.35, "sfu_tops": 3.9},
    "H200": {"label": "H200 SXM 141GB", "tensor_tflops": 989.4, "fp32_tflops": 66.9, "hbm_tbs": 4.8, "sfu_tops": 3.9},
    "A100": {"label": "A100 SXM4 80GB", "tensor_tflops": 312.0, "fp32_tflops": 19.5, "hbm_tbs": 2.04, "sfu_tops": 1.25},
}


# ==============================================================================================================
# Statistics
# ==============================================================================================================
def percentile(values: Sequence[float], q: float) -> float:
    """Percentile ``q`` in [0, 100] with linear interpolation between order statistics (numpy's default)."""
    if not values:
        raise ValueError("percentile of an empty sequence")
    if not 0 <= q <= 100:
        raise ValueError(f"q must be in [0, 100], got {q}")
    xs = sorted(float(v) for v in values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(times: Sequence[float]) -> Dict[str, float]:
    """Median, p20, p80, min, max and count of a list of durations (seconds)."""
    return {
        "median_s": percentile(times, 50),
        "p20_s": percentile(times, 20),
        "p80_s": percentile(times, 80),
        "min_s": min(times),
        "max_s": max(times),
        "n": len(times),
    }


# ==============================================================================================================
# Memory
# ==============================================================================================================
def _proc_status_kb(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_bytes() -> int:
    """Current resident set size of this process."""
    kb = _proc_status_kb("VmRSS")
    if kb is not None:
        return kb * 1024
    import psutil  # pragma: no cover - non-Linux

    return psutil.Process().memory_info().rss


def hwm_bytes() -> Optional[int]:
    """Peak resident set size (``VmHWM``) since process start or the last :func:`reset_hwm`; None off Linux."""
    kb = _proc_status_kb("VmHWM")
    return None if kb is None else kb * 1024


def reset_hwm() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux ``clear_refs`` value 5). True if it worked."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return False
    hwm, rss = hwm_bytes(), rss_bytes()
    # After a reset the high-water mark equals the RSS (allow a little growth in between).
    return hwm is not None and hwm <= rss + 4 * MB


def malloc_trim() -> None:
    """Return freed heap memory to the OS (glibc), so later peaks are not hidden by pages malloc kept."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        pass


class _RssSampler:
    """Fallback peak tracker: samples RSS every ``interval`` seconds in a thread (may miss very short spikes)."""

    def __init__(self, interval: float = 0.001):
        self.interval = interval
        self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, rss_bytes())


class PeakMemory:
    """Peak memory over a baseline for one device. ``cpu``: process RSS high-water mark; ``cuda``: allocator peak.

    Usage: ``pm = PeakMemory(device); pm.set_baseline()`` (after the inputs exist), then ``pm.start()`` /
    ``pm.stop()`` around a section; ``stop`` returns the section's high-water mark in bytes (absolute).
    """

    def __init__(self, device: str):
        self.device = device
        self.is_cuda = device.startswith("cuda")
        self.baseline = 0
        self._sampler: Optional[_RssSampler] = None
        if self.is_cuda:
            self.method = "cuda: torch.cuda.max_memory_allocated over the bytes allocated after the inputs"
        elif reset_hwm():
            self.method = ("cpu: VmHWM (reset via /proc/self/clear_refs, after malloc_trim) over the RSS after the "
                           "inputs, fresh subprocess per row")
            self._hwm = True
        else:  # pragma: no cover - non-Linux
            self.method = "cpu: RSS sampled every 1 ms in a thread (psutil) over the RSS after the inputs"
            self._hwm = False

    def current(self) -> int:
        if self.is_cuda:
            import torch

            torch.cuda.synchronize()
            return torch.cuda.memory_allocated()
        malloc_trim()
        return rss_bytes()

    def set_baseline(self) -> int:
        self.baseline = self.current()
        return self.baseline

    def start(self) -> int:
        now = self.current()
        if self.is_cuda:
            import torch

            torch.cuda.reset_peak_memory_stats()
        elif self._hwm:
            reset_hwm()
        else:  # pragma: no cover
            self._sampler = _RssSampler()
        return now

    def stop(self) -> int:
        if self.is_cuda:
            import torch

            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        if self._hwm:
            return hwm_bytes() or rss_bytes()
        return self._sampler.stop()  # pragma: no cover


# ==============================================================================================================
# Timing
# ==============================================================================================================
def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def measure(call: Callable[[], Any], *, device: str, warmup: int = 1, repeats: int = 10, max_row_s: float = 20.0,
            pm: Optional[PeakMemory] = None, prepare: Optional[Callable[[], Any]] = None) -> Dict[str, Any]:
    """Time ``call`` and measure its peak memory (see the module docstring for the exact protocol).

    ``prepare`` (optional) runs untimed before the first call (e.g. building a cached mask); its memory counts in
    ``peak_mb`` (it is held by the provider) but not in the times. ``pm`` must already have its baseline set (right
    after the inputs were allocated). Returns the statistics, memory figures and raw samples.
    """
    if pm is None:
        pm = PeakMemory(device)
        pm.set_baseline()
    first_start = pm.start()
    if prepare is not None:
        prepare()
    _sync(device)
    t0 = time.perf_counter()
    result = call()
    _sync(device)
    first_call_s = time.perf_counter() - t0
    del result
    first_peak = pm.stop()
    times: List[float] = []
    elapsed = 0.0
    if warmup <= 0:
        # No warm-up: the first call is the first sample, and the peak runs over every call including it.
        times.append(first_call_s)
        elapsed = first_call_s
        before = first_start
    else:
        for _ in range(warmup - 1):
            call()
        _sync(device)
        before = pm.start()
    def done() -> bool:
        # Enough samples, or the time cap reached, or one more call would overshoot it by a half.
        if len(times) >= max(1, repeats):
            return True
        return bool(times) and (elapsed >= max_row_s or elapsed + times[-1] > 1.5 * max_row_s)

    while not done():
        _sync(device)
        t0 = time.perf_counter()
        result = call()
        _sync(device)
        dt = time.perf_counter() - t0
        del result
        times.append(dt)
        elapsed += dt
    peak = pm.stop()
    out = summarize(times)
    out.update({
        "times_s": times,
        "first_call_s": first_call_s,
        "warmup": warmup,
        "peak_mb": max(0, peak - pm.baseline) / MB,
        "transient_mb": max(0, peak - before) / MB,
        "first_call_peak_mb": max(0, first_peak - pm.baseline) / MB,
        "memory_method": pm.method,
    })
    return out


def measure_provider(call: Callable[[], Any], spec: Dict[str, Any], *, device: str, warmup: int,
                     pm: Optional[PeakMemory] = None, prepare: Optional[Callable[[], Any]] = None) -> Dict[str, Any]:
    """:func:`measure` for one provider of a kernel sweep: a backend that cannot run here (or an op not written
    yet) becomes an :class:`Unavailable` row with its reason instead of a crash; records the thread count."""
    import torch

    from naclip_kernels import BackendUnavailableError

    try:
        out = measure(call, device=device, warmup=warmup, repeats=spec["repeats"], max_row_s=spec["max_row_s"],
                      pm=pm, prepare=prepare)
    except NotImplementedError as exc:
        raise Unavailable(f"not implemented yet: {exc}")
    except BackendUnavailableError as exc:
        raise Unavailable(str(exc))
    out["threads"] = torch.get_num_threads()
    return out


def warm_libraries(device: str) -> None:
    """Initialise the math libraries and thread pools before the baseline, so their one-off memory is not counted."""
    import torch
    import torch.nn.functional as F

    a = torch.randn(64, 64, device=device)
    (a @ a).softmax(-1)
    F.conv2d(torch.randn(1, 3, 16, 16, device=device), torch.randn(4, 3, 3, 3, device=device), padding=1)
    F.interpolate(torch.randn(1, 2, 8, 8, device=device), size=(16, 16), mode="bilinear", align_corners=True)
    torch.bmm(torch.randn(2, 8, 8, device=device), torch.randn(2, 8, 8, device=device))
    _sync(device)


# ==============================================================================================================
# Machine information and reference rates
# ==============================================================================================================
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
    """Measured float32 (CPU) / float16 (CUDA) ``n^3`` matmul rate: the arithmetic ceiling of this machine."""
    import torch

    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    stats = measure(lambda: a @ b, device=device, warmup=1, repeats=repeats, max_row_s=10.0)
    gflops = 2 * n**3 / stats["median_s"] / 1e9
    return {"n": n, "dtype": str(dtype).replace("torch.", ""), "median_s": stats["median_s"],
            "gflops": gflops, "samples": stats["n"]}


def measure_copy_rate(device: str = "cpu", mbytes: int = 256, repeats: int = 5) -> Dict[str, Any]:
    """Measured memory bandwidth of a large tensor copy (read + write bytes / time): the bytes ceiling."""
    import torch

    numel = mbytes * MB // 4
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    stats = measure(lambda: dst.copy_(src), device=device, warmup=1, repeats=repeats, max_row_s=5.0)
    return {"mbytes": mbytes, "median_s": stats["median_s"], "gbps": 2 * numel * 4 / stats["median_s"] / 1e9}


# ==============================================================================================================
# Isolation: one subprocess per row
# ==============================================================================================================
def run_row(target: str, spec: Dict[str, Any], *, isolate: bool = True, timeout_s: float = 600.0) -> Dict[str, Any]:
    """Run ``module:function(spec) -> dict`` in a fresh ``python -m bench._worker`` (or in-process).

    Never raises for a failing row: returns ``{"status": "error" | "timeout" | "killed", "reason": ...}``.
    """
    if not isolate:
        return call_target(target, spec)
    with tempfile.TemporaryDirectory(prefix="naclip_bench_") as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_path.write_text(json.dumps({"target": target, "spec": spec}))
        env = dict(os.environ)
        env.pop("TRITON_INTERPRET", None)   # never time interpreted kernels
        env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        try:
            proc = subprocess.run([sys.executable, "-m", "bench._worker", str(spec_path), str(out_path)],
                                  cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return {"status": "timeout", "reason": f"row exceeded the {timeout_s:.0f} s subprocess timeout"}
        if out_path.exists():
            return json.loads(out_path.read_text())
        if proc.returncode < 0 or proc.returncode == 137:
            signal = -proc.returncode if proc.returncode < 0 else 9
            return {"status": "killed", "reason": f"subprocess killed by signal {signal} (most likely out of memory)"}
        tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-5:]
        return {"status": "error", "reason": f"worker exited with {proc.returncode}: " + " | ".join(tail)}


def call_target(target: str, spec: Dict[str, Any]) -> Dict[str, Any]:
    """Import and call ``module:function(spec)``; turn exceptions into an error row."""
    import importlib

    module_name, func_name = target.split(":")
    try:
        func = getattr(importlib.import_module(module_name), func_name)
        out = func(spec)
        out.setdefault("status", "ok")
        return out
    except Unavailable as exc:
        return {"status": "unavailable", "reason": str(exc)}
    except MemoryError as exc:
        return {"status": "oom", "reason": f"MemoryError: {exc}"}
    except Exception as exc:  # noqa: BLE001 - a benchmark row must not kill the run
        msg = f"{type(exc).__name__}: {exc}".strip()
        if "out of memory" in msg.lower():
            return {"status": "oom", "reason": msg[:500]}
        return {"status": "error", "reason": msg[:500], "traceback": traceback.format_exc()[-2000:]}


class Unavailable(RuntimeError):
    """A provider that cannot run here (missing op, no GPU, unsupported by this torch): the row is skipped."""


# ==============================================================================================================
# Results files
# ==============================================================================================================
def results_path(bench: str, device: str, quick: bool, out_dir: Optional[Path] = None) -> Path:
    kind = "cuda" if device.startswith("cuda") else "cpu"
    name = f"{bench}_{kind}{'_quick' if quick else ''}.json"
    return Path(out_dir or RESULTS_DIR) / name


def load_results(path: Path) -> Optional[Dict[str, Any]]:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def save_results(path: Path, doc: Dict[str, Any]) -> None:
    """Atomic write (a crash mid-run leaves the previous complete file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1, sort_keys=False, default=str))
    os.replace(tmp, path)


def row_key(row: Dict[str, Any], fields: Iterable[str]) -> str:
    return json.dumps([row.get(f) for f in fields], default=str)


# ==============================================================================================================
# Sweep driver shared by the benchmarks
# ==============================================================================================================
class Sweep:
    """Runs rows in order, predicts and skips rows that would break the time/memory budget, saves after every row.

    ``key_fields`` identify a row (for ``--resume``); ``cost`` of a row is a number proportional to its work (used
    to extrapolate a provider's time from its previous, smaller row); ``memory_estimate`` (optional, bytes) is the
    analytic estimate used to skip eager rows before running them.
    """

    def __init__(self, bench: str, args, key_fields: Sequence[str], config: Dict[str, Any]):
        self.bench = bench
        self.args = args
        self.key_fields = list(key_fields)
        self.path = results_path(bench, args.device, args.quick, args.out)
        previous = load_results(self.path) if args.resume else None
        self.kept: Dict[str, Dict[str, Any]] = {}
        if previous:
            for row in previous.get("rows", []):
                if row.get("status") in ("ok", "unavailable"):
                    self.kept[row_key(row, self.key_fields)] = row
        self.run_id = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        self.doc: Dict[str, Any] = {
            "schema": SCHEMA_VERSION,
            "benchmark": bench,
            "run_id": self.run_id,
            "quick": bool(args.quick),
            "machine": machine_info(args.device),
            "config": config,
            "memory_method": MEMORY_METHOD_DOC,
            "rows": [],
        }
        m = self.doc["machine"]
        # Every row carries the essentials too, so rows merged by --resume from another run stay attributable.
        self.row_machine = {k: m.get(k) for k in ("hostname", "cpu_model", "cpu_affinity", "gpu_name", "torch",
                                                   "triton", "cuda_runtime", "git_commit", "git_dirty", "device")}
        self._last_ok: Dict[str, Dict[str, Any]] = {}   # provider-series -> last ok row
        self._blocked: Dict[str, tuple] = {}            # provider-series -> (cost, reason): larger rows skipped
        self.started = time.perf_counter()

    def add_reference_rates(self, rates: Dict[str, Any]) -> None:
        self.doc["reference_rates"] = rates
        self.save()

    def _carried_over(self) -> List[Dict[str, Any]]:
        """Rows of the previous file (``--resume``) that this run has not reached or does not run (other providers)."""
        used = {row_key(r, self.key_fields) for r in self.doc["rows"]}
        return [dict(r, resumed=True) for k, r in self.kept.items() if k not in used]

    def save(self) -> None:
        self.doc["elapsed_s"] = time.perf_counter() - self.started
        doc = dict(self.doc, rows=self.doc["rows"] + self._carried_over())
        save_results(self.path, doc)

    def run(self, row: Dict[str, Any], target: str, *, series: str, cost: float,
            memory_estimate: Optional[float] = None, call_estimate_s: Optional[float] = None,
            timeout_s: Optional[float] = None, extra_spec: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        """Run (or resume, or skip) one row; returns the completed row (also appended to the results)."""
        args = self.args
        row = dict(row)
        row["run_id"] = self.run_id
        row["machine"] = self.row_machine
        key = row_key(row, self.key_fields)
        if key in self.kept:
            old = dict(self.kept[key])
            old["resumed"] = True
            return self._append(old, series, cost)
        reason = self._skip_reason(row, series, cost, memory_estimate, call_estimate_s)
        if reason:
            row.update({"status": "skipped", "reason": reason})
            if row.get("memory_estimate_gb") is None and memory_estimate is not None:
                row["memory_estimate_gb"] = memory_estimate / 1024**3
            return self._append(row, series, cost)
        spec = dict(row)
        spec.update({"warmup": args.warmup, "repeats": args.repeats, "max_row_s": args.max_row_s,
                     "device": args.device})
        spec.update(extra_spec or {})
        t0 = time.perf_counter()
        limit = timeout_s or max(300.0, 3 * args.max_call_s + 2 * args.max_row_s + 60)
        result = run_row(target, spec, isolate=not args.no_isolate, timeout_s=limit)
        row.update(result)
        row["wall_s"] = time.perf_counter() - t0
        if memory_estimate is not None:
            row["memory_estimate_gb"] = memory_estimate / 1024**3
        if row.get("status") in ("timeout", "killed", "oom"):
            self._blocked[series] = (cost, f"a smaller size already failed ({row['status']})")
        return self._append(row, series, cost)

    def _skip_reason(self, row, series, cost, memory_estimate, call_estimate_s) -> Optional[str]:
        args = self.args
        budget = getattr(args, "max_total_min", None)
        if budget and time.perf_counter() - self.started > 60 * budget:
            return f"time budget exhausted (--max-total-min {budget:g})"
        if series in self._blocked and cost >= self._blocked[series][0]:
            return self._blocked[series][1]
        if memory_estimate is not None and memory_estimate > args.max_memory_gb * 1024**3:
            return (f"estimated peak memory {memory_estimate / 1024**3:.1f} GB > --max-memory-gb "
                    f"{args.max_memory_gb:g}")
        predicted = call_estimate_s
        last = self._last_ok.get(series)
        if last is not None and last.get("median_s") and last.get("_cost"):
            predicted = max(predicted or 0.0, last["median_s"] * cost / last["_cost"])
            if last.get("peak_mb") and memory_estimate is None:
                mem_pred = last["peak_mb"] * MB * cost / last["_cost"]
                if mem_pred > args.max_memory_gb * 1024**3:
                    return (f"extrapolated peak memory {mem_pred / 1024**3:.1f} GB > --max-memory-gb "
                            f"{args.max_memory_gb:g}")
        if predicted is not None and predicted > args.max_call_s:
            return f"predicted {predicted:.0f} s per call > --max-call-s {args.max_call_s:g}"
        return None

    def _append(self, row, series, cost) -> Dict[str, Any]:
        if row.get("status") == "ok" and row.get("median_s"):
            # Extrapolate from the largest measured row of the series (time and memory scale with `cost`).
            if series not in self._last_ok or cost >= self._last_ok[series]["_cost"]:
                self._last_ok[series] = dict(row, _cost=cost)
        self.doc["rows"].append(row)
        self.save()
        _print_progress(self.bench, row)
        return row

    def finish(self, speedup_group: Sequence[str], baseline_provider: str, flops_key: str = "flops",
               bytes_key: str = "bytes", compute_peak: str = "tensor_tflops",
               sort_key: Optional[Callable[[Dict[str, Any]], Any]] = None) -> Dict[str, Any]:
        self.doc["rows"] = self.doc["rows"] + self._carried_over()
        if sort_key is not None:
            self.doc["rows"].sort(key=sort_key)
        add_derived(self.doc, speedup_group, baseline_provider, flops_key, bytes_key, compute_peak)
        self.save()
        return self.doc


MEMORY_METHOD_DOC = (
    "peak_mb = extra peak memory over the inputs in steady state. CPU: each row runs in a fresh subprocess; after "
    "the inputs are allocated and freed heap pages returned (malloc_trim) the RSS is the baseline; /proc/self/"
    "clear_refs=5 resets the kernel's VmHWM high-water mark before the timed calls; peak_mb = VmHWM after them - "
    "baseline (includes memory the provider keeps between calls, e.g. a cached bias). transient_mb = VmHWM - RSS "
    "just before the timed calls. first_call_peak_mb = high-water mark of the first call (compile, cache build) over "
    "the baseline. CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus memory_allocated "
    "after the inputs."
)


def _print_progress(bench: str, row: Dict[str, Any]) -> None:
    status = row.get("status")
    label = row.get("label") or row.get("size")
    if status == "ok":
        msg = (f"{row['median_s'] * 1e3:10.2f} ms  [p20 {row['p20_s'] * 1e3:.2f}, p80 {row['p80_s'] * 1e3:.2f}] "
               f"n={row['n']}  peak {row['peak_mb']:.1f} MB")
    else:
        msg = f"{status}: {row.get('reason', '')}"
    resumed = " (resumed)" if row.get("resumed") else ""
    print(f"[{bench}] {label:<28} {row.get('provider', ''):<22} {msg}{resumed}", flush=True)


def add_derived(doc: Dict[str, Any], group: Sequence[str], baseline: str, flops_key: str = "flops",
                bytes_key: str = "bytes", compute_peak: str = "tensor_tflops") -> None:
    """Speedup over the baseline provider's row of the same group, and achieved rates vs the machine's floors."""
    rows = doc["rows"]
    base = {row_key(r, group): r for r in rows if r.get("provider") == baseline and r.get("status") == "ok"}
    rates = doc.get("reference_rates", {})
    peaks = gpu_peaks(doc["machine"].get("gpu_name"))
    for r in rows:
        if r.get("status") != "ok":
            continue
        b = base.get(row_key(r, group))
        r["speedup"] = (b["median_s"] / r["median_s"]) if b else None
        r["speedup_baseline"] = baseline if b else None
        if b and b.get("run_id") != r.get("run_id"):
            r["speedup_note"] = "baseline from another run (resumed)"
        flops, nbytes = r.get(flops_key), r.get(bytes_key)
        if flops:
            r["gflops"] = flops / r["median_s"] / 1e9
            if peaks and doc["machine"].get("device", "cpu").startswith("cuda"):
                floor_s = flops / (peaks[compute_peak] * 1e12)
                r["compute_peak"] = compute_peak
                r["floor_compute_s"] = floor_s
                r["pct_of_compute_peak"] = 100 * floor_s / r["median_s"]
            elif rates.get("matmul"):
                r["pct_of_matmul"] = 100 * r["gflops"] / rates["matmul"]["gflops"]
        if nbytes:
            r["gbps"] = nbytes / r["median_s"] / 1e9
            if peaks and doc["machine"].get("device", "cpu").startswith("cuda"):
                floor_s = nbytes / (peaks["hbm_tbs"] * 1e12)
                r["floor_bytes_s"] = floor_s
                r["pct_of_bandwidth_peak"] = 100 * floor_s / r["median_s"]
            elif rates.get("copy"):
                r["pct_of_copy"] = 100 * r["gbps"] / rates["copy"]["gbps"]


# ==============================================================================================================
# Markdown and plots
# ==============================================================================================================
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


def plot(doc: Dict[str, Any], path: Path, *, x: Callable[[Dict[str, Any]], float], xlabel: str,
         series: Callable[[Dict[str, Any]], str], title: str, ylabel_time: str = "median time (s)",
         variant: Optional[Callable[[Dict[str, Any]], str]] = None) -> Optional[Path]:
    """Two panels: median time (log, p20-p80 band) and peak memory against size. One colour per provider, one line
    style per ``variant`` (case / dtype), so providers compare at a glance."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        return None
    variant = variant or (lambda r: "")
    lines: Dict[tuple, List[tuple]] = {}
    for r in doc["rows"]:
        if r.get("status") == "ok":
            lines.setdefault((r.get("provider", ""), variant(r), series(r)), []).append(
                (x(r), r["median_s"], r.get("p20_s"), r.get("p80_s"), r.get("peak_mb")))
    providers = sorted({k[0] for k in lines})
    variants = sorted({k[1] for k in lines})
    colors = {p: f"C{i % 10}" for i, p in enumerate(providers)}
    styles = {v: ["-", "--", ":", "-."][i % 4] for i, v in enumerate(variants)}
    markers = {v: ["o", "s", "^", "D"][i % 4] for i, v in enumerate(variants)}
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(13, 5))
    for (prov, var, name), pts in sorted(lines.items()):
        pts.sort()
        xs = [p[0] for p in pts]
        kw = dict(color=colors[prov], linestyle=styles[var], marker=markers[var])
        ax_t.plot(xs, [p[1] for p in pts], label=name, **kw)
        ax_t.fill_between(xs, [p[2] for p in pts], [p[3] for p in pts], alpha=0.12, color=colors[prov])
        ax_m.plot(xs, [max(p[4] or 0, 1e-2) for p in pts], label=name, **kw)
    for ax, yl in ((ax_t, ylabel_time), (ax_m, "peak memory over inputs (MB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(yl)
        ax.grid(True, which="both", alpha=0.3)
    if lines:
        ax_m.legend(fontsize=7, loc="best")
    m = doc.get("machine", {})
    where = m.get("gpu_name") if str(m.get("device", "cpu")).startswith("cuda") else \
        f"{m.get('cpu_model')}, {m.get('torch_threads')} threads"
    fig.suptitle(f"{title} - {where}" + ("  [QUICK smoke run]" if doc.get("quick") else ""), fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ==============================================================================================================
# Command line shared options
# ==============================================================================================================
def default_max_memory_gb() -> float:
    try:
        with open("/proc/meminfo") as fh:
            total = int(fh.readline().split()[1]) / 1024**2
        return round(min(16.0, 0.6 * total), 1)
    except (OSError, ValueError, IndexError):  # pragma: no cover
        return 16.0


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


# ----------------------------------------------------------------------------------------------------------------
# Shared by the sweeps
# ----------------------------------------------------------------------------------------------------------------
ELEMENT_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}
OUR_PROVIDERS = ("torch", "triton")


def provider_phases(providers: Sequence[str], known: Sequence[str], baseline: str,
                    ours: Sequence[str] = OUR_PROVIDERS) -> List[List[str]]:
    """Validate ``providers`` against ``known`` and order them for a sweep.

    Within a size the ``baseline`` runs first (its row is the speedup baseline of the others). Our providers run
    over every size before the baselines do, so a time budget (``--max-total-min``) can only cut baseline rows at
    the largest sizes, never ours. Speedups are computed from the whole file at the end, so the order is free.
    """
    unknown = set(providers) - set(known)
    if unknown:
        raise SystemExit(f"unknown providers {sorted(unknown)}; choose from {list(known)}")
    ordered = ([baseline] if baseline in providers else []) + [p for p in providers if p != baseline]
    return [[p for p in ordered if p in ours], [p for p in ordered if p not in ours]]


def write_outputs(doc: Dict[str, Any], path: Path, markdown_text: str, *, plot_enabled: bool = True,
                  **plot_kwargs: Any) -> None:
    """Write ``<path>.md``, print the table, and plot ``<path>.png`` with :func:`plot` (``plot_kwargs``)."""
    path.with_suffix(".md").write_text(markdown_text + "\n")
    print()
    print(markdown_text)
    png = plot(doc, path.with_suffix(".png"), **plot_kwargs) if plot_enabled else None
    print(f"\nwrote {path}, {path.with_suffix('.md')}, {png}" if png else f"\nwrote {path}")
