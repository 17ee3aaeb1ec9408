"""Image inputs: loading files and turning PIL images, arrays and tensors into one float tensor layout.

Everything the segmenter accepts goes through :func:`to_tensor`, which returns a ``[3, H, W]`` float32 tensor in
``[0, 1]`` (RGB). :func:`load_image` reads a file into an RGB ``PIL.Image`` with clear errors for missing, unreadable
or corrupt files; the CLI and the web app reuse it.

Pillow and numpy are imported lazily so that ``import naclip`` stays cheap.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Tuple, Union

import torch
import torch.nn.functional as F

# CLIP's (OpenAI) normalisation, the default when the weights do not say otherwise (= open_clip.OPENAI_DATASET_*).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

__all__ = ["CLIP_MEAN", "CLIP_STD", "ImageLoadError", "load_image", "to_tensor", "is_image_like", "resized_shape",
           "resize_short_side", "normalize"]

PathLike = Union[str, os.PathLike]


class ImageLoadError(ValueError):
    """An image file could not be read or decoded (missing, not an image, truncated or corrupt)."""


def load_image(path: PathLike) -> "Any":
    """Read an image file into an RGB ``PIL.Image.Image`` (fully decoded, file closed).

    Grey-scale, palette, CMYK and alpha images are converted to RGB (alpha is dropped, not composited).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ImageLoadError (a ``ValueError``): the file is a directory, not an image, or truncated/corrupt.
        TypeError: ``path`` is not a str or ``os.PathLike``.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"load_image: path must be a str or os.PathLike, got {type(path).__name__}")
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError as exc:  # pragma: no cover - Pillow is a segmenter dependency
        raise ImportError("load_image needs Pillow: pip install 'naclip-kernels[segmenter]'") from exc
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"load_image: no such file: {str(path)!r}")
    if path.is_dir():
        raise ImageLoadError(f"load_image: {str(path)!r} is a directory, not an image file")
    try:
        with Image.open(path) as img:
            # load() forces the full decode here, so a truncated file fails now, not later in the pipeline.
            img.load()
            return img.convert("RGB")
    except UnidentifiedImageError as exc:
        raise ImageLoadError(f"load_image: {str(path)!r} is not an image Pillow can read") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        # Pillow reports truncated / corrupt data as OSError (or SyntaxError for some broken headers).
        raise ImageLoadError(f"load_image: could not decode {str(path)!r} (truncated or corrupt?): {exc}") from exc


def is_image_like(obj: Any) -> bool:
    """True for one image (PIL image, array, tensor or path), False for anything else (e.g. a list of them)."""
    if isinstance(obj, (str, os.PathLike, torch.Tensor)):
        return True
    try:
        from PIL import Image
        if isinstance(obj, Image.Image):
            return True
    except ImportError:  # pragma: no cover
        pass
    return type(obj).__module__ == "numpy" and hasattr(obj, "ndim")


def to_tensor(image: Any, arg: str = "image") -> torch.Tensor:
    """Convert one image to a ``[3, H, W]`` float32 RGB tensor with values in ``[0, 1]`` (on the CPU, or on the
    tensor's own device for tensor inputs).

    Accepts:
        - ``PIL.Image.Image`` (any mode; converted to RGB);
        - a numpy array ``[H, W, 3]`` or ``[H, W, 4]`` (alpha dropped) or ``[H, W]`` (grey), dtype uint8
          (``0..255``) or floating (``0..1``);
        - a tensor ``[3, H, W]`` (or ``[1, H, W]`` grey), dtype uint8 (``0..255``) or floating (``0..1``);
        - a file path (read with :func:`load_image`).

    Raises ``TypeError`` for unsupported types and ``ValueError`` for bad shapes, naming ``arg``.
    """
    if isinstance(image, (str, os.PathLike)):
        image = load_image(image)
    if isinstance(image, torch.Tensor):
        t = image
        if t.dim() != 3 or t.shape[0] not in (1, 3):
            raise ValueError(f"{arg}: a tensor image must be [3, H, W] (or [1, H, W]), got {tuple(t.shape)}; "
                             "pass batches as a list of images")
        if t.shape[1] < 1 or t.shape[2] < 1:
            raise ValueError(f"{arg}: empty image of shape {tuple(t.shape)}")
        if t.dtype == torch.uint8:
            t = t.float() / 255.0
        elif t.is_floating_point():
            t = t.float()
        else:
            raise TypeError(f"{arg}: tensor image dtype must be uint8 or floating, got {t.dtype}")
        return t.expand(3, -1, -1).contiguous() if t.shape[0] == 1 else t.contiguous()
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover
        Image = None
    if Image is not None and isinstance(image, Image.Image):
        import numpy as np
        arr = np.asarray(image.convert("RGB"))
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)
    if type(image).__module__ == "numpy" and hasattr(image, "ndim"):
        import numpy as np
        arr = np.asarray(image)
        if arr.ndim == 2:
            arr = arr[:, :, None].repeat(3, axis=2)
        if arr.ndim != 3 or arr.shape[2] not in (3, 4):
            raise ValueError(f"{arg}: an array image must be [H, W, 3], [H, W, 4] or [H, W], got {arr.shape}")
        if arr.shape[0] < 1 or arr.shape[1] < 1:
            raise ValueError(f"{arg}: empty image of shape {arr.shape}")
        arr = arr[:, :, :3]
        # astype copies: the caller's array may be read-only (np.asarray of a PIL image is), which torch.from_numpy
        # warns about, and is never written through.
        if arr.dtype == np.uint8:
            return torch.from_numpy(arr.astype(np.float32)).permute(2, 0, 1).div_(255.0)
        if np.issubdtype(arr.dtype, np.floating):
            return torch.from_numpy(arr.astype(np.float32)).permute(2, 0, 1).contiguous()
        raise TypeError(f"{arg}: array image dtype must be uint8 or floating, got {arr.dtype}")
    raise TypeError(f"{arg}: expected a PIL image, an [H, W, 3] uint8 array, a [3, H, W] tensor or a file path, "
                    f"got {type(image).__name__}")


def resized_shape(height: int, width: int, short_side: int | None, max_long_side: int | None = 2048
                  ) -> Tuple[int, int]:
    """The ``(H', W')`` that NACLIP's mmseg pipeline (``Resize(scale=(2048, short_side), keep_ratio=True)``) gives:
    scale so the short side becomes ``short_side`` unless that makes the long side exceed ``max_long_side``.
    ``short_side=None`` keeps the size."""
    if short_side is None:
        return height, width
    scale = short_side / min(height, width)
    if max_long_side is not None:
        scale = min(scale, max_long_side / max(height, width))
    return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))


def resize_short_side(image: torch.Tensor, short_side: int | None, max_long_side: int | None = 2048
                      ) -> torch.Tensor:
    """Resize ``[3, H, W]`` (or ``[B, 3, H, W]``) float so the short side is ``short_side`` (see
    :func:`resized_shape`). Bilinear, ``align_corners=False``, antialiased when shrinking (large photos would
    alias badly otherwise; mmseg's cv2 resize does not antialias, a deliberate small difference)."""
    batched = image.dim() == 4
    x = image if batched else image[None]
    size = resized_shape(x.shape[-2], x.shape[-1], short_side, max_long_side)
    if size != tuple(x.shape[-2:]):
        shrinking = size[0] < x.shape[-2] or size[1] < x.shape[-1]
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrinking)
    return x if batched else x[0]


def normalize(image: torch.Tensor, mean, std) -> torch.Tensor:
    """``(image - mean) / std`` per channel; ``image`` ``[..., 3, H, W]`` in ``[0, 1]``."""
    mean_t = torch.as_tensor(mean, dtype=image.dtype, device=image.device).view(3, 1, 1)
    std_t = torch.as_tensor(std, dtype=image.dtype, device=image.device).view(3, 1, 1)
    return (image - mean_t) / std_t
