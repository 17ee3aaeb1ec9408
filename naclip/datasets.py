"""Evaluation datasets in mmsegmentation's folder layouts (the layouts NACLIP's configs read).

``--data-root`` is the folder that holds the layout's sub-folders:

* ``voc`` (VOC21, VOC20), root ``VOCdevkit/VOC2012``: ``JPEGImages/<id>.jpg`` and ``SegmentationClass/<id>.png``,
  ids from ``ImageSets/Segmentation/{split}.txt`` (split ``val``).
* ``context`` (PC60, PC59), root ``VOCdevkit/VOC2010``: ``JPEGImages/<id>.jpg`` and
  ``SegmentationClassContext/<id>.png``, ids from ``ImageSets/SegmentationContext/{split}.txt`` (``val``).
* ``ade20k``, root ``ADEChallengeData2016``: ``images/{split}/<stem>.jpg`` and ``annotations/{split}/<stem>.png``
  (``validation``).
* ``cityscapes``, root ``cityscapes``: ``leftImg8bit/{split}/<city>/<stem>_leftImg8bit.png`` and
  ``gtFine/{split}/<city>/<stem>_gtFine_labelTrainIds.png`` (``val``).
* ``coco_stuff``, root ``coco_stuff164k``: ``images/{split}/<stem>.jpg`` and
  ``annotations/{split}/<stem>_labelTrainIds.png`` (``val2017``).
* ``coco_object``: ``images/{split}/<stem>.jpg`` and ``annotations/{split}/<stem>_instanceTrainIds.png``
  (``val2017``).

COCO-Object is not an official mmsegmentation dataset: NACLIP and SCLIP (after TCL/GroupViT) convert COCO 2017
instance annotations into ``*_instanceTrainIds.png`` maps (0 = background, 1..80 = the 80 thing classes, 255 =
ignore) next to the COCO-Stuff ones, with NACLIP's ``datasets/cvt_coco_object.py``; we read those files.

``reduce_zero_label`` (VOC20, PC59, ADE20K) follows mmsegmentation: label 0 becomes the ignore index and every
other label ``k`` becomes ``k - 1`` (255 stays 255).

Missing or unreadable folders raise :class:`DatasetError` with a one-line message when the dataset is opened;
a missing or corrupt label *file* raises it when that sample is loaded, so an evaluation can report it and go on.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple

import numpy as np

__all__ = ["DatasetError", "Sample", "SegDataset", "LAYOUTS", "open_dataset", "dataset_for_preset", "load_label",
           "reduce_zero_label", "Decoded", "DecodedImages", "decoded_images", "default_workers"]


class DatasetError(RuntimeError):
    """A dataset problem the user can fix (wrong root, missing folder, unreadable file); one-line message."""


@dataclass(frozen=True)
class Sample:
    image_path: Path
    label_path: Path

    @property
    def name(self) -> str:
        return self.image_path.stem


@dataclass(frozen=True)
class Layout:
    """How to find image / label pairs of one dataset family under a data root."""

    name: str
    default_split: str
    find: Callable[[Path, str], List[Sample]]
    hint: str                                   # what --data-root should point at, for error messages


# ---------------------------------------------------------------------------------------------------------------
# Listing helpers: every filesystem failure becomes a DatasetError naming the path.
# ---------------------------------------------------------------------------------------------------------------

def _require_dir(path: Path, what: str, layout: str) -> Path:
    if not path.exists():
        raise DatasetError(f"{what} '{path}' does not exist (expected by the {layout} layout)")
    if not path.is_dir():
        raise DatasetError(f"{what} '{path}' is not a directory")
    if not os.access(path, os.R_OK | os.X_OK):
        raise DatasetError(f"{what} '{path}' is not readable (permission denied)")
    return path


def _listdir(path: Path) -> List[str]:
    try:
        return sorted(os.listdir(path))
    except OSError as exc:
        raise DatasetError(f"cannot read folder '{path}': {exc.strerror or exc}") from None


def _read_ids(split_file: Path, layout: str) -> List[str]:
    if not split_file.is_file():
        raise DatasetError(f"split file '{split_file}' does not exist (expected by the {layout} layout; "
                           f"choose another with --split)")
    try:
        text = split_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"cannot read split file '{split_file}': {exc}") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def _find_id_list(img_sub: str, ann_sub: str, split_sub: str, layout: str):
    def find(root: Path, split: str) -> List[Sample]:
        img_dir = _require_dir(root / img_sub, "image folder", layout)
        ann_dir = _require_dir(root / ann_sub, "annotation folder", layout)
        ids = _read_ids(root / split_sub / f"{split}.txt", layout)
        return [Sample(img_dir / f"{i}.jpg", ann_dir / f"{i}.png") for i in ids]
    return find


def _find_paired(img_sub: str, ann_sub: str, img_suffix: str, ann_suffix: str, layout: str, nested: bool = False):
    """Images ``<img_sub>/{split}/[<sub>/]<stem><img_suffix>`` with labels ``<ann_sub>/{split}/[<sub>/]<stem><ann_suffix>``."""
    def find(root: Path, split: str) -> List[Sample]:
        img_dir = _require_dir(root / img_sub / split, "image folder", layout)
        ann_dir = _require_dir(root / ann_sub / split, "annotation folder", layout)
        subdirs = [d for d in _listdir(img_dir) if (img_dir / d).is_dir()] if nested else [""]
        samples = []
        for sub in subdirs:
            folder = img_dir / sub if sub else img_dir
            for fname in _listdir(folder):
                if fname.endswith(img_suffix) and not fname.startswith("."):
                    stem = fname[: -len(img_suffix)]
                    label_dir = ann_dir / sub if sub else ann_dir
                    samples.append(Sample(folder / fname, label_dir / f"{stem}{ann_suffix}"))
        return samples
    return find


LAYOUTS = {
    "voc": Layout("voc", "val",
                  _find_id_list("JPEGImages", "SegmentationClass", "ImageSets/Segmentation", "voc"),
                  "VOCdevkit/VOC2012 (JPEGImages, SegmentationClass, ImageSets/Segmentation)"),
    "context": Layout("context", "val",
                      _find_id_list("JPEGImages", "SegmentationClassContext", "ImageSets/SegmentationContext",
                                    "context"),
                      "VOCdevkit/VOC2010 (JPEGImages, SegmentationClassContext, ImageSets/SegmentationContext)"),
    "ade20k": Layout("ade20k", "validation",
                     _find_paired("images", "annotations", ".jpg", ".png", "ade20k"),
                     "ADEChallengeData2016 (images/validation, annotations/validation)"),
    "cityscapes": Layout("cityscapes", "val",
                         _find_paired("leftImg8bit", "gtFine", "_leftImg8bit.png", "_gtFine_labelTrainIds.png",
                                      "cityscapes", nested=True),
                         "cityscapes (leftImg8bit/val, gtFine/val with *_gtFine_labelTrainIds.png)"),
    "coco_stuff": Layout("coco_stuff", "val2017",
                         _find_paired("images", "annotations", ".jpg", "_labelTrainIds.png", "coco_stuff"),
                         "coco_stuff164k (images/val2017, annotations/val2017/*_labelTrainIds.png)"),
    "coco_object": Layout("coco_object", "val2017",
                          _find_paired("images", "annotations", ".jpg", "_instanceTrainIds.png", "coco_object"),
                          "coco_object (images/val2017, annotations/val2017/*_instanceTrainIds.png)"),
}


# ---------------------------------------------------------------------------------------------------------------
# Labels
# ---------------------------------------------------------------------------------------------------------------

def reduce_zero_label(label: np.ndarray, ignore_index: int = 255) -> np.ndarray:
    """mmsegmentation's ``reduce_zero_label``: 0 -> ignore, k -> k-1, ignore stays ignore."""
    label = label.astype(np.int64, copy=True)
    ignore = (label == 0) | (label == ignore_index)
    label -= 1
    label[ignore] = ignore_index
    return label


def load_label(path, reduce_zero: bool = False, ignore_index: int = 255) -> np.ndarray:
    """Read a label map PNG as ``int64 [H, W]``: palette PNGs give their indices (VOC), grey PNGs their values."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"label file '{path}' does not exist")
    try:
        with Image.open(path) as img:
            if img.mode not in ("P", "L", "I", "I;16", "I;16B", "I;16L", "1"):
                raise DatasetError(f"label file '{path}' has mode {img.mode}; expected a single-channel label PNG")
            label = np.array(img).astype(np.int64)
    except DatasetError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DatasetError(f"label file '{path}' cannot be read: {exc}") from None
    return reduce_zero_label(label, ignore_index) if reduce_zero else label


# ---------------------------------------------------------------------------------------------------------------
# Dataset
# ---------------------------------------------------------------------------------------------------------------

class SegDataset:
    """Image / label pairs of one split. Iterating yields ``(image_path, label int64 [H, W])``.

    Images are not opened here: the caller loads them (``naclip.image.load_image``) so that a corrupt image
    is reported by the same code path as in ``naclip segment``.
    """

    def __init__(self, root, layout: str, split: Optional[str] = None, reduce_zero_label: bool = False,
                 ignore_index: int = 255, limit: Optional[int] = None):
        if layout not in LAYOUTS:
            raise DatasetError(f"unknown dataset layout '{layout}'; known layouts: {', '.join(LAYOUTS)}")
        self.layout = LAYOUTS[layout]
        self.root = Path(root).expanduser()
        self.split = split or self.layout.default_split
        self.reduce_zero_label = reduce_zero_label
        self.ignore_index = ignore_index
        if not self.root.exists():
            raise DatasetError(f"data root '{self.root}' does not exist; point --data-root at {self.layout.hint}")
        _require_dir(self.root, "data root", layout)
        samples = self.layout.find(self.root, self.split)
        if not samples:
            raise DatasetError(f"no images found for split '{self.split}' under '{self.root}' "
                               f"(expected {self.layout.hint})")
        self.samples: List[Sample] = samples[:limit] if limit is not None else samples

    def __len__(self) -> int:
        return len(self.samples)

    def load_label(self, sample: Sample) -> np.ndarray:
        return load_label(sample.label_path, self.reduce_zero_label, self.ignore_index)

    def __iter__(self) -> Iterator[Tuple[Path, np.ndarray]]:
        for sample in self.samples:
            yield sample.image_path, self.load_label(sample)


def open_dataset(root, layout: str, split: Optional[str] = None, reduce_zero_label: bool = False,
                 ignore_index: int = 255, limit: Optional[int] = None) -> SegDataset:
    """Open a dataset by layout name (see the module docstring)."""
    return SegDataset(root, layout, split, reduce_zero_label, ignore_index, limit)


def dataset_for_preset(preset, root, split: Optional[str] = None, limit: Optional[int] = None) -> SegDataset:
    """The dataset a :class:`naclip.presets.Preset` is evaluated on, with its label conventions."""
    return SegDataset(root, preset.dataset_layout, split, preset.reduce_zero_label, preset.ignore_index, limit)


# ---------------------------------------------------------------------------------------------------------------
# Decoding in DataLoader workers
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Decoded:
    """One decoded item: the RGB ``PIL.Image`` (``None`` if it failed), ``prepare(image)`` when a ``prepare`` was
    given (else ``None``), its label (``int64 [H, W]``, or ``None`` when not asked for or failed) and the error
    that stopped it (``None`` on success)."""

    index: int
    image: Any
    label: Optional[np.ndarray]
    error: Optional[BaseException]
    prepared: Any = None


def _picklable(exc: BaseException) -> BaseException:
    """``exc`` if it survives the trip from a worker process, else a ``RuntimeError`` with its type and message."""
    import pickle

    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001 - any failure to round-trip means "send a plain copy"
        return RuntimeError(f"{type(exc).__name__}: {exc}")


class DecodedImages:
    """A map-style dataset (for ``torch.utils.data.DataLoader``): item ``i`` decodes ``image_paths[i]`` with
    :func:`naclip.image.load_image`, runs ``prepare`` on it when given (a picklable callable, e.g.
    :meth:`naclip.Segmenter.preprocessor`: resizing and normalisation) and, with ``label_paths``, reads its label
    with :func:`load_label`.

    Errors are returned in the item (:attr:`Decoded.error`), not raised: a corrupt image must be reported on its
    own line while the other images go on, and an exception raised in a worker would stop the whole loader.
    """

    def __init__(self, image_paths: Sequence[Path], label_paths: Optional[Sequence[Path]] = None,
                 reduce_zero_label: bool = False, ignore_index: int = 255,
                 prepare: Optional[Callable[[Any], Any]] = None):
        if label_paths is not None and len(label_paths) != len(image_paths):
            raise ValueError(f"DecodedImages: {len(label_paths)} label paths for {len(image_paths)} images")
        self.image_paths = list(image_paths)
        self.label_paths = None if label_paths is None else list(label_paths)
        self.reduce_zero_label = reduce_zero_label
        self.ignore_index = ignore_index
        self.prepare = prepare

    def __len__(self) -> int:
        return len(self.image_paths)

    def __getitem__(self, index: int) -> Decoded:
        from naclip.image import load_image

        image = label = prepared = None
        try:
            image = load_image(self.image_paths[index])
            if self.label_paths is not None:
                label = load_label(self.label_paths[index], self.reduce_zero_label, self.ignore_index)
            if self.prepare is not None:
                prepared = self.prepare(image)
        except Exception as exc:  # noqa: BLE001 - reported per image by the caller
            return Decoded(index, None, None, _picklable(exc))
        return Decoded(index, image, label, None, prepared)


def default_workers() -> int:
    """``--workers`` default: up to 4 decoding processes, never more than the CPUs this process may use."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cpus = os.cpu_count() or 1
    return max(0, min(4, cpus))


def _keep(item):
    """The DataLoader's collate function: items pass through unchanged (no batching, no tensor conversion)."""
    return item


def decoded_images(dataset: DecodedImages, workers: int = 0) -> Iterator[Decoded]:
    """The items of ``dataset`` in order, decoded by ``workers`` DataLoader worker processes (0: in this process).

    Workers decode (and prepare) ahead of the consumer (2 items each), so the model is fed while the next images
    decode.
    """
    if workers < 0:
        raise ValueError(f"decoded_images: workers must be >= 0, got {workers}")
    workers = min(workers, len(dataset))
    if workers == 0 or len(dataset) <= 1:
        for index in range(len(dataset)):
            yield dataset[index]
        return
    from torch.utils.data import DataLoader

    yield from DataLoader(dataset, batch_size=None, shuffle=False, num_workers=workers, collate_fn=_keep,
                          prefetch_factor=2)
