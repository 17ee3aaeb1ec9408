"""Environment switches of naclip_kernels (``NACLIP_KERNELS_NATIVE``, ``NACLIP_KERNELS_HUGE_PAGES``, ...)."""
from __future__ import annotations

import os

_OFF = ("0", "off", "false", "no")


def switch_on(name: str) -> bool:
    """False when the environment variable ``name`` is ``0``/``off``/``false``/``no`` (any case), else True (also
    when unset). Read on every call, so a test or a user can flip it at run time."""
    return os.environ.get(name, "1").strip().lower() not in _OFF
