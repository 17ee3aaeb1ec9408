"""Label-map visualisation shared by the CLI and the web app: palettes, palette PNGs, overlays with a legend,
class shares.

Two sets of colours, for two jobs:

- **Label PNGs** (:func:`save_label_png`, :func:`class_color`, :func:`colorize`) use PASCAL VOC's bit-interleaved
  colour map (class 0 black, 1 dark red, 2 dark green, ..., 255 cream), so a VOC label map saved here looks like
  the dataset's own ``SegmentationClass`` PNGs.
- **Overlays and their legends** (:func:`overlay`, :func:`overlay_color`) use :func:`overlay_palette`: colours
  picked to be told apart, none near black or white, so every listed class shows up, the first one included (in
  the VOC map it would be black, i.e. a dark patch over the photo).
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np

__all__ = ["palette", "class_color", "save_label_png", "colorize", "overlay_palette", "overlay_color", "overlay",
           "class_shares", "legend_names"]


def palette(n: int = 256) -> np.ndarray:
    """The VOC colour map as ``uint8 [n, 3]``: bit ``j`` of the id's r/g/b bit-planes goes to bit ``7 - j``."""
    ids = np.arange(n, dtype=np.int64)
    cmap = np.zeros((n, 3), dtype=np.int64)
    c = ids.copy()
    for j in range(8):
        for ch in range(3):
            cmap[:, ch] |= ((c >> ch) & 1) << (7 - j)
        c >>= 3
    return cmap.astype(np.uint8)


_PALETTE = palette(256)


def class_color(index: int) -> Tuple[int, int, int]:
    """The RGB colour of one class id (ids wrap modulo 256)."""
    r, g, b = _PALETTE[int(index) % 256]
    return int(r), int(g), int(b)


def _srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """``[n, 3]`` sRGB in 0..255 -> CIELAB (D65), where Euclidean distance approximates perceived difference."""
    c = rgb / 255.0
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    to_xyz = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
    xyz = linear @ to_xyz.T / np.array([0.95047, 1.0, 1.08883])
    eps = (6 / 29) ** 3
    f = np.where(xyz > eps, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[:, 1] - 16, 500 * (f[:, 0] - f[:, 1]), 200 * (f[:, 1] - f[:, 2])], axis=1)


@functools.lru_cache(maxsize=1)
def _overlay_palette_256() -> np.ndarray:
    # Greedy farthest-point sampling in CIELAB over a 16-level RGB grid, lightness 40..85 (no near-black, no
    # near-white: both vanish in a blend over a photo and against the legend's white panel), starting from a
    # strong red. Each next colour is the candidate farthest from all chosen ones, so the first k classes are as
    # far apart as this greedy order allows for every k (about 40 Delta-E for 20 classes, 11 for 256). ~0.1 s, once.
    levels = np.arange(0, 256, 17, dtype=np.float64)
    grid = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), axis=-1).reshape(-1, 3)
    lab = _srgb_to_lab(grid)
    keep = (lab[:, 0] >= 40) & (lab[:, 0] <= 85)
    grid, lab = grid[keep], lab[keep]
    chosen = [int(np.argmin(((grid - (230, 25, 75)) ** 2).sum(1)))]
    dist = ((lab - lab[chosen[0]]) ** 2).sum(1)
    for _ in range(255):
        nxt = int(np.argmax(dist))
        chosen.append(nxt)
        dist = np.minimum(dist, ((lab - lab[nxt]) ** 2).sum(1))
    out = grid[chosen].astype(np.uint8)
    out.setflags(write=False)
    return out


def overlay_palette(n: int = 256) -> np.ndarray:
    """The overlay colours of classes ``0..n-1`` as ``uint8 [n, 3]`` (``n <= 256``; all distinct, none near
    black or white); fixed, so a class keeps its colour from run to run."""
    if not 0 <= n <= 256:
        raise ValueError(f"overlay_palette: n must be in 0..256, got {n}")
    return _overlay_palette_256()[:n].copy()


def overlay_color(index: int) -> Tuple[int, int, int]:
    """The overlay / legend RGB colour of one class id (ids wrap modulo 256)."""
    r, g, b = _overlay_palette_256()[int(index) % 256]
    return int(r), int(g), int(b)


def _labels_numpy(labels) -> np.ndarray:
    if hasattr(labels, "detach"):
        labels = labels.detach().cpu().numpy()
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be a 2-D [H, W] array, got shape {tuple(labels.shape)}")
    return labels


def save_label_png(labels, path) -> Path:
    """Save ``[H, W]`` integer labels as a palette ('P' mode) PNG: pixel values are the class ids (readable back
    with ``np.array(Image.open(path))``), displayed in the VOC colours. Ids must be in 0..255."""
    from PIL import Image

    labels = _labels_numpy(labels)
    if labels.size and (labels.min() < 0 or labels.max() > 255):
        raise ValueError(f"label ids must be in 0..255 to fit a palette PNG, got {labels.min()}..{labels.max()}")
    img = Image.fromarray(labels.astype(np.uint8), mode="P")
    img.putpalette(_PALETTE.reshape(-1).tolist())
    path = Path(path)
    img.save(path, format="PNG")
    return path


def colorize(labels, colors: Optional[np.ndarray] = None) -> np.ndarray:
    """``[H, W]`` ids -> ``uint8 [H, W, 3]`` colours from ``colors`` (``[256, 3]``; default the VOC map)."""
    labels = _labels_numpy(labels)
    return (_PALETTE if colors is None else colors)[np.asarray(labels, dtype=np.int64) % 256]


def class_shares(labels, class_names: Sequence[str]) -> List[Tuple[str, float]]:
    """``(name, fraction of the image's pixels)`` for each class present, largest first.

    Ids outside ``class_names`` (e.g. 255 = ignore) are not listed but count in the denominator, so the shares
    of the listed classes sum to 1 only when every pixel has a class.
    """
    labels = _labels_numpy(labels)
    total = labels.size
    if total == 0:
        return []
    counts = np.bincount(labels.ravel()[(labels.ravel() >= 0)].astype(np.int64),
                         minlength=len(class_names))[: len(class_names)]
    shares = [(str(class_names[i]), float(counts[i]) / total) for i in np.flatnonzero(counts)]
    # Stable sort: equal shares keep class order, so the output is deterministic.
    return sorted(shares, key=lambda item: -item[1])


def legend_names(class_names: Sequence[str]) -> List[str]:
    """Names to show for class lines: the first synonym of ``"sofa, couch"`` is ``"sofa"``."""
    return [str(n).split(",")[0].strip() for n in class_names]


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)      # Pillow >= 10.1: scalable default font
    except TypeError:                                  # older Pillow: fixed bitmap font
        return ImageFont.load_default()


def overlay(image, labels, class_names: Sequence[str], alpha: float = 0.5, legend: Optional[str] = "present",
            ignore_index: Optional[int] = 255):
    """Blend the class colours (:func:`overlay_color`) over ``image`` and add a legend panel to the right.

    ``image``: PIL image (or ``[H, W, 3]`` uint8 array) of any size; it is resized to the label map's size if
    they differ. ``legend``: ``"present"`` lists the classes that occur (largest share first, with the share in
    percent), ``"all"`` lists every class in id order, ``None`` draws no legend. Pixels equal to
    ``ignore_index`` are left uncoloured. Returns an RGB PIL image.
    """
    from PIL import Image, ImageDraw

    labels = _labels_numpy(labels)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if legend not in ("present", "all", None):
        raise ValueError(f"legend must be 'present', 'all' or None, got {legend!r}")
    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image).astype(np.uint8))
    image = image.convert("RGB")
    h, w = labels.shape
    if image.size != (w, h):
        image = image.resize((w, h), Image.BILINEAR)

    base = np.asarray(image, dtype=np.float32)
    colours = colorize(labels, _overlay_palette_256()).astype(np.float32)
    mixed = (1.0 - alpha) * base + alpha * colours
    if ignore_index is not None:
        keep = labels == ignore_index
        mixed[keep] = base[keep]
    blended = Image.fromarray(np.clip(mixed + 0.5, 0, 255).astype(np.uint8))
    if legend is None:
        return blended

    names = legend_names(class_names)
    if legend == "present":
        # class_shares keyed by id (names may repeat), largest first.
        shares = class_shares(labels, [str(k) for k in range(len(names))])
        entries = [(int(i), f"{names[int(i)]} {100 * s:.1f}%") for i, s in shares]
    else:
        entries = [(i, names[i]) for i in range(len(names))]

    # Size the legend from the image so it stays legible on both thumbnails and large photos.
    font_size = int(min(max(h / 30, 11), 28))
    font = _font(font_size)
    probe = ImageDraw.Draw(blended)
    line_h = font_size + max(4, font_size // 3)
    swatch = font_size
    pad = max(6, font_size // 2)
    text_w = max([probe.textbbox((0, 0), text, font=font)[2] for _, text in entries] + [0])
    panel_w = pad * 3 + swatch + text_w if entries else 0
    panel_h = pad * 2 + line_h * len(entries)

    canvas = Image.new("RGB", (w + panel_w, max(h, panel_h)), (255, 255, 255))
    canvas.paste(blended, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for row, (cls, text) in enumerate(entries):
        y = pad + row * line_h
        x = w + pad
        draw.rectangle([x, y, x + swatch, y + swatch], fill=overlay_color(cls), outline=(0, 0, 0))
        draw.text((x + swatch + pad, y), text, fill=(0, 0, 0), font=font)
    return canvas
