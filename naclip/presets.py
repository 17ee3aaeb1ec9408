"""Benchmark presets (SPEC section 4) and the class-list syntax shared by the CLI, the segmenter and the web app.

A *class line* is one class written as one or more query names separated by commas, ``"sofa, couch"``: the
format of NACLIP's ``configs/cls_*.txt`` files. The segmenter scores every query name and takes the max over
a class's names, so ``"person, person in shirt, ..."`` is one class with several prompts.

Two user-facing spellings map onto class lines:

* ``--classes "cat, sofa/couch, tv monitor"`` (:func:`parse_classes_arg`): commas separate *classes*, a ``/``
  separates synonyms inside a class. Commas cannot be the synonym separator here, because on a single command
  line they are the natural way to list several classes.
* ``--classes-file F`` (:func:`parse_class_lines`, :func:`read_class_file`): one class per line, synonyms
  separated by commas, exactly NACLIP's format; blank lines and lines starting with ``#`` are ignored.

Both return a tuple of normalised class lines (``"sofa, couch"``) and raise :class:`ClassListError` (a
``ValueError``) with a one-line message for an empty list or an empty name.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence, Tuple

__all__ = [
    "ClassListError",
    "Preset",
    "PRESETS",
    "get_preset",
    "preset_names",
    "parse_classes_arg",
    "parse_class_lines",
    "read_class_file",
    "split_synonyms",
    "display_name",
    "count_queries",
]


class ClassListError(ValueError):
    """A class list that cannot be used: empty, or with an empty name. The message is one line."""


# --------------------------------------------------------------------------------------------------------------
# Class-line helpers
# --------------------------------------------------------------------------------------------------------------

def split_synonyms(line: str) -> Tuple[str, ...]:
    """The query names of one class line: ``"sofa, couch"`` -> ``("sofa", "couch")`` (whitespace stripped)."""
    return tuple(name.strip() for name in line.split(","))


def display_name(line: str) -> str:
    """The name shown for a class line in legends and tables: its first query name."""
    return split_synonyms(line)[0]


def count_queries(lines: Iterable[str]) -> int:
    """Total number of query names (text embeddings the segmenter computes) over the class lines."""
    return sum(len(split_synonyms(line)) for line in lines)


def _normalise_class(names: Sequence[str], where: str) -> str:
    names = [" ".join(n.split()) for n in names]          # collapse inner runs of whitespace
    if any(not n for n in names):
        raise ClassListError(f"empty class name in {where}")
    return ", ".join(names)


def parse_classes_arg(text: str) -> Tuple[str, ...]:
    """Parse the ``--classes`` syntax: ``"cat, sofa/couch"`` -> ``("cat", "sofa, couch")``.

    Commas separate classes, ``/`` separates synonyms of one class. A trailing comma is tolerated
    (``"cat, dog,"``); an empty name in the middle (``"cat,,dog"``, ``"sofa/"``) is an error, since it is
    almost always a typo.
    """
    items = [item.strip() for item in (text or "").split(",")]
    while items and not items[-1]:
        items.pop()
    if not items:
        raise ClassListError("the class list is empty: give at least one class, e.g. --classes \"cat, sofa/couch\"")
    return tuple(_normalise_class(item.split("/"), f"--classes {text!r}") for item in items)


def parse_class_lines(text: str, source: str = "the class list") -> Tuple[str, ...]:
    """Parse NACLIP's class-file format: one class per line, synonyms separated by commas.

    Blank lines and lines whose first non-blank character is ``#`` are skipped.
    """
    lines = []
    for number, raw in enumerate((text or "").splitlines(), start=1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        lines.append(_normalise_class(stripped.split(","), f"{source}, line {number}"))
    if not lines:
        raise ClassListError(f"{source} is empty: write one class per line, synonyms separated by commas")
    return tuple(lines)


def read_class_file(path) -> Tuple[str, ...]:
    """Read a class file (see :func:`parse_class_lines`); unreadable files raise :class:`ClassListError`."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ClassListError(f"class file '{path}' does not exist") from None
    except IsADirectoryError:
        raise ClassListError(f"class file '{path}' is a directory, not a file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ClassListError(f"cannot read class file '{path}': {exc}") from None
    return parse_class_lines(text, source=f"class file '{path}'")


# --------------------------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Preset:
    """Everything needed to run and score one benchmark the way NACLIP's configs do.

    ``classes`` are class lines (synonyms comma-separated) in label order: line ``i`` predicts label ``i``.
    ``label_names`` are the dataset's own class names (mmsegmentation's), used for tables and legends because
    a class line's first query is not always a good name (VOC21's background line starts with "sky").
    """

    name: str
    classes: Tuple[str, ...]
    short_side: int
    slide: Optional[Tuple[int, int]]          # (window, stride) in pixels; None = whole image at once
    confidence_threshold: Optional[float]     # below it a pixel becomes class 0 (background)
    background_index: Optional[int]
    dataset_layout: str                       # key of naclip.datasets.LAYOUTS
    reduce_zero_label: bool                   # label 0 is "unlabelled": 0 -> ignore, k -> k-1
    ignore_index: int = 255
    label_names: Tuple[str, ...] = field(default=())
    description: str = ""

    def __post_init__(self):
        # Fall back to the first query of each line so that label_names always has one name per class.
        if not self.label_names:
            object.__setattr__(self, "label_names", tuple(display_name(c) for c in self.classes))
        if len(self.label_names) != len(self.classes):
            raise ValueError(f"preset {self.name}: {len(self.label_names)} label names for {len(self.classes)} classes")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def num_queries(self) -> int:
        return count_queries(self.classes)


# Background line used by SCLIP/NACLIP for VOC21 and COCO-Object: 26 "stuff" names that, together, stand for
# "not one of the object classes". The confidence threshold (0.1) sends uncertain pixels to it as well.
_BACKGROUND = ("sky, wall, tree, wood, grass, road, sea, river, mountain, sands, desk, bed, building, cloud, lamp, "
               "door, window, wardrobe, ceiling, shelf, curtain, stair, floor, hill, rail, fence")
_PERSON = "person, person in shirt, person in jeans, person in dress, person in sweater, person in skirt, person in jacket"
_TV = "television monitor, tv monitor, monitor, television, screen"

# VOC object classes as SCLIP/NACLIP name them ("ship" for boat, "table" for diningtable: CLIP knows these better).
_VOC_OBJECTS = ("aeroplane", "bicycle", "bird", "ship", "bottle", "bus", "car", "cat", "chair", "cow", "table", "dog",
                "horse", "motorbike", _PERSON, "pottedplant", "sheep", "sofa", "train", _TV)
_VOC_LABELS = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
               "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")

_CONTEXT59_LABELS = (
    "aeroplane", "bag", "bed", "bedclothes", "bench", "bicycle", "bird", "boat", "book", "bottle", "building", "bus",
    "cabinet", "car", "cat", "ceiling", "chair", "cloth", "computer", "cow", "cup", "curtain", "dog", "door", "fence",
    "floor", "flower", "food", "grass", "ground", "horse", "keyboard", "light", "motorbike", "mountain", "mouse",
    "person", "plate", "platform", "pottedplant", "road", "rock", "sheep", "shelves", "sidewalk", "sign", "sky",
    "snow", "sofa", "table", "track", "train", "tree", "truck", "tvmonitor", "wall", "water", "window", "wood")
# Query names: the dataset names with the two run-together words split (CLIP's tokenizer has no "tvmonitor").
_CONTEXT59 = tuple({"pottedplant": "potted plant", "tvmonitor": "tv monitor"}.get(n, n) for n in _CONTEXT59_LABELS)

_COCO_THINGS = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow", "elephant",
    "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard",
    "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli",
    "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed", "dining table", "toilet",
    "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink",
    "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush")
# COCO-Object queries: background line (26) + person with its 7 names + 78 single names + "tv, television" = 113,
# SPEC's count. The one extra synonym is our choice: the published list this mirrors is not available offline and
# the 26 + 7 + 79 names we know of give 112; "television" is the most useful missing alias ("tv" alone is a weak
# CLIP prompt).
_COCO_OBJECT = (_BACKGROUND,) + tuple(
    {"person": _PERSON, "tv": "tv, television"}.get(n, n) for n in _COCO_THINGS)

_COCO_STUFF_LABELS = _COCO_THINGS + (
    "banner", "blanket", "branch", "bridge", "building-other", "bush", "cabinet", "cage", "cardboard", "carpet",
    "ceiling-other", "ceiling-tile", "cloth", "clothes", "clouds", "counter", "cupboard", "curtain", "desk-stuff",
    "dirt", "door-stuff", "fence", "floor-marble", "floor-other", "floor-stone", "floor-tile", "floor-wood", "flower",
    "fog", "food-other", "fruit", "furniture-other", "grass", "gravel", "ground-other", "hill", "house", "leaves",
    "light", "mat", "metal", "mirror-stuff", "moss", "mountain", "mud", "napkin", "net", "paper", "pavement",
    "pillow", "plant-other", "plastic", "platform", "playingfield", "railing", "railroad", "river", "road", "rock",
    "roof", "rug", "salad", "sand", "sea", "shelf", "sky-other", "skyscraper", "snow", "solid-other", "stairs",
    "stone", "straw", "structural-other", "table", "tent", "textile-other", "towel", "tree", "vegetable",
    "wall-brick", "wall-concrete", "wall-other", "wall-panel", "wall-stone", "wall-tile", "wall-wood", "water-other",
    "waterdrops", "window-blind", "window-other", "wood")


def _coco_stuff_query(label: str) -> str:
    """Turn COCO-Stuff's dataset names into prompts CLIP reads naturally: "wall-brick" -> "brick wall",
    "sky-other" -> "sky", "desk-stuff" -> "desk", "playingfield" -> "playing field"."""
    special = {"playingfield": "playing field", "window-blind": "window blind", "structural-other": "structure"}
    if label in special:
        return special[label]
    if "-" not in label:
        return label
    head, tail = label.split("-", 1)
    if tail in ("other", "stuff"):
        return head
    return f"{tail} {head}"          # material/kind first: "floor-wood" -> "wood floor"


_COCO_STUFF = tuple(_coco_stuff_query(n) for n in _COCO_STUFF_LABELS)

_ADE20K_LABELS = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path",
    "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase",
    "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light",
    "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver", "airplane",
    "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster",
    "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool",
    "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture",
    "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor",
    "bulletin board", "shower", "radiator", "glass", "clock", "flag")

_CITYSCAPES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
               "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle",
               "bicycle")

_SLIDE = (224, 112)   # SPEC 4: 224x224 windows, stride 112


def _build_presets() -> dict:
    presets = [
        Preset("voc21", (_BACKGROUND,) + _VOC_OBJECTS, short_side=336, slide=None, confidence_threshold=0.1,
               background_index=0, dataset_layout="voc", reduce_zero_label=False,
               label_names=("background",) + _VOC_LABELS,
               description="PASCAL VOC 2012 val, 20 objects + background"),
        Preset("voc20", _VOC_OBJECTS, short_side=336, slide=None, confidence_threshold=None,
               background_index=None, dataset_layout="voc", reduce_zero_label=True, label_names=_VOC_LABELS,
               description="PASCAL VOC 2012 val, 20 objects, background ignored"),
        Preset("pc60", ("background",) + _CONTEXT59, short_side=336, slide=_SLIDE, confidence_threshold=0.1,
               background_index=0, dataset_layout="context", reduce_zero_label=False,
               label_names=("background",) + _CONTEXT59_LABELS,
               description="PASCAL Context val, 59 classes + background"),
        Preset("pc59", _CONTEXT59, short_side=336, slide=_SLIDE, confidence_threshold=None,
               background_index=None, dataset_layout="context", reduce_zero_label=True,
               label_names=_CONTEXT59_LABELS, description="PASCAL Context val, 59 classes, background ignored"),
        Preset("coco_object", _COCO_OBJECT, short_side=336, slide=_SLIDE, confidence_threshold=0.1,
               background_index=0, dataset_layout="coco_object", reduce_zero_label=False,
               label_names=("background",) + _COCO_THINGS,
               description="COCO 2017 val, 80 object classes + background"),
        # NACLIP's public cfg_coco_stuff164k.py resizes to short side 448; SPEC section 4 (our contract) says
        # 336 for every benchmark but Cityscapes, so 336 it is (--short-side 448 reproduces that config).
        Preset("coco_stuff", _COCO_STUFF, short_side=336, slide=_SLIDE, confidence_threshold=None,
               background_index=None, dataset_layout="coco_stuff", reduce_zero_label=False,
               label_names=_COCO_STUFF_LABELS, description="COCO-Stuff 164k val2017, 171 classes"),
        Preset("ade20k", _ADE20K_LABELS, short_side=336, slide=_SLIDE, confidence_threshold=None,
               background_index=None, dataset_layout="ade20k", reduce_zero_label=True,
               description="ADE20K (ADEChallengeData2016) validation, 150 classes"),
        Preset("cityscapes", _CITYSCAPES, short_side=560, slide=_SLIDE, confidence_threshold=None,
               background_index=None, dataset_layout="cityscapes", reduce_zero_label=False,
               description="Cityscapes val (gtFine labelTrainIds), 19 classes"),
    ]
    return {p.name: p for p in presets}


PRESETS = _build_presets()

# Spellings people use for the same benchmarks; all lower-case, '-' and '_' are equivalent.
_ALIASES = {
    "voc": "voc21", "pascal_voc": "voc21", "context60": "pc60", "pascal_context": "pc60", "context59": "pc59",
    "cocoobject": "coco_object", "coco_obj": "coco_object", "cobj": "coco_object", "cocostuff": "coco_stuff",
    "coco_stuff164k": "coco_stuff", "ade": "ade20k", "ade150": "ade20k", "city_scapes": "cityscapes",
}


def preset_names() -> Tuple[str, ...]:
    """The canonical preset names, in SPEC order."""
    return tuple(PRESETS)


def get_preset(name: str) -> Preset:
    """Look a preset up by name: case-insensitive, ``-``/``_`` interchangeable, a few common aliases.

    Unknown names raise ``ValueError`` listing the valid ones.
    """
    key = str(name).strip().lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    if key not in PRESETS:
        raise ValueError(f"unknown preset '{name}'; valid presets: {', '.join(PRESETS)}")
    return PRESETS[key]
