"""Confusion-matrix IoU against hand-computed values on synthetic label maps (mmsegmentation conventions)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from naclip.metrics import ConfusionMatrix, LabelRangeError, format_table

I = 255  # ignore index

# A 4x4 label map and prediction, 4 classes; class 3 is predicted once but never labelled; one ignored pixel.
GT = np.array([[0, 0, 1, 1],
               [0, 0, 1, 1],
               [2, 2, 2, I],
               [2, 2, 0, 0]])
PRED = np.array([[0, 1, 1, 1],
                 [0, 0, 1, 3],
                 [2, 2, 0, 1],
                 [2, 2, 0, 0]])
# By hand, over the 15 labelled pixels:
#   class 0: label {(0,0),(0,1),(1,0),(1,1),(3,2),(3,3)} = 6; predicted at (0,0),(1,0),(1,1),(2,2),(3,2),(3,3) = 6;
#            intersection 5 -> IoU 5 / (6 + 6 - 5) = 5/7
#   class 1: label 4; predicted (0,1),(0,2),(0,3),(1,2) = 4 (the 1 at (2,3) is on an ignored pixel); I = 3 -> 3/5
#   class 2: label 5; predicted 4; I = 4 -> 4/5
#   class 3: label 0; predicted 1 -> IoU 0 (mmseg: union 1, counts in the mean)
HAND_IOU = [5 / 7, 3 / 5, 4 / 5, 0.0]
HAND_ACC = [5 / 6, 3 / 4, 4 / 5, float("nan")]


def test_hand_computed_iou_accuracy():
    cm = ConfusionMatrix(4, ignore_index=I)
    cm.update(PRED, GT)
    assert cm.total == 15
    np.testing.assert_allclose(cm.iou(), HAND_IOU)
    np.testing.assert_allclose(cm.class_accuracy(), HAND_ACC)
    assert cm.miou() == pytest.approx(sum(HAND_IOU) / 4)
    assert cm.accuracy() == pytest.approx(12 / 15)
    assert cm.mean_accuracy() == pytest.approx((5 / 6 + 3 / 4 + 4 / 5) / 3)


def test_class_absent_everywhere_is_nan_and_excluded():
    cm = ConfusionMatrix(5, ignore_index=I)          # class 4 never appears
    cm.update(PRED, GT)
    iou = cm.iou()
    assert math.isnan(iou[4])
    assert cm.miou() == pytest.approx(sum(HAND_IOU) / 4)


def test_accumulates_over_images_like_one_big_image():
    rng = np.random.default_rng(0)
    gts = [rng.integers(0, 3, size=(5, 7)) for _ in range(3)]
    preds = [rng.integers(0, 3, size=(5, 7)) for _ in range(3)]
    gts[1][0, :] = I
    a = ConfusionMatrix(3)
    for p, g in zip(preds, gts):
        a.update(p, g)
    b = ConfusionMatrix(3)
    b.update(np.concatenate(preds), np.concatenate(gts))
    np.testing.assert_array_equal(a.matrix, b.matrix)
    # Dataset-level IoU, not the mean of per-image IoUs.
    inter = [sum(((p == c) & (g == c)).sum() for p, g in zip(preds, gts)) for c in range(3)]
    union = [sum((((p == c) | (g == c)) & (g != I)).sum() for p, g in zip(preds, gts)) for c in range(3)]
    np.testing.assert_allclose(a.iou(), np.array(inter) / np.array(union))


def test_perfect_and_disjoint_predictions():
    gt = np.array([[0, 1], [2, I]])
    cm = ConfusionMatrix(3)
    cm.update(gt.copy(), gt)          # prediction 255 at an ignored pixel is fine: the pixel is skipped
    assert cm.miou() == 1.0 and cm.accuracy() == 1.0
    cm = ConfusionMatrix(3)
    cm.update(np.array([[1, 2], [0, 0]]), gt)
    assert cm.miou() == 0.0


def test_torch_inputs_and_dtypes():
    cm_np, cm_t = ConfusionMatrix(4), ConfusionMatrix(4)
    cm_np.update(PRED, GT)
    cm_t.update(torch.from_numpy(PRED).to(torch.uint8), torch.from_numpy(GT).to(torch.int32))
    np.testing.assert_array_equal(cm_np.matrix, cm_t.matrix)


def test_errors():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="shape"):
        cm.update(np.zeros((2, 2)), np.zeros((2, 3)))
    with pytest.raises(LabelRangeError, match="label value 3"):
        cm.update(np.zeros((1, 2)), np.array([[0, 3]]))
    with pytest.raises(LabelRangeError, match="prediction value 7"):
        cm.update(np.array([[0, 7]]), np.array([[0, 1]]))
    with pytest.raises(ValueError):
        ConfusionMatrix(0)
    empty = ConfusionMatrix(2)
    assert math.isnan(empty.miou()) and math.isnan(empty.accuracy())


def test_summary_and_table():
    cm = ConfusionMatrix(5)
    cm.update(PRED, GT)
    names = ["background", "cat", "dog", "sofa", "tv"]
    s = cm.summary(names)
    json.dumps(s)                       # NaN became None: valid JSON
    assert s["per_class"][4] == {"name": "tv", "IoU": None, "Acc": None}
    assert s["mIoU"] == pytest.approx(cm.miou())
    table = format_table(cm, names)
    assert "cat" in table and f"{100 * 3 / 5:.2f}" in table and f"mIoU {100 * cm.miou():.2f}" in table
