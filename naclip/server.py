"""`naclip serve`: a one-page local web app on top of the NACLIP segmenter.

Upload an image (or pick a bundled sample), type class names, choose sliding window / whole image and PAMR, and get
the overlay with a colour legend, the label map, per-class pixel shares and per-stage timings.

- ``create_app(segmenter, config)`` is the Flask app factory. ``segmenter`` is a loaded :class:`naclip.Segmenter` (or
  anything with the same call signature), or a zero-argument factory that returns one; a factory is called once, on
  the first request, and the result is shared by every request after it.
- Requests go through the model one at a time; others wait in a bounded queue (``ServerConfig.queue_size``) for at
  most ``ServerConfig.queue_timeout`` seconds and then get a clear "busy" message (HTTP 503).
- Bad input (not an image, a corrupt file, too many pixels or bytes, no or too many classes) gets HTTP 4xx with
  ``{"error": "..."}``; the page shows the message and the server keeps serving.
- ``add_serve_arguments(parser)`` / ``run_serve(args)`` are what ``naclip serve`` (naclip/cli.py) calls.
"""
from __future__ import annotations

import argparse
import base64
import collections
import io
import ipaddress
import logging
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from flask import Flask, jsonify, render_template, request, send_from_directory
from PIL import Image, ImageOps, UnidentifiedImageError
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

__all__ = ["ServerConfig", "create_app", "add_serve_arguments", "run_serve", "parse_classes", "SAMPLES"]

log = logging.getLogger("naclip.server")

PACKAGE_DIR = Path(__file__).resolve().parent
ASSETS_DIR = PACKAGE_DIR / "assets"

MB = 1024 * 1024

# Bundled sample photos (naclip/assets/, see LICENSE.md there): name -> (file, title, suggested classes).
SAMPLES: Dict[str, Tuple[str, str, str]] = {
    "cat": ("cat.jpg", "Chelsea the cat", "cat, wall, floor"),
    "coffee": ("coffee.jpg", "Coffee cup", "coffee cup, saucer, spoon, wooden table"),
    "astronaut": ("astronaut.jpg", "Astronaut Eileen Collins", "person, flag, space shuttle, wall"),
}

MODES = ("slide", "whole")
_TRUE = {"1", "true", "on", "yes"}
_FALSE = {"0", "false", "off", "no", ""}


@dataclass
class ServerConfig:
    """Limits and page settings of the web app (all checked on the server; the page checks the byte limit too)."""

    max_megapixels: float = 20.0       # images with more pixels than this are refused (checked before decoding)
    max_upload_mb: float = 25.0        # uploads larger than this (MiB) are refused
    max_classes: int = 64              # at most this many class names per request
    max_class_chars: int = 100         # at most this many characters per class name
    queue_size: int = 4                # requests that may wait while one runs; more get "busy" at once (0: none wait)
    queue_timeout: float = 300.0       # seconds a queued request waits for its turn before it gets "busy"
    max_display_side: int = 2048       # overlay / label-map images sent to the page are at most this many pixels wide/high
    alpha: float = 0.5                 # overlay opacity
    default_mode: str = "slide"        # "slide" (sliding window) or "whole" (whole image)
    window: Tuple[int, int] = (224, 112)   # (crop, stride) in pixels of the sliding-window mode
    default_pamr: bool = True
    model_info: Dict[str, Any] = field(default_factory=dict)   # shown on the page (model, weights, device...)
    # Methods offered by a method selector on the page (`naclip serve --vfm ...`: naclip and proxyclip), each with
    # its sliding window and PAMR default; empty: one segmenter, no selector.
    methods: Dict[str, Dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self):
        if self.max_megapixels <= 0 or self.max_upload_mb <= 0:
            raise ValueError("max_megapixels and max_upload_mb must be positive")
        if not 1 <= self.max_classes <= 255:
            raise ValueError("max_classes must be in 1..255 (the label map is an 8-bit palette PNG)")
        if self.max_class_chars < 1:
            raise ValueError("max_class_chars must be at least 1")
        if self.queue_size < 0 or self.queue_timeout < 0:
            raise ValueError("queue_size and queue_timeout must be >= 0")
        if self.default_mode not in MODES:
            raise ValueError(f"default_mode must be one of {MODES}, got {self.default_mode!r}")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * MB)

    @property
    def max_pixels(self) -> int:
        return int(self.max_megapixels * 1_000_000)


class RequestError(Exception):
    """A request the app refuses; ``status`` is the HTTP status, the message is shown on the page."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.message = message
        self.status = status


class Busy(RequestError):
    def __init__(self, message: str):
        super().__init__(message, 503)


class RequestQueue:
    """One request at a time through the model; up to ``size`` others wait, first come first served, for at most
    ``timeout`` seconds each. Beyond that they get :class:`Busy`."""

    def __init__(self, size: int, timeout: float):
        self.size = size
        self.timeout = timeout
        self._cond = threading.Condition()
        self._busy = False
        self._waiting: collections.deque = collections.deque()

    def status(self) -> Dict[str, Any]:
        with self._cond:
            return {"busy": self._busy, "waiting": len(self._waiting), "queue_size": self.size}

    def acquire(self) -> float:
        """Wait for the model; returns the seconds waited. Raises Busy if the queue is full or the wait times out."""
        start = time.perf_counter()
        with self._cond:
            if not self._busy and not self._waiting:
                self._busy = True
                return 0.0
            if len(self._waiting) >= self.size:
                raise Busy("The server is busy with another image and its queue is full "
                           f"({self.size} waiting at most). Please try again in a moment.")
            token = object()
            self._waiting.append(token)
            deadline = start + self.timeout
            try:
                while self._busy or self._waiting[0] is not token:
                    remaining = deadline - time.perf_counter()
                    if remaining <= 0:
                        raise Busy(f"The server is busy: this request waited {self.timeout:g} s in the queue "
                                   "without getting its turn. Please try again in a moment.")
                    self._cond.wait(remaining)
            finally:
                self._waiting.remove(token)
                self._cond.notify_all()       # the next in line may now be at the head
            self._busy = True
        return time.perf_counter() - start

    def release(self) -> None:
        with self._cond:
            self._busy = False
            self._cond.notify_all()


# ----------------------------------------------------------------------------------------------------------------
# Input parsing and validation


def parse_classes(text: Optional[str], max_classes: int, max_chars: int = 100) -> List[str]:
    """The CLI's ``--classes`` syntax (naclip.presets.parse_classes_arg): commas (or new lines) separate classes,
    ``/`` separates synonyms of one class (``"cat, sofa/couch"``). Returns the class lines (``"sofa, couch"``)."""
    from naclip.presets import ClassListError, parse_classes_arg

    text = (text or "").replace("\r", "").replace("\n", ",")
    if not text.replace(",", "").strip():
        raise RequestError("Please type at least one class name (separate several with commas).")
    try:
        lines = list(parse_classes_arg(text))
    except ClassListError as exc:
        raise RequestError(f"Cannot read the class list: {str(exc).replace('--classes ', '')}.") from None
    if len(lines) > max_classes:
        raise RequestError(f"Too many classes: {len(lines)} given, at most {max_classes} allowed.")
    long = [n for line in lines for n in line.split(", ") if len(n) > max_chars]
    if long:
        raise RequestError(f"Class name too long (at most {max_chars} characters): {long[0][:40]!r}...")
    return lines


def _parse_bool(value: Optional[str], default: bool, what: str) -> bool:
    if value is None:
        return default
    v = value.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise RequestError(f"{what} must be on or off, got {value!r}.")


def decode_image(data: bytes, config: ServerConfig, filename: str = "the upload") -> Image.Image:
    """Bytes -> RGB PIL image, refusing non-images, corrupt files and images over the pixel limit.

    The pixel count is checked from the header, before the pixel data is decoded."""
    if not data:
        raise RequestError(f"{filename} is empty.")
    if len(data) > config.max_upload_bytes:
        raise RequestError(f"{filename} is {len(data) / MB:.1f} MB; the limit is {config.max_upload_mb:g} MB.", 413)
    too_big = (f"{filename} is too large: more than {config.max_megapixels:g} megapixels "
               f"(the limit is {config.max_megapixels:g} MP).")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise RequestError(too_big, 413) from None
    except UnidentifiedImageError:
        raise RequestError(f"{filename} is not an image (or not a format Pillow can read: "
                           "use JPEG, PNG, WebP, BMP, GIF or TIFF).", 415) from None
    except Exception as exc:    # noqa: BLE001 - anything Pillow raises on garbage is the user's file, not our bug
        raise RequestError(f"{filename} could not be read as an image ({exc}).", 400) from None
    w, h = img.size
    if w * h > config.max_pixels:
        raise RequestError(f"{filename} is too large: {w}x{h} = {w * h / 1e6:.1f} megapixels "
                           f"(the limit is {config.max_megapixels:g} MP).", 413)
    if w < 1 or h < 1:
        raise RequestError(f"{filename} has no pixels ({w}x{h}).")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img.load()
            img = ImageOps.exif_transpose(img)
            img = img.convert("RGB")
    except Exception as exc:    # noqa: BLE001 - truncated / corrupt pixel data
        raise RequestError(f"{filename} is corrupt or truncated and could not be decoded ({exc}).", 400) from None
    return img


# ----------------------------------------------------------------------------------------------------------------
# Running the segmenter and rendering the result


def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def run_segmenter(segmenter, image: Image.Image, classes: Sequence[str], window: Optional[Tuple[int, int]],
                  pamr: bool):
    """One segmentation with this request's classes, window (``(crop, stride)`` or ``None`` for the whole image) and
    PAMR setting, on the shared :class:`naclip.Segmenter` (the caller holds the model lock). ``set_classes`` only
    runs when the classes changed; the text embeddings come from the segmenter's text cache either way."""
    if list(getattr(segmenter, "classes", None) or []) != list(classes):
        try:
            segmenter.set_classes(list(classes))
        except ValueError as exc:
            raise RequestError(f"Cannot use these classes: {exc}") from None
    segmenter.slide = window
    segmenter.pamr = bool(pamr)
    return segmenter(image)


def _fit(img: Image.Image, max_side: int, resample) -> Image.Image:
    if max(img.size) <= max_side:
        return img
    img = img.copy()
    img.thumbnail((max_side, max_side), resample)
    return img


def _data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


def _label_png_bytes(labels: np.ndarray) -> bytes:
    """The label map as naclip.visualize.save_label_png writes it (palette PNG, pixel value = class id)."""
    import tempfile

    from naclip import visualize

    with tempfile.TemporaryDirectory(prefix="naclip-serve-") as tmp:
        path = visualize.save_label_png(labels, Path(tmp) / "labels.png")
        return path.read_bytes()


def render_result(image: Image.Image, labels: np.ndarray, class_names: Sequence[str], config: ServerConfig
                  ) -> Dict[str, Any]:
    """Overlay (no legend drawn in: the page has its own), label map (palette PNG), and the legend entries:
    every requested class with its overlay colour and pixel share, largest share first (the label map keeps the
    PASCAL VOC colours of a label PNG). naclip.visualize draws."""
    from naclip import visualize

    names = visualize.legend_names(class_names)
    shares = dict(visualize.class_shares(labels, [str(k) for k in range(len(names))]))   # keyed by id
    legend = [{"index": i, "name": n, "color": "#%02x%02x%02x" % visualize.overlay_color(i),
               "share": float(shares.get(str(i), 0.0))} for i, n in enumerate(names)]
    legend.sort(key=lambda e: -e["share"])           # stable: ties keep the class order
    over = visualize.overlay(image, labels, class_names, alpha=config.alpha, legend=None)
    return {
        "overlay": _data_url(_png_bytes(_fit(over, config.max_display_side, Image.BILINEAR))),
        "label_map": _data_url(_label_png_bytes(labels)),
        "legend": legend,
    }


# ----------------------------------------------------------------------------------------------------------------
# The app


def create_app(segmenter: Any = None, config: Optional[ServerConfig] = None, *,
               segmenter_factory: Optional[Callable[[], Any]] = None) -> Flask:
    """The Flask app. Give either ``segmenter``, a loaded Segmenter shared by all requests, or ``segmenter_factory``,
    a zero-argument callable that returns one; it is called once, by the first request that needs the model.
    With ``config.methods``, the segmenter (or what the factory returns) is a mapping method name -> Segmenter and
    each request picks one with its ``method`` field (default: the first)."""
    if (segmenter is None) == (segmenter_factory is None):
        raise ValueError("create_app needs exactly one of segmenter= and segmenter_factory=")
    config = config or ServerConfig()
    app = Flask(__name__, template_folder=str(PACKAGE_DIR / "templates"), static_folder=str(PACKAGE_DIR / "static"))
    # Room for the form fields on top of the file itself; the file's own size is checked exactly in decode_image.
    app.config["MAX_CONTENT_LENGTH"] = config.max_upload_bytes + MB
    queue = RequestQueue(config.queue_size, config.queue_timeout)
    state: Dict[str, Any] = {"segmenter": segmenter, "factory": segmenter_factory}
    load_lock = threading.Lock()
    app.extensions["naclip"] = {"config": config, "queue": queue, "state": state}

    def get_segmenter():
        if state["segmenter"] is None:
            with load_lock:
                if state["segmenter"] is None:
                    t0 = time.perf_counter()
                    state["segmenter"] = state["factory"]()
                    state["load_seconds"] = time.perf_counter() - t0
        return state["segmenter"]

    def error(message: str, status: int):
        resp = jsonify({"error": message})
        resp.status_code = status
        return resp

    @app.errorhandler(RequestError)
    def _request_error(exc: RequestError):
        return error(exc.message, exc.status)

    @app.errorhandler(RequestEntityTooLarge)
    def _too_large(exc):
        return error(f"The upload is too large: the limit is {config.max_upload_mb:g} MB.", 413)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):
        if request.path.startswith("/api/") or request.path == "/healthz":
            return error(f"{exc.code} {exc.name}: {exc.description}", exc.code or 500)
        return exc

    @app.errorhandler(Exception)
    def _internal_error(exc: Exception):
        log.exception("error while handling %s", request.path)
        return error(f"Internal error: {type(exc).__name__}: {exc}", 500)

    @app.get("/")
    def index():
        return render_template("index.html", config=config, samples=_samples_list(),
                               limits=_limits(config), model_info=config.model_info)

    @app.get("/healthz")
    def healthz():
        return jsonify({"status": "ok", "model_loaded": state["segmenter"] is not None, **queue.status()})

    @app.get("/api/samples")
    def samples():
        return jsonify({"samples": _samples_list()})

    @app.get("/api/info")
    def info():
        return jsonify({"model": config.model_info, "limits": _limits(config)})

    @app.get("/samples/<name>")
    def sample_file(name: str):
        entry = next((s for s in SAMPLES.values() if s[0] == name), None)
        if entry is None:
            return error(f"No sample called {name!r}.", 404)
        return send_from_directory(ASSETS_DIR, entry[0], max_age=3600)

    @app.post("/api/segment")
    def segment():
        t_start = time.perf_counter()
        timings: List[Dict[str, Any]] = []
        if request.mimetype not in ("multipart/form-data", "application/x-www-form-urlencoded"):
            # Otherwise request.form is empty and the caller would be told to type a class name.
            raise RequestError("POST /api/segment takes multipart/form-data (fields: image or sample, classes, mode, "
                               f"pamr), not {request.mimetype or 'a body without a Content-Type'}.", 415)
        form = request.form            # parses the multipart body (413 if over MAX_CONTENT_LENGTH)
        classes = parse_classes(form.get("classes"), config.max_classes, config.max_class_chars)
        mode = (form.get("mode") or config.default_mode).strip().lower()
        if mode not in MODES:
            raise RequestError(f"mode must be 'slide' or 'whole', got {mode!r}.")
        method = (form.get("method") or next(iter(config.methods), "")).strip().lower()
        if config.methods and method not in config.methods:
            raise RequestError(f"Unknown method {method!r}; choose one of {', '.join(config.methods)}.")
        pamr = _parse_bool(form.get("pamr"), config.methods[method]["pamr"] if config.methods else
                           config.default_pamr, "PAMR")

        upload = request.files.get("image")
        sample = (form.get("sample") or "").strip()
        if upload is not None and upload.filename:
            data = upload.read(config.max_upload_bytes + 1)
            source = upload.filename
        elif sample:
            if sample not in SAMPLES:
                raise RequestError(f"Unknown sample {sample!r}; choose one of {', '.join(SAMPLES)}.", 404)
            data = (ASSETS_DIR / SAMPLES[sample][0]).read_bytes()
            source = f"sample:{sample}"
        else:
            raise RequestError("Please choose an image file to upload, or pick one of the sample photos.")
        t0 = time.perf_counter()
        image = decode_image(data, config, _display_name(upload.filename if upload and upload.filename else sample))
        timings.append({"stage": "decode image", "seconds": time.perf_counter() - t0})

        waited = queue.acquire()
        timings.append({"stage": "queue wait", "seconds": waited})
        try:
            if state["segmenter"] is None:
                t0 = time.perf_counter()
                get_segmenter()
                timings.append({"stage": "load model", "seconds": time.perf_counter() - t0})
            t0 = time.perf_counter()
            chosen, window = state["segmenter"], tuple(config.window)
            if config.methods:
                chosen, window = chosen[method], tuple(config.methods[method]["window"])
            result = run_segmenter(chosen, image, classes, window=window if mode == "slide" else None, pamr=pamr)
            seg_seconds = time.perf_counter() - t0
        finally:
            queue.release()
        stage_times = dict(getattr(result, "timings", None) or {})
        for stage, seconds in stage_times.items():
            name = "segmenter total" if stage == "total" else str(stage)
            timings.append({"stage": name, "seconds": float(seconds)})
        if not stage_times:
            timings.append({"stage": "segment", "seconds": seg_seconds})

        labels = _to_numpy(result.labels)
        if labels.ndim == 3 and labels.shape[0] == 1:
            labels = labels[0]
        names = list(getattr(result, "class_names", None) or classes)
        if labels.shape != (image.height, image.width):
            raise RuntimeError(f"segmenter returned labels of shape {labels.shape}, "
                               f"expected {(image.height, image.width)}")
        t0 = time.perf_counter()
        rendered = render_result(image, labels, names, config)
        timings.append({"stage": "render overlay", "seconds": time.perf_counter() - t0})
        timings.append({"stage": "total", "seconds": time.perf_counter() - t_start})
        return jsonify({
            "source": source,
            "width": image.width,
            "height": image.height,
            "classes": names,
            "mode": mode,
            "method": method or None,
            "pamr": pamr,
            "timings": timings,
            **rendered,
        })

    return app


def _display_name(name: str) -> str:
    name = Path(name or "the upload").name
    return f"'{name[:80]}'"


def _samples_list() -> List[Dict[str, str]]:
    return [{"name": key, "title": title, "url": f"/samples/{file}", "classes": classes}
            for key, (file, title, classes) in SAMPLES.items()]


def _limits(config: ServerConfig) -> Dict[str, Any]:
    return {"max_megapixels": config.max_megapixels, "max_upload_mb": config.max_upload_mb,
            "max_upload_bytes": config.max_upload_bytes, "max_classes": config.max_classes,
            "max_class_chars": config.max_class_chars, "queue_size": config.queue_size,
            "queue_timeout": config.queue_timeout}


# ----------------------------------------------------------------------------------------------------------------
# `naclip serve`


def _parse_window(text: str) -> Tuple[int, int]:
    """``224x112`` / ``224,112`` / ``224:112`` -> (224, 112); ``224`` -> (224, 112) (stride = half the crop)."""
    t = str(text).strip().lower()
    for sep in ("x", ",", ":"):
        t = t.replace(sep, " ")
    try:
        parts = [int(p) for p in t.split()]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts.append(max(1, parts[0] // 2))
    if len(parts) != 2 or parts[0] < 1 or parts[1] < 1 or parts[1] > parts[0]:
        raise argparse.ArgumentTypeError(f"invalid --slide {text!r}: expected CROPxSTRIDE with 1 <= stride <= crop, "
                                         "e.g. 224x112")
    return parts[0], parts[1]


def _parse_port(text: str) -> int:
    """A TCP port, 1..65535, or 0 for a free one (the socket layer would silently take 99999 modulo 65536)."""
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"invalid --port {text!r}: expected 1..65535, or 0 for a free port")
    return port


def add_serve_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``naclip serve``; the model options are the CLI's (same names and defaults)."""
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default: 127.0.0.1, this machine only; 0.0.0.0 opens it to the network)")
    parser.add_argument("--port", type=_parse_port, default=7860, help="port (default: 7860; 0 picks a free port)")
    from naclip.cli import add_model_loading_arguments, add_vfm_arguments

    g = parser.add_argument_group("model")
    add_model_loading_arguments(g)
    add_vfm_arguments(g)        # --vfm: ProxyCLIP too, chosen on the page
    g.add_argument("--slide", type=_parse_window, default=(224, 112), metavar="CROPxSTRIDE",
                   help="window and stride of the page's 'sliding window' mode (default: 224x112)")
    g.add_argument("--short-side", type=int, default=336, metavar="PX",
                   help="images are resized so their short side is PX before the model (default: 336)")
    lim = parser.add_argument_group("limits")
    lim.add_argument("--max-megapixels", type=float, default=20.0, help="largest image accepted (default: 20 MP)")
    lim.add_argument("--max-upload-mb", type=float, default=25.0, help="largest upload accepted (default: 25 MB)")
    lim.add_argument("--max-classes", type=int, default=64, help="most classes per request (default: 64, at most 255)")
    lim.add_argument("--queue-size", type=int, default=4,
                     help="requests that may wait while one runs; more get a 'busy' message (default: 4)")
    lim.add_argument("--queue-timeout", type=float, default=300.0,
                     help="seconds a queued request waits before it gets a 'busy' message (default: 300)")
    return parser


def build_segmenter(args: argparse.Namespace):
    """Load the Segmenter once, as the CLI does; each request sets its own classes, window and PAMR.

    With ``--vfm`` (or ``--vfm-pretrained``): ``{"naclip": ..., "proxyclip": ...}``, two segmenters on one CLIP
    model (ProxyCLIP does not modify it), the second with ProxyCLIP's own window and the VFM."""
    from naclip import Segmenter
    from naclip.cli import method_kwargs, model_loading_kwargs

    base = Segmenter(**model_loading_kwargs(args), classes=["object"], slide=tuple(args.slide),
                     short_side=args.short_side)
    proxy = method_kwargs(args, "proxyclip") if (args.vfm or args.vfm_pretrained) else None
    if proxy is None:
        return base
    return {"naclip": base,
            "proxyclip": Segmenter(base.loaded, None, method="proxyclip", classes=["object"],
                                   short_side=args.short_side, device=base.device, dtype=base.dtype,
                                   backend=base.backend, **proxy)}


def method_choices(segmenters: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    """``ServerConfig.methods`` for a mapping of segmenters: title, sliding window and PAMR default of each."""
    from naclip.methods import get_method

    return {name: {"title": get_method(name).title, "window": tuple(seg.slide or get_method(name).defaults["slide"]),
                   "pamr": bool(seg.pamr)} for name, seg in segmenters.items()}


def _check_can_listen(host: str, port: int) -> None:
    """Raise ValueError if ``host:port`` cannot be bound right now (the address is taken or not this machine's)."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, _, _, _, address = infos[0]
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            # As werkzeug's server does, so a port in TIME_WAIT from a previous run is not reported as taken.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    except OSError as exc:
        raise ValueError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; choose another --port (0 picks a "
                         "free one) or --host") from None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run_serve(args: argparse.Namespace, *, segmenter: Any = None) -> int:
    """Load the model once, start the web app and serve until Ctrl+C. Returns the exit status.
    ``segmenter``: use this one instead of loading ``args.model`` (tests)."""
    from werkzeug.serving import make_server

    from naclip.cli import (UserError, announce_loaded, announce_loading, load_error_message, model_loading_kwargs,
                            show_text_progress)

    try:
        config = ServerConfig(max_megapixels=args.max_megapixels, max_upload_mb=args.max_upload_mb,
                              max_classes=args.max_classes, queue_size=args.queue_size,
                              queue_timeout=args.queue_timeout, window=tuple(args.slide))
        if args.short_side is not None and args.short_side < 1:
            raise ValueError(f"--short-side must be a positive number of pixels, got {args.short_side}")
        # A port that is taken (7860 is also Gradio's default) should fail now, not after the model has loaded.
        _check_can_listen(args.host, args.port)
        t0 = announce_loading(args) if segmenter is None else time.perf_counter()
        loading = model_loading_kwargs(args)   # checks --device and --backend before the model loads
        if getattr(args, "vfm", None) or getattr(args, "vfm_pretrained", None):
            from naclip.cli import method_kwargs
            method_kwargs(args, "proxyclip")   # a bad --vfm name or missing file: one line now, not after loading
    except (ValueError, UserError) as exc:
        print(f"naclip serve: error: {exc}", file=sys.stderr)
        return 2
    weights = "random weights" if loading["pretrained"] is None else str(loading["pretrained"])
    device = loading["device"]
    config.model_info = {"model": args.model, "pretrained": weights, "device": device, "dtype": args.dtype}
    if segmenter is None:
        try:
            segmenter = build_segmenter(argparse.Namespace(**{**vars(args), "device": device}))
        except Exception as exc:    # noqa: BLE001 - a bad model name / path / device: one line, no traceback
            print(f"naclip serve: error: could not load the model: {load_error_message(exc)}", file=sys.stderr)
            return 2
        announce_loaded(t0, loading)
        for one in segmenter.values() if isinstance(segmenter, dict) else (segmenter,):
            show_text_progress(one)        # each new class list is encoded on its first request: say so in the log
    if isinstance(segmenter, dict):
        config.methods = method_choices(segmenter)
        vfm = segmenter["proxyclip"].head.vfm
        config.model_info["vfm"] = f"{vfm.name} ({vfm.weights_id or 'random weights'})"
    app = create_app(segmenter, config)
    try:
        server = make_server(args.host, args.port, app, threaded=True)
    except (OSError, OverflowError) as exc:
        print(f"naclip serve: error: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    host = f"[{args.host}]" if ":" in args.host else args.host
    if not _is_loopback(args.host):
        print(f"Warning: listening on {args.host}: anyone who can reach this machine can use the app.",
              file=sys.stderr)
    print(f"Serving on http://{host}:{server.server_port}  (Ctrl+C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("Stopping.", file=sys.stderr)
    finally:
        server.server_close()
    return 0
