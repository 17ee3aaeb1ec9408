"""Inputs for the proxy-attention tests: VFM-like features whose masks are decided with a margin.

The mask ``A < 0`` is a hard threshold: an off-diagonal similarity within rounding distance of ``beta * mu`` may
be kept by one implementation and masked by another, which moves that row's output by a whole softmax weight.
Any two float32 computations of ``S`` differ by ~1e-7, so the helpers draw features whose off-diagonal
similarities (computed in float64 from the very inputs the op sees, after quantisation) are at least ``margin``
away from the threshold, redrawing otherwise. That keeps every comparison meaningful instead of lucky.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

DEFAULT_MARGIN = 2e-5


def threshold_margin(feats: torch.Tensor, beta: float) -> float:
    """Smallest ``|S_tu - beta * mu|`` over off-diagonal entries and images (float64)."""
    xh = F.normalize(feats.double(), dim=-1)
    sim = xh @ xh.transpose(-1, -2)
    mu = sim.mean(dim=(-2, -1), keepdim=True)
    gap = (sim - beta * mu).abs()
    n_tokens = feats.shape[1]
    gap = gap + torch.eye(n_tokens, dtype=gap.dtype) * 1e9  # the diagonal is never masked: not a decision
    return float(gap.min()) if n_tokens > 1 else float("inf")


def region_features(batch: int, n_tokens: int, channels: int, generator: torch.Generator, *, regions: int = 4,
                    noise: float = 0.3) -> torch.Tensor:
    """Spatially coherent features like a VFM's: ``regions`` piecewise-constant bands of tokens plus noise."""
    centres = torch.randn(batch, regions, channels, generator=generator)
    label = (torch.arange(n_tokens) * regions) // max(1, n_tokens)
    return centres[:, label] + noise * torch.randn(batch, n_tokens, channels, generator=generator)


def proxy_inputs(generator: torch.Generator, batch: int, heads: int, n_tokens: int, channels: int, head_dim: int,
                 dtype: torch.dtype, *, beta: float = 1.2, layout: str = "contiguous", regions: int = 0,
                 margin: float = DEFAULT_MARGIN):
    """``feats [B, M, C]`` and ``v [B, H, M, D]`` in ``dtype``.

    ``layout="strided"``: non-contiguous views (feats as a ``[B, C, M]`` transpose, the layout of a VFM's
    ``[B, C, h, w]`` feature map flattened; v as a ``[B, M, H, D]`` transpose, the layout of a ViT's values).
    ``regions > 0``: :func:`region_features` instead of i.i.d. Gaussian features.
    """
    for _ in range(50):
        if regions:
            feats = region_features(batch, n_tokens, channels, generator, regions=regions)
        else:
            feats = torch.randn(batch, n_tokens, channels, generator=generator)
        feats = feats.to(dtype)
        if threshold_margin(feats, beta) >= margin:
            break
    else:
        raise RuntimeError(f"no feature draw with threshold margin >= {margin} for M={n_tokens}, C={channels}")
    if layout == "strided":
        feats = feats.transpose(1, 2).contiguous().transpose(1, 2)
        v = torch.randn(batch, n_tokens, heads, head_dim, generator=generator).to(dtype).transpose(1, 2)
        assert not feats.is_contiguous() and not v.is_contiguous()
    else:
        v = torch.randn(batch, heads, n_tokens, head_dim, generator=generator).to(dtype)
    return feats, v
