"""ProxyCLIP (Lan et al., ECCV 2024): CLIP's last-block values mixed with attention weights from a VFM.

The head (SPEC.md section 8), for a batch of CLIP-normalised windows ``[B, 3, H, W]``:

1. CLIP runs blocks ``1..L-1`` unchanged (:func:`naclip.model.tokens_before_last_block`: bicubic-interpolated
   positional embeddings for the window's ``h x w`` patch grid).
2. Last block: ``y = ln_1(x)``; only the value third of ``in_proj`` is computed (``q`` and ``k`` are unused);
   the ``[CLS]`` value is dropped; each head's ``[h, w, D]`` values are resized bilinearly
   (``align_corners=False``) to the VFM grid ``I x J`` -> ``v`` ``[B, H, I*J, D]``.
3. The VFM (:mod:`naclip.vfm`) sees the same windows, un-normalised from CLIP's mean/std and normalised with its
   own (ImageNet's): ``feats`` ``[B, I*J, C]``.
4. ``out_proj(naclip_kernels.proxy_attention(feats, v, beta, gamma))``, no residual, no MLP, then ``ln_post`` and
   ``proj``: features ``[B, I*J, D_out]`` on the VFM grid (the segmenter normalises them, takes the cosine with
   the text and upsamples the logits bilinearly to the window).

The model is not modified (no patch; its ``state_dict`` is untouched), so a ProxyCLIP head and a NACLIP patch can
share one CLIP model (the web app does). Windows are padded to a multiple of ``lcm(pad_to, CLIP patch, VFM
patch)`` (``pad_to`` = 56 as in ProxyCLIP's code; 112 with ViT-B/16 and a /8 or /14 VFM): both grids then cover
the same padded window exactly; every full 224 or 336 window needs no padding.

Options: ``vfm`` (a name of :data:`naclip.vfm.VFM_NAMES`, any timm ViT name, or a built :class:`naclip.vfm.VFM` /
timm model), ``vfm_pretrained`` (``"default"``, a timm tag, a file, ``None``), ``beta`` (1.2), ``gamma`` (3.0),
``pad_to`` (56). Defaults of the pipeline: windows 336/112, short side 336, no PAMR, logit scale 40; per benchmark
(``Segmenter.from_preset(name, method="proxyclip")``): short side 448 for Cityscapes and ADE20K, Cityscapes
windows 224/112, confidence thresholds VOC21 0.2, PC60 0.15, COCO-Object 0.25 and none elsewhere.
"""
from __future__ import annotations

from typing import Any, Dict, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from naclip.methods.base import DenseHead, Method, MethodContext, lcm_multiple, vit_tokens

__all__ = ["METHOD", "ProxyclipHead", "PRESET_SETTINGS"]

# mc-lan/ProxyCLIP configs/cfg_*.py: short side, window and threshold per benchmark (SPEC.md section 8).
_SLIDE = (336, 112)
PRESET_SETTINGS: Dict[str, Dict[str, Any]] = {
    "voc21": dict(short_side=336, slide=_SLIDE, confidence_threshold=0.2),
    "voc20": dict(short_side=336, slide=_SLIDE, confidence_threshold=None),
    "pc60": dict(short_side=336, slide=_SLIDE, confidence_threshold=0.15),
    "pc59": dict(short_side=336, slide=_SLIDE, confidence_threshold=None),
    "coco_object": dict(short_side=336, slide=_SLIDE, confidence_threshold=0.25),
    "coco_stuff": dict(short_side=336, slide=_SLIDE, confidence_threshold=None),
    "ade20k": dict(short_side=448, slide=_SLIDE, confidence_threshold=None),
    "cityscapes": dict(short_side=448, slide=(224, 112), confidence_threshold=None),
}


class ProxyclipHead(DenseHead):
    """ProxyCLIP's dense features on an open_clip ViT and a :class:`naclip.vfm.VFM` (see the module docstring)."""

    def __init__(self, context: MethodContext):
        from naclip.model import check_vit, get_patch, vision_patch_size
        from naclip.vfm import VFM, load_vfm

        opts = context.options
        model = context.model
        check_vit(model)
        self.model = model
        last = model.visual.transformer.resblocks[-1]
        patch = get_patch(model)
        if patch is not None and last is patch.block:        # a NACLIP patch on the same model: same submodules
            last = patch.block.original
        self.ln_1, self.attn, self.ls_1 = last.ln_1, last.attn, getattr(last, "ls_1", None)
        vfm = opts["vfm"]
        if isinstance(vfm, VFM):
            self.vfm = vfm.to(device=context.device, dtype=context.dtype)
        elif isinstance(vfm, nn.Module):
            self.vfm = VFM(vfm.to(device=context.device, dtype=context.dtype))
        else:
            self.vfm = load_vfm(vfm, opts["vfm_pretrained"], device=context.device, dtype=context.dtype)
        self.clip_mean, self.clip_std = context.mean, context.std
        self.beta, self.gamma = float(opts["beta"]), float(opts["gamma"])
        clip_patch = self.clip_patch = vision_patch_size(model)
        pad_to = int(opts["pad_to"])
        sizes = [(pad_to, pad_to), clip_patch] + ([self.vfm.patch_size] if self.vfm.input_size is None else [])
        self.pad_multiple = lcm_multiple(*sizes)
        self._backend = context.backend
        self._pos_cache: Dict[Any, torch.Tensor] = {}

    def values(self, tokens: torch.Tensor, clip_grid: Tuple[int, int], vfm_grid: Tuple[int, int]) -> torch.Tensor:
        """Last-block values ``[B, H, I*J, D]`` on the VFM grid from the tokens ``[B, 1 + h*w, E]`` entering it."""
        attn = self.attn
        width, heads = attn.embed_dim, attn.num_heads
        y = self.ln_1(tokens)
        bias = None if attn.in_proj_bias is None else attn.in_proj_bias[2 * width:]
        v = F.linear(y[:, 1:], attn.in_proj_weight[2 * width:], bias)         # [B, h*w, E]: q, k never computed
        b, (h, w), d = v.shape[0], clip_grid, width // heads
        v = v.reshape(b, h, w, heads, d).permute(0, 3, 4, 1, 2).reshape(b * heads, d, h, w)
        if (h, w) != tuple(vfm_grid):
            v = F.interpolate(v, size=tuple(vfm_grid), mode="bilinear", align_corners=False)
        i, j = vfm_grid
        return v.reshape(b, heads, d, i * j).transpose(2, 3)                   # [B, H, I*J, D]

    def __call__(self, images: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        import naclip_kernels
        from naclip.model import tokens_before_last_block
        from naclip.vfm import clip_to_vfm_input

        vfm_in = clip_to_vfm_input(images, self.clip_mean, self.clip_std, self.vfm.mean, self.vfm.std)
        feats, vfm_grid = self.vfm(vfm_in)                                     # [B, M, C]
        tokens, clip_grid = tokens_before_last_block(self.model, images, self._pos_cache)
        v = self.values(tokens, clip_grid, vfm_grid)
        mixed = naclip_kernels.proxy_attention(feats.to(v.dtype), v, beta=self.beta, gamma=self.gamma,
                                               backend=self._backend)          # [B, H, M, D]
        b, heads, m, d = mixed.shape
        x = self.attn.out_proj(mixed.transpose(1, 2).reshape(b, m, heads * d))
        if self.ls_1 is not None:
            x = self.ls_1(x)          # the identity in every CLIP; kept so layer-scaled towers stay consistent
        visual = self.model.visual
        x = visual.ln_post(x)
        if visual.proj is not None:
            x = x @ visual.proj
        return x, vfm_grid

    def tokens_per_window(self, window: Tuple[int, int]) -> int:
        vfm_tokens = vit_tokens(self.vfm.input_size or window, self.vfm.patch_size)
        return max(super().tokens_per_window(window), vfm_tokens)

    def remove(self) -> None:
        self._pos_cache.clear()

    def extra_repr(self) -> str:
        return (f"vfm={self.vfm.name!r}, vfm_weights={self.vfm.weights_id or 'random'}, beta={self.beta}, "
                f"gamma={self.gamma}, pad_multiple={self.pad_multiple}, backend={self._backend!r}")


def _check_options(options: Dict[str, Any]) -> None:
    import math

    from naclip_kernels._validation import check_positive_float

    beta = options["beta"]
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta):
        raise ValueError(f"Segmenter: beta must be a finite number, got {beta!r}")
    check_positive_float("Segmenter", "gamma", options["gamma"], allow_none=False)
    pad_to = options["pad_to"]
    if isinstance(pad_to, bool) or not isinstance(pad_to, int) or pad_to < 1:
        raise ValueError(f"Segmenter: pad_to must be a positive int, got {pad_to!r}")


def _preset_settings(preset: Any) -> Dict[str, Any]:
    if preset.name not in PRESET_SETTINGS:
        raise ValueError(f"ProxyCLIP has no settings for preset {preset.name!r}; known: {', '.join(PRESET_SETTINGS)}")
    return dict(PRESET_SETTINGS[preset.name])


METHOD = Method(
    name="proxyclip", title="ProxyCLIP",
    summary="CLIP values mixed by proxy attention from a vision foundation model (DINO, DINOv2, SAM, MAE)",
    build=ProxyclipHead,
    options={"vfm": "dino_vitb8", "vfm_pretrained": "default", "beta": 1.2, "gamma": 3.0, "pad_to": 56},
    defaults={"slide": _SLIDE, "short_side": 336, "pamr": False, "logit_scale": 40.0},
    preset_settings=_preset_settings, check_options=_check_options)
