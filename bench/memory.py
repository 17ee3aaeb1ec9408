"""Peak-memory probes: process RSS high-water mark on CPU (``VmHWM`` + ``clear_refs``), allocator peak on CUDA.

The protocol is in :mod:`bench` (package docstring); :data:`MEMORY_METHOD_DOC` is the version stored in results.
"""
from __future__ import annotations

import ctypes
import threading
import time
from typing import Optional

MB = 1024 * 1024


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


MEMORY_METHOD_DOC = (
    "peak_mb = extra peak memory over the inputs in steady state. CPU: each row runs in a fresh subprocess; after "
    "the inputs are allocated and freed heap pages returned (malloc_trim) the RSS is the baseline; /proc/self/"
    "clear_refs=5 resets the kernel's VmHWM high-water mark before the timed calls; peak_mb = VmHWM after them - "
    "baseline (includes memory the provider keeps between calls, e.g. a cached bias). transient_mb = VmHWM - RSS "
    "just before the timed calls. first_call_peak_mb = high-water mark of the first call (compile, cache build) over "
    "the baseline. CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus memory_allocated "
    "after the inputs."
)
