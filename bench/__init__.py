"""Benchmarks of naclip-kernels: ``python -m bench attention|pamr|segment|all`` (see README, Performance).

Modules: :mod:`bench.common` (timing, memory, machine info, results, tables, plots), :mod:`bench.attention`,
:mod:`bench.pamr`, :mod:`bench.segment`, :mod:`bench.gpu_report` (AOT compile report + H100 roofline estimate),
:mod:`bench.readme_tables` (markdown from the results JSON). ``pytest bench/ --benchmark-only`` runs the
pytest-benchmark suite in ``bench/bench_*.py``.
"""
