"""mmsegmentation folder layouts, built as tiny fake datasets in tmp dirs."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from naclip import datasets as ds
from naclip.datasets import DatasetError, dataset_for_preset, load_label, open_dataset, reduce_zero_label
from naclip.presets import get_preset


def _img(path, size=(6, 4)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (10, 20, 30)).save(path)


def _label(path, arr, palette=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(np.asarray(arr, dtype=np.uint8), mode="P" if palette else "L")
    if palette:
        img.putpalette([0, 0, 0, 128, 0, 0] * 128)
    img.save(path)


LABEL = np.array([[0, 1, 2, 255], [3, 3, 0, 1]])


def make_voc(root, ids=("2007_000033", "2007_000042"), split="val"):
    for i in ids:
        _img(root / "JPEGImages" / f"{i}.jpg", (4, 2))
        _label(root / "SegmentationClass" / f"{i}.png", LABEL, palette=True)
    (root / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
    (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n\n")
    return root


def test_reduce_zero_label():
    np.testing.assert_array_equal(reduce_zero_label(LABEL), [[255, 0, 1, 255], [2, 2, 255, 0]])


def test_voc_layout_reads_ids_in_split_order(tmp_path):
    root = make_voc(tmp_path / "VOC2012", ids=("b", "a"))
    d = dataset_for_preset(get_preset("voc21"), root)
    assert [s.name for s in d.samples] == ["b", "a"] and len(d) == 2
    items = list(d)
    assert items[0][0] == root / "JPEGImages" / "b.jpg"
    np.testing.assert_array_equal(items[0][1], LABEL)           # palette indices, 255 kept
    assert items[0][1].dtype == np.int64
    # VOC20: same files, background -> ignore, classes shifted down by one.
    d20 = dataset_for_preset(get_preset("voc20"), root)
    np.testing.assert_array_equal(next(iter(d20))[1], reduce_zero_label(LABEL))
    assert len(dataset_for_preset(get_preset("voc21"), root, limit=1)) == 1


def test_context_layout(tmp_path):
    root = tmp_path / "VOC2010"
    _img(root / "JPEGImages" / "x.jpg")
    _label(root / "SegmentationClassContext" / "x.png", np.zeros((4, 6)))
    (root / "ImageSets" / "SegmentationContext").mkdir(parents=True)
    (root / "ImageSets" / "SegmentationContext" / "val.txt").write_text("x\n")
    d59 = dataset_for_preset(get_preset("pc59"), root)
    assert (next(iter(d59))[1] == 255).all()                     # PC59: label 0 (background) ignored
    assert (next(iter(dataset_for_preset(get_preset("pc60"), root)))[1] == 0).all()


def test_ade_cityscapes_coco_layouts(tmp_path):
    ade = tmp_path / "ADEChallengeData2016"
    for stem in ("ADE_val_00000002", "ADE_val_00000001"):
        _img(ade / "images" / "validation" / f"{stem}.jpg")
        _label(ade / "annotations" / "validation" / f"{stem}.png", np.full((4, 6), 150))
    (ade / "images" / "validation" / "notes.txt").write_text("not an image")
    d = dataset_for_preset(get_preset("ade20k"), ade)
    assert [s.name for s in d.samples] == ["ADE_val_00000001", "ADE_val_00000002"]    # sorted, .txt skipped
    assert (next(iter(d))[1] == 149).all()

    city = tmp_path / "cityscapes"
    for town, stem in (("frankfurt", "frankfurt_000000_000294"), ("lindau", "lindau_000000_000019")):
        _img(city / "leftImg8bit" / "val" / town / f"{stem}_leftImg8bit.png")
        _label(city / "gtFine" / "val" / town / f"{stem}_gtFine_labelTrainIds.png", np.full((4, 6), 18))
        _label(city / "gtFine" / "val" / town / f"{stem}_gtFine_labelIds.png", np.full((4, 6), 33))
    d = dataset_for_preset(get_preset("cityscapes"), city)
    assert len(d) == 2 and d.samples[1].label_path.name == "lindau_000000_000019_gtFine_labelTrainIds.png"
    assert all((lab == 18).all() for _, lab in d)

    coco = tmp_path / "coco"
    _img(coco / "images" / "val2017" / "000000000139.jpg")
    _label(coco / "annotations" / "val2017" / "000000000139_labelTrainIds.png", np.full((4, 6), 170))
    _label(coco / "annotations" / "val2017" / "000000000139_instanceTrainIds.png", np.full((4, 6), 80))
    assert (next(iter(dataset_for_preset(get_preset("coco_stuff"), coco)))[1] == 170).all()
    assert (next(iter(dataset_for_preset(get_preset("coco_object"), coco)))[1] == 80).all()


def _one_line_error(fn, *match):
    with pytest.raises(DatasetError) as exc:
        fn()
    msg = str(exc.value)
    assert "\n" not in msg, msg
    for m in match:
        assert m in msg, msg
    return msg


def test_folder_errors(tmp_path, monkeypatch):
    voc21 = get_preset("voc21")
    _one_line_error(lambda: dataset_for_preset(voc21, tmp_path / "nope"), "does not exist", "JPEGImages")
    (tmp_path / "file").write_text("x")
    _one_line_error(lambda: dataset_for_preset(voc21, tmp_path / "file"), "not a directory")
    root = make_voc(tmp_path / "voc")
    _one_line_error(lambda: dataset_for_preset(voc21, root, split="train"), "train.txt", "--split")
    _one_line_error(lambda: dataset_for_preset(get_preset("ade20k"), root), "images/validation", "does not exist")
    (tmp_path / "empty" / "images" / "val2017").mkdir(parents=True)
    (tmp_path / "empty" / "annotations" / "val2017").mkdir(parents=True)
    _one_line_error(lambda: dataset_for_preset(get_preset("coco_stuff"), tmp_path / "empty"), "no images")
    _one_line_error(lambda: open_dataset(root, "kitti"), "unknown dataset layout")
    # Unreadable folder (simulated: the tests may run as root, which can read anything).
    real_access = ds.os.access
    monkeypatch.setattr(ds.os, "access", lambda p, m: False if str(p).endswith("SegmentationClass") else real_access(p, m))
    _one_line_error(lambda: dataset_for_preset(voc21, root), "not readable", "SegmentationClass")


def test_bad_label_files(tmp_path):
    root = make_voc(tmp_path / "voc", ids=("a", "b"))
    (root / "SegmentationClass" / "b.png").unlink()
    d = dataset_for_preset(get_preset("voc21"), root)
    it = iter(d)
    next(it)                                                    # the good one still loads
    with pytest.raises(DatasetError, match="b.png' does not exist"):
        next(it)
    (root / "SegmentationClass" / "b.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DatasetError, match="cannot be read"):
        d.load_label(d.samples[1])
    Image.new("RGB", (2, 2)).save(root / "SegmentationClass" / "b.png")
    with pytest.raises(DatasetError, match="single-channel"):
        load_label(root / "SegmentationClass" / "b.png")


def _halve(image):
    """A picklable ``prepare``: what the workers hand back next to the decoded image."""
    return image.size[0] // 2


@pytest.mark.parametrize("workers", [pytest.param(0, id="in-process"), pytest.param(2, id="two-workers")])
def test_decoded_images_in_order_with_errors_per_item(tmp_path, workers):
    from naclip.datasets import DecodedImages, decoded_images
    from naclip.image import ImageLoadError

    root = make_voc(tmp_path / "VOC2012", ids=("a", "b", "c", "d"))
    (root / "JPEGImages" / "b.jpg").write_bytes(b"not a jpeg")
    (root / "SegmentationClass" / "d.png").unlink()
    samples = dataset_for_preset(get_preset("voc20"), root).samples
    items = list(decoded_images(DecodedImages([s.image_path for s in samples], [s.label_path for s in samples],
                                              reduce_zero_label=True, prepare=_halve), workers))
    assert [item.index for item in items] == [0, 1, 2, 3]
    assert isinstance(items[1].error, ImageLoadError) and "b.jpg" in str(items[1].error) and items[1].image is None
    assert isinstance(items[3].error, DatasetError) and "d.png" in str(items[3].error)
    for item in (items[0], items[2]):
        assert item.error is None and item.image.size == (4, 2) and item.prepared == 2
        np.testing.assert_array_equal(item.label, reduce_zero_label(LABEL))
