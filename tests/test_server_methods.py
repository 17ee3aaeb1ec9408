"""`naclip serve --vfm ...`: the page offers NACLIP and ProxyCLIP, each request runs the chosen method with its own
window and PAMR default on one shared CLIP model; bad --vfm options are one line before loading."""
from __future__ import annotations

import argparse
import io

import numpy as np
import pytest

pytest.importorskip("flask")
pytest.importorskip("open_clip")
pytest.importorskip("timm")

from PIL import Image  # noqa: E402

from naclip import server  # noqa: E402
from naclip.server import ServerConfig, create_app  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*RANDOM weights.*")


class FakeResult:
    def __init__(self, size, n):
        self.labels = np.zeros(size[::-1], np.int64)
        self.class_names = [f"c{i}" for i in range(n)]
        self.timings = {"total": 0.001}


class Fake:
    """Records the settings each request ran with."""

    def __init__(self, slide, pamr):
        self.slide, self.pamr, self.classes, self.runs = slide, pamr, [], []

    def set_classes(self, classes):
        self.classes = list(classes)

    def __call__(self, image):
        self.runs.append((self.slide, self.pamr))
        return FakeResult(image.size, len(self.classes))


def _png():
    buf = io.BytesIO()
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _app():
    segs = {"naclip": Fake((224, 112), True), "proxyclip": Fake((336, 112), False)}
    config = ServerConfig(methods={"naclip": {"title": "NACLIP", "window": (224, 112), "pamr": True},
                                   "proxyclip": {"title": "ProxyCLIP", "window": (336, 112), "pamr": False}})
    return create_app(segs, config), segs


def _post(client, **fields):
    data = {"classes": "cat, dog", "image": (io.BytesIO(_png()), "x.png"), **fields}
    return client.post("/api/segment", data=data, content_type="multipart/form-data")


def test_page_offers_the_methods():
    app, _ = _app()
    html = app.test_client().get("/").get_data(as_text=True)
    assert 'name="method" value="naclip"' in html and 'name="method" value="proxyclip"' in html
    assert "ProxyCLIP" in html
    plain = create_app(Fake((224, 112), True), ServerConfig()).test_client().get("/").get_data(as_text=True)
    assert 'name="method"' not in plain


def test_each_request_runs_the_chosen_method_with_its_window_and_pamr_default():
    app, segs = _app()
    client = app.test_client()
    assert _post(client, method="proxyclip").get_json()["method"] == "proxyclip"
    assert segs["proxyclip"].runs == [((336, 112), False)] and segs["naclip"].runs == []
    assert _post(client).status_code == 200                         # default: the first method, NACLIP
    assert segs["naclip"].runs == [((224, 112), True)]
    _post(client, method="proxyclip", pamr="on", mode="whole")
    assert segs["proxyclip"].runs[-1] == (None, True)
    response = _post(client, method="maskclip")
    assert response.status_code == 400 and "maskclip" in response.get_json()["error"]


def _serve_args(**overrides):
    from tests.naclip_helpers import register_tiny_config
    parser = argparse.ArgumentParser()
    server.add_serve_arguments(parser)
    argv = ["--model", register_tiny_config(), "--pretrained", "none", "--device", "cpu", "--port", "0"]
    for key, value in overrides.items():
        argv += [f"--{key.replace('_', '-')}", value]
    return parser.parse_args(argv)


def test_build_segmenter_with_a_vfm_shares_one_clip_model():
    segs = server.build_segmenter(_serve_args(vfm="vit_tiny_patch16_224", vfm_pretrained="none"))
    assert set(segs) == {"naclip", "proxyclip"}
    assert segs["proxyclip"].model is segs["naclip"].model and segs["proxyclip"].method == "proxyclip"
    assert segs["proxyclip"].slide == (336, 112) and segs["proxyclip"].pamr is False
    choices = server.method_choices(segs)
    assert choices["proxyclip"] == {"title": "ProxyCLIP", "window": (336, 112), "pamr": False}
    image = Image.fromarray(np.full((40, 60, 3), 90, np.uint8))
    for method, seg in segs.items():
        result = server.run_segmenter(seg, image, ["cat", "dog"], window=choices[method]["window"], pamr=False)
        assert result.labels.shape == (40, 60)
    assert server.build_segmenter(_serve_args()).method == "naclip"       # no --vfm: one segmenter, as before


@pytest.mark.parametrize("option, value, needle", [
    ("vfm", "dino_vitb7", "unknown VFM 'dino_vitb7'"),
    ("vfm_pretrained", "/no/such/file.pth", "no such file"),
])
def test_bad_vfm_options_fail_before_loading(capsys, monkeypatch, option, value, needle):
    monkeypatch.setattr(server, "build_segmenter", lambda args: pytest.fail("loaded a model"))
    assert server.run_serve(_serve_args(**{option: value})) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(lines) == 1 and needle in lines[0]
