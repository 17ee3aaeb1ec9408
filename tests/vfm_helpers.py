"""Tiny random-weights VFMs of every family for the ProxyCLIP tests (no downloads): the real timm classes and the
real loading path (:func:`naclip.vfm.load_vfm`), with depth, width and heads overridden."""
from __future__ import annotations

import warnings

import torch

# name -> timm kwargs that make it tiny (real patch sizes and prefix tokens: the grid logic is what is tested).
TINY_VFM_KWARGS = {
    "dino_vitb8": dict(depth=1, embed_dim=32, num_heads=2),
    "dino_vitb16": dict(depth=1, embed_dim=32, num_heads=2),
    "dinov2_vitb14_reg": dict(depth=1, embed_dim=32, num_heads=2),       # 1 class + 4 register tokens
    "mae_vitb16": dict(depth=1, embed_dim=32, num_heads=2),
    # SAM: a 64 x 64 native size (4 x 4 grid), windowed + one global block, 16-channel neck.
    "sam_vitb": dict(depth=2, embed_dim=32, num_heads=2, img_size=64, window_size=2, global_attn_indexes=[1],
                     neck_chans=16),
}


def tiny_vfm(name: str = "dino_vitb8", seed: int = 0, **overrides):
    """A random-weights tiny VFM through ``load_vfm(name, None, ...)`` (deterministic per seed)."""
    from naclip.vfm import load_vfm

    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_vfm(name, None, **{**TINY_VFM_KWARGS[name], **overrides})
