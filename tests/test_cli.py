"""The `naclip` command line, in-process with a fake segmenter (no model, no weights), plus one subprocess smoke
test of `python -m naclip segment` with a small random-weights model."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from naclip import cli
from naclip.cli import main
from naclip.presets import get_preset

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------------------
# A fake segmenter: labels from the image's red channel (r // 40), or from a table keyed by image size.
# ---------------------------------------------------------------------------------------------------------------

class FakeResult:
    def __init__(self, labels, num_classes, class_names):
        self.labels = labels
        self.probs = np.stack([(labels == c).astype(np.float32) for c in range(num_classes)])
        self.class_names = class_names
        self.timings = {"image": 0.001, "total": 0.002}


class FakeSegmenter:
    def __init__(self, num_classes, class_names, by_size=None, fail_on_size=None):
        self.num_classes, self.class_names = num_classes, class_names
        self.by_size, self.fail_on_size = by_size or {}, fail_on_size
        self.seen = []

    def __call__(self, image):
        assert isinstance(image, Image.Image) and image.mode == "RGB"
        self.seen.append(image.size)
        if image.size == self.fail_on_size:
            raise RuntimeError("simulated out of memory")
        if image.size in self.by_size:
            labels = self.by_size[image.size]
        else:
            labels = np.minimum(np.asarray(image)[..., 0].astype(np.int64) // 40, self.num_classes - 1)
        return FakeResult(labels, self.num_classes, self.class_names)


class Factory:
    """Records how the CLI asked for its segmenter."""

    def __init__(self, **fake_kwargs):
        self.calls, self.fake_kwargs, self.segmenter = [], fake_kwargs, None

    def __call__(self, preset=None, **kwargs):
        self.calls.append((preset, kwargs))
        if preset is not None:
            p = get_preset(preset)
            n, names = p.num_classes, list(p.label_names)
        else:
            n, names = len(kwargs["classes"]), [c.split(",")[0] for c in kwargs["classes"]]
        self.segmenter = FakeSegmenter(n, names, **self.fake_kwargs)
        return self.segmenter


def _image(path, w=12, h=8, red=(0, 80)):
    """Left half red=red[0], right half red=red[1] -> the fake predicts classes red // 40."""
    arr = np.zeros((h, w, 3), np.uint8)
    arr[:, : w // 2, 0], arr[:, w // 2:, 0] = red
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


# Progress lines and the one-class warning (several tests here use a single class): tests/test_first_run.py checks them.
_STATUS = ("naclip: loading ", "naclip: model ready ", "naclip: warning: only one class ")


def _err_lines(capsys):
    return [line for line in capsys.readouterr().err.splitlines() if line.strip() and not line.startswith(_STATUS)]


# ---------------------------------------------------------------------------------------------------------------
# segment
# ---------------------------------------------------------------------------------------------------------------

def test_segment_files_and_folders(tmp_path, capsys):
    a = _image(tmp_path / "in" / "a.png")
    _image(tmp_path / "in" / "sub" / "b.png", w=10, red=(40, 0))
    (tmp_path / "in" / "notes.txt").write_text("skip me")
    single = _image(tmp_path / "single.png", w=6, h=6, red=(80, 80))
    out = tmp_path / "out"
    f = Factory()
    rc = main(["segment", str(tmp_path / "in"), str(single), "--classes", "sky, cat/kitten, dog",
               "--out", str(out), "--save-probs", "--device", "cpu"], segmenter_factory=f)
    assert rc == 0, capsys.readouterr().err
    (preset, kwargs), = f.calls
    assert preset is None and kwargs["classes"] == ["sky", "cat, kitten", "dog"]
    assert kwargs["pretrained"] == "openai" and kwargs["model"] == "ViT-B-16" and kwargs["device"] == "cpu"
    assert not {"pamr", "slide", "short_side", "confidence_threshold"} & set(kwargs)   # segmenter defaults
    for name, shape in (("a", (8, 12)), ("sub/b", (8, 10)), ("single", (6, 6))):
        lab = Image.open(out / f"{name}_labels.png")
        assert lab.mode == "P" and lab.size == shape[::-1]
        assert lab.getpalette()[3:6] == [128, 0, 0]          # VOC colours
        ov = Image.open(out / f"{name}_overlay.png")
        assert ov.mode == "RGB" and ov.size[1] >= shape[0] and ov.size[0] > shape[1]    # legend panel on the right
        probs = np.load(out / f"{name}_probs.npy")
        assert probs.shape == (3,) + shape and probs.dtype == np.float16
    labels = np.array(Image.open(out / "a_labels.png"))
    expected = np.zeros((8, 12), np.int64)
    expected[:, 6:] = 2
    np.testing.assert_array_equal(labels, expected)
    assert "segmented 3 of 3" in capsys.readouterr().err
    assert not (out / "notes_labels.png").exists()


def test_one_bad_image_does_not_lose_the_others(tmp_path, capsys):
    good = [_image(tmp_path / "in" / f"ok{i}.png", w=12 + i) for i in range(3)]
    (tmp_path / "in" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    _image(tmp_path / "in" / "oom.png", w=31)
    out = tmp_path / "out"
    f = Factory(fail_on_size=(31, 8))
    rc = main(["segment", str(tmp_path / "in"), str(tmp_path / "missing.png"), "--classes", "a, b, c",
               "--out", str(out), "-q"], segmenter_factory=f)
    assert rc == 1
    errors = _err_lines(capsys)
    assert len(errors) == 3, errors                                # one line per failure, nothing else (-q)
    assert all(e.startswith("naclip: error: ") for e in errors)
    assert any("missing.png" in e and "does not exist" in e for e in errors)
    assert any("broken.jpg" in e for e in errors)
    assert any("oom.png" in e and "simulated out of memory" in e for e in errors)
    for g in good:
        assert (out / f"{g.stem}_labels.png").exists() and (out / f"{g.stem}_overlay.png").exists()
    assert not (out / "broken_labels.png").exists()


def test_same_stem_twice_does_not_overwrite(tmp_path, capsys):
    _image(tmp_path / "x.png", w=12)
    _image(tmp_path / "x.bmp", w=14)
    out = tmp_path / "out"
    assert main(["segment", str(tmp_path / "x.png"), str(tmp_path / "x.bmp"), str(tmp_path / "x.png"),
                 "--classes", "a,b", "--out", str(out), "-q"], segmenter_factory=Factory()) == 0
    assert Image.open(out / "x_labels.png").size == (12, 8)
    assert Image.open(out / "x_bmp_labels.png").size == (14, 8)


def test_output_folder_inside_input_folder_is_not_rescanned(tmp_path):
    _image(tmp_path / "photos" / "p.png")
    out = tmp_path / "photos" / "seg"
    for _ in range(2):
        f = Factory()
        assert main(["segment", str(tmp_path / "photos"), "--classes", "a,b", "--out", str(out), "-q"],
                    segmenter_factory=f) == 0
        assert len(f.segmenter.seen) == 1


def test_preset_and_model_overrides(tmp_path, capsys):
    img = _image(tmp_path / "a.png")
    f = Factory()
    assert main(["segment", str(img), "--preset", "VOC21", "--out", str(tmp_path / "o"), "-q"],
                segmenter_factory=f) == 0
    preset, kwargs = f.calls[-1]
    assert preset == "voc21" and "classes" not in kwargs and "slide" not in kwargs
    ov = Image.open(tmp_path / "o" / "a_overlay.png")
    assert ov.size[0] > 12                                            # legend drawn with the dataset names

    argv = ["segment", str(img), "--classes", "a,b", "--out", str(tmp_path / "o2"), "-q", "--no-pamr",
            "--slide", "448x224", "--short-side", "224", "--threshold", "0.3", "--pretrained", "none",
            "--model", "ViT-S-16", "--backend", "torch", "--dtype", "bfloat16"]
    assert main(argv, segmenter_factory=f) == 0
    _, kwargs = f.calls[-1]
    import torch
    assert kwargs["pamr"] is False and kwargs["slide"] == (448, 224) and kwargs["short_side"] == 224
    assert kwargs["confidence_threshold"] == 0.3 and kwargs["pretrained"] is None and kwargs["model"] == "ViT-S-16"
    assert kwargs["backend"] == "torch" and kwargs["dtype"] == torch.bfloat16
    for flag in (["--whole"], ["--slide", "none"]):
        assert main(argv[:6] + flag, segmenter_factory=f) == 0
        assert f.calls[-1][1]["slide"] is None
    assert main(argv[:6] + ["--threshold", "none"], segmenter_factory=f) == 0
    assert f.calls[-1][1]["confidence_threshold"] is None
    assert main(argv[:6] + ["--pretrained", "/weights/b16.pt"], segmenter_factory=f) == 0
    assert f.calls[-1][1]["pretrained"] == "/weights/b16.pt"


@pytest.mark.parametrize("argv, needle", [
    (["--classes", ""], "class list is empty"),
    (["--classes", " , "], "class list is empty"),
    (["--classes", "cat,,dog"], "empty class name"),
    (["--preset", "voc99"], "unknown preset 'voc99'"),
    (["--classes-file", "/nonexistent/cls.txt"], "does not exist"),
    (["--classes", "a", "--slide", "12x24"], "invalid --slide"),
    (["--classes", "a", "--threshold", "2"], "invalid --threshold"),
    (["--classes", "a", "--alpha", "3"], "--alpha"),
    (["--classes", "a", "--preset", "voc21"], "not allowed with"),
    (["--preset", "ade20k", "--threshold", "0.2"], "no background class"),
    (["--classes", "a", "--device", "cuda:0" if not __import__("torch").cuda.is_available() else "bogus"],
     "--device"),
])
def test_user_errors_are_one_line(tmp_path, capsys, argv, needle):
    img = _image(tmp_path / "a.png")
    f = Factory()
    rc = main(["segment", str(img), "--out", str(tmp_path / "o")] + argv, segmenter_factory=f)
    assert rc == 2
    errors = _err_lines(capsys)
    assert len(errors) == 1 and errors[0].startswith("naclip: error: ") and needle in errors[0], errors
    assert f.calls == []                                               # failed before building the model


def test_empty_class_file(tmp_path, capsys):
    (tmp_path / "cls.txt").write_text("# nothing\n\n")
    rc = main(["segment", str(_image(tmp_path / "a.png")), "--classes-file", str(tmp_path / "cls.txt"),
               "--out", str(tmp_path / "o")], segmenter_factory=Factory())
    errors = _err_lines(capsys)
    assert rc == 2 and len(errors) == 1 and "is empty" in errors[0]


def test_folder_errors(tmp_path, capsys, monkeypatch):
    (tmp_path / "empty").mkdir()
    rc = main(["segment", str(tmp_path / "empty"), "--classes", "a", "--out", str(tmp_path / "o")],
              segmenter_factory=Factory())
    errors = _err_lines(capsys)
    assert rc == 2 and errors[0].startswith("naclip: error: no images in folder") and "no images to segment" in errors[1]
    # An unreadable folder (simulated: tests may run as root) next to a readable one.
    _image(tmp_path / "ok" / "a.png")
    (tmp_path / "locked").mkdir()
    real_access = os.access
    monkeypatch.setattr(cli.os, "access",
                        lambda p, m: False if str(p).endswith("locked") else real_access(p, m))
    rc = main(["segment", str(tmp_path / "locked"), str(tmp_path / "ok"), "--classes", "a", "--out",
               str(tmp_path / "o"), "-q"], segmenter_factory=Factory())
    errors = _err_lines(capsys)
    assert rc == 1 and errors == [f"naclip: error: cannot read folder '{tmp_path / 'locked'}': permission denied"]
    assert (tmp_path / "o" / "a_labels.png").exists()


def test_model_load_error_is_one_line(tmp_path, capsys):
    class ModelLoadError(RuntimeError):
        pass

    def factory(preset=None, **kwargs):
        raise ModelLoadError("load_clip: no network access and 'openai' weights are not in the local cache;\n"
                             "download them first")

    rc = main(["segment", str(_image(tmp_path / "a.png")), "--classes", "a", "--out", str(tmp_path / "o")],
              segmenter_factory=factory)
    errors = _err_lines(capsys)
    assert rc == 2 and len(errors) == 1
    assert errors[0].startswith("naclip: error: could not create the segmenter: no network access")


def test_help_and_presets(capsys):
    assert main(["--help"]) == 0
    assert "segment" in capsys.readouterr().out
    assert main([]) == 2
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert "voc21" in out and "113" in out and "560" in out


def test_serve_is_dispatched_lazily(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "naclip.server", None)            # simulate a missing web-app module
    assert main(["serve"]) == 2
    errors = _err_lines(capsys)
    assert len(errors) == 1 and "web app is not available" in errors[0]


def test_serve_help(capsys):
    assert main(["serve", "--help"]) == 0
    assert "--port" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------------
# eval
# ---------------------------------------------------------------------------------------------------------------

def _voc(root, items):
    """items: {id: (label [H, W])}; images get distinct sizes so the fake can look its prediction up."""
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(items) + "\n")
    for i, label in items.items():
        h, w = label.shape
        _image(root / "JPEGImages" / f"{i}.jpg", w=w, h=h)
        (root / "SegmentationClass").mkdir(exist_ok=True)
        img = Image.fromarray(label.astype(np.uint8), mode="P")
        img.putpalette([0] * 768)
        img.save(root / "SegmentationClass" / f"{i}.png")


def test_eval_matches_hand_computed_miou(tmp_path, capsys):
    g1 = np.zeros((4, 6), np.int64)
    g1[:, 3:] = 15                                                # background | person
    g1[0, 0] = 255
    p1 = g1.copy()
    p1[:, 5] = 0                                                  # 4 person pixels predicted background
    p1[0, 0] = 7                                                  # on the ignored pixel: no effect
    g2 = np.full((5, 5), 8, np.int64)                             # cat
    p2 = g2.copy()
    p2[0, :] = 9                                                  # 5 cat pixels predicted chair
    _voc(tmp_path / "VOC2012", {"img1": g1, "img2": g2})
    f = Factory(by_size={(6, 4): p1, (5, 5): p2})
    rc = main(["eval", "--preset", "voc21", "--data-root", str(tmp_path / "VOC2012"), "--json",
               str(tmp_path / "r.json"), "-q", "--device", "cpu"], segmenter_factory=f)
    assert rc == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    # By hand: background label 11, pred 11+4 = 15, I = 11 -> 11/15; person 12 label, 8 predicted, I 8 -> 8/12;
    # cat 25 label, 20 predicted, I 20 -> 20/25; chair 0 label, 5 predicted -> 0; the others: NaN.
    expected = {"background": 11 / 15, "person": 8 / 12, "cat": 20 / 25, "chair": 0.0}
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["images"] == 2 and result["failed"] == 0 and result["preset"] == "voc21"
    iou = {c["name"]: c["IoU"] for c in result["per_class"]}
    for name, value in expected.items():
        assert iou[name] == pytest.approx(value)
    assert sum(v is not None for v in iou.values()) == 4
    assert result["mIoU"] == pytest.approx(sum(expected.values()) / 4)
    assert result["aAcc"] == pytest.approx((11 + 8 + 20) / (11 + 12 + 25))
    assert f.calls[0][0] == "voc21"
    assert "person" in out and f"mIoU {100 * result['mIoU']:.2f}" in out
    # --limit
    f = Factory(by_size={(6, 4): p1, (5, 5): p2})
    assert main(["eval", "--preset", "voc21", "--data-root", str(tmp_path / "VOC2012"), "--limit", "1",
                 "--json", "-", "-q"], segmenter_factory=f) == 0
    assert f.segmenter.seen == [(6, 4)]
    assert json.loads(capsys.readouterr().out)["images"] == 1          # stdout is pure JSON with --json -


def test_eval_errors(tmp_path, capsys):
    rc = main(["eval", "--preset", "ade20k", "--data-root", str(tmp_path / "nowhere")], segmenter_factory=Factory())
    errors = _err_lines(capsys)
    assert rc == 2 and len(errors) == 1 and "does not exist" in errors[0] and "ADEChallengeData2016" in errors[0]

    rc = main(["eval", "--preset", "nope", "--data-root", str(tmp_path)], segmenter_factory=Factory())
    assert rc == 2 and "unknown preset" in _err_lines(capsys)[0]

    # One image with a missing label and one corrupt image: reported, the rest still scored.
    g = np.zeros((4, 6), np.int64)
    _voc(tmp_path / "voc", {"a": g, "b": np.zeros((4, 7), np.int64), "c": np.zeros((4, 8), np.int64)})
    (tmp_path / "voc" / "SegmentationClass" / "b.png").unlink()
    (tmp_path / "voc" / "JPEGImages" / "c.jpg").write_bytes(b"garbage")
    rc = main(["eval", "--preset", "voc21", "--data-root", str(tmp_path / "voc"), "-q"],
              segmenter_factory=Factory(by_size={(6, 4): g}))
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line]
    assert rc == 1 and len(errors) == 2 and "b.png" in errors[0] and "c.jpg" in errors[1]
    assert "1 image(s)" in captured.out and "2 failed" in captured.out

    # Labels that do not fit the preset: one line, and a hint that the preset is wrong.
    _voc(tmp_path / "voc2", {"a": np.full((4, 6), 40)})
    rc = main(["eval", "--preset", "voc21", "--data-root", str(tmp_path / "voc2"), "-q"],
              segmenter_factory=Factory(by_size={(6, 4): np.zeros((4, 6), np.int64)}))
    errors = _err_lines(capsys)
    assert rc == 2 and len(errors) == 1 and "label value 40" in errors[0] and "--preset voc21" in errors[0]


# ---------------------------------------------------------------------------------------------------------------
# naclip.visualize (what segment writes; the web app reuses overlay and class_shares)
# ---------------------------------------------------------------------------------------------------------------

def test_palette_label_png_overlay_and_shares(tmp_path):
    from naclip.visualize import class_color, class_shares, overlay, overlay_color, palette, save_label_png

    pal = palette()
    assert pal.shape == (256, 3) and pal.dtype == np.uint8
    assert [tuple(c) for c in pal[:4]] == [(0, 0, 0), (128, 0, 0), (0, 128, 0), (128, 128, 0)]
    assert tuple(pal[15]) == (192, 128, 128) and tuple(pal[255]) == (224, 224, 192)    # VOC person / ignore
    assert len({tuple(c) for c in pal}) == 256 and class_color(15) == (192, 128, 128)

    labels = np.array([[0, 1, 1, 255], [2, 2, 2, 2]])
    save_label_png(labels, tmp_path / "l.png")
    back = Image.open(tmp_path / "l.png")
    assert back.mode == "P"
    np.testing.assert_array_equal(np.array(back), labels)
    with pytest.raises(ValueError, match="0..255"):
        save_label_png(np.array([[300]]), tmp_path / "bad.png")

    names = ["sky", "cat, kitten", "dog"]
    assert class_shares(labels, names) == [("dog", 0.5), ("cat, kitten", 0.25), ("sky", 0.125)]
    img = Image.new("RGB", (8, 4), (200, 200, 200))             # a different size: resized to the labels
    plain = overlay(img, labels, names, alpha=1.0, legend=None)
    arr = np.asarray(plain)
    # Overlays use their own distinguishable colours (not VOC's black for class 0); ignored pixels stay as they are.
    assert plain.size == (4, 2) and tuple(arr[0, 1]) == overlay_color(1) and tuple(arr[0, 3]) == (200, 200, 200)
    assert tuple(arr[0, 0]) == overlay_color(0)
    half = np.asarray(overlay(img, labels, names, alpha=0.5, legend=None))
    assert tuple(half[1, 0]) == tuple(int(0.5 * 200 + 0.5 * c + 0.5) for c in overlay_color(2))   # rounded blend
    present = overlay(img, labels, names, legend="present")
    everything = overlay(img, np.zeros((2, 4), np.int64), names, legend="all")
    assert present.size[0] > 4 and present.size[1] >= 3 * 11   # a legend panel with three rows
    assert everything.size[1] >= present.size[1]
    with pytest.raises(ValueError):
        overlay(img, labels, names, alpha=2)


# ---------------------------------------------------------------------------------------------------------------
# One real run: `python -m naclip segment` with a small random-weights ViT (no download).
# ---------------------------------------------------------------------------------------------------------------

def test_python_m_naclip_segment_smoke(tmp_path):
    img = _image(tmp_path / "in" / "photo.png", w=40, h=30, red=(30, 200))
    (tmp_path / "in" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-m", "naclip", "segment", str(tmp_path / "in"), "--classes", "cat, sofa/couch",
         "--model", "ViT-S-16", "--pretrained", "none", "--device", "cpu", "--short-side", "32", "--no-pamr",
         "--out", str(out), "--save-probs"],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr                          # the corrupt file fails, the photo does not
    assert "Traceback" not in proc.stderr
    assert any("corrupt.png" in line and line.startswith("naclip: error: ") for line in proc.stderr.splitlines())
    labels = np.array(Image.open(out / "photo_labels.png"))
    assert labels.shape == (30, 40) and labels.max() <= 1
    assert np.load(out / "photo_probs.npy").shape == (2, 30, 40)
    assert Image.open(out / "photo_overlay.png").size[1] >= 30
    assert img.exists()


@pytest.mark.filterwarnings("ignore:.*RANDOM weights")
def test_eval_with_the_real_segmenter(tmp_path, capsys):
    """`naclip eval` through the real Segmenter.from_preset (small random ViT, one prompt template for speed)."""
    from naclip import Segmenter

    def factory(preset=None, **kwargs):
        return Segmenter.from_preset(preset, templates=["a photo of a {}."], cache_dir=False, **kwargs)

    rng = np.random.default_rng(0)
    _voc(tmp_path / "voc", {"a": rng.integers(0, 21, (20, 30)), "b": rng.integers(0, 21, (24, 18))})
    rc = main(["eval", "--preset", "voc21", "--data-root", str(tmp_path / "voc"), "--model", "ViT-S-16",
               "--pretrained", "none", "--short-side", "32", "--no-pamr", "--device", "cpu", "-q",
               "--json", str(tmp_path / "r.json")], segmenter_factory=factory)
    assert rc == 0, capsys.readouterr().err
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["images"] == 2 and result["pixels"] == 20 * 30 + 24 * 18
    assert 0.0 <= result["mIoU"] <= 1.0 and len(result["per_class"]) == 21
