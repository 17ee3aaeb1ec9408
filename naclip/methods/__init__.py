"""The segmentation methods, by name (timm-style registry): ``Segmenter(method="proxyclip")``.

============  =============================================================================================
name          last block
============  =============================================================================================
``naclip``    ``kk`` attention + Gaussian bias (sigma 5), no residual/MLP (default)
``sclip``     ``csa`` attention (``qq`` + ``kk``), no bias, residual and MLP kept
``clearclip`` ``qq`` attention, no bias, no residual/MLP
``clip``      the unmodified block (``qk`` attention)
``proxyclip`` CLIP values mixed by proxy attention computed from a vision foundation model's features
============  =============================================================================================

Each method is one module here that defines ``METHOD`` (a :class:`naclip.methods.base.Method`); adding one is a
new module and one line in :data:`METHODS`.
"""
from __future__ import annotations

from typing import Dict, Tuple

from naclip.methods import clearclip, clip, naclip, proxyclip, sclip
from naclip.methods.base import DenseHead, Method, MethodContext

__all__ = ["METHODS", "DEFAULT_METHOD", "get_method", "method_names", "Method", "DenseHead", "MethodContext"]

METHODS: Dict[str, Method] = {m.METHOD.name: m.METHOD for m in (naclip, sclip, clearclip, clip, proxyclip)}
DEFAULT_METHOD = "naclip"


def method_names() -> Tuple[str, ...]:
    return tuple(METHODS)


def get_method(name: str) -> Method:
    """The registered method ``name`` (case-insensitive); ``ValueError`` listing the known ones otherwise."""
    key = str(name).strip().lower() if isinstance(name, str) else name
    if key not in METHODS:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(METHODS)}")
    return METHODS[key]
