"""Benchmark presets (SPEC section 4) and the class-list syntax."""
from __future__ import annotations

import dataclasses

import pytest

from naclip.presets import (PRESETS, ClassListError, count_queries, display_name, get_preset, parse_class_lines,
                            parse_classes_arg, read_class_file, split_synonyms)

# (classes = lines, queries = names with synonyms): SPEC section 4 and the datasets' class counts.
EXPECTED = {
    "voc21": (21, 56), "voc20": (20, 30), "pc60": (60, 60), "pc59": (59, 59),
    "coco_object": (81, 113), "coco_stuff": (171, 171), "ade20k": (150, 150), "cityscapes": (19, 19),
}


def test_all_eight_benchmarks_present():
    assert set(PRESETS) == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_class_and_query_counts(name):
    p = PRESETS[name]
    classes, queries = EXPECTED[name]
    assert p.num_classes == len(p.classes) == classes
    assert p.num_queries == count_queries(p.classes) == queries
    assert len(p.label_names) == classes and len(set(p.label_names)) == classes
    for line in p.classes:                       # no empty names, normalised ", " separators
        names = split_synonyms(line)
        assert all(names) and ", ".join(names) == line
        assert len(set(names)) == len(names)     # no synonym repeated inside a class


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_settings_follow_spec(name):
    p = PRESETS[name]
    assert p.slide == (None if name in ("voc21", "voc20") else (224, 112))
    assert p.confidence_threshold == (0.1 if name in ("voc21", "pc60", "coco_object") else None)
    assert p.background_index == (0 if name in ("voc21", "pc60", "coco_object") else None)
    assert p.short_side == (560 if name == "cityscapes" else 336)
    assert p.reduce_zero_label == (name in ("voc20", "pc59", "ade20k"))
    assert p.ignore_index == 255


def test_voc21_background_and_synonyms():
    p = get_preset("voc21")
    assert len(split_synonyms(p.classes[0])) == 26 and split_synonyms(p.classes[0])[:3] == ("sky", "wall", "tree")
    assert p.label_names[0] == "background" and p.label_names[15] == "person"
    assert split_synonyms(p.classes[15])[0] == "person" and len(split_synonyms(p.classes[15])) == 7
    assert p.classes[1:] == get_preset("voc20").classes       # VOC20 = VOC21 without the background line
    assert get_preset("pc60").classes[1:] == get_preset("pc59").classes
    assert get_preset("coco_object").label_names[1:] == get_preset("coco_stuff").label_names[:80]


def test_get_preset_is_case_insensitive_and_lists_names_when_unknown():
    assert get_preset("VOC21") is PRESETS["voc21"]
    assert get_preset("COCO-Object") is PRESETS["coco_object"]
    assert get_preset(" Cityscapes ") is PRESETS["cityscapes"]
    assert get_preset("ADE20K") is PRESETS["ade20k"]
    with pytest.raises(ValueError) as exc:
        get_preset("voc22")
    msg = str(exc.value)
    assert "voc22" in msg and all(n in msg for n in PRESETS) and "\n" not in msg


def test_preset_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        PRESETS["voc21"].short_side = 448


def test_parse_classes_arg():
    assert parse_classes_arg("cat, sofa/couch") == ("cat", "sofa, couch")
    assert parse_classes_arg("  cat ,dog,  ") == ("cat", "dog")          # trailing comma tolerated
    assert parse_classes_arg("tv monitor / screen") == ("tv monitor, screen",)
    assert parse_classes_arg("traffic   light") == ("traffic light",)
    for bad in ("", "   ", ",", "cat,,dog", "sofa/", "/couch"):
        with pytest.raises(ClassListError) as exc:
            parse_classes_arg(bad)
        assert "\n" not in str(exc.value)


def test_parse_class_lines_and_files(tmp_path):
    text = "# my classes\nsky, clouds\n\n  cat  \ndog,puppy\n"
    assert parse_class_lines(text) == ("sky, clouds", "cat", "dog, puppy")
    assert display_name("dog, puppy") == "dog"
    with pytest.raises(ClassListError, match="empty"):
        parse_class_lines("# only a comment\n\n")
    with pytest.raises(ClassListError, match="line 2"):
        parse_class_lines("cat\ndog,,puppy")
    f = tmp_path / "cls.txt"
    f.write_text(text)
    assert read_class_file(f) == ("sky, clouds", "cat", "dog, puppy")
    with pytest.raises(ClassListError, match="does not exist"):
        read_class_file(tmp_path / "missing.txt")
    with pytest.raises(ClassListError, match="directory"):
        read_class_file(tmp_path)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ClassListError, match="empty"):
        read_class_file(tmp_path / "empty.txt")
