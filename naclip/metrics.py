"""Semantic-segmentation metrics from a confusion matrix, following mmsegmentation's ``IoUMetric``.

Per class ``c`` (``I`` = pixels predicted ``c`` whose label is ``c``, ``P`` = pixels predicted ``c``,
``G`` = pixels labelled ``c``, all over the pixels whose label is not the ignore index):

* ``IoU = I / (P + G - I)``; **NaN when the class appears in neither prediction nor label** (union 0), which
  ``miou()`` skips (``nanmean``). A class predicted somewhere but never labelled has IoU 0 and *does* count:
  that is what mmsegmentation does (it divides the summed intersections by the summed unions), so our numbers
  are comparable with the papers'.
* ``Acc = I / G`` (NaN without labelled pixels); ``aAcc`` = correctly classified / all labelled pixels.

Statistics are accumulated over the whole dataset before dividing (dataset-level IoU, not a mean of per-image
IoUs), again as mmsegmentation does.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np

__all__ = ["ConfusionMatrix", "LabelRangeError", "format_table"]


class LabelRangeError(ValueError):
    """A label or prediction outside ``[0, num_classes)`` that is not the ignore index: nearly always a preset /
    dataset mismatch (wrong class count, or ``reduce_zero_label`` set wrongly)."""


def _as_numpy(x) -> np.ndarray:
    # Accept torch tensors without importing torch here (keeps the metric usable without torch).
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


class ConfusionMatrix:
    """Accumulates a ``num_classes x num_classes`` confusion matrix (rows: label, columns: prediction).

    >>> cm = ConfusionMatrix(3)
    >>> cm.update(pred, gt)          # numpy arrays or torch tensors of the same shape, any integer dtype
    >>> cm.iou(), cm.miou(), cm.accuracy()
    """

    def __init__(self, num_classes: int, ignore_index: Optional[int] = 255):
        if int(num_classes) < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index
        self.matrix = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)

    def reset(self) -> None:
        self.matrix[:] = 0

    def update(self, pred, gt) -> None:
        """Add one prediction / label pair (same shape). Pixels whose label is the ignore index are skipped."""
        pred, gt = _as_numpy(pred), _as_numpy(gt)
        if pred.shape != gt.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} does not match label shape {tuple(gt.shape)}")
        pred = pred.astype(np.int64, copy=False).ravel()
        gt = gt.astype(np.int64, copy=False).ravel()
        if self.ignore_index is not None:
            keep = gt != self.ignore_index
            pred, gt = pred[keep], gt[keep]
        n = self.num_classes
        if gt.size:
            for what, arr in (("label", gt), ("prediction", pred)):
                lo, hi = int(arr.min()), int(arr.max())
                if lo < 0 or hi >= n:
                    bad = lo if lo < 0 else hi
                    raise LabelRangeError(
                        f"{what} value {bad} is outside 0..{n - 1} (ignore index {self.ignore_index}) "
                        f"for {n} classes")
        # One bincount over label*n + pred builds the whole matrix in a single pass.
        self.matrix += np.bincount(gt * n + pred, minlength=n * n).reshape(n, n)

    # -- statistics ----------------------------------------------------------------------------------------
    @property
    def total(self) -> int:
        """Number of labelled (non-ignored) pixels seen."""
        return int(self.matrix.sum())

    def intersection(self) -> np.ndarray:
        return np.diag(self.matrix).astype(np.float64)

    def union(self) -> np.ndarray:
        return self.matrix.sum(0) + self.matrix.sum(1) - np.diag(self.matrix).astype(np.float64)

    def iou(self) -> np.ndarray:
        """Per-class IoU, NaN where the class is in neither prediction nor label."""
        union = self.union()
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(union > 0, self.intersection() / np.maximum(union, 1), np.nan)

    def miou(self) -> float:
        """Mean IoU over the classes whose IoU is defined (NaN if none is)."""
        return _nanmean(self.iou())

    def class_accuracy(self) -> np.ndarray:
        """Per-class accuracy (recall) ``I / G``, NaN for classes without labelled pixels."""
        gt = self.matrix.sum(1).astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(gt > 0, self.intersection() / np.maximum(gt, 1), np.nan)

    def mean_accuracy(self) -> float:
        return _nanmean(self.class_accuracy())

    def accuracy(self) -> float:
        """Overall pixel accuracy (aAcc); NaN before any labelled pixel."""
        total = self.total
        return float(np.trace(self.matrix) / total) if total else float("nan")

    def summary(self, class_names: Optional[Sequence[str]] = None) -> Dict:
        """A JSON-friendly dict (NaN -> None): mIoU, aAcc, mAcc, and per-class IoU / Acc, all as fractions."""
        names = list(class_names) if class_names is not None else [str(i) for i in range(self.num_classes)]
        iou, acc = self.iou(), self.class_accuracy()
        return {
            "mIoU": _none_if_nan(self.miou()),
            "aAcc": _none_if_nan(self.accuracy()),
            "mAcc": _none_if_nan(self.mean_accuracy()),
            "pixels": self.total,
            "per_class": [{"name": n, "IoU": _none_if_nan(i), "Acc": _none_if_nan(a)}
                          for n, i, a in zip(names, iou.tolist(), acc.tolist())],
        }


def _nanmean(x: np.ndarray) -> float:
    x = x[~np.isnan(x)]
    return float(x.mean()) if x.size else float("nan")


def _none_if_nan(v: float):
    return None if v is None or np.isnan(v) else float(v)


def format_table(cm: ConfusionMatrix, class_names: Sequence[str]) -> str:
    """The per-class IoU / Acc table (percent, 2 decimals; ``-`` for undefined) followed by the summary line."""
    iou, acc = cm.iou(), cm.class_accuracy()
    width = max([len("class")] + [len(n) for n in class_names])
    fmt = lambda v: "    -" if np.isnan(v) else f"{100 * v:6.2f}"  # noqa: E731
    lines: List[str] = [f"{'class':<{width}}  {'IoU':>6}  {'Acc':>6}", "-" * (width + 16)]
    for name, i, a in zip(class_names, iou, acc):
        lines.append(f"{name:<{width}}  {fmt(i):>6}  {fmt(a):>6}")
    lines.append("-" * (width + 16))
    lines.append(f"mIoU {fmt(cm.miou()).strip()}  aAcc {fmt(cm.accuracy()).strip()}  "
                 f"mAcc {fmt(cm.mean_accuracy()).strip()}")
    return "\n".join(lines)
