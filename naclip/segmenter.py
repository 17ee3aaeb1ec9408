"""The NACLIP open-vocabulary segmenter (SPEC.md sections 2 and 4).

    from naclip import Segmenter
    seg = Segmenter(model="ViT-B-16", pretrained="openai", classes=["cat", "sofa, couch", "background"],
                    device="cuda", dtype=torch.float16, slide=(224, 112), pamr=True, backend="auto")
    result = seg(image)        # result.labels [H, W] int64, result.probs [num_classes, H, W] float32

Pipeline for one image of size ``H x W``:

1. RGB in ``[0, 1]``; resized (bilinear, antialiased when shrinking) so the short side is ``short_side`` (long side
   capped at ``max_long_side``, as mmseg's ``Resize(scale=(2048, short_side), keep_ratio=True)``) to ``H' x W'``;
   normalised with the weights' mean/std.
2. Patch logits = cosine(patch features, query embeddings). Sliding windows ``crop x crop`` with ``stride``
   (clamped to the border, batched ``window_batch_size`` at a time), each window's ``[Q, h, w]`` logits upsampled
   bilinearly to the window and averaged where windows overlap; or the whole image at once (``slide=None``).
   Inputs whose size is not a multiple of the patch size are zero-padded (in normalised space) on the right/bottom
   and the padded part of the upsampled logits is cropped off, so logits stay aligned with pixels.
3. Logits resized bilinearly from ``H' x W'`` to the input size ``H x W``; PAMR on the normalised image resized to
   ``H x W`` (this is what NACLIP's code does: it evaluates at the original image size).
4. ``softmax(logit_scale * logits)`` over queries, class probability = max over the class's queries (synonyms),
   ``labels = argmax``; with ``confidence_threshold``, pixels whose top class probability is below it get
   ``background_index`` (class 0 in NACLIP).

``probs`` are the per-class maxima of the query softmax: with synonyms they do not sum to 1 over classes.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

import naclip_kernels
from naclip_kernels._backend import BACKENDS
from naclip.image import CLIP_MEAN, CLIP_STD, is_image_like, normalize, resize_short_side, to_tensor
from naclip.methods import DEFAULT_METHOD, MethodContext, get_method
from naclip.methods.base import PIPELINE_SETTINGS
from naclip.model import LoadedCLIP, check_vit, import_open_clip, load_clip, vision_patch_size
from naclip.text import TextEncoder, parse_classes, read_class_file

__all__ = ["Segmenter", "SegmentationResult", "PreparedImage", "Preprocessor", "default_window_batch_size"]


@dataclass
class SegmentationResult:
    """One image's segmentation, at the input image's size ``H x W`` (tensors on the CPU).

    Attributes:
        labels: ``[H, W]`` int64 class ids (indices into ``class_names``).
        probs: ``[num_classes, H, W]`` float32: per class, the max over its queries of the softmax over queries
            of ``logit_scale * logits``.
        class_names: the first name of each class line.
        timings: seconds per stage: ``preprocess``, ``text`` (0 when cached), ``encode`` (image tower and window
            aggregation), ``pamr``, ``postprocess``, ``total``.
        logits: ``[num_queries, H, W]`` float32 cosine-similarity logits after PAMR (before ``logit_scale``), only
            when the segmenter was built with ``return_logits=True`` (they are large: queries x pixels).
    """
    labels: torch.Tensor
    probs: torch.Tensor
    class_names: List[str]
    timings: Dict[str, float] = field(default_factory=dict)
    logits: Optional[torch.Tensor] = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def size(self) -> Tuple[int, int]:
        """``(H, W)``."""
        return tuple(self.labels.shape)


class _MethodDefault:
    """The default of an argument whose value comes from the method (``Segmenter(method=...)``)."""

    def __repr__(self) -> str:
        return "<the method's default>"


DEFAULT: Any = _MethodDefault()
# Arguments of Segmenter that are method options (accepted only by the methods that declare them).
_METHOD_OPTION_ARGS = ("similarity", "sigma", "architecture", "vfm", "vfm_pretrained")


def _resolve_method(method: str, pipeline: Dict[str, Any], named_options: Dict[str, Any],
                    method_options: Optional[Dict[str, Any]]):
    """``(Method, pipeline settings, method options)``: the method's defaults where the caller gave ``DEFAULT``;
    options the method does not declare raise ``ValueError`` naming the ones it has."""
    spec = get_method(method)
    settings = {k: (spec.defaults[k] if v is DEFAULT else v) for k, v in pipeline.items()}
    given = {k: v for k, v in named_options.items() if v is not DEFAULT}
    for key, value in dict(method_options or {}).items():
        if key in given:
            raise ValueError(f"Segmenter: {key} given both as an argument and in method_options")
        given[key] = value
    unknown = sorted(set(given) - set(spec.options))
    if unknown:
        accepted = ", ".join(spec.options) or "none"
        raise ValueError(f"Segmenter: {', '.join(unknown)} do(es) not apply to method {spec.name!r} (its options: "
                         f"{accepted})")
    options = {**spec.options, **given}
    if spec.check_options is not None:
        spec.check_options(options)
    return spec, settings, options


@dataclass(frozen=True)
class PreparedImage:
    """An image already through step 1 of the pipeline (:meth:`Segmenter.preprocessor`): ``tensor`` ``[3, H', W']``
    float32, resized and normalised; ``size`` the original ``(H, W)``, the size of the segmentation."""
    tensor: torch.Tensor
    size: Tuple[int, int]


@dataclass(frozen=True)
class Preprocessor:
    """Step 1 of the pipeline as a picklable callable (what DataLoader workers run): ``image -> PreparedImage``."""
    short_side: Optional[int]
    max_long_side: Optional[int]
    mean: Tuple[float, ...]
    std: Tuple[float, ...]

    def __call__(self, image: Any) -> PreparedImage:
        x = to_tensor(image)
        resized = normalize(resize_short_side(x, self.short_side, self.max_long_side), self.mean, self.std)
        return PreparedImage(resized, (int(x.shape[-2]), int(x.shape[-1])))


# On a CPU, windows are batched until the matrix products have about this many rows (tokens): enough for the GEMM
# kernels' full rate, few enough for the activations to stay in the caches (see default_window_batch_size).
_CPU_GEMM_ROWS = 800


def default_window_batch_size(device: Any, tokens_per_window: int = 197) -> int:
    """Sliding windows per forward pass when ``window_batch_size=None``: 16 on CUDA; on a CPU, as many windows as
    make about 800 tokens per pass (4 CLIP ViT-B/16 windows of 224, one ProxyCLIP window with a DINO ViT-B/8).

    On a GPU one window (197 tokens) cannot fill the device, so windows are batched. On a CPU the matrix products of
    one CLIP window (197 x 768 by 768 x 3072 and the like) are too short for the GEMM kernels: measured on the
    2-core dev CPU (float32, torch's CPU BLAS), ViT-B's four linear layers ran at 129 GFLOP/s with 197 rows, 177
    with 788 (4 windows) and 189 with 1576. Batching also multiplies the activations, though: at 16 windows a
    ViT-B block's MLP hidden state is 39 MB and its attention scores 30 MB, past the caches. About 800 rows is the
    measured best of both. A 560x1120 Cityscapes-like encode (36 windows, ViT-B/16, random weights) took 8.8-9.1 s
    at 1 window per pass, 7.4 s at 2, 7.0-7.3 s at 4, 7.7 s at 8 and 8.4 s at 16. A window whose largest tower
    already has ~800 tokens or more (ProxyCLIP's DINO ViT-B/8 on a 336 window: 1765) runs one at a time.
    Whole-image inference is one window, so it is unaffected.
    """
    if torch.device(device).type == "cuda":
        return 16
    return max(1, min(16, round(_CPU_GEMM_ROWS / max(1, tokens_per_window))))


def _check_pos_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Segmenter: {name} must be a positive int, got {value!r}")
    return value


def _check_slide(slide: Any) -> Optional[Tuple[int, int]]:
    if slide is None:
        return None
    if not isinstance(slide, (tuple, list)) or len(slide) != 2:
        raise ValueError(f"Segmenter: slide must be (crop, stride) or None, got {slide!r}")
    crop, stride = _check_pos_int("slide[0] (crop)", slide[0]), _check_pos_int("slide[1] (stride)", slide[1])
    if stride > crop:
        raise ValueError(f"Segmenter: slide stride ({stride}) must not exceed the crop ({crop}): pixels between "
                         "windows would get no logits")
    return crop, stride


class Segmenter:
    """Training-free open-vocabulary segmentation on an open_clip ViT: NACLIP, SCLIP, ClearCLIP, CLIP, ProxyCLIP.

    Args:
        model: an open_clip ViT model name (e.g. ``"ViT-B-16"``), an already built open_clip CLIP model
            (``nn.Module``; the attention-family methods patch it in place; ``pretrained`` must be ``None``), or a
            :class:`naclip.model.LoadedCLIP` (shares its model, tokenizer and normalisation; ``pretrained=None``).
        pretrained: a pretrained tag (e.g. ``"openai"``; needs network unless already downloaded), a local
            checkpoint file path (loaded with ``weights_only=True``), or ``None`` for random weights (warns).
        classes: class lines, one per class, synonyms comma-separated (``["cat", "sofa, couch"]``), or the path of
            a text file with one class line per line. Change later with :meth:`set_classes`.
        device: ``"cuda"``, ``"cpu"``, ...; default CUDA when available.
        dtype: ``torch.float32``, ``float16`` or ``bfloat16``; default float16 on CUDA, float32 on CPU. Half
            precision on the CPU is slow or unsupported for several ops, so it warns and uses float32.
        method: a name of :data:`naclip.methods.METHODS`: ``"naclip"`` (default), ``"sclip"``, ``"clearclip"``,
            ``"clip"``, ``"proxyclip"``. It gives the defaults of ``slide``, ``short_side``, ``pamr``,
            ``logit_scale`` (NACLIP family: 224/112, 336, PAMR on, 40; ProxyCLIP: 336/112, 336, PAMR off, 40) and of
            its own options; every argument given explicitly overrides the method's default.
        slide: ``(crop, stride)`` for sliding-window inference, or ``None`` for the whole image at once.
        short_side: the short side the image is resized to (NACLIP: 336; 560 for Cityscapes); ``None`` keeps it.
        max_long_side: cap on the long side after resizing (mmseg's 2048); ``None`` for no cap.
        pamr: refine logits with PAMR (``naclip_kernels.pamr``); ``pamr_iters`` / ``pamr_dilations``: its settings.
        confidence_threshold: ``None`` or a probability in ``[0, 1]``: pixels whose top class probability is below
            it become ``background_index`` (NACLIP: 0.1 for VOC21, PC60, COCO-Object).
        background_index: the class that low-confidence pixels get (0 in NACLIP's class files).
        logit_scale: multiplier before the softmax over queries (NACLIP: 40).
        similarity, sigma, architecture: options of the attention family (``naclip``, ``sclip``, ``clearclip``,
            ``clip``): the last block's attention (``"kk"``/``"qk"``/``"qq"``/``"csa"``), Gaussian sigma (``None``: no
            neighbourhood bias) and ``"reduced"`` (no residual, no MLP) or ``"vanilla"``. Not given: the method's
            own (``naclip``: kk, 5, reduced; ``sclip``: csa, None, vanilla; ``clearclip``: qq, None, reduced;
            ``clip``: qk, None, vanilla); given: they replace it, so ``method="naclip", sigma=3.0`` is NACLIP with
            sigma 3. Refused (``ValueError``) with ``method="proxyclip"``.
        vfm, vfm_pretrained: ProxyCLIP's vision foundation model: a name of :data:`naclip.vfm.VFM_NAMES`
            (``"dino_vitb8"`` by default, ``"dino_vitb16"``, ``"dinov2_vitb14_reg"``, ``"sam_vitb"``,
            ``"mae_vitb16"``), any timm ViT name, or a built :class:`naclip.vfm.VFM` / timm model; its weights:
            ``"default"`` (the name's timm tag), another timm tag, a local file, or ``None`` (random, warns).
            Refused with the other methods.
        method_options: further options of the method by name (ProxyCLIP: ``beta`` 1.2, ``gamma`` 3.0,
            ``pad_to`` 56); unknown names raise ``ValueError``.
        backend: ``"auto"``/``"triton"``/``"torch"``/``"reference"`` for attention and PAMR.
        window_batch_size: sliding windows per forward pass (memory cap). ``None`` (default) picks it per device
            (:func:`default_window_batch_size`): 16 on CUDA; on a CPU about 800 tokens per pass (4 CLIP ViT-B/16
            windows of 224, 1 ProxyCLIP window with a DINO ViT-B/8).
        templates: prompt templates (default: the 80 OpenAI ImageNet templates).
        cache_dir: text-embedding disk cache (default ``$NACLIP_CACHE_DIR/text`` or ``~/.cache/naclip/text``);
            ``False`` disables it. Random weights are never disk-cached.
        tokenizer: only for a model passed as a module: its tokenizer (default: CLIP's BPE tokenizer).
        weights_id: only for a model passed as a module: a string identifying its weights, which enables the
            disk text cache.
        return_logits: also return the ``[num_queries, H, W]`` logits in each result.

    Call with one image (PIL image, ``[H, W, 3]`` uint8 array, ``[3, H, W]`` tensor, or a file path) to get a
    :class:`SegmentationResult`, or with a list of images to get a list of results.
    """

    def __init__(self, model: Union[str, nn.Module, LoadedCLIP] = "ViT-B-16", pretrained: Optional[str] = "openai",
                 classes: Union[Sequence[str], str, None] = None, *, method: str = DEFAULT_METHOD,
                 device: Any = None, dtype: Optional[torch.dtype] = None,
                 slide: Optional[Tuple[int, int]] = DEFAULT, short_side: Optional[int] = DEFAULT,
                 max_long_side: Optional[int] = 2048, pamr: bool = DEFAULT,
                 pamr_iters: int = 10, pamr_dilations: Sequence[int] = (8, 16),
                 confidence_threshold: Optional[float] = None, background_index: Optional[int] = 0,
                 logit_scale: float = DEFAULT, similarity: str = DEFAULT, sigma: Optional[float] = DEFAULT,
                 architecture: str = DEFAULT, vfm: Any = DEFAULT, vfm_pretrained: Optional[str] = DEFAULT,
                 method_options: Optional[Dict[str, Any]] = None, backend: str = "auto",
                 window_batch_size: Optional[int] = None, templates: Optional[Sequence[str]] = None,
                 cache_dir: Any = None,
                 tokenizer: Any = None, weights_id: Optional[str] = None, text_batch_size: int = 256,
                 return_logits: bool = False):
        # ---- options (validated before anything expensive happens)
        if backend not in BACKENDS:
            raise ValueError(f"Segmenter: backend must be one of {BACKENDS}, got {backend!r}")
        spec, settings, method_opts = _resolve_method(
            method, dict(slide=slide, short_side=short_side, pamr=pamr, logit_scale=logit_scale),
            dict(similarity=similarity, sigma=sigma, architecture=architecture, vfm=vfm,
                 vfm_pretrained=vfm_pretrained), method_options)
        slide, short_side, pamr, logit_scale = (settings[k] for k in PIPELINE_SETTINGS)
        slide = _check_slide(slide)
        if short_side is not None:
            _check_pos_int("short_side", short_side)
        if max_long_side is not None:
            _check_pos_int("max_long_side", max_long_side)
        _check_pos_int("pamr_iters", pamr_iters)
        pamr_dilations = tuple(pamr_dilations)
        if not pamr_dilations:
            raise ValueError("Segmenter: pamr_dilations must not be empty")
        for d in pamr_dilations:
            _check_pos_int("pamr_dilations[i]", d)
        if confidence_threshold is not None:
            if isinstance(confidence_threshold, bool) or not isinstance(confidence_threshold, (int, float)) \
                    or not 0.0 <= float(confidence_threshold) <= 1.0:
                raise ValueError(f"Segmenter: confidence_threshold must be None or in [0, 1], "
                                 f"got {confidence_threshold!r}")
            if background_index is None:
                raise ValueError("Segmenter: confidence_threshold needs a background_index (the class that "
                                 "low-confidence pixels get)")
            confidence_threshold = float(confidence_threshold)
        if not isinstance(logit_scale, (int, float)) or isinstance(logit_scale, bool) or logit_scale <= 0:
            raise ValueError(f"Segmenter: logit_scale must be a positive number, got {logit_scale!r}")
        if window_batch_size is not None:
            _check_pos_int("window_batch_size", window_batch_size)
        if classes is None:
            raise ValueError("Segmenter: classes is required: a list of class lines (synonyms 'name1, name2') or "
                             "a class file path; or use Segmenter.from_preset(name)")
        if isinstance(classes, (list, tuple)):
            parse_classes(classes)   # fail on a bad class list before loading a model
        if background_index is not None and (isinstance(background_index, bool)
                                             or not isinstance(background_index, int) or background_index < 0):
            raise ValueError(f"Segmenter: background_index must be None or a class index >= 0, got "
                             f"{background_index!r}")

        self._slide = slide
        self.short_side = short_side
        self.max_long_side = max_long_side
        self.pamr = bool(pamr)
        self.pamr_iters = pamr_iters
        self.pamr_dilations = pamr_dilations
        self.confidence_threshold = confidence_threshold
        self.background_index = background_index
        self.logit_scale = float(logit_scale)
        self.window_batch_size = window_batch_size
        self.return_logits = bool(return_logits)
        self._backend = backend
        self.method = spec.name

        # ---- device / dtype
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(device)
        if dtype is None:
            dtype = torch.float16 if device.type == "cuda" else torch.float32
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"Segmenter: dtype must be torch.float32, float16 or bfloat16, got {dtype}")
        if device.type == "cpu" and dtype != torch.float32:
            warnings.warn(f"Segmenter: dtype={dtype} on the CPU is slow or unsupported for several ops; using "
                          "torch.float32", UserWarning, stacklevel=2)
            dtype = torch.float32
        self.device, self.dtype = device, dtype

        # ---- model
        if isinstance(model, LoadedCLIP):
            if pretrained is not None or tokenizer is not None or weights_id is not None:
                raise ValueError("Segmenter: with a LoadedCLIP, pretrained/tokenizer/weights_id must be None (they "
                                 "come from it)")
            check_vit(model.model)
            loaded = LoadedCLIP(**{**vars(model), "model": model.model.to(device=device, dtype=dtype).eval()})
        elif isinstance(model, nn.Module):
            if pretrained is not None:
                raise ValueError("Segmenter: pretrained must be None when model is an nn.Module (its weights are "
                                 "already loaded)")
            check_vit(model)
            model = model.to(device=device, dtype=dtype).eval()
            if tokenizer is None:
                open_clip = import_open_clip()
                tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=getattr(model, "context_length", 77))
            pp = dict(getattr(model.visual, "preprocess_cfg", None) or {})
            loaded = LoadedCLIP(model=model, tokenizer=tokenizer, mean=tuple(pp.get("mean") or CLIP_MEAN),
                                std=tuple(pp.get("std") or CLIP_STD), model_name=type(model).__name__,
                                weights_id=weights_id)
        elif isinstance(model, str):
            if tokenizer is not None or weights_id is not None:
                raise ValueError("Segmenter: tokenizer/weights_id are only for a model passed as an nn.Module")
            loaded = load_clip(model, pretrained, device=device, dtype=dtype)
        else:
            raise TypeError(f"Segmenter: model must be an open_clip model name, an nn.Module or a LoadedCLIP, got "
                            f"{type(model).__name__}")
        self.loaded = loaded
        self.model = loaded.model
        self.mean, self.std = loaded.mean, loaded.std
        self.patch_size = vision_patch_size(self.model)
        self.method_options = dict(method_opts)

        # ---- text (before patching, so that a bad class list or template cannot leave the model patched)
        self.text_encoder = TextEncoder(self.model, loaded.tokenizer, loaded.model_name, loaded.weights_id,
                                        templates=templates, cache_dir=cache_dir, batch_size=text_batch_size)
        self.set_classes(classes)

        # ---- the method's dense-feature head on this model instance (undone by close())
        self.head = spec.build(MethodContext(model=self.model, mean=self.mean, std=self.std, device=device,
                                             dtype=dtype, backend=backend, options=method_opts))
        # The attention family's NaclipPatch (None for methods that do not patch the model).
        self.handle = getattr(self.head, "handle", None)
        if self.window_batch_size is None:
            window = (self.slide[0], self.slide[0]) if self.slide is not None else (224, 224)
            self.window_batch_size = default_window_batch_size(device, self.head.tokens_per_window(window))

    # ------------------------------------------------------------------------------------------------ options
    @classmethod
    def from_preset(cls, name: str, method: str = DEFAULT_METHOD, **overrides: Any) -> "Segmenter":
        """A segmenter with a benchmark preset's classes and the method's settings for that benchmark
        (``naclip.presets.get_preset(name)``: classes, background_index; short_side, slide and
        confidence_threshold as the method sets them per benchmark: NACLIP's for the attention family, ProxyCLIP's
        own for ``method="proxyclip"``); keyword arguments override them."""
        from naclip import presets  # lazy: the presets module is optional for the core API
        preset = presets.get_preset(name)
        kwargs: Dict[str, Any] = dict(classes=list(preset.classes), background_index=preset.background_index,
                                      **get_method(method).preset_settings(preset))
        kwargs["method"] = method
        kwargs.update(overrides)
        segmenter = cls(**kwargs)
        if "classes" not in overrides:
            # Name classes as the dataset does ("background", not the first synonym of its line, "sky").
            segmenter.class_names = list(preset.label_names)
        return segmenter

    @property
    def slide(self) -> Optional[Tuple[int, int]]:
        """``(crop, stride)`` or ``None`` (whole image); assignable, validated."""
        return self._slide

    @slide.setter
    def slide(self, value: Optional[Tuple[int, int]]) -> None:
        self._slide = _check_slide(value)

    @property
    def backend(self) -> str:
        """The kernels' backend for attention and PAMR; assignable (e.g. ``seg.backend = "reference"``)."""
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        if value not in BACKENDS:
            raise ValueError(f"Segmenter: backend must be one of {BACKENDS}, got {value!r}")
        self.head.backend = value
        self._backend = value

    def set_classes(self, classes: Union[Sequence[str], str]) -> None:
        """Replace the class list (lines ``"name1, name2"``, or a class file path). Text embeddings are computed
        on the next call (or taken from the cache)."""
        if isinstance(classes, str) and "\n" not in classes and ("/" in classes or classes.endswith(".txt")):
            classes = read_class_file(classes)
        elif hasattr(classes, "__fspath__"):
            classes = read_class_file(classes)
        class_names, queries, query_to_class = parse_classes(classes)
        if self.background_index is not None and self.confidence_threshold is not None \
                and not 0 <= self.background_index < len(class_names):
            raise ValueError(f"Segmenter: background_index {self.background_index} is out of range for "
                             f"{len(class_names)} classes")
        self.classes = list(classes)
        self.class_names = class_names
        self.queries = queries
        self.query_to_class = torch.tensor(query_to_class, dtype=torch.long)
        self._query_embeddings: Optional[torch.Tensor] = None

    @property
    def query_embeddings(self) -> torch.Tensor:
        """``[num_queries, D]`` float32 L2-normalised text embeddings (computed or loaded on first use)."""
        if self._query_embeddings is None:
            self._query_embeddings = self.text_encoder(self.queries)
        return self._query_embeddings

    def close(self) -> None:
        """Undo the method's changes to the model (the attention family restores the original last block); the
        segmenter is unusable afterwards."""
        self.head.remove()

    # ------------------------------------------------------------------------------------------------ inference
    def preprocessor(self) -> "Preprocessor":
        """Step 1 of the pipeline (RGB in ``[0, 1]``, resize, normalise) as a small picklable callable that runs on
        the CPU, e.g. in ``DataLoader`` workers; call the segmenter with its :class:`PreparedImage` results. The
        settings are those of this moment (``short_side``, ``max_long_side``, the weights' mean and std)."""
        return Preprocessor(self.short_side, self.max_long_side, tuple(self.mean), tuple(self.std))

    def __call__(self, images: Any) -> Union[SegmentationResult, List[SegmentationResult]]:
        if isinstance(images, (list, tuple)):
            if not images:
                raise ValueError("Segmenter: got an empty list of images")
            return [self._segment(img, f"images[{i}]") for i, img in enumerate(images)]
        if not (is_image_like(images) or isinstance(images, PreparedImage)):
            raise TypeError(f"Segmenter: image must be a PIL image, an [H, W, 3] uint8 array, a [3, H, W] tensor, a "
                            f"file path, or a list of them; got {type(images).__name__}")
        return self._segment(images, "image")

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _padded_size(self, size: Tuple[int, int]) -> Tuple[int, int]:
        """``size`` rounded up to the method's pad multiple (the CLIP patch size for the attention family)."""
        ph, pw = self.head.pad_multiple
        return size[0] + (-size[0]) % ph, size[1] + (-size[1]) % pw

    def _pad_to_patch(self, x: torch.Tensor) -> torch.Tensor:
        height, width = self._padded_size(tuple(x.shape[-2:]))
        pad_h, pad_w = height - x.shape[-2], width - x.shape[-1]
        return F.pad(x, (0, pad_w, 0, pad_h)) if pad_h or pad_w else x

    def _window_logits(self, crops: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Cosine logits ``[n, Q, h, w]`` float32 on the method's feature grid (CLIP's patch grid, or the VFM's for
        ProxyCLIP) for normalised crops ``[n, 3, H, W]``."""
        feats, (h, w) = self.head(self._pad_to_patch(crops))
        feats = F.normalize(feats.float(), dim=-1)
        logits = feats @ text.t()                                       # [n, h*w, Q]
        return logits.transpose(1, 2).reshape(crops.shape[0], -1, h, w)

    def _upsample_crop(self, logits: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
        """Grid logits ``[n, Q, h, w]`` -> pixel logits ``[n, Q, *size]``: bilinearly upsampled to the padded
        size (the grid covers it exactly), then the padding is cropped off."""
        up = F.interpolate(logits, size=self._padded_size(size), mode="bilinear", align_corners=False)
        return up[..., :size[0], :size[1]]

    def _logits_whole(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        grid_logits = self._window_logits(image[None], text)
        return self._upsample_crop(grid_logits, tuple(image.shape[-2:]))[0]

    def _logits_slide(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        crop, stride = self.slide
        _, height, width = image.shape
        ch, cw = min(crop, height), min(crop, width)
        rows = max(height - ch + stride - 1, 0) // stride + 1
        cols = max(width - cw + stride - 1, 0) // stride + 1
        boxes = []
        for r in range(rows):
            for c in range(cols):
                y2, x2 = min(r * stride + ch, height), min(c * stride + cw, width)
                boxes.append((y2 - ch, x2 - cw))   # clamped to the border: every window is ch x cw
        preds = torch.zeros(text.shape[0], height, width, device=image.device, dtype=torch.float32)
        count = torch.zeros(1, height, width, device=image.device, dtype=torch.float32)
        for start in range(0, len(boxes), self.window_batch_size):
            chunk = boxes[start:start + self.window_batch_size]
            crops = torch.stack([image[:, y:y + ch, x:x + cw] for y, x in chunk])
            grid_logits = self._window_logits(crops, text)
            # Upsample one window at a time: a batch of [n, Q, crop, crop] maps would cost n x Q x crop^2 floats.
            for i, (y, x) in enumerate(chunk):
                preds[:, y:y + ch, x:x + cw] += self._upsample_crop(grid_logits[i:i + 1], (ch, cw))[0]
                count[:, y:y + ch, x:x + cw] += 1
        return preds / count

    # no_grad rather than inference_mode: results must stay ordinary tensors that callers can modify in place.
    @torch.no_grad()
    def _segment(self, image: Any, arg: str) -> SegmentationResult:
        timings: Dict[str, float] = {}
        t_start = time.perf_counter()
        if isinstance(image, PreparedImage):
            x, (height, width) = image.tensor.to(self.device), image.size
        else:
            x = to_tensor(image, arg=arg).to(self.device)
            height, width = x.shape[-2:]
            x = normalize(resize_short_side(x, self.short_side, self.max_long_side), self.mean, self.std)
        self._sync()
        t = time.perf_counter()
        timings["preprocess"] = t - t_start

        text = self.query_embeddings
        self._sync()
        timings["text"] = time.perf_counter() - t
        t = time.perf_counter()

        logits = self._logits_slide(x, text) if self.slide is not None else self._logits_whole(x, text)
        if tuple(logits.shape[-2:]) != (height, width):
            logits = F.interpolate(logits[None], size=(height, width), mode="bilinear", align_corners=False)[0]
        self._sync()
        timings["encode"] = time.perf_counter() - t
        t = time.perf_counter()

        if self.pamr:
            guide = x[None]
            if tuple(guide.shape[-2:]) != (height, width):
                guide = F.interpolate(guide, size=(height, width), mode="bilinear", align_corners=False)
            logits = naclip_kernels.pamr(guide.float(), logits[None], num_iter=self.pamr_iters,
                                         dilations=self.pamr_dilations, backend=self._backend)[0].float()
        self._sync()
        timings["pamr"] = time.perf_counter() - t
        t = time.perf_counter()

        query_probs = torch.softmax(logits * self.logit_scale, dim=0)               # [Q, H, W]
        num_classes = len(self.class_names)
        if num_classes == query_probs.shape[0]:
            probs = query_probs
        else:
            index = self.query_to_class.to(query_probs.device).view(-1, 1, 1).expand_as(query_probs)
            probs = query_probs.new_zeros((num_classes, height, width)).scatter_reduce_(
                0, index, query_probs, reduce="amax", include_self=False)
        top, labels = probs.max(dim=0)
        if self.confidence_threshold is not None:
            labels = torch.where(top < self.confidence_threshold, torch.full_like(labels, self.background_index),
                                 labels)
        result_logits = logits.cpu() if self.return_logits else None
        labels, probs = labels.to(torch.int64).cpu(), probs.float().cpu()
        self._sync()
        timings["postprocess"] = time.perf_counter() - t
        timings["total"] = time.perf_counter() - t_start
        return SegmentationResult(labels=labels, probs=probs, class_names=list(self.class_names), timings=timings,
                                  logits=result_logits)

    def __repr__(self) -> str:
        return (f"Segmenter(model={self.loaded.model_name!r}, method={self.method!r}, classes={len(self.class_names)} "
                f"({len(self.queries)} queries), device={str(self.device)!r}, dtype={self.dtype}, slide={self.slide}, "
                f"short_side={self.short_side}, pamr={self.pamr}, backend={self._backend!r}, "
                f"head={self.head.extra_repr()})")
