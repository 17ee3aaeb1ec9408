"""The benchmark framework itself (bench/): statistics, memory measurement, skip logic and the results schema.

Fast (tiny sizes, rows in-process except one isolated row); the benchmarks' numbers are not checked here.
"""
from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from bench import isolation, memory, results_io, stats, sweep, timing

LINUX = sys.platform.startswith("linux")


# ----------------------------------------------------------------------------------------------------- statistics
@pytest.mark.parametrize("values", [[3.0], [1.0, 2.0], [5.0, 1.0, 4.0, 2.0, 3.0], list(np.random.default_rng(0).random(17))])
@pytest.mark.parametrize("q", [0, 20, 50, 80, 100])
def test_percentile_matches_numpy(values, q):
    assert stats.percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_summarize_fields_and_order():
    s = stats.summarize([0.5, 0.1, 0.3, 0.2, 0.4])
    assert s["n"] == 5 and s["median_s"] == pytest.approx(0.3)
    assert s["min_s"] <= s["p20_s"] <= s["median_s"] <= s["p80_s"] <= s["max_s"]
    with pytest.raises(ValueError):
        stats.percentile([], 50)


def test_measure_respects_repeats_and_time_cap():
    calls = []
    out = timing.measure(lambda: calls.append(1), device="cpu", warmup=2, repeats=4, max_row_s=60)
    assert out["n"] == 4 and len(calls) == 1 + 1 + 4          # first call + one more warm-up + 4 timed
    import time

    out = timing.measure(lambda: time.sleep(0.05), device="cpu", warmup=1, repeats=100, max_row_s=0.12)
    assert 1 <= out["n"] <= 4
    out = timing.measure(lambda: None, device="cpu", warmup=0, repeats=3, max_row_s=60)
    assert out["n"] == 3 and out["times_s"][0] == out["first_call_s"]


# ----------------------------------------------------------------------------------------------------- memory
@pytest.mark.skipif(not LINUX, reason="VmHWM / clear_refs are Linux features")
def test_hwm_reset_works_here():
    assert memory.reset_hwm(), "/proc/self/clear_refs could not reset VmHWM: the fallback sampler would be used"


@pytest.mark.skipif(not LINUX, reason="VmHWM / clear_refs are Linux features")
def test_peak_memory_sees_a_transient_allocation():
    """A call that touches 256 MiB and frees it must show ~256 MiB extra peak; a no-op call almost nothing."""
    size_mb = 256

    def allocate():
        t = torch.ones(size_mb * memory.MB // 4)          # written, so resident
        return float(t[-1])

    pm = memory.PeakMemory("cpu")
    pm.set_baseline()
    out = timing.measure(allocate, device="cpu", warmup=1, repeats=2, max_row_s=30, pm=pm)
    assert size_mb * 0.9 <= out["peak_mb"] <= size_mb * 1.25, out
    assert size_mb * 0.9 <= out["transient_mb"] <= size_mb * 1.25, out
    pm = memory.PeakMemory("cpu")
    pm.set_baseline()
    idle = timing.measure(lambda: None, device="cpu", warmup=1, repeats=2, max_row_s=30, pm=pm)
    assert idle["peak_mb"] < 16, idle


# ----------------------------------------------------------------------------------------------------- sweeps
def fake_row(spec):
    """Target for the skip-logic test: time proportional to the 'cost' field, 1 MB per unit of cost."""
    return {"median_s": 10.0 * spec["size"], "p20_s": 10.0 * spec["size"], "p80_s": 10.0 * spec["size"], "n": 1,
            "peak_mb": float(spec["size"]), "first_call_s": 1.0}


def _args(tmp_path, **kw):
    base = dict(device="cpu", quick=True, warmup=1, repeats=2, max_row_s=1.0, max_call_s=60.0, max_memory_gb=1.0,
                out=tmp_path, resume=False, no_isolate=True, no_plot=True)
    base.update(kw)
    return SimpleNamespace(**base)


def test_sweep_skips_predicted_slow_and_large_rows_and_resumes(tmp_path):
    target = "tests.test_bench_framework:fake_row"
    first = sweep.Sweep("fake", _args(tmp_path), ["provider", "size"], {})
    r1 = first.run({"provider": "p", "size": 1}, target, series="p", cost=1)
    r2 = first.run({"provider": "p", "size": 10}, target, series="p", cost=10)        # predicted 100 s > 60 s
    r3 = first.run({"provider": "p", "size": 2}, target, series="p", cost=2,
                   memory_estimate=5 * 1024**3)                                      # 5 GB > 1 GB
    assert r1["status"] == "ok" and r2["status"] == "skipped" and "max-call-s" in r2["reason"]
    assert r3["status"] == "skipped" and "max-memory-gb" in r3["reason"]
    first.finish(["size"], "p")
    again = sweep.Sweep("fake", _args(tmp_path, resume=True), ["provider", "size"], {})
    r1b = again.run({"provider": "p", "size": 1}, "tests.test_bench_framework:does_not_exist", series="p", cost=1)
    assert r1b.get("resumed") and r1b["median_s"] == 10.0
    # Resuming with another provider only keeps the earlier provider's rows in the file.
    other = sweep.Sweep("fake", _args(tmp_path, resume=True), ["provider", "size"], {})
    other.run({"provider": "q", "size": 1}, target, series="q", cost=1)
    doc = other.finish(["size"], "p")
    assert {(r["provider"], r["size"]) for r in doc["rows"] if r["status"] == "ok"} == {("p", 1), ("q", 1)}
    assert next(r for r in doc["rows"] if r["provider"] == "q")["speedup"] == pytest.approx(1.0)


def test_failing_row_is_recorded_not_raised(tmp_path):
    failing = sweep.Sweep("fake", _args(tmp_path), ["provider", "size"], {})
    row = failing.run({"provider": "p", "size": 1}, "tests.test_bench_framework:does_not_exist", series="p", cost=1)
    assert row["status"] == "error" and "does_not_exist" in row["reason"]


def test_isolated_row_runs_in_a_subprocess():
    spec = {"provider": "torch", "h": 3, "w": 4, "batch": 1, "heads": 2, "dim": 8, "sigma": 5.0, "prefix": 1,
            "similarity": "kk", "dtype": "float32", "device": "cpu", "warmup": 1, "repeats": 2, "max_row_s": 5}
    row = isolation.run_row("bench.attention:run_one", spec, isolate=True, timeout_s=120)
    assert row["status"] == "ok", row
    assert row["n"] >= 1 and row["median_s"] > 0 and "VmHWM" in row["memory_method"]


# ----------------------------------------------------------------------------------------------------- schema
MACHINE_KEYS = {"platform", "cpu_model", "cpu_count", "torch_threads", "torch", "triton", "cuda_runtime",
                "gpu_name", "git_commit", "git_dirty", "device", "timestamp_utc"}
ROW_KEYS_OK = {"provider", "status", "dtype", "median_s", "p20_s", "p80_s", "n", "first_call_s", "peak_mb",
               "memory_method", "speedup", "run_id"}


def _check_doc(doc, bench):
    assert doc["benchmark"] == bench and doc["quick"] is True and doc["schema"] == results_io.SCHEMA_VERSION
    assert MACHINE_KEYS <= set(doc["machine"]), MACHINE_KEYS - set(doc["machine"])
    assert doc["reference_rates"]["matmul"]["gflops"] > 0
    ok = [r for r in doc["rows"] if r["status"] == "ok"]
    assert ok, doc["rows"]
    for r in ok:
        assert ROW_KEYS_OK <= set(r), ROW_KEYS_OK - set(r)
        assert r["p20_s"] <= r["median_s"] <= r["p80_s"]
        assert r["machine"]["torch"] == torch.__version__ and "git_commit" in r["machine"]
    return ok


def test_attention_quick_run_schema(tmp_path):
    from bench import attention

    doc = attention.main(["--quick", "--no-isolate", "--out", str(tmp_path), "--providers", "eager,torch,triton",
                          "--grids", "3x4", "--repeats", "2"])
    ok = _check_doc(doc, "attention")
    assert {r["provider"] for r in ok} == {"eager", "torch"}
    for r in ok:
        assert r["shape_qkv"][2] == r["n_tokens"] and r["flops"] > 0 and r["gflops"] > 0
        assert r["speedup"] is not None
    triton_rows = [r for r in doc["rows"] if r["provider"] == "triton"]
    assert all(r["status"] in ("unavailable", "ok") and (r["status"] == "ok" or r["reason"]) for r in triton_rows)
    saved = json.loads((tmp_path / "attention_cpu_quick.json").read_text())
    assert len(saved["rows"]) == len(doc["rows"])
    assert (tmp_path / "attention_cpu_quick.md").exists()


def test_pamr_quick_run_schema_and_readme_tables(tmp_path, capsys):
    from bench import pamr, readme_tables

    doc = pamr.main(["--quick", "--no-isolate", "--out", str(tmp_path), "--images", "24x32", "--queries", "2",
                     "--repeats", "2", "--providers", "reference,torch"])
    ok = _check_doc(doc, "pamr")
    assert {r["provider"] for r in ok} == {"reference", "torch"}
    assert all(r["gbps"] > 0 for r in ok)
    torch_rows = [r for r in ok if r["provider"] == "torch"]
    assert all(r["row_rates"]["matmul"]["gflops"] > 0 and r["row_rates"]["copy"]["gbps"] > 0 for r in torch_rows)
    assert all(r["x_floor"] == pytest.approx(r["median_s"] / r["floor_s"]) for r in torch_rows)
    assert not any("row_rates" in r for r in ok if r["provider"] == "reference")
    capsys.readouterr()
    readme_tables.main(["--quick", "--dir", str(tmp_path), "--benches", "pamr"])
    text = capsys.readouterr().out
    assert "| image | queries |" in text and "ESTIMATE" in text


def test_gpu_report_estimate_is_labelled():
    from bench import gpu_report

    doc = gpu_report.build(skip_aot=True)
    assert doc["roofline_is_estimate"] is True
    att = {(r["case"], r["grid"]): r for r in doc["attention_estimates"]}
    r = att[("B*H=12", "64x64")]
    assert r["flops"] == pytest.approx(4 * 4097**2 * 64 * 12)
    assert r["floor_s"] == pytest.approx(max(r["compute_s"], r["bytes_s"], r["sfu_s"]))
    assert "ESTIMATE" in gpu_report.markdown(doc)


def test_pamr_floors_are_the_larger_of_fma_and_traffic_and_cpu_only():
    from bench import pamr

    row = {"provider": "torch", "status": "ok", "image": "8x8", "classes": 2, "dtype": "float32", "median_s": 0.5,
           "flops": 2e9, "bytes": 4e9}
    doc = {"machine": {"device": "cpu"}, "reference_rates": {"matmul": {"gflops": 10.0}, "copy": {"gbps": 2.0}},
           "rows": [dict(row), dict(row, provider="reference", status="skipped")]}
    pamr.add_floors(doc)
    r = doc["rows"][0]
    assert r["floor_fma_s"] == pytest.approx(0.2) and r["floor_copy_s"] == pytest.approx(2.0)
    assert r["floor_s"] == pytest.approx(2.0) and r["x_floor"] == pytest.approx(0.25)
    assert "floor_s" not in doc["rows"][1]
    assert ("| 8x8 | 2 | float32 | torch | 500 ms | 10 GFLOP/s | 2.0 GB/s | 200 ms | 2.00 s | 0.2x | 2.5x |"
            in pamr.floors_markdown(doc))
    # A row's own probe (taken in its process just before it) wins over the run's, at its fastest call's rates.
    own = dict(row, row_rates={"matmul": {"gflops": 0.5, "best_gflops": 1.0},
                               "copy": {"gbps": 20.0, "best_gbps": 40.0}})
    doc_own = dict(doc, rows=[own])
    pamr.add_floors(doc_own)
    assert own["floor_fma_s"] == pytest.approx(2.0) and own["floor_copy_s"] == pytest.approx(0.1)
    assert own["floor_s"] == pytest.approx(2.0) and own["x_floor"] == pytest.approx(0.25)
    assert "| 1 GFLOP/s | 40.0 GB/s |" in pamr.floors_markdown(doc_own)
    cuda = dict(doc, machine={"device": "cuda"}, rows=[dict(row)])
    pamr.add_floors(cuda)
    assert "floor_s" not in cuda["rows"][0] and pamr.floors_markdown(cuda) == ""
