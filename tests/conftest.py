"""Shared fixtures: deterministic fresh random inputs, NaN poisoning, and Triton-interpreter gating."""
from __future__ import annotations

import os
import subprocess
import sys
import zlib

import pytest
import torch

from naclip_kernels._triton_compat import HAS_TRITON, interpreter_enabled

requires_triton_interpreter = pytest.mark.skipif(
    not (HAS_TRITON and interpreter_enabled()),
    reason="Triton kernels run on CPU only under TRITON_INTERPRET=1 (set before import); the README test command sets it",
)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_python(code: str, *, triton_interpreter: bool = False) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh Python with this checkout importable; without ``TRITON_INTERPRET`` unless asked.

    Interpret mode is fixed when Triton kernels are decorated (import time), so behaviour that depends on it,
    such as the refusal of CPU tensors by the compiled Triton backend, can only be checked in another process.
    """
    env = {key: val for key, val in os.environ.items() if key != "TRITON_INTERPRET"}
    if triton_interpreter:
        env["TRITON_INTERPRET"] = "1"
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def stub_autotuner_benchmark(monkeypatch, tuner) -> list:
    """Let ``tuner`` (a ``triton.autotune`` object) run its whole launch path under the interpreter.

    Triton's benchmarker needs an active GPU driver, so it is replaced by a stub that still runs each candidate
    once (interpreted, as the benchmarker would) and reports made-up timings that make the LAST candidate win.
    Caching across calls and runs is off, so the test sees pruning and benchmarking happen. Returns the list the
    stub appends each benchmarked candidate to.
    """
    candidates: list = []

    def fake_do_bench(kernel_call, quantiles=None, **kwargs):
        kernel_call()
        candidates.append(kernel_call)
        return [1.0 / len(candidates)] * 3

    # do_bench is a cached_property that asks for the driver: shadow it in the instance dict instead.
    monkeypatch.setitem(tuner.__dict__, "do_bench", fake_do_bench)
    monkeypatch.setattr(tuner, "cache_results", False, raising=False)  # no disk cache between test runs
    monkeypatch.setattr(tuner, "cache", {})
    return candidates


@pytest.fixture
def rng(request) -> torch.Generator:
    """A generator seeded from the test id: fresh inputs for every test, the same inputs on every run.

    crc32 rather than ``hash``: Python salts ``hash(str)`` per process, which would make a failure unreproducible.
    ``NACLIP_TEST_SEED=<int>`` shifts every seed to draw a new set of inputs.
    """
    seed = (zlib.crc32(request.node.nodeid.encode()) + int(os.environ.get("NACLIP_TEST_SEED", "0"))) % (2**31)
    return torch.Generator().manual_seed(seed)


def pytest_report_header(config):
    return (f"torch {torch.__version__}, triton interpreter {'on' if interpreter_enabled() else 'off'}, "
            f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')!r}")


# CI sets NACLIP_FORBID_SKIPS=1: there every dependency is installed and the interpreter is on, so a skipped test
# is a check that silently did not run. The run then fails and names the skipped tests.
_SKIPPED: list = []


def pytest_runtest_logreport(report):
    if report.skipped and not hasattr(report, "wasxfail"):
        _SKIPPED.append(report.nodeid)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if _SKIPPED and os.environ.get("NACLIP_FORBID_SKIPS") == "1":
        terminalreporter.write_line(f"NACLIP_FORBID_SKIPS=1: {len(_SKIPPED)} test(s) skipped, failing the run:",
                                    red=True)
        for nodeid in _SKIPPED:
            terminalreporter.write_line(f"  {nodeid}")


def pytest_sessionfinish(session, exitstatus):
    if _SKIPPED and os.environ.get("NACLIP_FORBID_SKIPS") == "1" and exitstatus == 0:
        session.exitstatus = 1
