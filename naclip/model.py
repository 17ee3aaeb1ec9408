"""CLIP loading and the NACLIP surgery on an open_clip ViT (SPEC.md section 2).

- :func:`load_clip` builds an open_clip model from a model name and a pretrained tag, a local checkpoint file or
  ``None`` (random weights), failing fast with :class:`ModelLoadError` when weights cannot be fetched.
- :func:`patch_naclip` swaps the last vision block of *that model instance* for a :class:`NaclipBlock` that runs
  ``naclip_kernels.NeighbourAttention`` and returns a :class:`NaclipPatch` handle; ``handle.remove()`` puts the
  original block object back. The block re-registers the original block's submodules under the same names, so
  ``state_dict()`` (keys and tensors) is identical while patched.
- :func:`dense_features` runs the visual tower densely at any input size (bicubic-interpolated positional
  embeddings, cached per grid) and returns per-patch features.

open_clip is imported lazily: ``import naclip`` works without it.
"""
from __future__ import annotations

import difflib
import logging
import math
import os
import socket
import threading
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

import naclip_kernels
from naclip_kernels._backend import BACKENDS
from naclip_kernels._validation import SIMILARITIES

__all__ = [
    "ModelLoadError",
    "NotAViTError",
    "LoadedCLIP",
    "load_clip",
    "import_open_clip",
    "check_vit",
    "vision_patch_size",
    "NaclipBlock",
    "NaclipPatch",
    "patch_naclip",
    "get_patch",
    "dense_features",
    "tokens_before_last_block",
    "ARCHITECTURES",
]

ARCHITECTURES = ("reduced", "vanilla")

# Where a probe for network access goes, and how long it may take: a missing network must fail in seconds.
_NETWORK_PROBE_HOSTS = (("huggingface.co", 443), ("openaipublic.azureedge.net", 443))
_NETWORK_PROBE_TIMEOUT_S = 3.0


class ModelLoadError(RuntimeError):
    """CLIP weights could not be loaded (no network for a pretrained tag, unreadable checkpoint, unknown model).

    ``str(exc)`` is written for Python callers (hints name keyword arguments: ``pretrained='/path/w.pt'``);
    ``exc.cli_message`` says the same for the command line (``--pretrained /path/w.pt``)."""

    def __init__(self, message: str, cli_message: Optional[str] = None):
        super().__init__(message)
        self.cli_message = message if cli_message is None else cli_message

    def __reduce__(self):   # keeps cli_message through pickling (multiprocessing, DataLoader workers)
        return type(self), (str(self), self.cli_message)


def _option(name: str, value: Any, cli: bool) -> str:
    """An option as the interface in use spells it: ``--pretrained /p`` (command line) or ``pretrained='/p'``."""
    if cli:
        flag = {"model_name": "model"}.get(name, name).replace("_", "-")
        return f"--{flag} {value}"
    return f"{name}={value!r}"


class NotAViTError(ValueError):
    """The model's image tower is not an open_clip ``VisionTransformer`` with standard attention blocks."""


def import_open_clip():
    """``import open_clip`` with an install hint when it is missing."""
    try:
        import open_clip
    except ImportError as exc:
        raise ImportError("the NACLIP segmenter needs open_clip: pip install 'naclip-kernels[segmenter]' "
                          "(or pip install open_clip_torch)") from exc
    return open_clip


# --------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------
@dataclass
class LoadedCLIP:
    """What :func:`load_clip` returns.

    Attributes:
        model: the open_clip model (eval mode, on ``device`` in ``dtype``).
        tokenizer: the model's open_clip tokenizer (callable: list of str -> ``[n, context_length]`` int64).
        mean, std: the image normalisation of the weights (CLIP's by default).
        model_name: the open_clip model name.
        weights_id: identity of the weights, used in text-cache keys: ``"tag:<tag>"``, ``"file:<path>:<size>:
            <mtime_ns>"``, or ``None`` for random weights (never disk-cached).
    """
    model: nn.Module
    tokenizer: Any
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    model_name: str
    weights_id: Optional[str]


def _precision(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]


def _network_reachable(timeout: float = _NETWORK_PROBE_TIMEOUT_S) -> bool:
    """True if a TCP connection to a weights host opens within ``timeout`` seconds (all probes run in a daemon
    thread, so a resolver that hangs cannot hang the caller)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes") or \
            os.environ.get("NACLIP_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    result = {"ok": False}

    def probe():
        for host, port in _NETWORK_PROBE_HOSTS:
            try:
                socket.create_connection((host, port), timeout=timeout).close()
                result["ok"] = True
                return
            except Exception:  # OSError normally; anything else also means "no usable network"
                continue

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return result["ok"]


def _cached_weights_file(open_clip, cfg: Dict[str, Any], cache_dir: Optional[str]) -> Optional[str]:
    """The local file of a pretrained tag if it has been downloaded before (HF hub cache or open_clip's URL
    cache); ``None`` otherwise. Never touches the network."""
    if cfg.get("file"):
        return cfg["file"] if os.path.isfile(cfg["file"]) else None
    hf_hub = cfg.get("hf_hub", "")
    if hf_hub:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            try_to_load_from_cache = None
        if try_to_load_from_cache is not None:
            model_id, filename = os.path.split(hf_hub)
            names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
            if filename.endswith((".bin", ".pth")):
                names.insert(0, filename[:-4] + ".safetensors")
            for name in names:
                try:
                    found = try_to_load_from_cache(repo_id=model_id, filename=name, cache_dir=cache_dir)
                except Exception:  # malformed ids etc.: treat as not cached
                    found = None
                if isinstance(found, str) and os.path.isfile(found):
                    return found
    url = cfg.get("url", "")
    if url:
        target = os.path.join(cache_dir or os.path.expanduser("~/.cache/clip"), os.path.basename(url))
        if os.path.isfile(target):
            return target
    return None


def _offline_message(model_name: str, tag: str, reason: str, cli: bool = False) -> str:
    """The "no weights without network" message; ``cli=True`` writes its hints as command-line options."""
    quick = f"{model_name.split('-quickgelu')[0]}-quickgelu"
    fetch = f"open_clip.create_model({model_name!r}, pretrained={tag!r})"
    if cli:
        fetch = f'python -c "import open_clip; {fetch}"'
    return (f"load_clip: could not get the pretrained weights {tag!r} for {model_name!r}: {reason}. "
            f"Download the checkpoint on a machine with network access (for example {fetch} caches it under "
            f"~/.cache/huggingface), copy the file here and pass its path instead: "
            f"{_option('pretrained', '/path/to/open_clip_model.safetensors', cli)} "
            f"(an open_clip state dict, .safetensors/.bin/.pt, loaded with weights_only=True). For OpenAI weights "
            f"use the '-quickgelu' model name with a local file, e.g. {_option('model', quick, cli)}.")


def _offline_error(model_name: str, tag: str, reason: str) -> "ModelLoadError":
    return ModelLoadError(_offline_message(model_name, tag, reason),
                          cli_message=_offline_message(model_name, tag, reason, cli=True))


def _unknown_model_message(open_clip, model_name: str) -> str:
    names = open_clip.list_models()
    close = [n for n in names if n.lower() == model_name.lower()] or \
        difflib.get_close_matches(model_name, names, n=3, cutoff=0.7)
    hint = f"; did you mean {' or '.join(repr(n) for n in close)}?" if close else ""
    return f"load_clip: unknown open_clip model {model_name!r}{hint} (open_clip.list_models() lists them all)"


class _DropRandomInitLine(logging.Filter):
    """Drops open_clip's "No pretrained weights loaded for model ... Model initialized randomly." record."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No pretrained weights loaded for model")


def _create_unloaded(open_clip, model_name: str, **kwargs: Any) -> nn.Module:
    """``open_clip.create_model(model_name, pretrained=None)`` without its "initialized randomly" warning: either
    the weights are loaded right after (a file), or :func:`load_clip` has already said they are random, once."""
    line_filter = _DropRandomInitLine()
    # open_clip logs through the root logger (logging.warning); its module logger too in case that changes.
    loggers = (logging.getLogger(), logging.getLogger("open_clip.factory"))
    for logger in loggers:
        logger.addFilter(line_filter)
    try:
        return open_clip.create_model(model_name, pretrained=None, **kwargs)
    finally:
        for logger in loggers:
            logger.removeFilter(line_filter)


def _load_file(open_clip, model: nn.Module, path: str, model_name: str) -> None:
    """Load a local checkpoint (weights_only=True: a malicious pickle cannot run code) into ``model``, every
    tensor required; :mod:`naclip.checkpoints` says what is wrong with a file that does not load."""
    from naclip.checkpoints import CheckpointError, load_checkpoint_file

    try:
        load_checkpoint_file(open_clip, model, path, model_name)
    except CheckpointError as exc:
        raise ModelLoadError(f"load_clip: could not load checkpoint {path!r} into {model_name!r}: {exc}") from exc


def vision_patch_size(model: nn.Module) -> Tuple[int, int]:
    """``(ph, pw)`` of an open_clip model's image patch embedding (open_clip stores an int or a pair)."""
    patch = model.visual.patch_size
    return (int(patch[0]), int(patch[1])) if isinstance(patch, (tuple, list)) else (int(patch), int(patch))


def check_vit(model: nn.Module) -> None:
    """Raise :class:`NotAViTError` unless ``model.visual`` is an open_clip ``VisionTransformer`` whose blocks use
    ``nn.MultiheadAttention`` with one class token and no attentional pooler."""
    visual = getattr(model, "visual", None)
    if visual is None:
        raise NotAViTError(f"the model ({type(model).__name__}) has no .visual image tower")
    name = type(visual).__name__
    if name != "VisionTransformer":
        kind = {"ModifiedResNet": "a ResNet", "TimmModel": "a timm image tower"}.get(name, f"a {name}")
        raise NotAViTError(f"NACLIP needs an open_clip ViT image tower (VisionTransformer); this model has {kind}. "
                           f"Use a ViT model such as 'ViT-B-16' or 'ViT-L-14'")
    blocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
    if blocks is None or len(blocks) == 0:
        raise NotAViTError("the VisionTransformer has no transformer.resblocks")
    last = blocks[-1]
    if isinstance(last, NaclipBlock):
        last = last.original
    if not isinstance(getattr(last, "attn", None), nn.MultiheadAttention):
        raise NotAViTError(f"the last vision block ({type(last).__name__}) does not use nn.MultiheadAttention "
                           "(custom-attention towers, e.g. qk-norm or scaled-cosine blocks, are not supported)")
    if getattr(visual, "attn_pool", None) is not None:
        raise NotAViTError("ViTs with an attentional pooler (CoCa-style) are not supported: their ln_post/proj "
                           "act on pooled queries, not on patch tokens")


def load_clip(model_name: str = "ViT-B-16", pretrained: Optional[str] = "openai", device: Any = "cpu",
              dtype: torch.dtype = torch.float32, cache_dir: Optional[str] = None) -> LoadedCLIP:
    """Build an open_clip ViT model with weights.

    Args:
        model_name: an open_clip model name (``open_clip.list_models()``), e.g. ``"ViT-B-16"``.
        pretrained: a pretrained tag (``open_clip.list_pretrained_tags_by_model(model_name)``, e.g. ``"openai"``):
            taken from the local download cache if present, else downloaded when the network is reachable; a path
            to a local checkpoint file (an open_clip state dict; loaded with ``torch.load(weights_only=True)`` or
            safetensors); or ``None`` for random weights (a ``UserWarning`` says so).
        device, dtype: where and in which precision (float32, float16, bfloat16) the model lives.
        cache_dir: open_clip's download cache directory (default: the HF hub cache / ``~/.cache/clip``).

    Raises:
        ModelLoadError: unknown model name, no network for an uncached tag (within a few seconds, not after
            download timeouts), an unreadable or mismatching checkpoint file.
        NotAViTError: the model's image tower is not a ViT (e.g. ``RN50`` or a timm ConvNeXt).
        ImportError: open_clip is not installed.
    """
    open_clip = import_open_clip()
    if not isinstance(model_name, str) or not model_name:
        raise TypeError(f"load_clip: model_name must be a non-empty str, got {model_name!r}")
    if pretrained is not None and not isinstance(pretrained, (str, os.PathLike)):
        raise TypeError(f"load_clip: pretrained must be a tag, a file path or None, got {type(pretrained).__name__}")
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"load_clip: dtype must be torch.float32, float16 or bfloat16, got {dtype}")
    device = torch.device(device)
    has_schema = model_name.startswith(("hf-hub:", "local-dir:"))
    if not has_schema:
        cfg = open_clip.get_model_config(model_name)
        if cfg is None:
            raise ModelLoadError(_unknown_model_message(open_clip, model_name))
        vision_cfg = cfg.get("vision_cfg", {})
        # Reject non-ViT towers before any download: ResNets have a tuple of layer counts, timm towers a name.
        if vision_cfg.get("timm_model_name"):
            raise NotAViTError(f"load_clip: {model_name!r} has a timm image tower "
                               f"({vision_cfg['timm_model_name']}); NACLIP needs an open_clip ViT such as 'ViT-B-16'")
        if isinstance(vision_cfg.get("layers"), (list, tuple)):
            raise NotAViTError(f"load_clip: {model_name!r} has a ResNet image tower; NACLIP needs a ViT such as "
                               "'ViT-B-16'")

    kwargs = dict(precision=_precision(dtype), device=device, cache_dir=cache_dir)
    weights_id: Optional[str]
    tag_cfg: Dict[str, Any] = {}
    if pretrained is None:
        # The one message for random weights (open_clip's own "initialized randomly" line is dropped below).
        warnings.warn(f"naclip: building {model_name!r} with RANDOM weights (no pretrained weights asked for): for "
                      "tests and benchmarks only, the segmentations are meaningless", UserWarning, stacklevel=2)
        try:
            model = _create_unloaded(open_clip, model_name, **kwargs)
        except Exception as exc:
            raise ModelLoadError(f"load_clip: could not build {model_name!r}: {exc}") from exc
        weights_id = None
    elif os.path.isfile(os.path.expanduser(os.fspath(pretrained))):
        # expanduser: `--pretrained=~/w.pt` and pretrained="~/w.pt" reach us with the ~ (no shell expanded it).
        path = os.path.abspath(os.path.expanduser(os.fspath(pretrained)))
        try:
            model = _create_unloaded(open_clip, model_name, **kwargs)
        except Exception as exc:
            raise ModelLoadError(f"load_clip: could not build {model_name!r}: {exc}") from exc
        _load_file(open_clip, model, path, model_name)
        stat = os.stat(path)
        weights_id = f"file:{path}:{stat.st_size}:{stat.st_mtime_ns}"
    else:
        tag = str(pretrained)
        if has_schema:
            raise ModelLoadError(f"load_clip: with a {model_name.split(':')[0]!r} model name, pretrained must be None "
                                 f"(the weights come from the model name), got {tag!r}")
        tag_cfg = open_clip.get_pretrained_cfg(model_name, tag) or {}
        if not tag_cfg:
            if any(sep in tag for sep in ("/", "\\", ".")):
                what = "load_clip: {} is neither an existing file nor a known tag"
                raise ModelLoadError(what.format(_option("pretrained", tag, False)),
                                     cli_message=what.format(_option("pretrained", tag, True)))
            known = open_clip.list_pretrained_tags_by_model(model_name)
            if not known:
                what = "load_clip: {!r} has no pretrained weights in open_clip: pass a local checkpoint file ({}) " \
                       "or {} for random weights"
                raise ModelLoadError(
                    what.format(model_name, _option("pretrained", "/path/w.pt", False), "pretrained=None"),
                    cli_message=what.format(model_name, _option("pretrained", "/path/w.pt", True), "--pretrained none"))
            raise ModelLoadError(f"load_clip: unknown pretrained tag {tag!r} for {model_name!r}; known tags: "
                                 f"{', '.join(known)}")
        local = _cached_weights_file(open_clip, tag_cfg, cache_dir)
        quick_gelu = bool(tag_cfg.get("quick_gelu", False))
        try:
            if local is not None:
                model = _create_unloaded(open_clip, model_name, force_quick_gelu=quick_gelu, **kwargs)
                _load_file(open_clip, model, local, model_name)
            else:
                if not _network_reachable():
                    raise _offline_error(model_name, tag, "no network access and not in the local download cache")
                # The tag's own QuickGELU setting: OpenAI weights were trained with QuickGELU, and open_clip only
                # warns on a mismatch, which would silently give wrong features.
                model = open_clip.create_model(model_name, pretrained=tag, force_quick_gelu=quick_gelu,
                                               weights_only=True, **kwargs)
        except ModelLoadError:
            raise
        except Exception as exc:
            raise _offline_error(model_name, tag, f"{type(exc).__name__}: {exc}") from exc
        weights_id = f"tag:{tag}"
    model.eval()
    check_vit(model)
    pp = dict(getattr(model.visual, "preprocess_cfg", None) or {})
    mean = tuple(tag_cfg.get("mean") or pp.get("mean") or open_clip.OPENAI_DATASET_MEAN)
    std = tuple(tag_cfg.get("std") or pp.get("std") or open_clip.OPENAI_DATASET_STD)
    try:
        tokenizer = open_clip.get_tokenizer(model_name)
    except Exception as exc:
        raise ModelLoadError(f"load_clip: could not build the tokenizer of {model_name!r}: {exc}") from exc
    return LoadedCLIP(model=model, tokenizer=tokenizer, mean=mean, std=std, model_name=model_name,
                      weights_id=weights_id)


# --------------------------------------------------------------------------------------------------------------
# The NACLIP block and its removable patch
# --------------------------------------------------------------------------------------------------------------
def _infer_square_grid(n_tokens: int, prefix: int) -> Tuple[int, int]:
    side = math.isqrt(max(n_tokens - prefix, 0))
    if side * side != n_tokens - prefix or side == 0:
        raise ValueError(f"NaclipBlock: cannot infer the patch grid of {n_tokens} tokens; call it with grid=(h, w) "
                         "(naclip.model.dense_features does)")
    return side, side


class NaclipBlock(nn.Module):
    """The replacement for a ViT's last ``ResidualAttentionBlock``.

    ``architecture="reduced"`` (NACLIP, SPEC.md section 2): ``x = ls_1(out_proj(attention(ln_1(x))))``, with no
    residual and no MLP (``ls_1`` is the identity in every CLIP model; it is kept so layer-scaled ViTs stay
    consistent). ``architecture="vanilla"``: the usual block, ``x = x + ls_1(attn(ln_1(x)))`` then
    ``x = x + ls_2(mlp(ln_2(x)))``, with only the attention swapped.

    The attention is ``naclip_kernels.NeighbourAttention`` over the original ``attn`` (weights shared). The original
    block's submodules (``ln_1``, ``attn``, ``ls_1``, ``ln_2``, ``mlp``, ``ls_2``) are registered under their own
    names, so the model's ``state_dict`` is unchanged; the original block object is kept (unregistered) in
    ``.original`` for :meth:`NaclipPatch.remove`.

    ``forward(x, attn_mask=None, grid=None)``: ``x`` in the block's layout (``[B, N, E]`` if ``attn.batch_first``
    else ``[N, B, E]``); ``grid=(h, w)`` is the patch grid (inferred as square when omitted, which is what
    open_clip's own ``encode_image`` gives at the native resolution); ``attn_mask`` must be ``None``.
    """

    _SUBMODULES = ("ln_1", "attn", "ls_1", "ln_2", "mlp", "ls_2")

    def __init__(self, block: nn.Module, similarity: str = "kk", sigma: Optional[float] = 5.0,
                 architecture: str = "reduced", backend: str = "auto", prefix_tokens: int = 1):
        super().__init__()
        if similarity not in SIMILARITIES:
            raise ValueError(f"patch_naclip: similarity must be one of {SIMILARITIES}, got {similarity!r}")
        if architecture not in ARCHITECTURES:
            raise ValueError(f"patch_naclip: architecture must be one of {ARCHITECTURES}, got {architecture!r}")
        if backend not in BACKENDS:
            raise ValueError(f"patch_naclip: backend must be one of {BACKENDS}, got {backend!r}")
        for name in self._SUBMODULES:
            sub = getattr(block, name, None)
            if sub is None:
                if name in ("ln_1", "attn"):
                    raise NotAViTError(f"patch_naclip: the last block ({type(block).__name__}) has no .{name}")
                if name in ("ln_2", "mlp") and architecture == "vanilla":
                    raise NotAViTError(f"patch_naclip: vanilla architecture needs .{name} on the last block")
                continue
            self.add_module(name, sub)
        # Plain attributes (not submodules): keeps state_dict keys identical to the original block's.
        object.__setattr__(self, "original", block)
        object.__setattr__(self, "neighbour_attention", naclip_kernels.NeighbourAttention(
            block.attn, sigma=sigma, prefix_tokens=prefix_tokens, similarity=similarity, backend=backend))
        self.architecture = architecture

    @property
    def similarity(self) -> str:
        return self.neighbour_attention.similarity

    @property
    def sigma(self) -> Optional[float]:
        return self.neighbour_attention.sigma

    @property
    def backend(self) -> str:
        return self.neighbour_attention.backend

    @backend.setter
    def backend(self, value: str) -> None:
        if value not in BACKENDS:
            raise ValueError(f"NaclipBlock: backend must be one of {BACKENDS}, got {value!r}")
        self.neighbour_attention.backend = value

    def extra_repr(self) -> str:
        return (f"architecture={self.architecture!r}, similarity={self.similarity!r}, sigma={self.sigma}, "
                f"backend={self.backend!r}")

    def _ls(self, name: str, x: torch.Tensor) -> torch.Tensor:
        mod = self._modules.get(name)
        return x if mod is None else mod(x)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                grid: Optional[Tuple[int, int]] = None, **_: Any) -> torch.Tensor:
        if attn_mask is not None:
            raise ValueError("NaclipBlock: attn_mask is not supported (vision towers use none)")
        n_tokens = x.shape[1] if self.attn.batch_first else x.shape[0]
        if grid is None:
            grid = _infer_square_grid(n_tokens, self.neighbour_attention.prefix_tokens)
        attended = self._ls("ls_1", self.neighbour_attention(self.ln_1(x), grid))
        if self.architecture == "reduced":
            return attended
        x = x + attended
        return x + self._ls("ls_2", self.mlp(self.ln_2(x)))


@dataclass(eq=False)
class NaclipPatch:
    """Handle returned by :func:`patch_naclip`. ``remove()`` restores the original last block (the same object);
    usable as a context manager. Also holds the per-grid cache of interpolated positional embeddings."""
    model: nn.Module
    block: NaclipBlock
    index: int
    removed: bool = False
    _pos_cache: Dict[Any, torch.Tensor] = field(default_factory=dict, repr=False)

    def remove(self) -> None:
        if self.removed:
            return
        blocks = self.model.visual.transformer.resblocks
        if blocks[self.index] is not self.block:
            raise RuntimeError("NaclipPatch.remove: the model's last block is no longer this patch's block "
                               "(patched again or modified since); remove the later patch first")
        blocks[self.index] = self.block.original
        self.removed = True
        self._pos_cache.clear()
        if getattr(self.model.visual, "_naclip_patch", None) is self:
            del self.model.visual._naclip_patch

    def __enter__(self) -> "NaclipPatch":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def patch_naclip(model: nn.Module, similarity: str = "kk", sigma: Optional[float] = 5.0,
                 architecture: str = "reduced", backend: str = "auto") -> NaclipPatch:
    """Replace the last vision block of ``model`` (this instance only) with a :class:`NaclipBlock`.

    Presets: NACLIP ``similarity="kk", sigma=5.0, architecture="reduced"``; ClearCLIP-style ``"qq", None,
    "reduced"``; SCLIP-style ``"csa", None`` (with either architecture); vanilla CLIP attention ``"qk", None,
    "vanilla"`` (equals the unpatched model).

    Returns a :class:`NaclipPatch`; ``handle.remove()`` undoes it exactly. Raises ``RuntimeError`` if the model
    is already patched, :class:`NotAViTError` for non-ViT models, ``ValueError`` for bad options.
    """
    check_vit(model)
    visual = model.visual
    existing = getattr(visual, "_naclip_patch", None)
    if existing is not None and not existing.removed:
        raise RuntimeError("patch_naclip: this model is already patched; call .remove() on the existing handle "
                           "(naclip.model.get_patch(model)) first")
    blocks = visual.transformer.resblocks
    index = len(blocks) - 1
    block = NaclipBlock(blocks[index], similarity=similarity, sigma=sigma, architecture=architecture,
                        backend=backend, prefix_tokens=1)
    blocks[index] = block
    handle = NaclipPatch(model=model, block=block, index=index)
    # A plain attribute (not a module): lets dense_features find the handle's position-embedding cache.
    object.__setattr__(visual, "_naclip_patch", handle)
    return handle


def get_patch(model: nn.Module) -> Optional[NaclipPatch]:
    """The active :class:`NaclipPatch` of ``model``, or ``None``."""
    handle = getattr(getattr(model, "visual", None), "_naclip_patch", None)
    return None if handle is None or handle.removed else handle


# --------------------------------------------------------------------------------------------------------------
# Dense forward
# --------------------------------------------------------------------------------------------------------------
def interpolate_pos_embed(pos: torch.Tensor, native_grid: Tuple[int, int], grid: Tuple[int, int]) -> torch.Tensor:
    """Bicubic resize (``align_corners=False``, computed in float32) of a ``[1 + g0*g1, E]`` positional embedding
    to ``[1 + h*w, E]``; the class-token row is kept as is. Returned in float32."""
    g0, g1 = native_grid
    if pos.shape[0] != 1 + g0 * g1:
        raise ValueError(f"positional_embedding has {pos.shape[0]} rows, expected 1 + {g0}*{g1}")
    pos = pos.float()
    if tuple(grid) == (g0, g1):
        return pos
    cls_pos, patch_pos = pos[:1], pos[1:]
    patch_pos = patch_pos.reshape(1, g0, g1, -1).permute(0, 3, 1, 2)
    patch_pos = F.interpolate(patch_pos, size=tuple(grid), mode="bicubic", align_corners=False)
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1)
    return torch.cat([cls_pos, patch_pos], dim=0)


def _pos_embed(visual: nn.Module, grid: Tuple[int, int], dtype: torch.dtype,
               cache: Optional[Dict[Any, torch.Tensor]]) -> torch.Tensor:
    param = visual.positional_embedding
    if torch.compiler.is_compiling():
        # Under torch.compile the grid is symbolic (one graph for every image size): the interpolation is part of
        # the graph, and a Python dict keyed by sizes and data pointers would break it.
        return interpolate_pos_embed(param.detach(), tuple(visual.grid_size), grid).to(dtype)
    # _version changes on in-place updates (load_state_dict), so a reload never serves a stale embedding.
    key = (tuple(grid), dtype, param.device, param.data_ptr(), param._version)
    if cache is not None and key in cache:
        return cache[key]
    out = interpolate_pos_embed(param.detach(), tuple(visual.grid_size), grid).to(dtype)
    if cache is not None:
        if len(cache) >= 16:  # grids seen by one process are few; bound it anyway
            cache.clear()
        cache[key] = out
    return out


def tokens_before_last_block(model: nn.Module, images: torch.Tensor,
                             pos_cache: Optional[Dict[Any, torch.Tensor]] = None,
                             op: str = "tokens_before_last_block") -> Tuple[torch.Tensor, Tuple[int, int]]:
    """The visual tower of an open_clip ViT up to its last block, at any input size.

    Args:
        model: an open_clip ViT model (patched or not).
        images: ``[B, 3, H, W]`` normalised images; ``H, W`` multiples of the patch size.
        pos_cache: a dict caching the interpolated positional embeddings per grid (``None``: no cache).

    Returns:
        ``(tokens, (h, w))``: ``tokens`` ``[B, 1 + h*w, E]`` (batch first, ``[CLS]`` first) as they enter the last
        block, in the model's dtype: ``conv1 -> flatten -> [CLS] + bicubic-interpolated pos-embed -> ln_pre ->
        blocks[:-1]``. ``patch_dropout`` is skipped: it is the identity at inference and would break the grid.
    """
    visual = model.visual
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"{op}: images must be [B, 3, H, W], got "
                         f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
    ph, pw = visual.patch_size if isinstance(visual.patch_size, tuple) else (visual.patch_size,) * 2
    if images.shape[-2] % ph or images.shape[-1] % pw:
        raise ValueError(f"{op}: H, W must be multiples of the patch size {(ph, pw)}, got "
                         f"{tuple(images.shape[-2:])}")
    dtype = visual.conv1.weight.dtype
    x = visual.conv1(images.to(dtype))                          # [B, E, h, w]
    grid = (x.shape[-2], x.shape[-1])
    x = x.flatten(2).transpose(1, 2)                            # [B, h*w, E]
    cls = visual.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
    x = torch.cat([cls, x], dim=1) + _pos_embed(visual, grid, x.dtype, pos_cache)
    x = visual.ln_pre(x)
    blocks = visual.transformer.resblocks
    batch_first = blocks[-1].attn.batch_first
    if not batch_first:
        x = x.transpose(0, 1)
    for blk in blocks[:-1]:
        x = blk(x)
    if not batch_first:
        x = x.transpose(0, 1)
    return x, grid


def dense_features(model: nn.Module, images: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """Per-patch CLIP features of a patched model at any input size.

    Args:
        model: an open_clip ViT model patched with :func:`patch_naclip`.
        images: ``[B, 3, H, W]`` normalised images; ``H, W`` multiples of the patch size (the segmenter pads).

    Returns:
        ``(features, (h, w))``: ``features`` ``[B, h*w, D]`` in the model's dtype (after ``ln_post`` and ``proj``,
        prefix token dropped, *not* normalised), row-major over the ``h x w`` patch grid.

    Runs :func:`tokens_before_last_block`, then the NACLIP block (with the grid), ``ln_post`` and ``proj``.
    """
    handle = get_patch(model)
    if handle is None:
        raise RuntimeError("dense_features: the model is not patched; call naclip.patch_naclip(model) first")
    visual = model.visual
    x, grid = tokens_before_last_block(model, images, handle._pos_cache, op="dense_features")
    if not handle.block.attn.batch_first:
        x = x.transpose(0, 1)
    x = visual.transformer.resblocks[-1](x, grid=grid)
    if not handle.block.attn.batch_first:
        x = x.transpose(0, 1)
    x = visual.ln_post(x)
    if visual.proj is not None:
        x = x @ visual.proj
    return x[:, 1:], grid
