"""The ``naclip`` command line: ``segment``, ``eval``, ``presets`` and ``serve``.

``main(argv)`` returns the exit status instead of exiting, so tests (and other Python code) can call it:

* 0: everything worked;
* 1: the run finished but some images failed (each failure was reported on its own line, the others' outputs
  were written);
* 2: a user error stopped the run before any work (bad option, empty class list, unknown preset, unreadable
  data folder, model that cannot be loaded); reported as one line ``naclip: error: ...`` without a traceback;
* 130: interrupted (Ctrl+C);
* 141: stdout was closed early (``naclip presets | head -1``); the command stopped without a message.

Set ``NACLIP_DEBUG=1`` to get full tracebacks instead of one-line messages.

Heavy imports (torch, open_clip, Pillow, the segmenter) happen inside the commands, so ``naclip --help`` is fast.
The segmenter is created through a factory that tests can replace (``main(argv, segmenter_factory=...)``).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from naclip.presets import (ClassListError, PRESETS, display_name, get_preset, parse_classes_arg,
                            read_class_file)

__all__ = ["main", "build_parser", "default_segmenter_factory", "UserError", "IMAGE_EXTENSIONS"]

PROG = "naclip"
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm"})
_UNSET = object()          # "option not given": presets keep their own setting unless the user overrides it
_WHOLE = "whole"           # --slide none / --whole


class UserError(Exception):
    """A problem the user can fix; printed as one line ``naclip: error: <message>``, exit status 2."""


def _debug() -> bool:
    return os.environ.get("NACLIP_DEBUG", "").strip() not in ("", "0")


def _err(message: str, writer: Optional[Callable[[str], None]] = None) -> None:
    line = f"{PROG}: error: {message}"
    if writer is not None:
        writer(line)
    else:
        print(line, file=sys.stderr, flush=True)


def _one_line(exc: BaseException) -> str:
    """An exception as one line: multi-line messages are joined, the helper-name prefixes dropped; a message written
    for the command line (``ModelLoadError.cli_message``: ``--pretrained /path`` rather than ``pretrained='/path'``)
    is preferred."""
    text = " ".join(str(getattr(exc, "cli_message", None) or exc).split())
    for prefix in ("load_image: ", "load_clip: ", "load_vfm: "):
        if text.startswith(prefix):
            text = text[len(prefix):]
    if isinstance(exc, KeyError):       # str(KeyError('x')) is "'x'": say what it was
        text = f"missing key {text}"
    return text or type(exc).__name__


# --------------------------------------------------------------------------------------------------------------
# Argument parsing
# --------------------------------------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (the usage text is what ``--help`` is for)."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(2, f"{PROG}: error: {message} (see '{self.prog} --help')\n")


def _parse_slide(text: str):
    """``224x112`` / ``224,112`` / ``224:112`` -> (224, 112); ``224`` -> (224, 112); none/whole -> whole image."""
    t = text.strip().lower()
    if t in ("none", "whole", "off", "no"):
        return _WHOLE
    for sep in ("x", ",", ":"):
        t = t.replace(sep, " ")
    parts = t.split()
    try:
        nums = [int(p) for p in parts]
    except ValueError:
        nums = []
    if len(nums) == 1:
        nums.append(nums[0] // 2)          # the usual half-window stride
    if len(nums) != 2 or nums[0] < 1 or nums[1] < 1 or nums[1] > nums[0]:
        raise argparse.ArgumentTypeError(
            f"invalid --slide {text!r}: expected WINDOWxSTRIDE with 1 <= STRIDE <= WINDOW (e.g. 224x112), "
            "or 'none' for the whole image")
    return (nums[0], nums[1])


def _parse_threshold(text: str):
    t = text.strip().lower()
    if t in ("none", "off", "no"):
        return None
    try:
        value = float(t)
    except ValueError:
        value = float("nan")
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"invalid --threshold {text!r}: expected a probability in [0, 1] or 'none'")
    return value


def _nonnegative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def _add_pipeline_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("input pipeline and multi-process runs")
    g.add_argument("--workers", type=_nonnegative_int, default=None, metavar="N",
                   help="processes that decode images (and read labels) ahead of the model (default: min(4, "
                        "CPUs); 0 = decode in the main process). Under torchrun (torchrun --nproc-per-node N -m "
                        "naclip ...) each rank takes every N-th image and has its own workers")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def add_model_loading_arguments(g) -> None:
    """``--model --pretrained --device --dtype --backend``: what every command that loads a model takes
    (``segment``, ``eval`` and ``serve``); :func:`model_loading_kwargs` turns them into Segmenter arguments."""
    g.add_argument("--model", default="ViT-B-16", help="open_clip ViT name (default: ViT-B-16)")
    g.add_argument("--pretrained", default="openai",
                   help="pretrained tag (default: openai), a local open_clip checkpoint file, or 'none' for random "
                        "weights (tests only: the masks are meaningless)")
    g.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    g.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                   help="model precision (default: float32)")
    g.add_argument("--backend", default="auto", choices=("auto", "triton", "torch", "reference"),
                   help="kernel backend for attention and PAMR (default: auto)")


def model_loading_kwargs(args: argparse.Namespace) -> Dict[str, Any]:
    """``model, pretrained, device, dtype, backend`` for :class:`naclip.Segmenter` from the options above
    (``--pretrained none`` means random weights; the device is checked and defaulted)."""
    import torch

    pretrained = args.pretrained
    if pretrained is not None and str(pretrained).strip().lower() in ("none", "random", ""):
        pretrained = None
    device = _resolve_device(args.device)
    _check_backend(args.backend, device)
    return dict(model=args.model, pretrained=pretrained, device=device,
                dtype={"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[args.dtype],
                backend=args.backend)


def _check_backend(backend: str, device: str) -> None:
    """``--backend triton`` where it cannot run is an error now, before the model loads, rather than a failure
    of every image after it (naclip_kernels says why)."""
    if backend != "triton":
        return
    import torch
    from naclip_kernels._backend import triton_unavailable_reason

    reason = triton_unavailable_reason(torch.device(device))
    if reason is not None:
        raise UserError(f"--backend triton cannot run on {device}: "
                        + reason.replace("backend='torch'", "--backend torch"))


# The method registry's names, without importing torch (naclip.methods imports it); tests check they agree.
METHOD_NAMES = ("naclip", "sclip", "clearclip", "clip", "proxyclip")


def add_vfm_arguments(g) -> None:
    """``--vfm --vfm-pretrained``: ProxyCLIP's vision foundation model (``segment``, ``eval``, ``serve``)."""
    g.add_argument("--vfm", default=None, metavar="NAME",
                   help="ProxyCLIP's vision foundation model: dino_vitb8 (default), dino_vitb16, dinov2_vitb14_reg, "
                        "sam_vitb, mae_vitb16, or any timm ViT name; implies --method proxyclip (so does --vfm-pretrained)")
    g.add_argument("--vfm-pretrained", default=None, metavar="TAG|FILE|none",
                   help="the VFM's weights: a timm tag (default: the VFM's own, e.g. dino), a local checkpoint file "
                        "(timm or original layout), or 'none' for random weights (tests only)")


def method_kwargs(args: argparse.Namespace, method: Optional[str]) -> Dict[str, Any]:
    """``vfm`` / ``vfm_pretrained`` for :class:`naclip.Segmenter` from ``--vfm --vfm-pretrained``, checked before
    anything loads: the VFM options need ``method`` ``"proxyclip"``, a VFM name must be one timm knows, and a
    ``--vfm-pretrained`` that looks like a path must exist."""
    kwargs: Dict[str, Any] = {}
    if args.vfm is None and args.vfm_pretrained is None:
        return kwargs
    if method != "proxyclip":
        raise UserError(f"--vfm/--vfm-pretrained apply to --method proxyclip only (got --method {method})")
    if args.vfm is not None:
        from naclip.model import ModelLoadError
        from naclip.vfm import resolve_vfm_name

        try:
            resolve_vfm_name(args.vfm)
        except ModelLoadError as exc:
            raise UserError(f"--vfm: {_one_line(exc)}") from None
        kwargs["vfm"] = args.vfm
    if args.vfm_pretrained is not None:
        weights = str(args.vfm_pretrained).strip()
        if weights.lower() in ("none", "random", ""):
            kwargs["vfm_pretrained"] = None
        else:
            path = os.path.expanduser(weights)
            looks_like_path = any(sep in weights for sep in ("/", "\\")) or \
                weights.endswith((".pth", ".pt", ".bin", ".safetensors"))
            if looks_like_path and not os.path.isfile(path):
                raise UserError(f"--vfm-pretrained: no such file '{weights}'")
            kwargs["vfm_pretrained"] = path if os.path.isfile(path) else weights
    return kwargs


def _add_model_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    add_model_loading_arguments(g)
    g.add_argument("--method", choices=METHOD_NAMES, default=None,
                   help="segmentation method: naclip (default), sclip, clearclip, clip, proxyclip; each brings its "
                        "own defaults (proxyclip: 336x112 windows, no PAMR, ProxyCLIP's preset thresholds)")
    add_vfm_arguments(g)
    g.add_argument("--pamr", dest="pamr", action="store_true", default=_UNSET,
                   help="refine the masks with PAMR (the default of the NACLIP family; off for proxyclip)")
    g.add_argument("--no-pamr", dest="pamr", action="store_false", default=_UNSET,
                   help="skip the PAMR mask refinement (faster, about 3 mIoU lower)")
    g.add_argument("--slide", type=_parse_slide, default=_UNSET, metavar="WxS",
                   help="sliding window size and stride in pixels, e.g. 224x112; 'none' = whole image "
                        "(default: the preset's, else the segmenter's)")
    g.add_argument("--whole", dest="slide", action="store_const", const=_WHOLE,
                   help="run on the whole image at once (same as --slide none)")
    g.add_argument("--short-side", type=_positive_int, default=_UNSET, metavar="PX",
                   help="resize so the short side is PX before segmenting (default: the preset's, else 336)")
    g.add_argument("--threshold", type=_parse_threshold, default=_UNSET, metavar="P",
                   help="pixels whose top class probability is below P become class 0 (the first class: "
                        "list a background class first); 'none' disables (default: the preset's, else none)")


def version_text() -> str:
    """``naclip 0.2.0 (torch 2.14.1, triton 3.8.0, open_clip 3.3.0, Python 3.11.7)``, from the installed packages'
    metadata: nothing is imported, so it is instant and works even when torch itself is broken."""
    from importlib import metadata

    def installed(dist: str) -> Optional[str]:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    own = installed("naclip-kernels")
    if own is None:        # a source checkout on PYTHONPATH: read the version without importing torch
        import re

        init = Path(__file__).resolve().parents[1] / "naclip_kernels" / "__init__.py"
        found = re.search(r'^__version__ = "([^"]+)"', init.read_text(encoding="utf-8"), re.M) if init.is_file() \
            else None
        own = f"{found.group(1) if found else 'unknown'} (not installed)"
    deps = [f"{name} {installed(dist) or 'not installed'}"
            for name, dist in (("torch", "torch"), ("triton", "triton"), ("open_clip", "open_clip_torch"))]
    return f"{PROG} {own} ({', '.join(deps)}, Python {sys.version.split()[0]})"


class _VersionAction(argparse.Action):
    """``--version``, computed only when asked for."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_text())
        parser.exit(0)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="NACLIP training-free open-vocabulary segmentation with CLIP.")
    parser.add_argument("--version", action=_VersionAction,
                        help="print the version of naclip-kernels and of torch, triton and open_clip, and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    seg = sub.add_parser(
        "segment", help="segment images into the given classes",
        description="Segment images or folders of images. Writes <name>_labels.png (palette label map, pixel "
                    "value = class index) and <name>_overlay.png (colours + legend) per image, and "
                    "<name>_probs.npy with --save-probs.",
        epilog="Class syntax: --classes 'cat, sofa/couch' (commas between classes, '/' between synonyms); "
               "--classes-file F: one class per line, synonyms separated by commas (NACLIP's cls_*.txt format). "
               "Output names: <name> is the file name without its extension (with its sub-folder for images found "
               "in folders); when two inputs give the same name, the later one gets its extension appended "
               "(cat.jpg -> cat_*, cat.png -> cat_png_*), so nothing is overwritten.")
    seg.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files and/or folders (searched "
                     "recursively for " + ", ".join(sorted(IMAGE_EXTENSIONS)) + ")")
    cls = seg.add_mutually_exclusive_group(required=True)
    cls.add_argument("--classes", help="classes, comma-separated; synonyms of one class joined by '/'")
    cls.add_argument("--classes-file", metavar="FILE", help="class file: one class per line, synonyms comma-separated")
    cls.add_argument("--preset", help="a benchmark's classes and settings: " + ", ".join(PRESETS))
    seg.add_argument("--out", required=True, metavar="DIR", help="output folder (created if needed)")
    seg.add_argument("--save-probs", action="store_true",
                     help="also write <name>_probs.npy: class probabilities [C, H, W], float16")
    seg.add_argument("--alpha", type=float, default=0.5, help="overlay opacity in [0, 1] (default: 0.5)")
    seg.add_argument("--legend", choices=("present", "all", "none"), default="present",
                     help="overlay legend: classes present in the image (default), all classes, or none")
    seg.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no summary line")
    _add_model_arguments(seg)
    _add_pipeline_arguments(seg)

    ev = sub.add_parser(
        "eval", help="mIoU of a preset on a dataset in mmsegmentation layout",
        description="Evaluate a benchmark preset on its dataset (mmsegmentation folder layout, see README): "
                    "prints the per-class IoU table and the mIoU.")
    ev.add_argument("--preset", required=True, help="benchmark: " + ", ".join(PRESETS))
    ev.add_argument("--data-root", required=True, metavar="PATH", help="dataset folder, e.g. VOCdevkit/VOC2012")
    ev.add_argument("--split", default=None, help="split name (default: val, validation for ADE20K, val2017 for COCO)")
    ev.add_argument("--limit", type=_positive_int, default=None, metavar="N", help="only the first N images")
    ev.add_argument("--json", default=None, metavar="FILE",
                    help="also write the results as JSON, metrics as fractions in [0, 1] (\"units\": \"fraction\"; "
                         "the table prints percent); '-' = JSON to stdout and the table to stderr")
    ev.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    _add_model_arguments(ev)
    _add_pipeline_arguments(ev)

    pre = sub.add_parser("presets", help="list the benchmark presets",
                         description="List the benchmark presets and their settings.")
    pre.add_argument("--method", choices=METHOD_NAMES, default="naclip",
                     help="show the settings this method uses per benchmark (default: naclip; proxyclip has its own)")
    # `serve` is parsed by naclip.server's own options (see _run_serve); this entry is for --help.
    sub.add_parser("serve", help="start the local web app (options: naclip serve --help)", add_help=False)
    return parser


# --------------------------------------------------------------------------------------------------------------
# Segmenter construction
# --------------------------------------------------------------------------------------------------------------

def default_segmenter_factory(preset: Optional[str] = None, **kwargs):
    """Build a :class:`naclip.Segmenter`: ``Segmenter.from_preset(preset, **kwargs)`` or ``Segmenter(**kwargs)``."""
    from naclip import Segmenter

    if preset is not None:
        return Segmenter.from_preset(preset, **kwargs)
    return Segmenter(**kwargs)


def describe_weights(pretrained: Optional[str]) -> str:
    """``--pretrained`` in words: ``pretrained weights 'openai'``, ``weights from /w.pt`` or ``random weights``."""
    text = "" if pretrained is None else str(pretrained).strip()
    if text.lower() in ("none", "random", ""):
        return "random weights"
    if os.path.isfile(os.path.expanduser(text)):
        return f"weights from {text}"
    return f"pretrained weights '{text}'"


def announce_loading(args: argparse.Namespace, quiet: bool = False) -> float:
    """Say what is loading before torch and open_clip are imported (seconds of silence otherwise, which look like a
    hang when the weights then turn out to be unavailable offline). Returns the start time for
    :func:`announce_loaded`. Random weights get no mention here: load_clip warns about them, once."""
    if not quiet:
        weights = "" if describe_weights(args.pretrained) == "random weights" else \
            f" with {describe_weights(args.pretrained)}"
        print(f"{PROG}: loading {args.model}{weights} (importing torch and open_clip first takes a few seconds)...",
              file=sys.stderr, flush=True)
    return time.perf_counter()


def announce_loaded(start: float, kwargs: Dict[str, Any], quiet: bool = False) -> None:
    if not quiet:
        dtype = str(kwargs.get("dtype", "")).replace("torch.", "")
        print(f"{PROG}: model ready in {time.perf_counter() - start:.1f} s ({kwargs.get('device')}, {dtype})",
              file=sys.stderr, flush=True)


class _TextProgressLines:
    """TextEncoder ``progress`` for logs and pipes (no bar there): one line when encoding starts, one when done."""

    def __init__(self):
        self.start: Optional[float] = None

    def __call__(self, done: int, total: int, message: str) -> None:
        if done == 0:                    # called once before the first batch of every encoding
            self.start = time.perf_counter()
            print(f"{PROG}: {message}...", file=sys.stderr, flush=True)
        elif done >= total and self.start is not None:
            print(f"{PROG}: {total} prompts encoded in {time.perf_counter() - self.start:.1f} s", file=sys.stderr,
                  flush=True)


def encode_text_first(segmenter: Any, quiet: bool = False) -> None:
    """Encode the class prompts before the first image, so that a first run's text encoding (VOC21's 56 names x 80
    templates: tens of seconds on a CPU) is a step of its own with naclip.text's progress, not a silent wait inside
    the first image with the image bar at 0. On a terminal: TextEncoder's message and bar; in logs and pipes: a
    line when it starts and one when it is done; quiet: nothing. Segmenters without a text encoder (tests' fakes)
    are left alone; cached embeddings cost nothing here."""
    if not hasattr(type(segmenter), "query_embeddings") or not show_text_progress(segmenter, quiet):
        return
    segmenter.query_embeddings  # noqa: B018 - the property computes (or loads) and keeps the embeddings


def show_text_progress(segmenter: Any, quiet: bool = False) -> bool:
    """How the segmenter's text encoder reports a first-run encoding here: naclip.text's own message and bar on a
    terminal, :class:`_TextProgressLines` in logs and pipes (it would log at INFO, which nobody sees), nothing when
    quiet. False if the segmenter has no text encoder."""
    encoder = getattr(segmenter, "text_encoder", None)
    if encoder is None:
        return False
    if quiet:
        encoder.progress = False
    elif not sys.stderr.isatty():
        encoder.progress = _TextProgressLines()
    return True


def _resolve_device(device: Optional[str]) -> str:
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise UserError(f"invalid --device {device!r} (e.g. cpu, cuda, cuda:1)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    return device


def _segmenter_kwargs(args: argparse.Namespace) -> Dict[str, Any]:
    """Model options for the factory; preset-level settings only when the user gave them."""
    implied = "proxyclip" if args.vfm is not None or args.vfm_pretrained is not None else None
    method = args.method if args.method is not None else implied
    extra = method_kwargs(args, method or "naclip")
    kwargs = model_loading_kwargs(args)
    if method is not None:
        kwargs["method"] = method
    kwargs.update(extra)
    if args.pamr is not _UNSET:
        kwargs["pamr"] = args.pamr
    if args.slide is not _UNSET:
        kwargs["slide"] = None if args.slide == _WHOLE else args.slide
    if args.short_side is not _UNSET:
        kwargs["short_side"] = args.short_side
    if args.threshold is not _UNSET:
        kwargs["confidence_threshold"] = args.threshold
    return kwargs


def _build_segmenter(factory, preset: Optional[str], kwargs: Dict[str, Any]):
    if preset is not None and kwargs.get("confidence_threshold") is not None \
            and get_preset(preset).background_index is None:
        # Checked here, before the model loads: the segmenter would refuse it only after seconds of loading.
        raise UserError(f"--threshold: preset {preset} has no background class to give low-confidence pixels")
    try:
        return factory(preset, **kwargs)
    except (KeyboardInterrupt, UserError):
        raise
    except Exception as exc:       # noqa: BLE001 - a model that cannot load is a user-facing error, one line
        if _debug():
            raise
        raise UserError(f"could not create the segmenter: {load_error_message(exc)}") from None


def load_error_message(exc: BaseException) -> str:
    """One line for an exception raised while building the segmenter (``segment``, ``eval`` and ``serve``)."""
    # ModelLoadError / ValueError messages are written for users; for anything else the type helps.
    plain = isinstance(exc, ValueError) or type(exc).__name__ == "ModelLoadError"
    return ("" if plain else f"{type(exc).__name__}: ") + _one_line(exc)


def _to_numpy(x):
    import numpy as np

    if hasattr(x, "detach"):
        x = x.detach()
        if getattr(x, "dtype", None) is not None and str(x.dtype) == "torch.bfloat16":
            x = x.float()
        x = x.cpu().numpy()
    return np.asarray(x)


def _progress(total: int, quiet: bool, desc: str):
    from tqdm import tqdm

    # A progress bar only makes sense on a terminal; in logs and pipes it is noise.
    disable = quiet or not sys.stderr.isatty() or total <= 1
    return tqdm(total=total, desc=desc, unit="img", disable=disable, file=sys.stderr, dynamic_ncols=True)


@contextlib.contextmanager
def _world(args):
    """Join the torchrun job this process belongs to, if any (``naclip.distributed``), for one command: sets
    ``args.world`` and, in a multi-process world, ``args.device`` to this rank's device."""
    from naclip.distributed import DistributedError, process_group

    try:
        with process_group(args.device) as world:
            args.world = world
            if world.enabled:
                args.device = world.device
            yield world
    except DistributedError as exc:
        raise UserError(str(exc)) from None


def _decoded(args, segmenter, image_paths, label_paths=None, dataset=None):
    """The images (and labels) of this rank, decoded in ``--workers`` DataLoader worker processes, which also
    resize and normalise them when the segmenter offers a ``preprocessor()`` (``naclip.Segmenter`` does)."""
    from naclip.datasets import DecodedImages, decoded_images, default_workers

    labels = {} if dataset is None else dict(reduce_zero_label=dataset.reduce_zero_label,
                                             ignore_index=dataset.ignore_index)
    prepare = segmenter.preprocessor() if callable(getattr(segmenter, "preprocessor", None)) else None
    workers = default_workers() if args.workers is None else args.workers
    return decoded_images(DecodedImages(image_paths, label_paths, prepare=prepare, **labels), workers)


def _bar_title(title: str, world) -> str:
    return f"{title} (rank 0 of {world.world_size})" if world.enabled else title


def _ranks_note(world) -> str:
    return f" by {world.world_size} processes" if world.enabled else ""


# --------------------------------------------------------------------------------------------------------------
# segment
# --------------------------------------------------------------------------------------------------------------

def _collect_inputs(inputs: Sequence[str], out_dir: Path) -> Tuple[List[Tuple[Path, str]], List[str]]:
    """Expand files and folders into ``(image path, output name)`` pairs, plus one error line per unusable input.

    Folder contents keep their sub-folder structure in the output names (``dir/a/x.jpg`` -> ``a/x``); files found
    under the output folder are skipped so that re-running into an output folder inside an input folder does
    not segment its own overlays.
    """
    found: List[Tuple[Path, str]] = []
    errors: List[str] = []
    out_resolved = out_dir.resolve()

    def inside_out(p: Path) -> bool:
        try:
            p.resolve().relative_to(out_resolved)
            return True
        except ValueError:
            return False

    for raw in inputs:
        path = Path(raw).expanduser()
        if path.is_file():
            found.append((path, path.stem))
        elif path.is_dir():
            if not os.access(path, os.R_OK | os.X_OK):
                errors.append(f"cannot read folder '{path}': permission denied")
                continue
            walk_errors: List[OSError] = []
            images = []
            for dirpath, dirnames, filenames in os.walk(path, onerror=walk_errors.append):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and not inside_out(Path(dirpath, d)))
                for fname in sorted(filenames):
                    if fname.startswith(".") or Path(fname).suffix.lower() not in IMAGE_EXTENSIONS:
                        continue
                    images.append(Path(dirpath, fname))
            for exc in walk_errors:
                errors.append(f"cannot read folder '{exc.filename}': {exc.strerror or exc}")
            if not images and not walk_errors:
                errors.append(f"no images in folder '{path}' (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
            for img in images:
                found.append((img, img.relative_to(path).with_suffix("").as_posix()))
        elif path.exists():
            errors.append(f"'{path}' is neither a file nor a folder")
        else:
            errors.append(f"'{path}' does not exist")

    # The same output name twice (x.jpg and x.png, or one file given twice) would overwrite: disambiguate.
    seen: Dict[str, int] = {}
    unique: List[Tuple[Path, str]] = []
    resolved_seen = set()
    for img, name in found:
        key = img.resolve()
        if key in resolved_seen:
            continue
        resolved_seen.add(key)
        if name in seen:
            base = f"{name}_{img.suffix.lstrip('.').lower()}"
            candidate, n = base, 2
            while candidate in seen:
                candidate, n = f"{base}_{n}", n + 1
            name = candidate
        seen[name] = 1
        unique.append((img, name))
    return unique, errors


def _class_setup(args) -> Tuple[Optional[str], Optional[Tuple[str, ...]], List[str]]:
    """(preset name or None, class lines or None, names for legends)."""
    if args.preset is not None:
        try:
            preset = get_preset(args.preset)
        except ValueError as exc:
            raise UserError(str(exc)) from None
        return preset.name, None, list(preset.label_names)
    try:
        lines = parse_classes_arg(args.classes) if args.classes is not None else read_class_file(args.classes_file)
    except ClassListError as exc:
        raise UserError(str(exc)) from None
    return None, lines, [display_name(line) for line in lines]


def _save_outputs(out_dir: Path, name: str, image, result, legend_names: Sequence[str], args) -> None:
    import numpy as np

    from naclip.visualize import overlay, save_label_png

    labels = _to_numpy(result.labels)
    if labels.ndim == 3 and labels.shape[0] == 1:      # tolerate a [1, H, W] batch of one
        labels = labels[0]
    target = out_dir / name
    target.parent.mkdir(parents=True, exist_ok=True)
    save_label_png(labels, f"{target}_labels.png")
    names = list(legend_names)
    legend = None if args.legend == "none" else args.legend
    overlay(image, labels, names, alpha=args.alpha, legend=legend).save(f"{target}_overlay.png")
    if args.save_probs:
        probs = _to_numpy(result.probs)
        if probs.ndim == 4 and probs.shape[0] == 1:
            probs = probs[0]
        np.save(f"{target}_probs.npy", probs.astype(np.float16))


def _cmd_segment(args, factory) -> int:
    if not 0.0 <= args.alpha <= 1.0:
        raise UserError(f"--alpha must be in [0, 1], got {args.alpha}")
    preset_name, class_lines, legend_names = _class_setup(args)
    if len(legend_names) == 1 and args.world.is_main:
        # Scores are a softmax over the listed classes: with one class, every pixel gets it.
        print(f"{PROG}: warning: only one class ({legend_names[0]!r}), so every pixel gets it; list the other "
              f"things in the images too, e.g. --classes '{legend_names[0]}, background'", file=sys.stderr)
    out_dir = Path(args.out).expanduser()
    images, input_errors = _collect_inputs(args.inputs, out_dir)
    world = args.world
    for line in input_errors if world.is_main else ():    # every rank sees the same inputs: report them once
        _err(line)
    if not images:
        raise UserError("no images to segment")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create output folder '{out_dir}': {exc.strerror or exc}") from None
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise UserError(f"output folder '{out_dir}' is not writable")

    start = announce_loading(args, args.quiet or not world.is_main)     # once per job, not once per rank
    kwargs = _segmenter_kwargs(args)
    if class_lines is not None:
        kwargs["classes"] = list(class_lines)
    segmenter = _build_segmenter(factory, preset_name, kwargs)
    announce_loaded(start, kwargs, args.quiet or not world.is_main)
    encode_text_first(segmenter, args.quiet or not world.is_main)

    failed = len(input_errors) if world.is_main else 0
    done = 0
    start = time.perf_counter()
    mine = world.shard(images)                           # rank r of W: images r, r + W, ...
    decoded = _decoded(args, segmenter, [path for path, _ in mine])
    with _progress(len(mine), args.quiet or not world.is_main, _bar_title("segment", world)) as bar:
        for (path, name), item in zip(mine, decoded):
            try:
                if item.error is not None:
                    raise item.error
                image = item.image
                result = segmenter(image if item.prepared is None else item.prepared)
                _save_outputs(out_dir, name, image, result, legend_names, args)
                done += 1
            except KeyboardInterrupt:
                raise
            except Exception as exc:       # noqa: BLE001 - one image's failure must not lose the others
                if _debug():
                    raise
                failed += 1
                msg = _one_line(exc)
                _err(msg if str(path) in msg else f"{path}: {msg}", writer=lambda s: bar.write(s, file=sys.stderr))
            bar.update(1)
    done, failed = (sum(column) for column in zip(*world.gather((done, failed))))
    if not args.quiet and world.is_main:
        elapsed = time.perf_counter() - start
        print(f"{PROG}: segmented {done} of {len(images)} image(s) in {elapsed:.1f} s -> {out_dir}"
              + (f"; {failed} failed" if failed else "") + _ranks_note(world), file=sys.stderr)
    return 1 if failed else 0


# --------------------------------------------------------------------------------------------------------------
# eval
# --------------------------------------------------------------------------------------------------------------

def _data_root_hint(preset, args, max_folders: int = 32) -> str:
    """``; did you mean --data-root X/VOC2012?`` when the dataset is one folder further down than --data-root
    (the usual slip: VOCdevkit instead of VOCdevkit/VOC2012); empty otherwise."""
    from naclip.datasets import DatasetError, dataset_for_preset

    root = Path(args.data_root).expanduser()
    try:
        children = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))[:max_folders]
    except OSError:
        return ""
    for child in children:
        try:
            dataset_for_preset(preset, child, split=args.split, limit=1)
        except (DatasetError, OSError):
            continue
        return f"; did you mean --data-root {child}?"
    return ""


def _cmd_eval(args, factory) -> int:
    from naclip.datasets import DatasetError, dataset_for_preset
    from naclip.metrics import ConfusionMatrix, LabelRangeError, format_table

    try:
        preset = get_preset(args.preset)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    # Open the dataset before loading the model: a wrong --data-root should fail in milliseconds.
    try:
        dataset = dataset_for_preset(preset, args.data_root, split=args.split, limit=args.limit)
    except DatasetError as exc:
        raise UserError(str(exc) + _data_root_hint(preset, args)) from None
    if args.json not in (None, "-"):
        json_parent = Path(args.json).expanduser().parent
        if not json_parent.is_dir():
            raise UserError(f"--json: folder '{json_parent}' does not exist")

    quiet_here = args.quiet or not args.world.is_main                  # once per job, not once per rank
    start = announce_loading(args, quiet_here)
    kwargs = _segmenter_kwargs(args)
    segmenter = _build_segmenter(factory, preset.name, kwargs)
    announce_loaded(start, kwargs, quiet_here)
    encode_text_first(segmenter, quiet_here)

    cm = ConfusionMatrix(preset.num_classes, ignore_index=preset.ignore_index)
    failed, done = 0, 0
    stage_totals: Dict[str, float] = {}
    fatal: Optional[str] = None
    start = time.perf_counter()
    world = args.world
    samples = world.shard(dataset.samples)               # rank r of W: images r, r + W, ...
    decoded = _decoded(args, segmenter, [s.image_path for s in samples], [s.label_path for s in samples], dataset)
    with _progress(len(samples), args.quiet or not world.is_main, _bar_title(f"eval {preset.name}", world)) as bar:
        for sample, item in zip(samples, decoded):
            try:
                if item.error is not None:
                    raise item.error
                image, label = item.image, item.label
                result = segmenter(image if item.prepared is None else item.prepared)
                pred = _to_numpy(result.labels)
                if pred.shape != label.shape:
                    raise ValueError(f"prediction size {pred.shape} differs from label size {label.shape} "
                                     f"('{sample.label_path}')")
                cm.update(pred, label)
                done += 1
                for stage, seconds in (getattr(result, "timings", None) or {}).items():
                    stage_totals[stage] = stage_totals.get(stage, 0.0) + float(seconds)
            except KeyboardInterrupt:
                raise
            except LabelRangeError as exc:
                # Not one bad image: the preset does not match the data. Stop with one clear line (after telling
                # the other ranks, which would otherwise wait for this one in the reduction below).
                fatal = f"'{sample.label_path}': {exc}; is --preset {preset.name} right for this dataset?"
                break
            except Exception as exc:       # noqa: BLE001 - report the image and go on with the rest
                if _debug():
                    raise
                failed += 1
                msg = _one_line(exc)
                path = sample.image_path
                _err(msg if str(path) in msg or isinstance(exc, DatasetError) else f"{path}: {msg}",
                     writer=lambda s: bar.write(s, file=sys.stderr))
            bar.update(1)
    per_rank = world.gather((done, failed, stage_totals, fatal))
    fatal = next((f for *_, f in per_rank if f is not None), None)
    if fatal is not None:
        raise UserError(fatal)
    # Exact int64 sums over ranks: the per-class intersections, unions, predicted and labelled pixel counts all
    # come from the confusion matrix, so the metrics are those of one process over all the images.
    cm.matrix = world.sum_int64(cm.matrix)
    done, failed = sum(r[0] for r in per_rank), sum(r[1] for r in per_rank)
    stage_totals = {}
    for _, _, totals, _ in per_rank:
        for stage, seconds in totals.items():
            stage_totals[stage] = stage_totals.get(stage, 0.0) + seconds
    elapsed = time.perf_counter() - start
    if done == 0:
        raise UserError(f"none of the {len(dataset)} image(s) could be evaluated")
    if not world.is_main:
        return 1 if failed else 0

    names = list(preset.label_names)
    # With --json - the JSON alone goes to stdout (so it can be piped); the table then goes to stderr.
    table_out = sys.stderr if args.json == "-" else sys.stdout
    print(f"{preset.name}: {done} image(s) from '{dataset.root}' (split {dataset.split})"
          + (f", {failed} failed" if failed else ""), file=table_out)
    print(format_table(cm, names), file=table_out)
    summary = cm.summary(names)
    summary.update({
        # The table prints percent; the JSON keeps exact fractions and says so (mIoU, aAcc, mAcc, IoU, Acc).
        "units": "fraction",
        "preset": preset.name, "data_root": str(dataset.root), "split": dataset.split, "images": done,
        "failed": failed, "seconds": round(elapsed, 3), "processes": world.world_size,
        "mean_stage_seconds": {k: v / done for k, v in stage_totals.items()},
        "settings": {k: (str(v) if k in ("dtype",) else v) for k, v in kwargs.items()},
    })
    if args.json is not None:
        text = json.dumps(summary, indent=2, default=str)
        if args.json == "-":
            print(text)
        else:
            try:
                Path(args.json).expanduser().write_text(text + "\n", encoding="utf-8")
            except OSError as exc:
                raise UserError(f"cannot write --json file '{args.json}': {exc.strerror or exc}") from None
    return 1 if failed else 0


# --------------------------------------------------------------------------------------------------------------
# presets / serve
# --------------------------------------------------------------------------------------------------------------

def _cmd_presets(args) -> int:
    method = getattr(args, "method", "naclip")
    settings = None
    if method != "naclip":        # the method's own per-benchmark settings (imports torch: only when asked for)
        from naclip.methods import get_method
        settings = get_method(method).preset_settings
    print(f"{'preset':<12} {'classes':>7} {'queries':>7} {'short':>5} {'window':>8} {'thresh':>6}  layout")
    for p in PRESETS.values():
        short, slide, threshold = p.short_side, p.slide, p.confidence_threshold
        if settings is not None:
            chosen = settings(p)
            short, slide, threshold = chosen["short_side"], chosen["slide"], chosen["confidence_threshold"]
        window = "whole" if slide is None else f"{slide[0]}x{slide[1]}"
        thr = "-" if threshold is None else f"{threshold:g}"
        print(f"{p.name:<12} {p.num_classes:>7} {p.num_queries:>7} {short:>5} {window:>8} {thr:>6}  "
              f"{p.dataset_layout}")
    return 0


def _run_serve(argv: Sequence[str]) -> int:
    try:
        from naclip.server import add_serve_arguments, run_serve
    except ImportError as exc:
        _err(f"the web app is not available ({_one_line(exc)}); install it with: pip install "
             "'naclip-kernels[segmenter]'")
        return 2
    parser = _Parser(prog=f"{PROG} serve", description="Start the NACLIP web app.")
    add_serve_arguments(parser)
    try:
        args = parser.parse_args(list(argv))
    except SystemExit as exc:
        return _exit_code(exc)
    return int(run_serve(args) or 0)


def _exit_code(exc: SystemExit) -> int:
    code = exc.code
    if code is None:
        return 0
    return code if isinstance(code, int) else 1


def _format_warning(message, category, filename, lineno, line=None) -> str:
    # Python's default shows the source line of the warn() call: noise for a command-line user.
    text = " ".join(str(message).split())
    if text.startswith(f"{PROG}: "):
        text = text[len(PROG) + 2:]
    return f"{PROG}: warning: {text}\n"


def main(argv: Optional[Sequence[str]] = None, *, segmenter_factory: Optional[Callable[..., Any]] = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); returns the exit status.

    ``segmenter_factory(preset_name_or_None, **kwargs)`` builds the segmenter (default
    :func:`default_segmenter_factory`); tests pass a fake one.
    """
    import logging
    import warnings

    # Libraries underneath (open_clip) log through the root logger; without a handler, logging's fallback prints
    # "WARNING:root:...". Give those lines the CLI's prefix instead (only when nobody configured logging).
    if not logging.getLogger().handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(f"{PROG}: %(levelname)s: %(message)s"))
        logging.getLogger().addHandler(handler)
    saved = warnings.formatwarning
    warnings.formatwarning = _format_warning
    try:
        return _main(argv, segmenter_factory)
    except BrokenPipeError:
        # The reader of stdout went away (`naclip presets | head -1`): stop quietly, as Unix tools do (141 is the
        # status a shell shows for a command stopped by SIGPIPE).
        _discard_stdout()
        return 141
    finally:
        warnings.formatwarning = saved


def _discard_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's final flush of what is still buffered does not raise
    again ("Exception ignored ... BrokenPipeError") on the way out."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):    # a replaced sys.stdout (tests): nothing is flushed at exit
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


def _main(argv, segmenter_factory) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    factory = segmenter_factory or default_segmenter_factory
    # `serve` has its own options (naclip.server), and its module (Flask) is only imported when asked for.
    if argv and argv[0] == "serve":
        try:
            return _run_serve(argv[1:])
        except KeyboardInterrupt:
            return 130
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return _exit_code(exc)
    try:
        if args.command in ("segment", "eval"):
            with _world(args):
                return (_cmd_segment if args.command == "segment" else _cmd_eval)(args, factory)
        if args.command == "presets":
            return _cmd_presets(args)
        parser.error(f"unknown command {args.command!r}")
    except UserError as exc:
        _err(str(exc))
        return 2
    except KeyboardInterrupt:
        _err("interrupted")
        return 130
    except SystemExit as exc:
        return _exit_code(exc)
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
