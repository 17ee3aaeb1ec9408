"""Timing one call: warm-up, samples under a time cap, percentiles and peak memory (protocol in :mod:`bench`)."""
from __future__ import annotations

import time
from typing import Any, Callable, Dict, List, Optional

from bench.isolation import Unavailable
from bench.memory import MB, PeakMemory
from bench.stats import summarize


def sync(device: str) -> None:
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
    sync(device)
    t0 = time.perf_counter()
    result = call()
    sync(device)
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
        sync(device)
        before = pm.start()
    def done() -> bool:
        # Enough samples, or the time cap reached, or one more call would overshoot it by a half.
        if len(times) >= max(1, repeats):
            return True
        return bool(times) and (elapsed >= max_row_s or elapsed + times[-1] > 1.5 * max_row_s)

    while not done():
        sync(device)
        t0 = time.perf_counter()
        result = call()
        sync(device)
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
    # The first call of any torch.library custom op imports torch._dynamo (custom_op wraps its kernels in
    # torch._disable_dynamo), ~80 MB resident for the process's life: a one-off of the registration, not of any
    # provider's working memory. Every provider, ours and the baselines, gets it before the baseline.
    import torch._dynamo  # noqa: F401
    sync(device)
