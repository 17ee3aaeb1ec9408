"""The web app (naclip/server.py) over plain HTTP: pages, samples, a real segmentation with a tiny random-weights
model, every bad-input case, the request queue, and `naclip serve` start-up."""
from __future__ import annotations

import argparse
import base64
import io
import json
import threading
import time
import urllib.error
import urllib.request
import uuid
import warnings

import numpy as np
import pytest

flask = pytest.importorskip("flask", reason="the web app needs Flask: pip install 'naclip-kernels[segmenter]'")
PIL_Image = pytest.importorskip("PIL.Image", reason="the web app needs Pillow")
pytest.importorskip("open_clip", reason="the segmenter needs open_clip: pip install 'naclip-kernels[segmenter]'")

import torch  # noqa: E402

from naclip import server  # noqa: E402
from naclip.server import ServerConfig, create_app  # noqa: E402

Image = PIL_Image


# --------------------------------------------------------------------------------------------------------------
# Helpers shared with tests/test_server_browser.py
# --------------------------------------------------------------------------------------------------------------

def tiny_segmenter(**kwargs):
    """A real naclip.Segmenter on a tiny random-weights open_clip ViT (2 blocks, width 64): fast on a CPU."""
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    from naclip import Segmenter

    torch.manual_seed(0)
    model = open_clip.CLIP(
        embed_dim=32,
        vision_cfg=CLIPVisionCfg(layers=2, width=64, head_width=32, patch_size=16, image_size=64),
        text_cfg=CLIPTextCfg(layers=1, width=64, heads=2, context_length=77, vocab_size=49408))
    options = dict(classes=["object"], device="cpu", short_side=96, slide=(64, 32), pamr_iters=2,
                   cache_dir=False)
    options.update(kwargs)
    return Segmenter(model, pretrained=None, **options)


class ServerThread:
    """The app on a real threaded werkzeug server on a free 127.0.0.1 port, in a daemon thread."""

    def __init__(self, app):
        from werkzeug.serving import make_server

        self.server = make_server("127.0.0.1", 0, app, threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


def jpeg_bytes(size=(64, 48), color=(200, 80, 40), quality=90) -> bytes:
    rng = np.random.default_rng(0)
    arr = np.clip(np.array(color)[None, None] + rng.integers(-30, 30, (size[1], size[0], 3)), 0, 255)
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def multipart(fields: dict, files: dict = None):
    """(body, content type) of a multipart/form-data request, for urllib."""
    boundary = uuid.uuid4().hex
    parts = []
    for name, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for name, (filename, data) in (files or {}).items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                     f'Content-Type: application/octet-stream\r\n\r\n'.encode() + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def http_post(url: str, fields: dict, files: dict = None, timeout: float = 60):
    """POST multipart over a real socket; returns (status, JSON body)."""
    body, ctype = multipart(fields, files)
    req = urllib.request.Request(url, data=body, headers={"Content-Type": ctype}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def http_get_json(url: str, timeout: float = 30):
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.status, json.loads(resp.read())


def decode_data_url(url: str) -> "Image.Image":
    assert url.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))


class FakeSegmenter:
    """The Segmenter interface the app uses (set_classes, slide, pamr, __call__), with no model: stripes of
    labels, optional blocking on an event (to hold a request 'running'), and call counting."""

    def __init__(self, gate: threading.Event = None):
        self.classes = []
        self.class_names = []
        self.slide = (224, 112)
        self.pamr = True
        self.gate = gate
        self.calls = []
        self.started = threading.Event()

    def set_classes(self, classes):
        self.classes = list(classes)
        self.class_names = [c.split(",")[0].strip() for c in classes]

    def __call__(self, image):
        from naclip.segmenter import SegmentationResult

        self.calls.append({"classes": list(self.classes), "slide": self.slide, "pamr": self.pamr,
                           "size": image.size})
        self.started.set()
        if self.gate is not None:
            assert self.gate.wait(30), "test gate never opened"
        w, h = image.size
        n = len(self.class_names)
        labels = torch.as_tensor((np.arange(w)[None, :] * n // w).repeat(h, 0), dtype=torch.int64)
        probs = torch.nn.functional.one_hot(labels, n).permute(2, 0, 1).float()
        return SegmentationResult(labels=labels, probs=probs, class_names=list(self.class_names),
                                  timings={"preprocess": 0.001, "text": 0.0, "encode": 0.002, "pamr": 0.0,
                                           "postprocess": 0.0, "total": 0.003})


# --------------------------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def real_segmenter():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tiny_segmenter()


@pytest.fixture(scope="module")
def real_client(real_segmenter):
    app = create_app(real_segmenter, ServerConfig(model_info={"model": "tiny", "pretrained": "random weights"}))
    return app.test_client()


@pytest.fixture
def fake():
    return FakeSegmenter()


def make_client(segmenter=None, **config):
    return create_app(segmenter or FakeSegmenter(), ServerConfig(**config)).test_client()


def post(client, classes="cat, wall", image=None, filename="photo.jpg", **fields):
    data = {"classes": classes, **fields}
    if image is not None:
        data["image"] = (io.BytesIO(image), filename)
    return client.post("/api/segment", data=data, content_type="multipart/form-data")


def assert_error(resp, status, *words):
    assert resp.status_code == status, (resp.status_code, resp.get_data(as_text=True)[:300])
    assert resp.is_json
    message = resp.get_json()["error"]
    for w in words:
        assert w.lower() in message.lower(), message
    return message


# --------------------------------------------------------------------------------------------------------------
# Pages and samples
# --------------------------------------------------------------------------------------------------------------

def test_healthz_and_index(fake):
    client = make_client(fake, model_info={"model": "ViT-X", "pretrained": "random weights", "device": "cpu"})
    resp = client.get("/healthz")
    assert resp.status_code == 200
    assert resp.get_json() == {"status": "ok", "model_loaded": True, "busy": False, "waiting": 0, "queue_size": 4}
    page = client.get("/")
    assert page.status_code == 200
    html = page.get_data(as_text=True)
    for needle in ('id="image-input"', 'id="classes"', 'value="slide"', 'value="whole"', 'id="pamr"',
                   'id="legend"', 'id="overlay"', "ViT-X", "random weights", "20 megapixels", "25 MB"):
        assert needle in html, needle
    for asset in ("/static/app.js", "/static/app.css"):
        assert client.get(asset).status_code == 200, asset


def test_samples_are_listed_served_and_licensed(fake):
    client = make_client(fake)
    samples = client.get("/api/samples").get_json()["samples"]
    assert [s["name"] for s in samples] == ["cat", "coffee", "astronaut"]
    for s in samples:
        resp = client.get(s["url"])
        assert resp.status_code == 200 and resp.mimetype == "image/jpeg"
        img = Image.open(io.BytesIO(resp.data))
        assert max(img.size) <= 512 and s["classes"]
    assert (server.ASSETS_DIR / "LICENSE.md").is_file()
    assert client.get("/samples/../server.py").status_code == 404
    assert client.get("/samples/%2e%2e%2fserver.py").status_code == 404
    assert_error(client.get("/samples/nope.jpg"), 404, "no sample")
    assert_error(client.get("/api/nope"), 404, "not found")


def test_parse_classes_uses_the_cli_syntax():
    assert server.parse_classes("cat, sofa/couch ,  tv  monitor,", 10) == ["cat", "sofa, couch", "tv monitor"]
    assert server.parse_classes("cat\ndog", 10) == ["cat", "dog"]


# --------------------------------------------------------------------------------------------------------------
# Successful segmentations
# --------------------------------------------------------------------------------------------------------------

def test_segment_upload_with_tiny_model(real_client):
    image = jpeg_bytes((80, 60))
    resp = post(real_client, "cat, sofa/couch, wall", image, mode="slide", pamr="on")
    assert resp.status_code == 200, resp.get_data(as_text=True)[:500]
    data = resp.get_json()
    assert (data["width"], data["height"]) == (80, 60)
    assert data["classes"] == ["cat", "sofa", "wall"]
    assert data["mode"] == "slide" and data["pamr"] is True
    overlay = decode_data_url(data["overlay"])
    assert overlay.size == (80, 60)
    label_map = decode_data_url(data["label_map"])
    assert label_map.size == (80, 60) and label_map.mode == "P"
    ids = np.array(label_map)
    assert ids.max() < 3
    legend = data["legend"]
    assert sorted(e["name"] for e in legend) == ["cat", "sofa", "wall"]
    assert all(e["color"].startswith("#") and len(e["color"]) == 7 for e in legend)
    assert abs(sum(e["share"] for e in legend) - 1.0) < 1e-6
    for e in legend:       # shares are the label map's pixel fractions
        assert abs(e["share"] - float((ids == e["index"]).mean())) < 1e-6
    assert [e["share"] for e in legend] == sorted((e["share"] for e in legend), reverse=True)
    stages = [t["stage"] for t in data["timings"]]
    for stage in ("decode image", "queue wait", "preprocess", "text", "encode", "pamr", "render overlay", "total"):
        assert stage in stages, stages
    assert all(t["seconds"] >= 0 for t in data["timings"])


def test_segment_sample_whole_image_without_pamr(real_client, real_segmenter):
    resp = post(real_client, "cat, wall, floor", sample="cat", mode="whole", pamr="off")
    assert resp.status_code == 200, resp.get_data(as_text=True)[:500]
    data = resp.get_json()
    assert (data["width"], data["height"]) == Image.open(server.ASSETS_DIR / "cat.jpg").size
    assert data["mode"] == "whole" and data["pamr"] is False
    assert real_segmenter.slide is None and real_segmenter.pamr is False
    assert real_segmenter.classes == ["cat", "wall", "floor"]


def test_request_options_reach_the_segmenter(fake):
    client = make_client(fake, window=(96, 48))
    assert post(client, "a, b", jpeg_bytes(), mode="whole", pamr="off").status_code == 200
    assert post(client, "a, b/c", jpeg_bytes(), mode="slide", pamr="on").status_code == 200
    assert post(client, "a, b/c", jpeg_bytes()).status_code == 200           # defaults: slide, PAMR on
    assert [(c["classes"], c["slide"], c["pamr"]) for c in fake.calls] == [
        (["a", "b"], None, False), (["a", "b, c"], (96, 48), True), (["a", "b, c"], (96, 48), True)]


def test_model_is_loaded_once_by_the_factory():
    built = []

    def factory():
        built.append(FakeSegmenter())
        return built[-1]

    client = create_app(segmenter_factory=factory).test_client()
    assert client.get("/healthz").get_json()["model_loaded"] is False
    for _ in range(3):
        assert post(client, "a", jpeg_bytes()).status_code == 200
    assert len(built) == 1 and len(built[0].calls) == 3
    with pytest.raises(ValueError):
        create_app()


# --------------------------------------------------------------------------------------------------------------
# Bad input: a clear message, a 4xx status, and the server keeps serving
# --------------------------------------------------------------------------------------------------------------

def test_not_an_image(fake):
    client = make_client(fake)
    assert_error(post(client, "cat", b"hello, I am a text file\n" * 20, "notes.txt"), 415, "not an image",
                 "notes.txt")
    assert_error(post(client, "cat", b"", "empty.png"), 400, "empty")
    assert post(client, "cat", jpeg_bytes()).status_code == 200         # still serving
    assert fake.calls and len(fake.calls) == 1


def test_corrupt_truncated_jpeg(fake):
    client = make_client(fake)
    data = jpeg_bytes((256, 256))
    assert_error(post(client, "cat", data[: len(data) // 2], "broken.jpg"), 400, "corrupt", "broken.jpg")
    assert not fake.calls
    assert post(client, "cat", data).status_code == 200


def test_too_many_megapixels_is_refused_before_decoding(fake):
    client = make_client(fake, max_megapixels=0.5)
    big = jpeg_bytes((1000, 800), quality=50)                       # 0.8 MP
    assert_error(post(client, "cat", big, "big.jpg"), 413, "too large", "0.8 megapixels", "0.5 MP")
    # Truncated: decoding would fail as corrupt, so a "too large" answer shows the size was checked first.
    assert_error(post(client, "cat", big[:2000], "big.jpg"), 413, "too large")
    assert post(client, "cat", jpeg_bytes((600, 600))).status_code == 200      # 0.36 MP is fine


def test_too_many_bytes(fake):
    client = make_client(fake, max_upload_mb=0.05)                   # 51.2 KiB
    noisy = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (200, 200, 3), dtype=np.uint8)).save(noisy, "PNG")
    assert len(noisy.getvalue()) > 0.05 * 2 ** 20
    assert_error(post(client, "cat", noisy.getvalue(), "noise.png"), 413, "limit is 0.05 MB")
    # A body beyond Flask's MAX_CONTENT_LENGTH (limit + 1 MiB for the form) is refused by Flask itself.
    assert_error(post(client, "cat", b"\0" * (2 * 2 ** 20), "huge.png"), 413, "too large", "0.05 MB")
    assert post(client, "cat", jpeg_bytes()).status_code == 200


def test_too_many_bytes_over_a_real_socket(fake):
    """The same 413 through werkzeug's real server (the body is not read), then the server still answers."""
    with ServerThread(create_app(fake, ServerConfig(max_upload_mb=0.05))) as srv:
        status, body = http_post(srv.url + "/api/segment", {"classes": "cat"},
                                 {"image": ("huge.png", b"\0" * (3 * 2 ** 20))})
        assert status == 413 and "0.05 MB" in body["error"]
        status, body = http_post(srv.url + "/api/segment", {"classes": "cat"}, {"image": ("ok.jpg", jpeg_bytes())})
        assert status == 200 and body["classes"] == ["cat"]


def test_no_classes(fake):
    client = make_client(fake)
    for text in ("", "   ", ",, ,", None):
        resp = post(client, text, jpeg_bytes()) if text is not None else client.post(
            "/api/segment", data={"image": (io.BytesIO(jpeg_bytes()), "a.jpg")}, content_type="multipart/form-data")
        assert_error(resp, 400, "at least one class")
    assert_error(post(client, "cat,,dog", jpeg_bytes()), 400, "empty class name")
    assert not fake.calls


def test_too_many_classes(fake):
    client = make_client(fake, max_classes=3)
    assert_error(post(client, "a, b, c, d", jpeg_bytes()), 400, "too many classes", "4 given", "at most 3")
    assert post(client, "a, b, c", jpeg_bytes()).status_code == 200
    assert_error(post(client, "x" * 101, jpeg_bytes()), 400, "too long")
    with pytest.raises(ValueError):
        ServerConfig(max_classes=256)


def test_other_bad_requests(fake):
    client = make_client(fake)
    assert_error(post(client, "cat"), 400, "choose an image")
    assert_error(post(client, "cat", sample="dog"), 404, "unknown sample")
    assert_error(post(client, "cat", jpeg_bytes(), mode="tiles"), 400, "slide", "whole")
    assert_error(post(client, "cat", jpeg_bytes(), pamr="maybe"), 400, "pamr")
    assert_error(client.get("/api/segment"), 405)
    assert not fake.calls


def test_segmenter_failure_is_a_json_500_and_the_server_recovers(fake):
    calls = {"n": 0}
    original = fake.__class__.__call__

    class Flaky(FakeSegmenter):
        def __call__(self, image):
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("out of memory (simulated)")
            return original(self, image)

    client = make_client(Flaky())
    assert_error(post(client, "cat", jpeg_bytes()), 500, "out of memory (simulated)")
    assert post(client, "cat", jpeg_bytes()).status_code == 200
    assert client.get("/healthz").get_json()["busy"] is False


# --------------------------------------------------------------------------------------------------------------
# The queue: one request at a time through the model
# --------------------------------------------------------------------------------------------------------------

def _start_request(url, results, key, classes="a, b"):
    def run():
        results[key] = http_post(url + "/api/segment", {"classes": classes}, {"image": ("x.jpg", jpeg_bytes())})
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _wait_for(predicate, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def test_concurrent_requests_are_queued_and_both_succeed():
    gate = threading.Event()
    fake = FakeSegmenter(gate)
    app = create_app(fake, ServerConfig(queue_size=1))
    queue = app.extensions["naclip"]["queue"]
    results = {}
    with ServerThread(app) as srv:
        first = _start_request(srv.url, results, "first", "a, b")
        assert fake.started.wait(20)
        second = _start_request(srv.url, results, "second", "c, d, e")
        assert _wait_for(lambda: queue.status()["waiting"] == 1), queue.status()
        assert http_get_json(srv.url + "/healthz")[1] == {"status": "ok", "model_loaded": True, "busy": True,
                                                          "waiting": 1, "queue_size": 1}
        time.sleep(0.2)
        assert len(fake.calls) == 1                  # the second has not reached the model
        gate.set()
        first.join(30)
        second.join(30)
    assert results["first"][0] == 200 and results["second"][0] == 200, results
    assert results["first"][1]["classes"] == ["a", "b"] and results["second"][1]["classes"] == ["c", "d", "e"]
    waited = {t["stage"]: t["seconds"] for t in results["second"][1]["timings"]}["queue wait"]
    assert waited >= 0.2
    assert [c["classes"] for c in fake.calls] == [["a", "b"], ["c", "d", "e"]]


def test_busy_message_when_the_queue_is_full():
    gate = threading.Event()
    fake = FakeSegmenter(gate)
    results = {}
    with ServerThread(create_app(fake, ServerConfig(queue_size=0))) as srv:
        first = _start_request(srv.url, results, "first")
        assert fake.started.wait(20)
        status, body = http_post(srv.url + "/api/segment", {"classes": "a"}, {"image": ("y.jpg", jpeg_bytes())})
        assert status == 503 and "busy" in body["error"] and "try again" in body["error"]
        # Bad input is still answered at once while the model is busy.
        status, body = http_post(srv.url + "/api/segment", {"classes": ""}, {"image": ("y.jpg", jpeg_bytes())})
        assert status == 400 and "class" in body["error"]
        gate.set()
        first.join(30)
        assert results["first"][0] == 200
        status, body = http_post(srv.url + "/api/segment", {"classes": "a"}, {"image": ("y.jpg", jpeg_bytes())})
        assert status == 200                          # free again
    assert len(fake.calls) == 2


def test_busy_message_when_the_wait_times_out():
    gate = threading.Event()
    fake = FakeSegmenter(gate)
    results = {}
    with ServerThread(create_app(fake, ServerConfig(queue_size=2, queue_timeout=0.3))) as srv:
        first = _start_request(srv.url, results, "first")
        assert fake.started.wait(20)
        t0 = time.monotonic()
        status, body = http_post(srv.url + "/api/segment", {"classes": "a"}, {"image": ("y.jpg", jpeg_bytes())})
        assert status == 503 and "waited 0.3 s" in body["error"], body
        assert time.monotonic() - t0 >= 0.3
        gate.set()
        first.join(30)
    assert results["first"][0] == 200 and len(fake.calls) == 1


# --------------------------------------------------------------------------------------------------------------
# `naclip serve`
# --------------------------------------------------------------------------------------------------------------

def _serve_args(*argv):
    return server.add_serve_arguments(argparse.ArgumentParser()).parse_args(list(argv))


def test_serve_arguments_defaults():
    args = _serve_args()
    assert (args.host, args.port, args.model, args.pretrained, args.device, args.dtype, args.backend) == (
        "127.0.0.1", 7860, "ViT-B-16", "openai", None, "float32", "auto")
    assert (args.max_megapixels, args.max_upload_mb, args.max_classes, args.slide) == (20.0, 25.0, 64, (224, 112))
    assert _serve_args("--slide", "336x168", "--port", "0").slide == (336, 168)
    with pytest.raises(SystemExit):
        _serve_args("--slide", "10x20")


def test_run_serve_prints_its_url_and_serves(monkeypatch, capsys):
    """run_serve on port 0 with an injected segmenter: prints 'Serving on http://127.0.0.1:PORT', answers there,
    and returns 0 on Ctrl+C."""
    from werkzeug import serving

    seen = {}
    real_make_server = serving.make_server

    def make_server(host, port, app, **kwargs):
        srv = real_make_server(host, port, app, **kwargs)
        seen["server"] = srv

        def serve_forever():
            with app.test_client() as c:
                seen["health"] = c.get("/healthz").get_json()
            seen["bound"] = srv.server_address
            raise KeyboardInterrupt
        srv.serve_forever = serve_forever
        return srv

    monkeypatch.setattr(serving, "make_server", make_server)
    args = _serve_args("--port", "0", "--pretrained", "none", "--device", "cpu")
    assert server.run_serve(args, segmenter=FakeSegmenter()) == 0
    out = capsys.readouterr().out
    port = seen["bound"][1]
    assert seen["bound"][0] == "127.0.0.1" and port > 0
    assert f"Serving on http://127.0.0.1:{port}" in out
    assert seen["health"]["status"] == "ok"


def test_run_serve_reports_bad_options_and_model_errors(capsys):
    assert server.run_serve(_serve_args("--max-classes", "0"), segmenter=FakeSegmenter()) == 2
    assert "max_classes" in capsys.readouterr().err
    assert server.run_serve(_serve_args("--model", "No-Such-Model", "--pretrained", "none", "--port", "0",
                                        "--device", "cpu")) == 2          # a problem the user can fix, as in the CLI
    assert "could not load the model" in capsys.readouterr().err


def test_cli_dispatches_serve(monkeypatch):
    cli = pytest.importorskip("naclip.cli")
    seen = {}
    monkeypatch.setattr(server, "run_serve", lambda args: seen.setdefault("args", args) and 0)
    assert cli.main(["serve", "--port", "0", "--max-classes", "5", "--pretrained", "none"]) == 0
    assert seen["args"].port == 0 and seen["args"].max_classes == 5 and seen["args"].pretrained == "none"


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the message for a machine without CUDA")
def test_serve_checks_the_device_before_loading_a_model(capsys):
    from naclip.cli import main

    assert main(["serve", "--device", "cuda", "--pretrained", "none", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "CUDA is not available" in err and "model ready" not in err
