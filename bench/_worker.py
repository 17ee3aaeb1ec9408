"""Subprocess entry point: ``python -m bench._worker SPEC.json OUT.json`` runs one benchmark row in isolation."""
from __future__ import annotations

import json
import sys

from bench.isolation import call_target


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec_path, out_path = argv
    job = json.loads(open(spec_path).read())
    result = call_target(job["target"], job["spec"])
    with open(out_path, "w") as fh:
        json.dump(result, fh, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
