"""pytest-benchmark suite configuration (``pytest bench/ --benchmark-only``).

``BENCH_QUICK=1`` shrinks every size to a smoke test. CPU tensors use float32, CUDA tensors float16.
"""
from __future__ import annotations

import os

import pytest
import torch

QUICK = os.environ.get("BENCH_QUICK", "") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.float16 if DEVICE == "cuda" else torch.float32


def pytest_report_header(config):
    return (f"naclip-kernels benchmark suite: device={DEVICE} dtype={DTYPE} quick={QUICK} "
            f"torch={torch.__version__} threads={torch.get_num_threads()}")


@pytest.fixture
def device():
    return DEVICE


def run_pedantic(benchmark, fn, rounds: int, group: str, **extra):
    """One warm-up, then ``rounds`` timed rounds of one call each (CUDA synchronised)."""
    benchmark.group = group
    benchmark.extra_info.update(extra)

    def call():
        out = fn()
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        return out

    return benchmark.pedantic(call, rounds=rounds, warmup_rounds=1, iterations=1)
