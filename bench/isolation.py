"""One subprocess per benchmark row (``python -m bench._worker``), and the in-process call that turns a
row's exceptions into status rows."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any, Dict

from bench import ROOT


def run_row(target: str, spec: Dict[str, Any], *, isolate: bool = True, timeout_s: float = 600.0) -> Dict[str, Any]:
    """Run ``module:function(spec) -> dict`` in a fresh ``python -m bench._worker`` (or in-process).

    Never raises for a failing row: returns ``{"status": "error" | "timeout" | "killed", "reason": ...}``.
    """
    if not isolate:
        return call_target(target, spec)
    with tempfile.TemporaryDirectory(prefix="naclip_bench_") as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_path.write_text(json.dumps({"target": target, "spec": spec}))
        env = dict(os.environ)
        env.pop("TRITON_INTERPRET", None)   # never time interpreted kernels
        env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        try:
            proc = subprocess.run([sys.executable, "-m", "bench._worker", str(spec_path), str(out_path)],
                                  cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return {"status": "timeout", "reason": f"row exceeded the {timeout_s:.0f} s subprocess timeout"}
        if out_path.exists():
            return json.loads(out_path.read_text())
        if proc.returncode < 0 or proc.returncode == 137:
            signal = -proc.returncode if proc.returncode < 0 else 9
            return {"status": "killed", "reason": f"subprocess killed by signal {signal} (most likely out of memory)"}
        tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-5:]
        return {"status": "error", "reason": f"worker exited with {proc.returncode}: " + " | ".join(tail)}


def call_target(target: str, spec: Dict[str, Any]) -> Dict[str, Any]:
    """Import and call ``module:function(spec)``; turn exceptions into an error row."""
    import importlib

    module_name, func_name = target.split(":")
    try:
        func = getattr(importlib.import_module(module_name), func_name)
        out = func(spec)
        out.setdefault("status", "ok")
        return out
    except Unavailable as exc:
        return {"status": "unavailable", "reason": str(exc)}
    except MemoryError as exc:
        return {"status": "oom", "reason": f"MemoryError: {exc}"}
    except Exception as exc:  # noqa: BLE001 - a benchmark row must not kill the run
        msg = f"{type(exc).__name__}: {exc}".strip()
        if "out of memory" in msg.lower():
            return {"status": "oom", "reason": msg[:500]}
        return {"status": "error", "reason": msg[:500], "traceback": traceback.format_exc()[-2000:]}


class Unavailable(RuntimeError):
    """A provider that cannot run here (missing op, no GPU, unsupported by this torch): the row is skipped."""
