"""PAMR (placeholder until the PAMR op lands)."""
from __future__ import annotations

__all__ = ["pamr"]


def pamr(image, mask, num_iter=10, dilations=(8, 16), backend="auto"):
    raise NotImplementedError("PAMR op not written yet")


def aot_configs():
    return []
