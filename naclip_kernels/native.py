"""Compiled CPU kernels: C sources in ``naclip_kernels/csrc``, built on first use, cached, loaded with ctypes.

Why C and not only tensor ops: PAMR's sweep is a 16-term multiply-add per pixel and channel. Eager torch runs it
as 16 passes over the mask, so it is bound by cache traffic at several times the arithmetic floor. A loop that
keeps the sum in registers is not something eager ops can express. A C compiler is on nearly every machine
that has PyTorch, and compiling one small C file takes about a second. C++ with the torch headers would take a
minute, and a binary wheel could not use ``-march=native``.

How it works:
  * ``load(name)`` compiles ``csrc/<name>_cpu.c`` into a shared library the first time a process needs it, and
    memoises it. The compiler is ``$CC`` or ``cc``/``gcc``/``clang`` from ``PATH``. The flags are ``-O3
    -march=native`` (plain ``-O3`` where ``-march=native`` is refused). The result is cached under
    ``$NACLIP_KERNELS_CACHE_DIR`` (default ``$XDG_CACHE_HOME/naclip_kernels`` or ``~/.cache/naclip_kernels``).
  * The cache key hashes the source, the compiler and its version, the flags, and this CPU's model and feature
    flags. A home directory shared by different machines therefore never loads a library built for another
    CPU's instruction set.
  * The build writes a temporary file and renames it into place. Ranks of one torchrun job that build at once
    both succeed, and none loads a half-written file.
  * Set ``NACLIP_KERNELS_NATIVE=0`` to never build or load. The callers then run their eager PyTorch paths, which
    give the same results and are several times slower.
  * When no compiler works, ``load`` returns ``None``. It warns once per process with the reason, and
    :func:`status` keeps that reason.

``python -m naclip_kernels.native`` builds everything now (for an image or a cluster's shared cache) and prints
:func:`status`.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

from naclip_kernels._env import switch_on

__all__ = ["load", "status", "build", "disabled", "NativeBuildError", "SOURCES"]

_CSRC = Path(__file__).resolve().parent / "csrc"
# Library name -> (source file, ABI version its nk_abi_version() must return).
SOURCES = {"pamr": ("pamr_cpu.c", 4)}
_BASE_FLAGS = ["-O3", "-std=gnu11", "-fPIC", "-shared", "-ffp-contract=fast", "-fno-math-errno"]
_NATIVE_FLAGS = ["-march=native"]
_ENV_SWITCH = "NACLIP_KERNELS_NATIVE"
_ENV_CACHE = "NACLIP_KERNELS_CACHE_DIR"

_lock = threading.Lock()
_loaded: Dict[tuple, ctypes.CDLL] = {}
_failures: Dict[str, str] = {}
_warned: set = set()


class NativeBuildError(RuntimeError):
    """A compiled CPU kernel could not be built or loaded; the message says why."""


def disabled() -> bool:
    """True when ``NACLIP_KERNELS_NATIVE`` is ``0``, ``false``, ``no`` or ``off``. It is read on every call, so a
    test or a user can switch it at run time."""
    return not switch_on(_ENV_SWITCH)


def cache_dir() -> Path:
    root = os.environ.get(_ENV_CACHE)
    if root:
        return Path(root).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "naclip_kernels"


def _compilers() -> List[str]:
    """Candidate C compilers, best first: ``$CC``, Python's own build compiler, then ``cc``, ``gcc``, ``clang``."""
    names = []
    if os.environ.get("CC"):
        names.append(os.environ["CC"].split()[0])
    configured = sysconfig.get_config_var("CC")
    if configured:
        names.append(configured.split()[0])
    names += ["cc", "gcc", "clang"]
    found = []
    for name in names:
        path = shutil.which(name)
        if path and path not in found:
            found.append(path)
    return found


def _cpu_identity() -> str:
    """This CPU's model and instruction-set flags (Linux ``/proc/cpuinfo``; elsewhere what ``platform`` knows)."""
    lines = []
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                key = line.split(":", 1)[0].strip()
                if key in ("model name", "flags", "Features", "CPU implementer", "CPU part") and line not in lines:
                    lines.append(line)
    except OSError:
        pass
    return "".join(lines) or f"{platform.machine()} {platform.processor()}"


def _compiler_version(compiler: str) -> str:
    try:
        proc = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30)
        return proc.stdout.splitlines()[0] if proc.stdout else proc.stderr.strip()[:200]
    except (OSError, subprocess.SubprocessError) as exc:
        return f"unknown ({exc})"


def _library_suffix() -> str:
    return ".dll" if sys.platform == "win32" else (".dylib" if sys.platform == "darwin" else ".so")


def build(name: str, extra_flags: Sequence[str] = (), directory: Optional[Path] = None,
          native: bool = True) -> Path:
    """Compile library ``name`` (a key of :data:`SOURCES`) and return its path. A cached build is reused.

    ``extra_flags`` are appended to the compiler flags and are part of the cache key. The tests use them to build
    the non-AVX-512 variant of a kernel. ``native=False`` drops ``-march=native``. Raises
    :class:`NativeBuildError` with the compiler's message when no candidate compiler succeeds.
    """
    if name not in SOURCES:
        raise ValueError(f"naclip_kernels.native: unknown library {name!r}; known: {sorted(SOURCES)}")
    source_path = _CSRC / SOURCES[name][0]
    source = source_path.read_bytes()
    compilers = _compilers()
    if not compilers:
        raise NativeBuildError("no C compiler found (set $CC, or install gcc or clang)")
    errors = []
    for compiler in compilers:
        version = _compiler_version(compiler)
        flag_sets = ([_NATIVE_FLAGS] if native else []) + [[]]
        for arch in flag_sets:
            flags = _BASE_FLAGS + arch + list(extra_flags)
            key = hashlib.sha256(b"\0".join([source, compiler.encode(), version.encode(), " ".join(flags).encode(),
                                             platform.machine().encode(), _cpu_identity().encode()])).hexdigest()[:16]
            target_dir = Path(directory) if directory is not None else cache_dir() / "native" / f"{name}-{key}"
            target = target_dir / f"libnk_{name}{_library_suffix()}"
            if target.exists():
                return target
            try:
                target_dir.mkdir(parents=True, exist_ok=True)
            except OSError:
                # An unwritable cache (read-only home): build per process in a temporary directory instead.
                target_dir = Path(tempfile.mkdtemp(prefix=f"naclip_kernels_{name}_"))
                target = target_dir / f"libnk_{name}{_library_suffix()}"
            partial = target_dir / f".{target.name}.{os.getpid()}.{threading.get_ident()}.tmp"
            cmd = [compiler, *flags, str(source_path), "-o", str(partial), "-lm"]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            except (OSError, subprocess.SubprocessError) as exc:
                errors.append(f"{' '.join(cmd)}: {exc}")
                continue
            if proc.returncode != 0 or not partial.exists():
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
                errors.append(f"{' '.join(cmd)} exited {proc.returncode}: {' | '.join(tail)}")
                partial.unlink(missing_ok=True)
                continue
            os.replace(partial, target)
            return target
    raise NativeBuildError("could not compile " + source_path.name + ": " + "; ".join(errors))


def _open(name: str, path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    expected = SOURCES[name][1]
    found = lib.nk_abi_version()
    if found != expected:
        raise NativeBuildError(f"{path} reports ABI {found}, this naclip_kernels expects {expected}")
    return lib


def load(name: str, defines: Optional[Mapping[str, object]] = None) -> Optional[ctypes.CDLL]:
    """The loaded library ``name``, built on first use; ``None`` when disabled or when it cannot be built here.

    ``defines`` are preprocessor macros (``-DKEY=VALUE``) selecting a specialised build. PAMR compiles one library
    per dilation tuple, so that every tap offset is a constant. Each set of defines is a separate cache entry and
    a separate compile, about a second, once per machine. The first failure in a process warns once
    (``RuntimeWarning``) with the reason, and :func:`status` keeps it.
    """
    if disabled():
        return None
    flags = tuple(f"-D{key}={value}" for key, value in sorted((defines or {}).items()))
    key = (name, flags)
    lib = _loaded.get(key)
    if lib is not None or name in _failures:
        return lib
    with _lock:
        if key in _loaded or name in _failures:
            return _loaded.get(key)
        try:
            _loaded[key] = _open(name, build(name, extra_flags=flags))
        except (NativeBuildError, OSError) as exc:
            _failures[name] = str(exc)
            if name not in _warned:
                _warned.add(name)
                warnings.warn(f"naclip_kernels: the compiled CPU kernel '{name}' is unavailable ({exc}); using the "
                              f"eager PyTorch path, which is slower. Set {_ENV_SWITCH}=0 to choose that path "
                              f"without this warning.", RuntimeWarning, stacklevel=3)
        return _loaded.get(key)


def status() -> Dict[str, Dict[str, object]]:
    """Per library: ``available``, ``path`` or ``reason``, and for loaded ones the vector width in floats."""
    out: Dict[str, Dict[str, object]] = {}
    for name in SOURCES:
        if disabled():
            out[name] = {"available": False, "reason": f"disabled by {_ENV_SWITCH}={os.environ[_ENV_SWITCH]}"}
            continue
        lib = load(name)
        if lib is None:
            out[name] = {"available": False, "reason": _failures.get(name, "unknown")}
        else:
            out[name] = {"available": True, "path": lib._name, "vector_width": int(lib.nk_vector_width())}
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m naclip_kernels.native``: build every compiled CPU kernel now and print where each stands."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m naclip_kernels.native", description=main.__doc__)
    parser.parse_args(argv)
    ok = True
    for name, info in status().items():
        ok &= bool(info["available"])
        detail = f"{info['path']} (vector width {info['vector_width']} floats)" if info["available"] else info["reason"]
        print(f"{name}: {'available' if info['available'] else 'unavailable'}: {detail}")
    print(f"cache: {cache_dir()}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
