"""``python -m bench attention|pamr|segment|proxy|all [options]`` (``python -m bench <name> --help`` for the options).

``all`` runs attention, pamr, segment and proxy one after the other with the same options (``--providers`` is per
benchmark, so it is not accepted by ``all``).
"""
from __future__ import annotations

import sys
import time

BENCHES = ("attention", "pamr", "segment", "proxy")


def _module(name):
    import importlib

    return importlib.import_module(f"bench.{name}")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        print("benchmarks: " + ", ".join(BENCHES) + ", all")
        print("reports:    python -m bench.gpu_report    python -m bench.readme_tables")
        return 0
    name, rest = argv[0], argv[1:]
    if name == "all":
        if any(a.startswith("--providers") for a in rest):
            print("--providers is per benchmark; run the benchmarks one by one to select providers", file=sys.stderr)
            return 2
        t0 = time.perf_counter()
        for bench in BENCHES:
            print(f"\n===== {bench} =====", flush=True)
            _module(bench).main(rest)
        print(f"\nall benchmarks done in {time.perf_counter() - t0:.0f} s")
        return 0
    if name not in BENCHES:
        print(f"unknown benchmark {name!r}; choose from {BENCHES + ('all',)}", file=sys.stderr)
        return 2
    _module(name).main(rest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
