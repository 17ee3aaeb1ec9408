"""The dependency versions this release is tested with: the one place setup.py and the tests read them from.

``TESTED`` lists, per package, the releases the test suite has run on (``TRITON_INTERPRET=1 python -m pytest
tests``) and, for Triton, the releases whose ahead-of-time compile report is committed under
``bench/results/aot/`` with every autotune and default configuration spill-free on sm_80 and sm_90. setup.py admits
exactly these minor releases, so what ``pip install`` resolves is always something that was tested.

This module imports nothing: setup.py executes it before any dependency is installed.
"""

TESTED = {
    # torch pins its Triton: 2.14.x -> triton 3.8.x, 2.15.x -> triton 3.9.x.
    "torch": ("2.14.1", "2.15.0"),
    "triton": ("3.8.0", "3.9.0"),
    "open_clip_torch": ("3.3.0",),
    "timm": ("1.0.31",),
    "torchvision": ("0.29.1", "0.29.2"),
}


def minor_range(package: str) -> str:
    """A pip specifier admitting exactly the tested minor releases of ``package``: ``>=A.B.0,<C.(D+1)``."""
    versions = sorted(TESTED[package], key=lambda v: tuple(int(x) for x in v.split(".")))
    low = ".".join(versions[0].split(".")[:2])
    major, minor = (int(x) for x in versions[-1].split(".")[:2])
    return f">={low},<{major}.{minor + 1}"


def aot_report_name(triton_version: str) -> str:
    """File name of the committed AOT report for a Triton release, under ``bench/results/aot/``."""
    return f"triton-{triton_version}.json"
