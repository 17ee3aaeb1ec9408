"""Ahead-of-time (AOT) GPU-readiness check: compile every kernel configuration for real GPUs without a GPU.

For each :class:`~naclip_kernels._aot_spec.KernelConfig` returned by the ``aot_configs()`` of the op modules
(:data:`OP_MODULES`), this compiles the Triton kernel for ``sm_80`` (A100) and ``sm_90`` (H100) with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` and reads the cubin's resource usage with
``cuobjdump --dump-resource-usage`` (shipped in the Triton wheel). One row per (config, target):

    op, kernel, config, target, registers, spill_bytes (cuobjdump STACK + LOCAL), shared_bytes, ok, error

``shared_bytes`` is the dynamic shared memory Triton requests at launch (``metadata.shared``) plus any static shared
memory cuobjdump reports. A config "spills" when ``spill_bytes > 0``; registers at 255 with spills means the
config would run with local-memory traffic on a real GPU and must not be in an autotune list.

Usage::

    python -m naclip_kernels.aot [--json PATH] [--defaults-only [--full-head-dims 64]] [--head-dims 64,128]
                                 [--ops neighbour_attention] [--targets 80,90] [--jobs N] [--update REPORT]

    # the committed reports, one per Triton release setup.py admits (run once under each release):
    python -m naclip_kernels.aot --update bench/results/aot/triton-$(python -c "import triton; print(triton.__version__)").json

The JSON report records the toolchain it was made with (Triton, its ptxas, torch) and, per row, a hash of the
kernel module's ``@triton.jit`` sources, so a stale report is detectable (``tests/test_aot.py`` checks that each
committed report covers every current config with the current kernel source). ``--update`` recompiles only the
rows that are missing or stale.

    from naclip_kernels.aot import run_aot, format_table
    rows = run_aot()               # list of dicts; works from a process running under TRITON_INTERPRET=1 too

Triton fixes interpret mode when a kernel is decorated (module import), and an interpreted kernel cannot be
compiled, so when the calling process is interpreting, :func:`run_aot` re-runs this module in a subprocess with
``TRITON_INTERPRET`` removed from the environment and reads its JSON back.

``KernelConfig.tags`` keys understood here: ``"divisible_by_16"``, a list of argument names (pointers, strides)
that a real launch would see 16-divisible, compiled with ``tt.divisibility=16`` as Triton's JIT would do.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import importlib
import inspect
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
from typing import Any, Dict, List, Optional, Sequence, Tuple

from naclip_kernels._aot_spec import KernelConfig

OP_MODULES = ("naclip_kernels.ops.neighbour_attention", "naclip_kernels.ops.pamr",
              "naclip_kernels.ops.proxy_attention")
DEFAULT_TARGETS = (80, 90)

__all__ = ["OP_MODULES", "collect_configs", "compile_config", "run_aot", "format_table", "ptxas_available",
           "cuobjdump_path", "kernel_source_hash", "report_document", "toolchain_versions", "update_report", "main"]


# --------------------------------------------------------------------------------------------------------------
# Tools
# --------------------------------------------------------------------------------------------------------------
def _nvidia_bin(name: str) -> Optional[str]:
    try:
        import triton
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if os.path.isfile(path) and os.access(path, os.X_OK):
        return path
    return shutil.which(name)


def cuobjdump_path() -> Optional[str]:
    """``cuobjdump`` from the Triton wheel (or PATH), or ``None``."""
    env = os.environ.get("TRITON_CUOBJDUMP_PATH")
    return env if env and os.path.isfile(env) else _nvidia_bin("cuobjdump")


def ptxas_available() -> Tuple[bool, str]:
    """Whether the NVIDIA backend can assemble cubins here (needs Triton, ptxas and cuobjdump); with the reason."""
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return False, f"Triton is not installed ({exc})"
    ptxas = os.environ.get("TRITON_PTXAS_PATH") or _nvidia_bin("ptxas")
    if not ptxas or not os.path.isfile(ptxas):
        return False, "ptxas not found (Triton wheel without backends/nvidia/bin/ptxas, and none on PATH)"
    if cuobjdump_path() is None:
        return False, "cuobjdump not found (Triton wheel without backends/nvidia/bin/cuobjdump, and none on PATH)"
    try:
        subprocess.run([ptxas, "--version"], capture_output=True, check=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        return False, f"ptxas at {ptxas} does not run: {exc}"
    return True, ""


# --------------------------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------------------------
def collect_configs(ops: Optional[Sequence[str]] = None, defaults_only: bool = False,
                    head_dims: Optional[Sequence[int]] = None,
                    full_head_dims: Optional[Sequence[int]] = None) -> List[KernelConfig]:
    """Every ``KernelConfig`` of the op modules, optionally only the defaults and/or only some head dims.

    ``ops`` filters by module short name (``"neighbour_attention"``, ``"pamr"``). ``head_dims`` keeps configs
    whose ``tags["head_dim"]`` is listed (configs without that tag, e.g. PAMR's, are always kept).
    ``full_head_dims`` (with ``defaults_only``): also keep the non-default configs of these head dims.
    """
    configs: List[KernelConfig] = []
    for module_name in OP_MODULES:
        if ops is not None and module_name.rsplit(".", 1)[-1] not in ops:
            continue
        module = importlib.import_module(module_name)
        getter = getattr(module, "aot_configs", None)
        if getter is None:
            continue
        for cfg in getter():
            if defaults_only and not cfg.default:
                if full_head_dims is None or cfg.tags.get("head_dim") not in full_head_dims:
                    continue
            if head_dims is not None and "head_dim" in cfg.tags and cfg.tags["head_dim"] not in head_dims:
                continue
            configs.append(cfg)
    return configs


def _config_label(cfg: KernelConfig) -> str:
    return cfg.name


# --------------------------------------------------------------------------------------------------------------
# Kernel source identity
# --------------------------------------------------------------------------------------------------------------
def _is_triton_function(obj: Any) -> bool:
    return type(obj).__name__ in ("JITFunction", "InterpretedFunction") and callable(getattr(obj, "fn", None))


def kernel_source_hash(kernel: Any) -> str:
    """SHA-256 (16 hex digits) of the source of every ``@triton.jit`` function in the kernel's module.

    Registers and spills depend on the kernel and on the jitted helpers it calls, so any edit to one of them makes
    a committed report stale. Computed from the Python source text, so it is the same under the interpreter and
    for every Triton release (which is what lets the test suite check a report made with another Triton).
    """
    fn = getattr(kernel, "fn", kernel)
    module = sys.modules[fn.__module__]
    parts = []
    for name in sorted(vars(module)):
        obj = vars(module)[name]
        if _is_triton_function(obj) and obj.fn.__module__ == module.__name__:
            parts.append(f"{name}\n{inspect.getsource(obj.fn)}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------------------------
# Compile one config
# --------------------------------------------------------------------------------------------------------------
_USAGE_RE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def parse_resource_usage(text: str) -> Dict[str, int]:
    """Parse ``cuobjdump --dump-resource-usage`` output (first kernel entry): registers, stack, shared, local."""
    match = _USAGE_RE.search(text)
    if match is None:
        raise ValueError(f"no 'REG:.. STACK:.. SHARED:.. LOCAL:..' line in cuobjdump output: {text[-400:]!r}")
    reg, stack, shared, local = (int(x) for x in match.groups())
    return {"registers": reg, "stack": stack, "static_shared": shared, "local": local}


def compile_config(cfg: KernelConfig, arch: int) -> Dict[str, Any]:
    """Compile one config for ``sm_<arch>`` and return its row (never raises; errors go to ``row["error"]``)."""
    row: Dict[str, Any] = {
        "op": cfg.op, "kernel": getattr(cfg.kernel, "__name__", str(cfg.kernel)), "config": _config_label(cfg),
        "target": f"sm_{arch}", "num_warps": cfg.num_warps, "num_stages": cfg.num_stages, "default": cfg.default,
        "tags": {k: v for k, v in cfg.tags.items() if isinstance(v, (int, float, str, bool))},
        "registers": None, "spill_bytes": None, "shared_bytes": None, "ok": False, "error": None,
        "source_hash": kernel_source_hash(cfg.kernel),
    }
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        kernel = cfg.kernel
        if not hasattr(kernel, "arg_names") or type(kernel).__name__ == "InterpretedFunction":
            raise RuntimeError("kernel is not a JITFunction (imported under TRITON_INTERPRET=1?)")
        attrs = {}
        for name in cfg.tags.get("divisible_by_16", ()):
            attrs[(kernel.arg_names.index(name),)] = [["tt.divisibility", 16]]
        src = ASTSource(fn=kernel, signature=dict(cfg.signature), constexprs=dict(cfg.constexprs), attrs=attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
        cubin = compiled.asm["cubin"]
        with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as handle:
            handle.write(cubin)
            path = handle.name
        try:
            tool = cuobjdump_path()
            if tool is None:
                raise RuntimeError("cuobjdump not found")
            result = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True,
                                    timeout=120)
            if result.returncode != 0:
                raise RuntimeError(f"cuobjdump failed: {result.stderr.strip()[-400:]}")
            usage = parse_resource_usage(result.stdout)
        finally:
            os.unlink(path)
        row["registers"] = usage["registers"]
        row["spill_bytes"] = usage["stack"] + usage["local"]
        row["shared_bytes"] = int(compiled.metadata.shared) + usage["static_shared"]
        row["ok"] = True
    except Exception as exc:  # report, do not abort the whole table
        text = " ".join(str(exc).split())
        row["error"] = f"{type(exc).__name__}: {text[-500:]}"
    return row


# Worker state for the process pool: configs are re-collected in each worker (kernels are not picklable).
_WORKER_CONFIGS: List[KernelConfig] = []


def _worker_init(ops, defaults_only, head_dims, full_head_dims):
    global _WORKER_CONFIGS
    _WORKER_CONFIGS = collect_configs(ops, defaults_only, head_dims, full_head_dims)


def _worker_compile(index_arch):
    index, arch = index_arch
    return compile_config(_WORKER_CONFIGS[index], arch)


def _run_in_process(ops, defaults_only, head_dims, full_head_dims, targets, jobs,
                    only: Optional[Sequence[Tuple[str, str, int]]] = None) -> List[Dict[str, Any]]:
    """Compile the selection here; ``only``: restrict to these (op, config name, arch) triples."""
    configs = collect_configs(ops, defaults_only, head_dims, full_head_dims)
    work = [(i, arch) for i in range(len(configs)) for arch in targets]
    if only is not None:
        keep = set(only)
        work = [(i, arch) for i, arch in work if (configs[i].op, configs[i].name, arch) in keep]
    if jobs <= 1 or len(work) <= 1:
        return [compile_config(configs[i], arch) for i, arch in work]
    ctx = multiprocessing.get_context("fork")  # compile-only workers: no CUDA context to break by forking
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_worker_init,
                                                initargs=(ops, defaults_only, head_dims, full_head_dims)) as pool:
        return list(pool.map(_worker_compile, work))


def _interpreting() -> bool:
    from naclip_kernels._triton_compat import interpreter_enabled

    return interpreter_enabled() or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def run_aot(ops: Optional[Sequence[str]] = None, defaults_only: bool = False,
            head_dims: Optional[Sequence[int]] = None, full_head_dims: Optional[Sequence[int]] = None,
            targets: Sequence[int] = DEFAULT_TARGETS,
            jobs: Optional[int] = None, timeout: Optional[float] = None) -> List[Dict[str, Any]]:
    """Compile the selected configs for each target and return one row (dict) per (config, target).

    Selection as in :func:`collect_configs`. Runs in this process when it is not interpreting Triton kernels, otherwise in a subprocess without
    ``TRITON_INTERPRET``. ``jobs``: parallel compile processes (default: ``min(4, cpu count)``).
    Raises ``RuntimeError`` if ptxas/cuobjdump are missing (see :func:`ptxas_available`).
    """
    ok, reason = ptxas_available()
    if not ok:
        raise RuntimeError(f"AOT compile unavailable: {reason}")
    if jobs is None:
        jobs = max(1, min(4, os.cpu_count() or 1))
    targets = tuple(int(t) for t in targets)
    if not _interpreting():
        return _run_in_process(ops, defaults_only, head_dims, full_head_dims, targets, jobs)

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "aot.json")
        cmd = [sys.executable, "-m", "naclip_kernels.aot", "--json", out, "--quiet", "--jobs", str(jobs),
               "--targets", ",".join(str(t) for t in targets)]
        if ops is not None:
            cmd += ["--ops", ",".join(ops)]
        if defaults_only:
            cmd.append("--defaults-only")
        if head_dims is not None:
            cmd += ["--head-dims", ",".join(str(d) for d in head_dims)]
        if full_head_dims is not None:
            cmd += ["--full-head-dims", ",".join(str(d) for d in full_head_dims)]
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0 or not os.path.exists(out):
            raise RuntimeError(f"AOT subprocess failed (rc={result.returncode}): {result.stderr[-2000:]}")
        with open(out) as handle:
            return json.load(handle)["rows"]


# --------------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------------
def format_table(rows: Sequence[Dict[str, Any]]) -> str:
    """Markdown table of the rows, one line per (config, target)."""
    lines = ["| op | kernel | config | default | target | regs | spill B | smem B | ok |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        status = "yes" if r["ok"] else f"no: {r['error']}"
        lines.append(f"| {r['op']} | {r['kernel']} | {r['config']} | {'*' if r['default'] else ''} | {r['target']} | "
                     f"{'' if r['registers'] is None else r['registers']} | "
                     f"{'' if r['spill_bytes'] is None else r['spill_bytes']} | "
                     f"{'' if r['shared_bytes'] is None else r['shared_bytes']} | {status} |")
    return "\n".join(lines)


def toolchain_versions() -> Dict[str, Optional[str]]:
    """The versions a report depends on: Triton (its compiler and bundled ptxas decide registers and spills)."""
    versions: Dict[str, Optional[str]] = {"triton": None, "ptxas": None, "torch": None}
    try:
        import triton

        versions["triton"] = triton.__version__
    except ImportError:
        return versions
    ptxas = os.environ.get("TRITON_PTXAS_PATH") or _nvidia_bin("ptxas")
    if ptxas:
        try:
            out = subprocess.run([ptxas, "--version"], capture_output=True, text=True, timeout=60).stdout
            match = re.search(r"release ([0-9.]+)", out)
            versions["ptxas"] = match.group(1) if match else None
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        import torch

        versions["torch"] = torch.__version__
    except ImportError:
        pass
    return versions


def report_document(rows: Sequence[Dict[str, Any]], targets: Optional[Sequence[int]] = None) -> Dict[str, Any]:
    """The JSON report: the toolchain it was made with, the targets, a summary and the rows."""
    return {
        "toolchain": toolchain_versions(),
        "targets": [f"sm_{t}" for t in (targets or DEFAULT_TARGETS)],
        "summary": {"compiles": len(rows), "ok": sum(bool(r["ok"]) for r in rows),
                    "with_spills": sum(1 for r in rows if r["ok"] and r["spill_bytes"])},
        "rows": list(rows),
    }


def update_report(path: str, ops: Optional[Sequence[str]] = None, defaults_only: bool = False,
                  head_dims: Optional[Sequence[int]] = None, full_head_dims: Optional[Sequence[int]] = None,
                  targets: Optional[Sequence[int]] = None, jobs: Optional[int] = None) -> List[Dict[str, Any]]:
    """Rows for the current selection, reusing the still-valid rows of the report at ``path``.

    A row is reused when the report was made with the installed Triton and its (op, config, target) and kernel
    source hash match today's; everything else is compiled (in one :func:`run_aot` call restricted to those ops).
    Rows of configs that no longer exist are dropped.
    """
    targets = tuple(targets or DEFAULT_TARGETS)
    try:
        with open(path) as handle:
            old = json.load(handle)
    except FileNotFoundError:
        old = {"toolchain": {}, "rows": []}
    same_toolchain = old.get("toolchain", {}).get("triton") == toolchain_versions()["triton"]
    previous = {(r["op"], r["config"], r["target"]): r for r in old.get("rows", [])} if same_toolchain else {}
    wanted = collect_configs(ops, defaults_only, head_dims, full_head_dims)
    rows, todo = {}, []
    for cfg in wanted:
        for arch in targets:
            key = (cfg.op, cfg.name, f"sm_{arch}")
            row = previous.get(key)
            if row is not None and row.get("source_hash") == kernel_source_hash(cfg.kernel):
                rows[key] = row
            else:
                todo.append((cfg.op, cfg.name, arch))
    if todo:
        if _interpreting():
            raise RuntimeError("update_report compiles in this process: run it without TRITON_INTERPRET")
        ok, reason = ptxas_available()
        if not ok:
            raise RuntimeError(f"AOT compile unavailable: {reason}")
        jobs = jobs if jobs is not None else max(1, min(4, os.cpu_count() or 1))
        for row in _run_in_process(ops, defaults_only, head_dims, full_head_dims, targets, jobs, only=todo):
            rows[(row["op"], row["config"], row["target"])] = row
    return [rows[(cfg.op, cfg.name, f"sm_{arch}")] for cfg in wanted for arch in targets
            if (cfg.op, cfg.name, f"sm_{arch}") in rows]


def _csv(text: Optional[str], cast=str):
    return None if text is None else [cast(x) for x in text.split(",") if x.strip()]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m naclip_kernels.aot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="also write {'rows': [...]} to this path")
    parser.add_argument("--defaults-only", action="store_true", help="only the configs used without autotuning")
    parser.add_argument("--head-dims", help="comma-separated head dims to keep, e.g. 64,128")
    parser.add_argument("--full-head-dims", help="with --defaults-only: also every config of these head dims")
    parser.add_argument("--ops", help="comma-separated op modules, e.g. neighbour_attention,pamr")
    parser.add_argument("--targets", default="80,90", help="comma-separated SM versions (default 80,90)")
    parser.add_argument("--jobs", type=int, default=None, help="parallel compile processes")
    parser.add_argument("--quiet", action="store_true", help="do not print the table")
    parser.add_argument("--update", metavar="REPORT",
                        help="reuse the rows of this JSON report whose config, target and kernel source are unchanged "
                             "(same Triton release only), compile the rest, and write the result back to it")
    args = parser.parse_args(argv)
    selection = dict(ops=_csv(args.ops), defaults_only=args.defaults_only, head_dims=_csv(args.head_dims, int),
                     full_head_dims=_csv(args.full_head_dims, int))
    if args.update:
        rows = update_report(args.update, targets=_csv(args.targets, int), jobs=args.jobs, **selection)
        args.json = args.json or args.update
    else:
        rows = run_aot(targets=_csv(args.targets, int), jobs=args.jobs, **selection)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report_document(rows, _csv(args.targets, int)), handle, indent=1)
    if not args.quiet:
        print(format_table(rows))
        bad = [r for r in rows if not r["ok"] or r["spill_bytes"]]
        print(f"\n{len(rows)} compiles, {sum(r['ok'] for r in rows)} ok, "
              f"{sum(1 for r in rows if r['ok'] and r['spill_bytes'])} with spills")
        return 1 if bad else 0
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
