"""``python -m bench proxy`` machinery: a quick in-process run, its derived columns, and the GPU estimate rows.

The numbers themselves are not checked (no timing assertions); the schema and the arithmetic of the derived
columns are.
"""
from __future__ import annotations

import json

import pytest
import torch

from bench import proxy


def test_quick_run_schema_and_derived_columns(tmp_path):
    doc = proxy.main(["--quick", "--no-isolate", "--out", str(tmp_path), "--providers", "original,torch,triton",
                      "--cases", "quick_4x4", "--repeats", "2", "--no-plot", "--no-segmenter"])
    ok = [r for r in doc["rows"] if r["status"] == "ok"]
    assert {(r["provider"], r["features"]) for r in ok} == {(p, f) for p in ("original", "torch")
                                                            for f in ("random", "regions")}
    rate = doc["reference_rates"]["matmul"]["gflops"]
    original_peak = {r["features"]: r["peak_mb"] for r in ok if r["provider"] == "original"}
    for r in ok:
        assert r["flops"] == 2.0 * 16 * 16 * (32 + 2 * 16)
        assert r["x_floor"] == pytest.approx(r["median_s"] * rate * 1e9 / r["flops"])
        assert r["speedup"] is not None
        # At this tiny size the original's extra peak is a few pages, and can read 0.0 MB in-process: no ratio then.
        base = original_peak[r["features"]]
        if base > 0:
            assert r["mem_vs_original"] == pytest.approx(r["peak_mb"] / base)
        else:
            assert r.get("mem_vs_original") is None
    assert all(r["status"] == "unavailable" and "CUDA" in r["reason"] for r in doc["rows"] if r["provider"] == "triton")
    saved = json.loads((tmp_path / "proxy_cpu_quick.json").read_text())
    assert all("x_floor" in r for r in saved["rows"] if r["status"] == "ok")
    text = (tmp_path / "proxy_cpu_quick.md").read_text()
    assert "speedup vs original" in text and "x floor" in text


def test_region_feature_map_is_piecewise_constant_plus_noise():
    feats = proxy.region_feature_map(6, 9, 5, torch.Generator().manual_seed(0), regions=3, noise=0.0)
    grid = feats[0].view(6, 9, 5)
    assert torch.equal(grid[0, 0], grid[1, 2]) and not torch.equal(grid[0, 0], grid[0, 3])
    assert len({tuple(t.tolist()) for t in feats[0]}) == 9


def test_gpu_report_proxy_estimate():
    from bench import gpu_report

    doc = gpu_report.build(skip_aot=True)
    rows = {r["case"]: r for r in doc["proxy_estimates"]}
    sam = rows["sam_b_1024"]
    assert sam["flops"] == pytest.approx(2 * 4096**2 * (256 + 768))
    assert sam["floor_s"] == pytest.approx(max(sam["compute_s"], sam["bytes_s"], sam["sfu_s"]))
    assert sam["original_floor_s"] > sam["floor_s"]
    assert "Proxy attention (ProxyCLIP)" in gpu_report.markdown(doc)
