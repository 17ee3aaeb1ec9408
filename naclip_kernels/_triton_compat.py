"""Import Triton when it is there, and stand in for it when it is not.

Triton ships only for Linux x86-64 (it comes with the CUDA build of torch); a laptop may have torch without it.
Kernel modules import ``triton`` and ``tl`` from here so that their ``@triton.jit`` definitions still evaluate
(to inert placeholders) and ``import naclip_kernels`` works everywhere. Whether a kernel can actually run is
decided by :func:`naclip_kernels._backend.resolve_backend`, which names the reason when it cannot.
"""
from __future__ import annotations

import inspect
import os

try:  # pragma: no cover - exercised by whichever branch the machine has
    import triton
    import triton.language as tl

    HAS_TRITON = True
    TRITON_IMPORT_ERROR: str | None = None
except ImportError as exc:  # pragma: no cover
    HAS_TRITON = False
    TRITON_IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

    class _Inert:
        """Placeholder for a Triton kernel or decorator when Triton is not installed."""

        def __init__(self, *args, **kwargs):
            self.fn = args[0] if args and callable(args[0]) else None

        def __call__(self, *args, **kwargs):
            if self.fn is None and len(args) == 1 and callable(args[0]) and not kwargs:
                return _Inert(args[0])
            raise RuntimeError(f"Triton is not installed ({TRITON_IMPORT_ERROR}); this kernel cannot run")

        def __getitem__(self, grid):
            return self

    class _TritonStub:
        jit = _Inert
        autotune = _Inert
        heuristics = _Inert
        Config = _Inert

        @staticmethod
        def cdiv(a, b):
            return -(-a // b)

        @staticmethod
        def next_power_of_2(n):
            return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()

    class _LanguageStub:
        constexpr = int

        def __getattr__(self, name):
            raise RuntimeError(f"triton.language.{name} used without Triton installed")

    triton = _TritonStub()  # type: ignore[assignment]
    tl = _LanguageStub()  # type: ignore[assignment]


def _autotune_cache_kwargs() -> dict:
    """``{"cache_results": True}`` when this Triton's ``triton.autotune`` takes ``cache_results`` (3.3+), else ``{}``.

    With it, the autotuner writes the winning config of each key to Triton's on-disk cache (``TRITON_CACHE_DIR``,
    default ``~/.triton/cache``), so every later process on the machine (each ``torchrun`` rank, each new
    ``naclip eval``) loads it instead of benchmarking all configs again. Cache entries are keyed by the kernel
    source, the configs, the autotune key values and the GPU, so a change to any of them retunes. Older Triton
    (no such argument) tunes once per process; ``TRITON_CACHE_AUTOTUNING=1`` turns caching on there where the
    installed version reads that variable. Triton itself never caches under the interpreter.
    """
    if not HAS_TRITON:
        return {}
    try:
        params = inspect.signature(triton.autotune).parameters
    except (TypeError, ValueError):  # pragma: no cover - a C-level or wrapped callable without a signature
        return {}
    return {"cache_results": True} if "cache_results" in params else {}


AUTOTUNE_CACHE_KWARGS = _autotune_cache_kwargs()


def interpreter_enabled() -> bool:
    """True when Triton kernels were defined under ``TRITON_INTERPRET=1`` and run on the CPU.

    Triton fixes interpret mode when a kernel is *decorated* (module import time), so this reads the knob Triton
    itself read; setting the variable after ``naclip_kernels`` was imported has no effect.
    """
    if not HAS_TRITON:
        return False
    knobs = getattr(triton, "knobs", None)
    if knobs is not None and hasattr(knobs, "runtime"):
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
