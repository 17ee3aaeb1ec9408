"""naclip-kernels: fused kernels for training-free open-vocabulary semantic segmentation with CLIP.

Public API::

    import naclip_kernels as nk
    out = nk.neighbour_attention(q, k, v, grid=(h, w), sigma=5.0, prefix_tokens=1, similarity="kk")
    refined = nk.pamr(image, mask, num_iter=10, dilations=(8, 16))
    out = nk.proxy_attention(feats, v, beta=1.2, gamma=3.0)          # ProxyCLIP: [B, M, C], [B, H, M, D]
    nk.reference.neighbour_attention(...), nk.reference.pamr(...)   # eager ground truth
    nk.NeighbourAttention(mha), nk.PAMR()                             # nn.Modules
    nk.empty_cpu_cache()                     # unmap the compiled CPU path's cached buffers (torch.cuda.empty_cache)

``import naclip_kernels`` needs neither a GPU, nor Triton, nor open_clip.
"""
from naclip_kernels import reference
from naclip_kernels._backend import BACKENDS, BackendUnavailableError
from naclip_kernels._host_memory import empty_cpu_cache
from naclip_kernels.modules import PAMR, NeighbourAttention
from naclip_kernels.ops.neighbour_attention import neighbour_attention
from naclip_kernels.ops.pamr import pamr
from naclip_kernels.ops.proxy_attention import proxy_attention

__version__ = "0.2.0"

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "NeighbourAttention",
    "PAMR",
    "empty_cpu_cache",
    "neighbour_attention",
    "pamr",
    "proxy_attention",
    "reference",
    "__version__",
]
