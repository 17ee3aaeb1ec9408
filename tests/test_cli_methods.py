"""`naclip segment|eval --method ... --vfm ... --vfm-pretrained ...`: options reach the segmenter, and bad VFM names,
missing or mismatched checkpoints and offline tags are one `naclip: error:` line each, exit 2, before any image."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("open_clip")
pytest.importorskip("timm")

import naclip.vfm as nv  # noqa: E402
from naclip import cli  # noqa: E402
from naclip.cli import main  # noqa: E402
from tests.naclip_helpers import register_tiny_config  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*RANDOM weights.*")

# A small real timm ViT (5.7M parameters at full size) for the runs through the real factory.
SMALL_VIT = "vit_tiny_patch16_224"


class Recorder:
    def __init__(self):
        self.calls = []

    def __call__(self, preset=None, **kwargs):
        self.calls.append((preset, kwargs))
        raise SystemExit(0)      # stop after recording: the options are what is under test


def _image(tmp_path):
    path = tmp_path / "img.png"
    Image.fromarray(np.full((24, 40, 3), 120, np.uint8)).save(path)
    return path


def _segment_argv(tmp_path, *extra):
    return ["segment", str(_image(tmp_path)), "--classes", "cat, dog", "--out", str(tmp_path / "out"), "-q",
            "--device", "cpu", *extra]


def _error_lines(capsys):
    err = capsys.readouterr().err
    return [line for line in err.splitlines() if line.startswith("naclip: error:")], err


def test_method_names_match_the_registry():
    from naclip.methods import method_names
    assert cli.METHOD_NAMES == method_names()


@pytest.mark.parametrize("extra, expected", [
    ([], {}),
    (["--method", "sclip"], {"method": "sclip"}),
    (["--method", "proxyclip"], {"method": "proxyclip"}),
    (["--vfm", "sam_vitb"], {"method": "proxyclip", "vfm": "sam_vitb"}),
    (["--method", "proxyclip", "--vfm", "dinov2_vitb14_reg", "--vfm-pretrained", "none", "--pamr"],
     {"method": "proxyclip", "vfm": "dinov2_vitb14_reg", "vfm_pretrained": None, "pamr": True}),
    (["--method", "proxyclip", "--vfm-pretrained", "dino"], {"method": "proxyclip", "vfm_pretrained": "dino"}),
    (["--vfm-pretrained", "none"], {"method": "proxyclip", "vfm_pretrained": None}),
], ids=["default", "sclip", "proxyclip", "vfm-implies-proxyclip", "all", "tag", "vfm-pretrained-implies"])
def test_method_options_reach_the_segmenter(tmp_path, extra, expected):
    rec = Recorder()
    main(_segment_argv(tmp_path, *extra), segmenter_factory=rec)
    (_, kwargs), = rec.calls
    got = {k: kwargs[k] for k in ("method", "vfm", "vfm_pretrained", "pamr") if k in kwargs}
    assert got == expected


def test_eval_passes_the_method_to_the_preset_factory(tmp_path):
    root = tmp_path / "VOC2012"
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("a\n")
    (root / "JPEGImages").mkdir()
    (root / "SegmentationClass").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "JPEGImages" / "a.jpg")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "SegmentationClass" / "a.png")
    rec = Recorder()
    main(["eval", "--preset", "voc21", "--data-root", str(root), "-q", "--device", "cpu", "--method", "proxyclip",
          "--vfm", "mae_vitb16"], segmenter_factory=rec)
    (preset, kwargs), = rec.calls
    assert preset == "voc21" and kwargs["method"] == "proxyclip" and kwargs["vfm"] == "mae_vitb16"
    # The preset's thresholds and windows come from the method (Segmenter.from_preset), not from the CLI.
    assert not {"slide", "short_side", "confidence_threshold", "pamr"} & set(kwargs)


@pytest.mark.parametrize("extra, needle", [
    (["--vfm", "dino_vitb7"], "--vfm: unknown VFM 'dino_vitb7'; known names: dino_vitb8, dino_vitb16"),
    (["--vfm", "resnet50"], "not a ViT"),
    (["--method", "naclip", "--vfm", "dino_vitb8"], "apply to --method proxyclip only"),
    (["--method", "proxyclip", "--vfm-pretrained", "/no/such/dino.pth"], "no such file '/no/such/dino.pth'"),
    (["--method", "maskclip"], "invalid choice: 'maskclip'"),
], ids=["unknown-vfm", "not-a-vit", "vfm-without-proxyclip", "missing-file", "unknown-method"])
def test_bad_options_are_one_line_before_loading(tmp_path, capsys, extra, needle):
    rec = Recorder()
    assert main(_segment_argv(tmp_path, *extra), segmenter_factory=rec) == 2
    lines, err = _error_lines(capsys)
    assert len(lines) == 1 and needle in lines[0], err
    assert rec.calls == []


def _real_run(tmp_path, *extra):
    name = register_tiny_config()
    return _segment_argv(tmp_path, "--model", name, "--pretrained", "none", "--short-side", "32", *extra)


def test_proxyclip_through_the_real_factory(tmp_path, capsys):
    argv = _real_run(tmp_path, "--method", "proxyclip", "--vfm", SMALL_VIT, "--vfm-pretrained", "none")
    assert main(argv) == 0, capsys.readouterr().err
    labels = np.asarray(Image.open(tmp_path / "out" / "img_labels.png"))
    assert labels.shape == (24, 40)


def test_mismatched_vfm_checkpoint_is_one_line(tmp_path, capsys):
    import timm
    wrong = tmp_path / "wrong_vit.pth"
    torch.save(timm.create_model(SMALL_VIT, pretrained=False, depth=1, num_classes=0).state_dict(), wrong)
    argv = _real_run(tmp_path, "--method", "proxyclip", "--vfm", SMALL_VIT, "--vfm-pretrained", str(wrong))
    assert main(argv) == 2
    lines, err = _error_lines(capsys)
    assert len(lines) == 1, err
    assert str(wrong) in lines[0] and "does not match" in lines[0] and "missing keys" in lines[0]
    assert not (tmp_path / "out" / "img_labels.png").exists()


def test_offline_vfm_tag_is_one_line_with_the_cli_spelling(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(nv, "_cached_tag_file", lambda pcfg: None)
    monkeypatch.setenv("NACLIP_OFFLINE", "1")
    argv = _real_run(tmp_path, "--method", "proxyclip", "--vfm", f"{SMALL_VIT}.augreg_in21k")
    assert main(argv) == 2
    lines, err = _error_lines(capsys)
    assert len(lines) == 1, err
    assert "vit_tiny_patch16_224.augreg_in21k" in lines[0] and "--vfm-pretrained /path/to/" in lines[0]
    assert "vfm_pretrained=" not in lines[0]


def test_presets_lists_the_methods_settings(capsys):
    assert main(["presets", "--method", "proxyclip"]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[1:]}
    assert rows["voc21"][3:6] == ["336", "336x112", "0.2"] and rows["cityscapes"][3:6] == ["448", "224x112", "-"]
    assert rows["pc60"][5] == "0.15" and rows["coco_object"][5] == "0.25" and rows["ade20k"][3] == "448"
    assert main(["presets"]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[1:]}
    assert rows["voc21"][3:6] == ["336", "whole", "0.1"]
