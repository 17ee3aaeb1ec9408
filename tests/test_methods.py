"""The method registry (naclip.methods) through naclip.Segmenter: every name builds and segments, method defaults,
explicit arguments over them, options refused across methods, per-benchmark settings. Tiny random models."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("open_clip")
pytest.importorskip("timm")

from naclip import Segmenter  # noqa: E402
from naclip.methods import METHODS, get_method, method_names  # noqa: E402
from naclip.text import OPENAI_IMAGENET_TEMPLATES  # noqa: E402
from tests.naclip_helpers import random_image, tiny_clip  # noqa: E402
from tests.vfm_helpers import tiny_vfm  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*RANDOM weights.*")

CLASSES = ["background", "cat", "sofa, couch"]

# (method, similarity, sigma, architecture) of the attention family, as SPEC.md section 1 and the papers set them.
FAMILY = [("naclip", "kk", 5.0, "reduced"), ("sclip", "csa", None, "vanilla"), ("clearclip", "qq", None, "reduced"),
          ("clip", "qk", None, "vanilla")]


def make(method="naclip", seed=0, **kwargs):
    kwargs.setdefault("classes", CLASSES)
    kwargs.setdefault("templates", OPENAI_IMAGENET_TEMPLATES[:2])
    kwargs.setdefault("cache_dir", False)
    if method == "proxyclip":
        kwargs.setdefault("vfm", tiny_vfm("dino_vitb8", seed=seed))
        kwargs.setdefault("method_options", {"pad_to": 16})
    return Segmenter(tiny_clip(seed), None, method=method, **kwargs)


def test_registry_names_and_lookup():
    assert method_names() == ("naclip", "sclip", "clearclip", "clip", "proxyclip")
    assert get_method("ProxyCLIP") is METHODS["proxyclip"]
    with pytest.raises(ValueError, match="unknown method 'maskclip'; known methods: naclip, sclip"):
        get_method("maskclip")
    with pytest.raises(ValueError, match="unknown method"):
        make("maskclip")


@pytest.mark.parametrize("method", list(METHODS), ids=list(METHODS))
def test_each_method_builds_and_segments(method):
    seg = make(method, short_side=80, slide=(48, 32), pamr=False, return_logits=True)
    assert seg.method == method and method in repr(seg)
    result = seg(random_image(40, 70, seed=2))
    assert result.labels.shape == (40, 70) and result.logits.shape == (4, 40, 70)
    assert torch.isfinite(result.logits).all() and (result.logits.abs() <= 1 + 1e-5).all()
    seg.close()


@pytest.mark.parametrize("method, similarity, sigma, architecture", FAMILY, ids=[f[0] for f in FAMILY])
def test_family_methods_are_their_attention_settings(method, similarity, sigma, architecture):
    seg = make(method, pamr=False)
    block = seg.handle.block
    assert (block.similarity, block.sigma, block.architecture) == (similarity, sigma, architecture)
    # The same logits as the explicit settings on the default method (what users assembled from flags before).
    explicit = make("naclip", similarity=similarity, sigma=sigma, architecture=architecture, pamr=False,
                    return_logits=True)
    image = random_image(36, 52, seed=3)
    torch.testing.assert_close(make(method, pamr=False, return_logits=True)(image).logits, explicit(image).logits,
                               atol=0, rtol=0)


def test_method_defaults_and_explicit_arguments_override_them():
    naclip = make("naclip")
    assert (naclip.slide, naclip.short_side, naclip.pamr, naclip.logit_scale) == ((224, 112), 336, True, 40.0)
    proxy = make("proxyclip")
    assert (proxy.slide, proxy.short_side, proxy.pamr, proxy.logit_scale) == ((336, 112), 336, False, 40.0)
    assert proxy.method_options["beta"] == 1.2 and proxy.method_options["gamma"] == 3.0
    assert proxy.handle is None          # ProxyCLIP does not patch the model
    # Explicit pipeline arguments win over the method's defaults; PAMR stays available with ProxyCLIP.
    proxy = make("proxyclip", slide=None, short_side=64, pamr=True, logit_scale=50.0)
    assert (proxy.slide, proxy.short_side, proxy.pamr, proxy.logit_scale) == (None, 64, True, 50.0)
    # Explicit attention options override the family method's own: NACLIP with sigma 3, SCLIP with a bias.
    assert make("naclip", sigma=3.0).handle.block.sigma == 3.0
    block = make("sclip", sigma=2.0, architecture="reduced").handle.block
    assert (block.similarity, block.sigma, block.architecture) == ("csa", 2.0, "reduced")


@pytest.mark.parametrize("method, kwargs, match", [
    ("proxyclip", dict(similarity="kk"), "similarity do.*not apply to method 'proxyclip'.*vfm, vfm_pretrained"),
    ("proxyclip", dict(sigma=None), "sigma"),
    ("naclip", dict(vfm="dino_vitb8"), "vfm do.*not apply to method 'naclip'.*similarity, sigma, architecture"),
    ("clip", dict(method_options={"beta": 1.0}), "beta"),
    ("proxyclip", dict(method_options={"gamma": 0.0}), "gamma"),
    ("proxyclip", dict(method_options={"beta": float("nan")}), "beta"),
    ("proxyclip", dict(method_options={"pad_to": 0}), "pad_to"),
    ("naclip", dict(similarity="kk", method_options={"similarity": "qq"}), "both"),
], ids=["proxy-similarity", "proxy-sigma", "naclip-vfm", "clip-beta", "gamma", "beta-nan", "pad-to", "twice"])
def test_options_of_other_methods_are_refused_before_building(method, kwargs, match):
    model = tiny_clip()
    original = model.visual.transformer.resblocks[-1]
    with pytest.raises(ValueError, match=match):
        Segmenter(model, None, classes=CLASSES, method=method, cache_dir=False, **kwargs)
    assert model.visual.transformer.resblocks[-1] is original


def test_from_preset_uses_the_methods_benchmark_settings():
    expected = {"voc21": (336, (336, 112), 0.2), "pc60": (336, (336, 112), 0.15),
                "coco_object": (336, (336, 112), 0.25), "voc20": (336, (336, 112), None),
                "ade20k": (448, (336, 112), None), "cityscapes": (448, (224, 112), None),
                "coco_stuff": (336, (336, 112), None), "pc59": (336, (336, 112), None)}
    vfm = tiny_vfm("dino_vitb8")
    for name, (short, slide, threshold) in expected.items():
        seg = Segmenter.from_preset(name, method="proxyclip", model=tiny_clip(), pretrained=None, vfm=vfm,
                                    cache_dir=False, templates=["{}"])
        assert (seg.short_side, seg.slide, seg.confidence_threshold, seg.pamr) == (short, slide, threshold, False), \
            name
    # The attention family keeps NACLIP's benchmark settings (VOC21: whole image, threshold 0.1, PAMR).
    seg = Segmenter.from_preset("voc21", method="clearclip", model=tiny_clip(), pretrained=None, cache_dir=False,
                                templates=["{}"])
    assert (seg.slide, seg.confidence_threshold, seg.pamr, seg.method) == (None, 0.1, True, "clearclip")
    # Overrides still win.
    seg = Segmenter.from_preset("voc21", method="proxyclip", model=tiny_clip(), pretrained=None, vfm=vfm,
                                cache_dir=False, templates=["{}"], confidence_threshold=0.5, slide=None)
    assert (seg.confidence_threshold, seg.slide) == (0.5, None)


def test_proxyclip_can_share_a_model_with_a_naclip_patch():
    """The web app runs NACLIP and ProxyCLIP on one CLIP model: ProxyCLIP reads the original last block's weights,
    patched or not, and never changes the model."""
    model = tiny_clip(seed=4)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    kwargs = dict(classes=CLASSES, templates=["{}"], cache_dir=False, return_logits=True,
                  vfm=tiny_vfm("dino_vitb8", seed=4), method_options={"pad_to": 16}, short_side=None, slide=None)
    image = random_image(32, 48, seed=5)
    built_before = Segmenter(model, None, method="proxyclip", **kwargs)
    alone = built_before(image).logits
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    naclip = Segmenter(model, None, classes=CLASSES, templates=["{}"], cache_dir=False)   # patches the model
    built_after = Segmenter(model, None, method="proxyclip", **kwargs)
    torch.testing.assert_close(built_before(image).logits, alone, atol=0, rtol=0)
    torch.testing.assert_close(built_after(image).logits, alone, atol=0, rtol=0)
    naclip.close()


def test_a_loaded_clip_is_shared_with_its_tokenizer_and_normalisation():
    import open_clip
    from naclip.model import LoadedCLIP
    model = tiny_clip(seed=6)
    loaded = LoadedCLIP(model=model, tokenizer=open_clip.tokenizer.SimpleTokenizer(context_length=77),
                        mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), model_name="tiny", weights_id=None)
    seg = Segmenter(loaded, None, classes=CLASSES, templates=["{}"], cache_dir=False, pamr=False)
    assert seg.model is model and seg.loaded.tokenizer is loaded.tokenizer and seg.mean == (0.5, 0.5, 0.5)
    assert seg(random_image(20, 30)).labels.shape == (20, 30)
    with pytest.raises(ValueError, match="LoadedCLIP"):
        Segmenter(loaded, "openai", classes=CLASSES)
