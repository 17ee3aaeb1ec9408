"""Vision foundation models (VFMs) for ProxyCLIP, through timm (SPEC.md section 8).

    from naclip.vfm import load_vfm
    vfm = load_vfm("dino_vitb8", pretrained="default", device="cuda", dtype=torch.float16)
    feats, (I, J) = vfm(images)          # ImageNet-normalised [B, 3, H, W] -> [B, I*J, C], row-major grid

Names (:data:`VFM_NAMES`), or any timm ViT name (``"vit_small_patch14_dinov2.lvd142m"``):

========================  ========================================  ===================================  =========
name                      timm model                                features                             input
========================  ========================================  ===================================  =========
``dino_vitb8`` (default)  ``vit_base_patch8_224.dino``              last block, final norm, [CLS] gone   as is
``dino_vitb16``           ``vit_base_patch16_224.dino``             same                                 as is
``dinov2_vitb14_reg``     ``vit_base_patch14_reg4_dinov2.lvd142m``  same, [CLS] + 4 registers dropped    as is
``sam_vitb``              ``samvit_base_patch16.sa1b``              image-encoder neck, 256 channels     1024^2
``mae_vitb16``            ``vit_base_patch16_224.mae``              last block, final norm, [CLS] gone   as is
========================  ========================================  ===================================  =========

- Plain ViTs (timm ``VisionTransformer``) are created with ``dynamic_img_size=True`` (positional embeddings
  interpolated to the input's grid), so a window goes in at its own size; ``H, W`` must be multiples of the patch
  size and the grid is ``(H / p, W / p)``. MAE: ProxyCLIP's code resizes the window to the crop size only because
  its MAE has fixed-size positional embeddings; for every full window that is the window as is, which is what
  happens here.
- SAM (timm ``VisionTransformerSAM``: windowed attention with relative positions for a fixed size) gets the input
  resized bilinearly (``align_corners=False``) to its native size (1024 x 1024), whatever the window's shape, so
  its grid is always ``native / 16`` (64 x 64).
- Weights: ``pretrained="default"`` (the name's own tag, e.g. ``dino``), another timm tag of that architecture,
  a local file (``torch.load(weights_only=True)`` or safetensors; timm's own layout or the original repository's,
  converted by timm's checkpoint filter), or ``None`` (random weights, one warning). A tag that is not in the
  local download cache needs the network; without it :class:`naclip.model.ModelLoadError` comes within seconds,
  saying how to use a local file instead (the same probe as :func:`naclip.model.load_clip`).
"""
from __future__ import annotations

import os
import sys
import warnings
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from naclip.model import ModelLoadError, _cached_weights_file, _network_reachable, _option

__all__ = ["VFM_NAMES", "DEFAULT_VFM", "IMAGENET_MEAN", "IMAGENET_STD", "VFM", "load_vfm", "resolve_vfm_name",
           "clip_to_vfm_input"]

VFM_NAMES: Dict[str, str] = {
    "dino_vitb8": "vit_base_patch8_224.dino",
    "dino_vitb16": "vit_base_patch16_224.dino",
    "dinov2_vitb14_reg": "vit_base_patch14_reg4_dinov2.lvd142m",
    "sam_vitb": "samvit_base_patch16.sa1b",
    "mae_vitb16": "vit_base_patch16_224.mae",
}
DEFAULT_VFM = "dino_vitb8"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# timm modules whose models this file knows how to read features from.
_FAMILIES = {"vision_transformer": "vit", "vision_transformer_sam": "sam"}


def _import_timm():
    try:
        import timm
    except ImportError as exc:
        raise ImportError("ProxyCLIP's vision foundation models need timm: pip install 'naclip-kernels[segmenter]' "
                          "(or pip install timm)") from exc
    return timm


def _known_names() -> str:
    return ", ".join(VFM_NAMES)


def resolve_vfm_name(name: str) -> Tuple[str, Optional[str], str]:
    """``name`` -> ``(timm architecture, tag or None, family)``, family ``"vit"`` or ``"sam"``. Builds nothing.

    Raises :class:`naclip.model.ModelLoadError` (one line, listing the known names) for names timm does not know
    and for timm models that are not plain ViTs or SAM ViTs."""
    if not isinstance(name, str) or not name.strip():
        raise ModelLoadError(f"load_vfm: the VFM name must be a non-empty string, got {name!r}; known names: "
                             f"{_known_names()}, or any timm ViT name")
    timm = _import_timm()
    from timm.models._registry import _model_to_module

    full = VFM_NAMES.get(name.strip().lower(), name.strip())
    arch, _, tag = full.partition(".")
    if not timm.is_model(arch):
        raise ModelLoadError(f"load_vfm: unknown VFM {name!r}; known names: {_known_names()}, or any timm ViT name "
                             f"(timm.list_models('vit_*'))")
    family = _FAMILIES.get(_model_to_module.get(arch, ""))
    if family is None:
        raise ModelLoadError(f"load_vfm: {name!r} is a timm {_model_to_module.get(arch, '?')} model, not a ViT; "
                             f"known names: {_known_names()}, or any timm ViT (vision_transformer) or SAM ViT name")
    return arch, (tag or None), family


def clip_to_vfm_input(images: torch.Tensor, clip_mean, clip_std, vfm_mean, vfm_std) -> torch.Tensor:
    """Windows normalised with CLIP's mean/std -> the same pixels normalised with the VFM's (ImageNet's):
    ``((x * clip_std + clip_mean) - vfm_mean) / vfm_std``, one affine map per channel."""
    c_mean, c_std, v_mean, v_std = (torch.tensor(t, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
                                    for t in (clip_mean, clip_std, vfm_mean, vfm_std))
    scale, shift = c_std / v_std, (c_mean - v_mean) / v_std
    return (images.float() * scale + shift).to(images.dtype)


class VFM(nn.Module):
    """A timm ViT (or SAM ViT) as ProxyCLIP's source of attention weights.

    ``forward(images)``: ``[B, 3, H, W]`` normalised with :attr:`mean` / :attr:`std`; plain ViTs need ``H, W``
    multiples of :attr:`patch_size`. Returns ``(feats, (I, J))``: ``feats`` ``[B, I*J, C]`` in the model's dtype,
    row-major over the ``I x J`` patch grid, prefix (class and register) tokens dropped; ``C`` is
    :attr:`channels` (the embedding width; SAM's neck width, 256).

    Attributes:
        model: the timm model (eval mode).
        family: ``"vit"`` or ``"sam"``.
        patch_size: ``(p, p)`` of the patch embedding.
        input_size: SAM's native ``(H, W)`` every input is resized to; ``None`` for plain ViTs (input as is).
        name: the name it was loaded under; ``weights_id``: ``"tag:<timm name>"``, ``"file:<path>"`` or ``None``.
    """

    def __init__(self, model: nn.Module, name: Optional[str] = None, weights_id: Optional[str] = None):
        super().__init__()
        module = type(model).__module__.rsplit(".", 1)[-1]
        family = _FAMILIES.get(module)
        if family is None or not hasattr(model, "forward_features") or not hasattr(model, "patch_embed"):
            raise TypeError(f"VFM: expected a timm VisionTransformer or VisionTransformerSAM, got "
                            f"{type(model).__name__}")
        if family == "vit" and not getattr(model, "dynamic_img_size", False):
            raise ValueError("VFM: the timm ViT must be created with dynamic_img_size=True (windows of any size "
                             "need interpolated positional embeddings)")
        self.model = model.eval()
        self.family = family
        self.name = name or type(model).__name__
        self.weights_id = weights_id
        self.patch_size = tuple(model.patch_embed.patch_size)
        self.input_size = tuple(model.patch_embed.img_size) if family == "sam" else None
        self.prefix_tokens = int(getattr(model, "num_prefix_tokens", 0)) if family == "vit" else 0
        self.channels = int(model.neck[0].out_channels if family == "sam" else model.embed_dim)
        cfg = dict(getattr(model, "pretrained_cfg", None) or {})
        self.mean = tuple(cfg.get("mean") or IMAGENET_MEAN)
        self.std = tuple(cfg.get("std") or IMAGENET_STD)

    def grid(self, size: Tuple[int, int]) -> Tuple[int, int]:
        """The feature grid ``(I, J)`` for an input of ``size = (H, W)``."""
        if self.input_size is not None:
            size = self.input_size
        return size[0] // self.patch_size[0], size[1] // self.patch_size[1]

    def forward(self, images: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"VFM: images must be [B, 3, H, W], got "
                             f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
        dtype = self.model.patch_embed.proj.weight.dtype
        x = images.to(dtype)
        if self.input_size is not None:
            if tuple(x.shape[-2:]) != self.input_size:
                x = F.interpolate(x, size=self.input_size, mode="bilinear", align_corners=False)
            out = self.model.forward_features(x)                        # [B, C, I, J] (the neck)
            grid = (out.shape[-2], out.shape[-1])
            return out.flatten(2).transpose(1, 2), grid
        ph, pw = self.patch_size
        if x.shape[-2] % ph or x.shape[-1] % pw:
            raise ValueError(f"VFM: H, W must be multiples of the patch size {self.patch_size}, got "
                             f"{tuple(x.shape[-2:])}")
        grid = (x.shape[-2] // ph, x.shape[-1] // pw)
        tokens = self.model.forward_features(x)                         # [B, P + I*J, C], final norm applied
        if tokens.shape[1] != self.prefix_tokens + grid[0] * grid[1]:
            raise RuntimeError(f"VFM: {self.name} returned {tokens.shape[1]} tokens for a {grid} grid with "
                               f"{self.prefix_tokens} prefix tokens")
        return tokens[:, self.prefix_tokens:], grid

    def extra_repr(self) -> str:
        return (f"name={self.name!r}, family={self.family!r}, patch_size={self.patch_size}, "
                f"channels={self.channels}, weights={self.weights_id or 'random'}")


# --------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------
def _offline_message(full: str, reason: str, cli: bool) -> str:
    """:func:`naclip.model.load_clip`'s offline message for a timm VFM; ``cli=True`` spells the hints as options."""
    fetch = f"timm.create_model({full!r}, pretrained=True)"
    if cli:
        fetch = f'python -c "import timm; {fetch}"'
    return (f"load_vfm: could not get the VFM weights {full!r}: {reason}. Download them on a machine with network "
            f"access ({fetch} caches them under ~/.cache/huggingface), copy the file here and pass its path "
            f"instead: {_option('vfm_pretrained', '/path/to/model.safetensors', cli)} (a timm or original-layout "
            f"state dict, .safetensors/.pth, loaded with weights_only=True); {_option('vfm_pretrained', 'none' if cli else None, cli)}"
            f" runs with random weights (tests only)")


def _offline_error(full: str, reason: str) -> ModelLoadError:
    return ModelLoadError(_offline_message(full, reason, cli=False),
                          cli_message=_offline_message(full, reason, cli=True))


def _cached_tag_file(pcfg: Any) -> Optional[str]:
    """The local file of a timm pretrained config if it was downloaded before (HF hub cache, torch hub cache)."""
    hub = getattr(pcfg, "hf_hub_id", None)
    candidates = []
    if getattr(pcfg, "file", None):
        candidates.append({"file": pcfg.file})
    if hub:
        names = [pcfg.hf_hub_filename] if getattr(pcfg, "hf_hub_filename", None) else \
            ["model.safetensors", "pytorch_model.bin"]
        candidates += [{"hf_hub": f"{hub}/{n}"} for n in names]
    for cfg in candidates:
        found = _cached_weights_file(None, cfg, None)
        if found:
            return found
    if getattr(pcfg, "url", None):
        return _cached_weights_file(None, {"url": pcfg.url}, os.path.join(torch.hub.get_dir(), "checkpoints"))
    return None


def _describe_mismatch(model: nn.Module, state: Dict[str, torch.Tensor]) -> Optional[str]:
    """One line naming what differs between ``state`` and the model's state dict, or ``None`` if they match."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(own[k].shape)]
    parts = []
    for what, items in (("shape mismatch (file vs model)", shapes), ("missing keys", missing),
                        ("unexpected keys", unexpected)):
        if items:
            parts.append(f"{len(items)} {what}, e.g. {', '.join(items[:3])}")
    return "; ".join(parts) or None


def _load_file(model: nn.Module, arch: str, path: str) -> None:
    from timm.models import load_state_dict

    try:
        state = load_state_dict(path, use_ema=False, device="cpu", weights_only=True)
    except Exception as exc:  # unreadable, not a state dict, pickled code refused by weights_only
        raise ModelLoadError(f"load_vfm: could not read checkpoint {path!r}: {' '.join(str(exc).split())}") from exc
    # timm's own converter for the architecture turns the original repositories' layouts (DINO, DINOv2, MAE, SAM
    # checkpoints) into timm's and resamples positional embeddings; classifier heads are not used.
    filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    try:
        if filter_fn is not None:
            state = filter_fn(state, model)
    except Exception as exc:
        raise ModelLoadError(f"load_vfm: checkpoint {path!r} does not match {arch!r}: could not convert it "
                             f"({type(exc).__name__}: {' '.join(str(exc).split())})") from exc
    state = {k: v for k, v in state.items() if not k.startswith(("head.", "fc_norm.", "head_drop."))
             or k in model.state_dict()}
    mismatch = _describe_mismatch(model, state)
    if mismatch:
        raise ModelLoadError(f"load_vfm: checkpoint {path!r} does not match {arch!r}: {mismatch}")
    model.load_state_dict(state, strict=True)


def load_vfm(name: str = DEFAULT_VFM, pretrained: Optional[str] = "default", device: Any = "cpu",
             dtype: torch.dtype = torch.float32, **model_kwargs: Any) -> VFM:
    """Build a VFM (a name of :data:`VFM_NAMES` or any timm ViT name) with weights.

    Args:
        name: e.g. ``"dino_vitb8"`` or ``"vit_small_patch14_reg4_dinov2.lvd142m"``.
        pretrained: ``"default"`` (the name's tag, else timm's default tag of the architecture), a timm tag of
            the architecture (``timm.list_pretrained('<arch>*')``), a local checkpoint file, or ``None`` (random
            weights, a ``UserWarning``).
        device, dtype: where and in which precision (float32, float16, bfloat16) the model lives.
        model_kwargs: passed to ``timm.create_model`` (e.g. ``depth=2, embed_dim=64, num_heads=2`` for tests).

    Raises:
        ModelLoadError: unknown or non-ViT name (one line listing the known names), unknown tag, no network for
            an uncached tag (within seconds), unreadable or mismatching checkpoint file (naming the file and what
            mismatched).
    """
    timm = _import_timm()
    arch, name_tag, family = resolve_vfm_name(name)
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"load_vfm: dtype must be torch.float32, float16 or bfloat16, got {dtype}")
    if pretrained is not None and not isinstance(pretrained, (str, os.PathLike)):
        raise TypeError(f"load_vfm: pretrained must be 'default', a tag, a file path or None, got "
                        f"{type(pretrained).__name__}")
    kwargs = dict(num_classes=0, **model_kwargs)
    if family == "vit":
        kwargs.setdefault("dynamic_img_size", True)

    local: Optional[str] = None
    # The name's tag also for a file or random weights: its pretrained config gives the normalisation (ImageNet's
    # for the five named VFMs; timm's untagged default of vit_base_patch8_224, say, is an augreg one with 0.5/0.5).
    full = arch if name_tag is None else f"{arch}.{name_tag}"
    if pretrained is not None and os.path.isfile(os.fspath(pretrained)):
        local = os.path.abspath(os.fspath(pretrained))
        weights_id = f"file:{local}"
    elif pretrained is not None:
        tag = str(pretrained).strip()
        if any(sep in tag for sep in ("/", "\\")) or tag.endswith((".pth", ".pt", ".bin", ".safetensors")):
            raise ModelLoadError(f"load_vfm: vfm_pretrained={tag!r} is neither an existing file nor a timm tag")
        if tag == "default":
            tag = name_tag
        full = arch if tag is None else f"{arch}.{tag}"
        try:
            pcfg = timm.models.get_pretrained_cfg(full)
        except RuntimeError:
            pcfg = None
        if pcfg is None:
            known = [n.partition(".")[2] for n in timm.list_pretrained(arch)] or ["(none)"]
            raise ModelLoadError(f"load_vfm: unknown pretrained tag {tag!r} for the timm model {arch!r}; known tags: "
                                 f"{', '.join(known)}")
        full = f"{arch}.{pcfg.tag}" if getattr(pcfg, "tag", None) else arch
        weights_id = f"tag:{full}"
        local = _cached_tag_file(pcfg)
        if local is None and not _network_reachable():
            raise _offline_error(full, "no network access and not in the local download cache")
    else:
        warnings.warn(f"naclip: building the VFM {name!r} with RANDOM weights (vfm_pretrained=None): for tests and "
                      "benchmarks only, the segmentations are meaningless", UserWarning, stacklevel=2)
        weights_id = None

    try:
        if pretrained is not None and local is None:
            model = timm.create_model(full, pretrained=True, **kwargs)
        else:
            # The pretrained config (mean/std, native size) of the tag, without loading its weights.
            model = timm.create_model(full, pretrained=False, **kwargs)
    except ModelLoadError:
        raise
    except Exception as exc:
        if pretrained is not None and local is None:
            raise _offline_error(full, f"{type(exc).__name__}: {' '.join(str(exc).split())}") from exc
        raise ModelLoadError(f"load_vfm: could not build the timm model {full!r}: "
                             f"{' '.join(str(exc).split())}") from exc
    if local is not None:
        _load_file(model, full, local)
    model = model.to(device=torch.device(device), dtype=dtype).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return VFM(model, name=name, weights_id=weights_id)
