"""Small random open_clip models for the segmenter tests (no downloads, no network)."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

# A 2-block ViT (width 64, 2 heads, patch 16, native 64x64 = 4x4 grid) and a 2-block text tower: fast on 2 cores,
# but with every piece of a real CLIP (class token, ln_pre, ln_post, proj, causal text mask, EOT pooling).
TINY_NAME = "naclip-test-tiny"
TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}

_registered = False


def register_tiny_config() -> str:
    """Register :data:`TINY_CONFIG` with open_clip under :data:`TINY_NAME` (once per process) and return the name."""
    global _registered
    import open_clip
    if not _registered:
        directory = Path(tempfile.mkdtemp(prefix="naclip-test-config-"))
        (directory / f"{TINY_NAME}.json").write_text(json.dumps(TINY_CONFIG))
        open_clip.add_model_config(directory / f"{TINY_NAME}.json")
        _registered = True
    return TINY_NAME


def tiny_clip(seed: int = 0):
    """A random-weights tiny open_clip CLIP in eval mode (deterministic per seed)."""
    import open_clip
    torch.manual_seed(seed)
    model = open_clip.model.CLIP(**TINY_CONFIG)
    # open_clip leaves the visual tower at PyTorch's default init; spread the class/positional embeddings a bit
    # so interpolation and the Gaussian bias visibly matter.
    with torch.no_grad():
        model.visual.positional_embedding.normal_(0, 0.5)
    return model.eval()


def random_image(height: int, width: int, seed: int = 0) -> torch.Tensor:
    """A smooth random RGB image ``[3, H, W]`` uint8 (blobs, so segments and PAMR have structure to work on)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(1, 3, max(2, height // 24), max(2, width // 24), generator=g)
    img = torch.nn.functional.interpolate(low, size=(height, width), mode="bicubic", align_corners=False)[0]
    img = img + 0.05 * torch.rand(3, height, width, generator=g)
    return (img.clamp(0, 1) * 255).round().to(torch.uint8)

