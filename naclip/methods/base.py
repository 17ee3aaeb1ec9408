"""What a segmentation method is: the registry entry (:class:`Method`) and the dense-feature head it builds.

A *method* decides one thing in the pipeline of :class:`naclip.Segmenter`: how a batch of (CLIP-normalised, padded)
windows becomes per-location features that are compared with the text embeddings. Everything around it (resizing,
sliding windows, upsampling, PAMR, the softmax over queries, thresholds) is shared. A method also brings its own
defaults for the shared settings (window, short side, PAMR, logit scale) and per-benchmark settings for
:meth:`naclip.Segmenter.from_preset`.

Adding a method is one module in this package that defines a :class:`Method` and one entry in
``naclip.methods.METHODS``; the segmenter has no per-method branches.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import torch
from torch import nn

__all__ = ["Method", "DenseHead", "MethodContext", "PIPELINE_SETTINGS", "preset_pipeline_settings"]

# The shared pipeline settings a method gives defaults for (names of naclip.Segmenter arguments).
PIPELINE_SETTINGS = ("slide", "short_side", "pamr", "logit_scale")


@dataclass
class MethodContext:
    """What a method's ``build`` gets from the segmenter.

    Attributes:
        model: the open_clip CLIP model (eval mode, on ``device`` in ``dtype``); heads must not change its
            ``state_dict``.
        mean, std: the CLIP weights' image normalisation (the windows arrive normalised with them).
        device, dtype: where the model lives and in which precision.
        backend: kernel backend, ``"auto"``/``"triton"``/``"torch"``/``"reference"``.
        options: the method's options, its defaults merged with what the caller gave (validated names).
    """
    model: nn.Module
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    device: torch.device
    dtype: torch.dtype
    backend: str
    options: Dict[str, Any]


def vit_tokens(size: Tuple[int, int], patch: Tuple[int, int]) -> int:
    """Tokens of a ViT pass over an ``(H, W)`` input: the patch grid (partial patches count) plus one class token."""
    return -(-size[0] // patch[0]) * -(-size[1] // patch[1]) + 1


class DenseHead:
    """The dense-feature function a method builds on one CLIP model.

    ``head(images)`` takes ``[B, 3, H, W]`` CLIP-normalised windows whose ``H, W`` are multiples of
    :attr:`pad_multiple` and returns ``(features, (h, w))``: ``features`` ``[B, h*w, D]`` (un-normalised, in the
    model's dtype, row-major over an ``h x w`` grid that covers the whole window; the segmenter upsamples the
    logits from it to the window bilinearly). Subclasses implement ``__call__`` and, if they hold resources or
    change the model, :meth:`remove`.
    """

    #: ``(ph, pw)``: the window's height and width must be multiples of these (the segmenter pads to them).
    pad_multiple: Tuple[int, int] = (1, 1)

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        self._backend = value

    def __call__(self, images: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:  # pragma: no cover
        raise NotImplementedError

    def tokens_per_window(self, window: Tuple[int, int]) -> int:
        """Tokens of the largest transformer pass one ``window`` (``(H, W)`` pixels) costs: the CLIP tower's patch
        grid plus its prefix token by default; a head that runs another model on the window (ProxyCLIP's VFM)
        reports the larger of the two. The segmenter sizes its CPU window batches from it."""
        from naclip.model import vision_patch_size

        return vit_tokens(window, vision_patch_size(self.model))

    def remove(self) -> None:
        """Undo whatever the head did to the model (nothing by default)."""

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"


def lcm_multiple(*sizes: Tuple[int, int]) -> Tuple[int, int]:
    """Per axis, the least common multiple of ``(h, w)`` pairs."""
    return (math.lcm(*(s[0] for s in sizes)), math.lcm(*(s[1] for s in sizes)))


def preset_pipeline_settings(preset: Any) -> Dict[str, Any]:
    """NACLIP's per-benchmark settings, as the preset table stores them (SPEC.md section 4)."""
    return dict(short_side=preset.short_side, slide=None if preset.slide is None else tuple(preset.slide),
                confidence_threshold=preset.confidence_threshold)


@dataclass(frozen=True)
class Method:
    """One entry of the method registry.

    Attributes:
        name: the registry name (``Segmenter(method=name)``, ``naclip segment --method name``).
        title: the name shown on the web page and in tables ("NACLIP", "ProxyCLIP").
        summary: one line: what the last block computes.
        build: ``build(context) -> DenseHead``.
        options: the method's own options and their defaults (e.g. ``similarity``, ``sigma``, ``architecture``
            for the NACLIP family; ``vfm``, ``vfm_pretrained``, ``beta``, ``gamma`` for ProxyCLIP). Options of
            other methods are refused.
        defaults: defaults of the shared pipeline settings (:data:`PIPELINE_SETTINGS`) when the caller gives none.
        preset_settings: ``preset -> {short_side, slide, confidence_threshold}`` for ``from_preset``.
        check_options: validates the merged options before anything is built (raises ``ValueError``).
    """
    name: str
    title: str
    summary: str
    build: Callable[[MethodContext], DenseHead]
    options: Mapping[str, Any] = field(default_factory=dict)
    defaults: Mapping[str, Any] = field(default_factory=dict)
    preset_settings: Callable[[Any], Dict[str, Any]] = preset_pipeline_settings
    check_options: Optional[Callable[[Dict[str, Any]], None]] = None

    def __post_init__(self):
        unknown = set(self.defaults) - set(PIPELINE_SETTINGS)
        if unknown:
            raise ValueError(f"method {self.name}: defaults for unknown settings {sorted(unknown)}")
