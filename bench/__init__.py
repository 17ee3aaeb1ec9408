"""Benchmarks of naclip-kernels: ``python -m bench attention|pamr|segment|all`` (see README, Performance).

Benchmarks: :mod:`bench.attention`, :mod:`bench.pamr`, :mod:`bench.segment`, :mod:`bench.gpu_report` (AOT compile
report + H100 roofline estimate), :mod:`bench.readme_tables` (markdown from the results JSON). ``pytest bench/
--benchmark-only`` runs the pytest-benchmark suite in ``bench/bench_*.py``.

Machinery they share, one concern per module: :mod:`bench.stats` (percentiles), :mod:`bench.memory` (peak-memory
probes), :mod:`bench.timing` (timing one call), :mod:`bench.machine` (machine info, GPU peaks, measured matmul and
copy rates), :mod:`bench.isolation` (one subprocess per row), :mod:`bench.results_io` (results files),
:mod:`bench.sweep` (the sweep driver and derived columns), :mod:`bench.tables` (markdown), :mod:`bench.plots`
(PNG plots), :mod:`bench.cli_args` (shared command-line options).

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
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent   # the repository root (rows run from it, git info read in it)
