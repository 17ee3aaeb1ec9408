"""NACLIP training-free open-vocabulary segmentation on open_clip, using the naclip_kernels kernels.

    from naclip import Segmenter
    seg = Segmenter(model="ViT-B-16", pretrained="openai", classes=["cat", "sofa, couch", "background"])
    result = seg(image)     # result.labels [H, W] int64, result.probs [num_classes, H, W]

``import naclip`` is cheap: torch only. open_clip, Pillow and the segmenter modules load on first use of the names
below, and a missing open_clip raises an ``ImportError`` with the install command only then.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__all__ = [
    "Segmenter",
    "SegmentationResult",
    "patch_naclip",
    "load_clip",
    "dense_features",
    "ModelLoadError",
    "NotAViTError",
    "NaclipPatch",
    "TextEncoder",
    "OPENAI_IMAGENET_TEMPLATES",
    "load_image",
    "ImageLoadError",
    "load_vfm",
    "VFM_NAMES",
    "METHODS",
]

_LAZY = {
    "Segmenter": "naclip.segmenter",
    "SegmentationResult": "naclip.segmenter",
    "patch_naclip": "naclip.model",
    "load_clip": "naclip.model",
    "dense_features": "naclip.model",
    "ModelLoadError": "naclip.model",
    "NotAViTError": "naclip.model",
    "NaclipPatch": "naclip.model",
    "TextEncoder": "naclip.text",
    "OPENAI_IMAGENET_TEMPLATES": "naclip.text",
    "load_image": "naclip.image",
    "ImageLoadError": "naclip.image",
    "load_vfm": "naclip.vfm",
    "VFM_NAMES": "naclip.vfm",
    "METHODS": "naclip.methods",
}

if TYPE_CHECKING:  # pragma: no cover
    from naclip.image import ImageLoadError, load_image
    from naclip.methods import METHODS
    from naclip.vfm import VFM_NAMES, load_vfm
    from naclip.model import (ModelLoadError, NaclipPatch, NotAViTError, dense_features, load_clip,
                              patch_naclip)
    from naclip.segmenter import SegmentationResult, Segmenter
    from naclip.text import OPENAI_IMAGENET_TEMPLATES, TextEncoder


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'naclip' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
