"""NACLIP (Hajimiri et al., WACV 2025): neighbour-aware ``kk`` attention with a Gaussian bias, reduced last block.

Also the head of the whole *attention family* (SPEC.md sections 1-2): a method that only changes the last block's
attention similarity, its Gaussian bias and whether the block keeps its residual and MLP is
:func:`attention_method` with its settings (``sclip.py``, ``clearclip.py``, ``clip.py`` are one call each).
The head is :func:`naclip.model.patch_naclip` on the model plus :func:`naclip.model.dense_features`.

Options (any family method): ``similarity`` (``"kk"``, ``"qk"``, ``"qq"``, ``"csa"``), ``sigma`` (Gaussian
standard deviation in patches, ``None`` for no bias), ``architecture`` (``"reduced"``: no residual, no MLP;
``"vanilla"``: the usual block). Given explicitly they override the method's own values.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch

from naclip.methods.base import DenseHead, Method, MethodContext

__all__ = ["METHOD", "AttentionHead", "attention_method", "NACLIP_PIPELINE"]

# NACLIP's pipeline (SPEC.md section 4), shared by the family: the attention is what differs between them.
NACLIP_PIPELINE = {"slide": (224, 112), "short_side": 336, "pamr": True, "logit_scale": 40.0}


class AttentionHead(DenseHead):
    """The model patched with :func:`naclip.model.patch_naclip`; features from :func:`naclip.model.dense_features`.

    ``handle`` is the :class:`naclip.model.NaclipPatch` (``remove()`` restores the original last block)."""

    def __init__(self, context: MethodContext):
        from naclip.model import patch_naclip, vision_patch_size

        opts = context.options
        self.model = context.model
        self.handle = patch_naclip(context.model, similarity=opts["similarity"], sigma=opts["sigma"],
                                   architecture=opts["architecture"], backend=context.backend)
        self.pad_multiple = vision_patch_size(context.model)

    @property
    def backend(self) -> str:
        return self.handle.block.backend

    @backend.setter
    def backend(self, value: str) -> None:
        self.handle.block.backend = value

    def __call__(self, images: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        from naclip.model import dense_features

        return dense_features(self.model, images)

    def remove(self) -> None:
        self.handle.remove()

    def extra_repr(self) -> str:
        return self.handle.block.extra_repr()


def _check_attention_options(options: Dict[str, Any]) -> None:
    from naclip.model import ARCHITECTURES
    from naclip_kernels._validation import SIMILARITIES, check_positive_float

    if options["similarity"] not in SIMILARITIES:
        raise ValueError(f"Segmenter: similarity must be one of {SIMILARITIES}, got {options['similarity']!r}")
    if options["sigma"] is not None:
        check_positive_float("Segmenter", "sigma", options["sigma"], allow_none=True)
    if options["architecture"] not in ARCHITECTURES:
        raise ValueError(f"Segmenter: architecture must be one of {ARCHITECTURES}, got "
                         f"{options['architecture']!r}")


def attention_method(name: str, title: str, summary: str, similarity: str, sigma: Optional[float],
                     architecture: str) -> Method:
    """A method of the attention family: these attention settings, NACLIP's pipeline defaults."""
    return Method(name=name, title=title, summary=summary, build=AttentionHead,
                  options={"similarity": similarity, "sigma": sigma, "architecture": architecture},
                  defaults=NACLIP_PIPELINE, check_options=_check_attention_options)


METHOD = attention_method(
    "naclip", "NACLIP", "kk attention + Gaussian neighbourhood bias (sigma 5), no residual/MLP in the last block",
    similarity="kk", sigma=5.0, architecture="reduced")
