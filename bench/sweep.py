"""The sweep driver shared by the benchmarks: row order, budget-based skipping, resume, saving after every row,
and the derived columns (speedup over the baseline, achieved rates against the machine's ceilings)."""
from __future__ import annotations

import datetime as _dt
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

from bench.isolation import run_row
from bench.machine import gpu_peaks, machine_info
from bench.memory import MB, MEMORY_METHOD_DOC
from bench.results_io import SCHEMA_VERSION, load_results, results_path, row_key, save_results

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
