"""``nn.Module`` wrappers: the drop-in attention for a ViT block, and PAMR as a layer."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from naclip_kernels._backend import BACKENDS
from naclip_kernels._validation import SIMILARITIES, check_grid, check_int, check_positive_float
from naclip_kernels.ops.neighbour_attention import neighbour_attention
from naclip_kernels.ops.pamr import check_pamr_params, pamr

__all__ = ["NeighbourAttention", "PAMR"]


class NeighbourAttention(nn.Module):
    """Neighbour-aware attention that reuses an existing ``nn.MultiheadAttention``'s weights.

    ``forward(x, grid)`` computes ``out_proj(neighbour_attention(q, k, v))`` where ``q, k, v`` come from the wrapped
    module's packed ``in_proj`` weights: the drop-in replacement for a ViT block's self-attention (SPEC.md
    section 2). The weights are shared, not copied, so the wrapped module keeps working unchanged and
    ``state_dict`` round-trips. For ``similarity="kk"`` the query projection is skipped (it is unused).

    Args:
        attn: an ``nn.MultiheadAttention`` with packed in-projection (``kdim == vdim == embed_dim``), no
            ``add_bias_kv`` and no ``add_zero_attn``; ``batch_first`` either way.
        sigma, prefix_tokens, similarity, scale, backend: as in :func:`naclip_kernels.neighbour_attention`.

    Shapes:
        ``x``: ``[B, N, E]`` if ``attn.batch_first`` else ``[N, B, E]``; the output has the same layout.
    """

    def __init__(self, attn: nn.MultiheadAttention, sigma: Optional[float] = 5.0, prefix_tokens: int = 1,
                 similarity: str = "kk", scale: Optional[float] = None, backend: str = "auto"):
        super().__init__()
        op = "NeighbourAttention"
        if not isinstance(attn, nn.MultiheadAttention):
            raise TypeError(f"{op}: attn must be an nn.MultiheadAttention, got {type(attn).__name__}")
        if attn.in_proj_weight is None:
            raise ValueError(f"{op}: attn must use a packed in_proj_weight (kdim == vdim == embed_dim)")
        if attn.bias_k is not None or attn.add_zero_attn:
            raise ValueError(f"{op}: attn with add_bias_kv or add_zero_attn is not supported")
        if similarity not in SIMILARITIES:
            raise ValueError(f"{op}: similarity must be one of {SIMILARITIES}, got {similarity!r}")
        if backend not in BACKENDS:
            raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
        self.attn = attn
        self.sigma = check_positive_float(op, "sigma", sigma, allow_none=True)
        self.prefix_tokens = check_int(op, "prefix_tokens", prefix_tokens, minimum=0)
        self.similarity = similarity
        self.scale = scale
        self.backend = backend

    @property
    def num_heads(self) -> int:
        return self.attn.num_heads

    def extra_repr(self) -> str:
        return (f"embed_dim={self.attn.embed_dim}, num_heads={self.num_heads}, similarity={self.similarity!r}, "
                f"sigma={self.sigma}, prefix_tokens={self.prefix_tokens}, backend={self.backend!r}")

    def _project(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """One of the packed projections (0: q, 1: k, 2: v) of ``x`` ``[B, N, E]`` as ``[B, H, N, D]``."""
        embed = self.attn.embed_dim
        weight = self.attn.in_proj_weight[index * embed:(index + 1) * embed]
        bias = None if self.attn.in_proj_bias is None else self.attn.in_proj_bias[index * embed:(index + 1) * embed]
        batch, n_tokens, _ = x.shape
        return F.linear(x, weight, bias).view(batch, n_tokens, self.num_heads, -1).transpose(1, 2)

    def forward(self, x: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        op = "NeighbourAttention"
        if not isinstance(x, torch.Tensor) or x.dim() != 3:
            layout = "[B, N, E]" if self.attn.batch_first else "[N, B, E]"
            raise ValueError(f"{op}: x must be a 3-D tensor {layout}, got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        if x.shape[-1] != self.attn.embed_dim:
            raise ValueError(f"{op}: x's last dim must be embed_dim={self.attn.embed_dim}, got {x.shape[-1]}")
        check_grid(op, grid)
        tokens = x if self.attn.batch_first else x.transpose(0, 1)
        needs_q = self.similarity != "kk"
        q = self._project(tokens, 0) if needs_q else None
        k = self._project(tokens, 1)
        v = self._project(tokens, 2)
        out = neighbour_attention(q, k, v, grid=grid, sigma=self.sigma, prefix_tokens=self.prefix_tokens,
                                  similarity=self.similarity, scale=self.scale, backend=self.backend)
        batch, _, n_tokens, _ = out.shape
        out = out.transpose(1, 2).reshape(batch, n_tokens, self.attn.embed_dim)
        out = self.attn.out_proj(out)
        return out if self.attn.batch_first else out.transpose(0, 1)


class PAMR(nn.Module):
    """Pixel-adaptive mask refinement as a layer: ``forward(image, mask)`` = :func:`naclip_kernels.pamr`.

    ``image`` ``[B, K, H, W]`` and ``mask`` ``[B, C, h, w]`` give ``[B, C, H, W]`` in the mask's dtype (``SPEC.md``
    section 3). ``num_iter`` (int >= 1), ``dilations`` (non-empty ints >= 1) and ``backend`` are checked here, at
    construction, so that a misconfigured layer fails when it is built rather than on its first batch. The layer
    has no parameters or buffers.
    """

    def __init__(self, num_iter: int = 10, dilations: Sequence[int] = (8, 16), backend: str = "auto"):
        super().__init__()
        op = "PAMR"
        self.num_iter, self.dilations = check_pamr_params(num_iter, dilations, op=op)
        if not isinstance(backend, str) or backend not in BACKENDS:
            raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
        self.backend = backend

    def extra_repr(self) -> str:
        return f"num_iter={self.num_iter}, dilations={self.dilations}, backend={self.backend!r}"

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return pamr(image, mask, num_iter=self.num_iter, dilations=self.dilations, backend=self.backend)
