"""ProxyCLIP through naclip.Segmenter (SPEC.md section 8).

- The head equals a literal implementation of SPEC.md section 8 written here (float64 proxy-attention loop, every
  head's values resized one by one, the VFM fed by hand), whole image and windows, with and without padding.
- The issue's end-to-end check: a random-weights ViT-B-16 CLIP with a DINO ViT-B/8 VFM (real width and patch, two
  blocks) on a bundled photo, fused paths vs backend="reference": labels agree on >= 99.9% of pixels.
- Batched windows equal the one-window loop; every VFM family runs through the segmenter; bad input.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("open_clip")
pytest.importorskip("timm")

from naclip import Segmenter  # noqa: E402
from naclip.image import load_image  # noqa: E402
from naclip.model import tokens_before_last_block  # noqa: E402
from naclip.text import OPENAI_IMAGENET_TEMPLATES  # noqa: E402
from naclip.vfm import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from tests.naclip_helpers import random_image, tiny_clip  # noqa: E402
from tests.tolerances import tol  # noqa: E402
from tests.vfm_helpers import TINY_VFM_KWARGS, tiny_vfm  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*RANDOM weights.*")

ASSETS = Path(__file__).resolve().parent.parent / "naclip" / "assets"
CLASSES = ["background", "cat", "sofa, couch", "tree, plant"]


def proxy_segmenter(vfm_name="dino_vitb8", seed=0, **kwargs) -> Segmenter:
    kwargs.setdefault("classes", CLASSES)
    kwargs.setdefault("templates", OPENAI_IMAGENET_TEMPLATES[:3])
    kwargs.setdefault("cache_dir", False)
    kwargs.setdefault("method_options", {"pad_to": 16})
    return Segmenter(tiny_clip(seed), None, method="proxyclip", vfm=tiny_vfm(vfm_name, seed=seed), **kwargs)


# ------------------------------------------------------------------------------------------ literal SPEC section 8
def _literal_proxy_attention(feats: torch.Tensor, v: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """SPEC.md section 7 for one image, float64, as written there: [M, C], [H, M, D] -> [H, M, D]."""
    xh = feats.double() / feats.double().norm(dim=-1, keepdim=True)
    s = xh @ xh.t()
    a = gamma * (s - beta * s.mean())
    a = torch.where((a < 0) & ~torch.eye(len(a), dtype=torch.bool), torch.full_like(a, float("-inf")), a)
    weights = torch.softmax(a, dim=-1)
    return torch.stack([weights @ v[h].double() for h in range(v.shape[0])])


def literal_window_logits(seg: Segmenter, window: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """ProxyCLIP's logits ``[Q, H, W]`` for one CLIP-normalised window ``[3, H, W]``, step by step from SPEC 8."""
    head, model = seg.head, seg.model
    ph, pw = head.pad_multiple
    height, width = window.shape[-2:]
    padded = F.pad(window, (0, (-width) % pw, 0, (-height) % ph))[None]
    # The VFM sees the pixels un-normalised from CLIP's mean/std and normalised with ImageNet's.
    mean, std = (torch.tensor(t).view(1, 3, 1, 1) for t in (seg.mean, seg.std))
    im_mean, im_std = (torch.tensor(t).view(1, 3, 1, 1) for t in (IMAGENET_MEAN, IMAGENET_STD))
    vfm_in = (padded * std + mean - im_mean) / im_std
    vfm = head.vfm
    if vfm.family == "sam":
        vfm_in = F.interpolate(vfm_in, size=vfm.input_size, mode="bilinear", align_corners=False)
        out = vfm.model.forward_features(vfm_in)
        grid, feats = tuple(out.shape[-2:]), out.flatten(2)[0].t()
    else:
        grid = (vfm_in.shape[-2] // vfm.patch_size[0], vfm_in.shape[-1] // vfm.patch_size[1])
        feats = vfm.model.forward_features(vfm_in)[0, vfm.prefix_tokens:]
    # CLIP blocks 1..L-1, then the last block's ln_1 and in_proj (q, k, v: only v is used).
    x, (h, w) = tokens_before_last_block(model, padded)
    last = model.visual.transformer.resblocks[-1]
    attn = last.attn
    _, _, v = F.linear(last.ln_1(x), attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    heads, d = attn.num_heads, attn.embed_dim // attn.num_heads
    v = v[0, 1:]                                                  # [CLS] value dropped: [h*w, E]
    per_head = []
    for k in range(heads):
        vk = v[:, k * d:(k + 1) * d].t().reshape(1, d, h, w)
        vk = F.interpolate(vk, size=grid, mode="bilinear", align_corners=False)
        per_head.append(vk.reshape(d, -1).t())
    mixed = _literal_proxy_attention(feats, torch.stack(per_head), beta=1.2, gamma=3.0)    # [H, M, D]
    out = attn.out_proj(mixed.float().permute(1, 0, 2).reshape(-1, heads * d))           # no residual, no MLP
    out = model.visual.ln_post(out) @ model.visual.proj
    logits = F.normalize(out, dim=-1) @ text.t()                                          # [M, Q]
    logits = logits.t().reshape(1, -1, *grid)
    up = F.interpolate(logits, size=padded.shape[-2:], mode="bilinear", align_corners=False)
    return up[0, :, :height, :width]


@pytest.mark.parametrize("vfm_name", ["dino_vitb8", "dinov2_vitb14_reg", "sam_vitb"])
@pytest.mark.parametrize("size", [(48, 64), (37, 53)], ids=["exact", "padded"])
def test_whole_image_matches_the_literal_pipeline(vfm_name, size):
    seg = proxy_segmenter(vfm_name, slide=None, short_side=None, return_logits=True,
                          method_options={"pad_to": 16 if vfm_name != "dinov2_vitb14_reg" else 14})
    image = random_image(*size, seed=8)
    result = seg(image)
    from naclip.image import normalize, to_tensor
    window = normalize(to_tensor(image), seg.mean, seg.std)
    with torch.no_grad():
        expected = literal_window_logits(seg, window, seg.query_embeddings)
    t = tol("proxyclip_segmenter", "literal", torch.float32)
    torch.testing.assert_close(result.logits, expected, atol=t.atol, rtol=t.rtol,
                               msg=lambda m: f"{m} [tolerance: {t.reason}]")


def test_sliding_windows_average_the_literal_window_logits():
    seg = proxy_segmenter(slide=(32, 16), short_side=None, return_logits=True)
    image = random_image(40, 56, seed=9)
    result = seg(image)
    from naclip.image import normalize, to_tensor
    x = normalize(to_tensor(image), seg.mean, seg.std)
    total, count = torch.zeros(6, 40, 56), torch.zeros(1, 40, 56)
    with torch.no_grad():
        for y in (0, 8):                         # rows: 0, then clamped to 40 - 32
            for x0 in (0, 16, 24):               # columns: 0, 16, then clamped to 56 - 32
                total[:, y:y + 32, x0:x0 + 32] += literal_window_logits(seg, x[:, y:y + 32, x0:x0 + 32],
                                                                        seg.query_embeddings)
                count[:, y:y + 32, x0:x0 + 32] += 1
    t = tol("proxyclip_segmenter", "literal", torch.float32)
    torch.testing.assert_close(result.logits, total / count, atol=t.atol, rtol=t.rtol)


def test_batched_windows_equal_the_one_window_loop():
    image = random_image(50, 120, seed=4)
    a = proxy_segmenter(window_batch_size=1, slide=(48, 32), short_side=None, return_logits=True)(image)
    b = proxy_segmenter(window_batch_size=64, slide=(48, 32), short_side=None, return_logits=True)(image)
    torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("vfm_name", list(TINY_VFM_KWARGS), ids=list(TINY_VFM_KWARGS))
@pytest.mark.parametrize("size", [(45, 61), (20, 100)])
def test_each_vfm_family_through_the_segmenter(vfm_name, size):
    seg = proxy_segmenter(vfm_name, slide=(32, 16), short_side=None, pamr=True, pamr_iters=2)
    result = seg(random_image(*size, seed=1))
    assert result.labels.shape == size and torch.isfinite(result.probs).all()


def test_default_padding_is_lcm_of_56_and_the_patch_sizes():
    assert proxy_segmenter(method_options={}).head.pad_multiple == (112, 112)          # 56, CLIP /16, DINO /8
    assert proxy_segmenter("sam_vitb", method_options={}).head.pad_multiple == (112, 112)   # SAM is resized


def test_bad_vfms_are_refused_before_the_model_is_used():
    import timm
    from naclip.model import ModelLoadError
    kwargs = dict(classes=CLASSES, method="proxyclip", cache_dir=False)
    with pytest.raises(ModelLoadError, match="unknown VFM 'dino_vitb7'.*dino_vitb8"):
        Segmenter(tiny_clip(), None, vfm="dino_vitb7", **kwargs)
    with pytest.raises(TypeError, match="VisionTransformer"):
        Segmenter(tiny_clip(), None, vfm=torch.nn.Linear(3, 3), **kwargs)
    fixed_size = timm.create_model("vit_base_patch8_224", pretrained=False, depth=1, embed_dim=32, num_heads=2)
    with pytest.raises(ValueError, match="dynamic_img_size=True"):
        Segmenter(tiny_clip(), None, vfm=fixed_size, **kwargs)


# ------------------------------------------------------------------------------------------ e2e on a real photo
@pytest.fixture(scope="module")
def vit_b16_proxyclip():
    from naclip.vfm import load_vfm
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        # DINO ViT-B/8 at its real width and patch (a 28 x 42 grid here), two blocks to keep the CPU run short.
        vfm = load_vfm("dino_vitb8", None, depth=2)
        seg = Segmenter("ViT-B-16", pretrained=None, classes=CLASSES, method="proxyclip", vfm=vfm, device="cpu",
                        templates=OPENAI_IMAGENET_TEMPLATES[:8], cache_dir=False, return_logits=True,
                        short_side=224, slide=(224, 112))
    yield seg
    seg.close()


def test_e2e_vit_b16_dino_fused_matches_reference_on_a_photo(vit_b16_proxyclip):
    seg = vit_b16_proxyclip
    photo = load_image(ASSETS / "cat.jpg")            # 451 x 300 -> 224 x 336: two 224 windows in one batch
    try:
        seg.backend = "reference"
        ref = seg(photo)
        seg.backend = "auto"
        fast = seg(photo)
    finally:
        seg.backend = "auto"
    assert fast.labels.shape == (photo.height, photo.width)
    t = tol("proxyclip_segmenter", "auto", torch.float32)
    torch.testing.assert_close(fast.logits, ref.logits, atol=t.atol, rtol=t.rtol,
                               msg=lambda m: f"{m} [tolerance: {t.reason}]")
    agreement = (fast.labels == ref.labels).double().mean().item()
    assert agreement >= 0.999, f"labels agree on {agreement:.5%} of pixels (< 99.9%)"


def test_triton_proxy_attention_through_the_segmenter():
    """backend="triton" (the GPU path; on CPU under TRITON_INTERPRET=1) vs backend="reference", tiny models."""
    from tests.conftest import requires_triton_interpreter
    if requires_triton_interpreter.args[0]:
        pytest.skip(requires_triton_interpreter.kwargs["reason"])
    seg = proxy_segmenter(slide=None, short_side=None, return_logits=True)
    photo = load_image(ASSETS / "coffee.jpg").resize((48, 32))
    seg.backend = "reference"
    ref = seg(photo)
    seg.backend = "triton"
    fast = seg(photo)
    t = tol("proxyclip_segmenter", "triton", torch.float32)
    torch.testing.assert_close(fast.logits, ref.logits, atol=t.atol, rtol=t.rtol,
                               msg=lambda m: f"{m} [tolerance: {t.reason}]")
    assert (fast.labels == ref.labels).double().mean().item() >= 0.999


def test_window_batches_are_sized_by_the_larger_tower():
    """On a CPU the default window batch counts the VFM's tokens when they outnumber CLIP's (a /8 VFM on the same
    window has 4x the patches of a /16 CLIP)."""
    from naclip.segmenter import default_window_batch_size

    seg = proxy_segmenter(slide=(48, 32), short_side=None)
    clip_patch = seg.model.visual.patch_size[0]
    vfm_patch = seg.head.vfm.patch_size[0]
    expected = max((-(-48 // clip_patch)) ** 2, (-(-48 // vfm_patch)) ** 2) + 1
    assert seg.head.tokens_per_window((48, 48)) == expected
    assert seg.window_batch_size == default_window_batch_size("cpu", expected)
