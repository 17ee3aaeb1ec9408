"""naclip.vfm: every VFM family at two input sizes (grid, feature shape, prefix tokens), input handling, weights
(random, local files, tags offline), and one-line errors. Tiny random timm models of the real classes."""
from __future__ import annotations

import pickle
import socket
import time
import warnings

import pytest
import torch

pytest.importorskip("timm")
pytestmark = pytest.mark.filterwarnings("ignore:.*RANDOM weights.*")

import naclip.vfm as nv  # noqa: E402
from naclip.model import ModelLoadError  # noqa: E402
from naclip.vfm import IMAGENET_MEAN, IMAGENET_STD, VFM, VFM_NAMES, clip_to_vfm_input, load_vfm  # noqa: E402
from tests.vfm_helpers import TINY_VFM_KWARGS, tiny_vfm  # noqa: E402

# (name, two input sizes, expected grids, prefix tokens, channels)
FAMILIES = [
    ("dino_vitb8", [(48, 64), (24, 40)], [(6, 8), (3, 5)], 1, 32),
    ("dino_vitb16", [(48, 64), (32, 96)], [(3, 4), (2, 6)], 1, 32),
    ("dinov2_vitb14_reg", [(56, 84), (28, 42)], [(4, 6), (2, 3)], 5, 32),
    ("mae_vitb16", [(48, 64), (16, 32)], [(3, 4), (1, 2)], 1, 32),
    ("sam_vitb", [(48, 80), (96, 32)], [(4, 4), (4, 4)], 0, 16),      # resized to its native 64 x 64
]


@pytest.mark.parametrize("name, sizes, grids, prefix, channels", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_family_grid_and_features_at_two_sizes(name, sizes, grids, prefix, channels, rng):
    vfm = tiny_vfm(name)
    assert vfm.prefix_tokens == prefix and vfm.channels == channels
    # ImageNet normalisation (SPEC.md section 8) even with random weights: the name's tag sets it, not timm's
    # untagged default of the architecture (an augreg config with mean = std = 0.5 for vit_base_patch8_224).
    assert (vfm.mean, vfm.std) == (IMAGENET_MEAN, IMAGENET_STD)
    assert vfm.family == ("sam" if name == "sam_vitb" else "vit")
    for size, grid in zip(sizes, grids):
        x = torch.randn(2, 3, *size, generator=rng)
        feats, got = vfm(x)
        assert got == grid == vfm.grid(size)
        assert feats.shape == (2, grid[0] * grid[1], channels) and torch.isfinite(feats).all()
        # The features are timm's own, with the prefix tokens dropped (SAM: its neck output, flattened).
        with torch.no_grad():
            if vfm.family == "sam":
                native = torch.nn.functional.interpolate(x, size=vfm.input_size, mode="bilinear", align_corners=False)
                expected = vfm.model.forward_features(native).flatten(2).transpose(1, 2)
            else:
                expected = vfm.model.forward_features(x)[:, prefix:]
        torch.testing.assert_close(feats, expected, atol=0, rtol=0)
        # Each image's features depend on that image only: batched windows are independent.
        single, _ = vfm(x[1:])
        torch.testing.assert_close(single[0], feats[1], atol=1e-5, rtol=1e-5)


def test_known_names_map_to_the_spec_models():
    assert VFM_NAMES == {
        "dino_vitb8": "vit_base_patch8_224.dino", "dino_vitb16": "vit_base_patch16_224.dino",
        "dinov2_vitb14_reg": "vit_base_patch14_reg4_dinov2.lvd142m", "sam_vitb": "samvit_base_patch16.sa1b",
        "mae_vitb16": "vit_base_patch16_224.mae"}
    assert nv.DEFAULT_VFM == "dino_vitb8"
    for name, full in VFM_NAMES.items():
        arch, tag, family = nv.resolve_vfm_name(name)
        assert f"{arch}.{tag}" == full and family == ("sam" if name == "sam_vitb" else "vit")


def test_any_timm_vit_name_and_plain_vits_use_dynamic_img_size():
    vfm = load_vfm("vit_small_patch14_reg4_dinov2.lvd142m", None, depth=1, embed_dim=24, num_heads=2)
    assert vfm.model.dynamic_img_size and vfm.prefix_tokens == 5 and vfm.patch_size == (14, 14)
    assert vfm(torch.zeros(1, 3, 28, 56))[1] == (2, 4)
    # The tag's pretrained config (ImageNet mean/std) is kept although no weights were loaded.
    assert vfm.mean == IMAGENET_MEAN and vfm.std == IMAGENET_STD


def test_clip_to_vfm_input_undoes_clip_normalisation():
    from naclip.image import CLIP_MEAN, CLIP_STD, normalize
    pixels = torch.rand(2, 3, 5, 7)
    clip_in = normalize(pixels, CLIP_MEAN, CLIP_STD)
    out = clip_to_vfm_input(clip_in, CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(out, (pixels - mean) / std, atol=1e-5, rtol=1e-5)


def test_random_weights_warn_once():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_vfm("dino_vitb16", None, **TINY_VFM_KWARGS["dino_vitb16"])
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert len(messages) == 1 and "RANDOM weights" in messages[0]


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_local_checkpoint_round_trip(tmp_path, suffix):
    source = tiny_vfm("dinov2_vitb14_reg", seed=3)
    path = tmp_path / f"weights{suffix}"
    state = {k: v.contiguous() for k, v in source.model.state_dict().items()}
    if suffix == ".safetensors":
        from safetensors.torch import save_file
        save_file(state, str(path))
    else:
        torch.save({"model": state}, path)            # wrapped as the original repositories save them
    loaded = load_vfm("dinov2_vitb14_reg", str(path), **TINY_VFM_KWARGS["dinov2_vitb14_reg"])
    assert loaded.weights_id == f"file:{path}"
    x = torch.randn(1, 3, 28, 42)
    torch.testing.assert_close(loaded(x)[0], source(x)[0], atol=0, rtol=0)


def test_sam_original_layout_checkpoint_is_converted(tmp_path):
    """SAM's own checkpoints prefix the encoder with image_encoder. (and name the MLP lin1/lin2): timm's filter
    converts them, so the file from the SAM repository loads as is."""
    source = tiny_vfm("sam_vitb", seed=4)
    original = {"image_encoder." + k.replace("mlp.fc", "mlp.lin"): v for k, v in source.model.state_dict().items()}
    original["prompt_encoder.dummy"] = torch.zeros(1)
    path = tmp_path / "sam_vit_b.pth"
    torch.save(original, path)
    loaded = load_vfm("sam_vitb", str(path), **TINY_VFM_KWARGS["sam_vitb"])
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(loaded(x)[0], source(x)[0], atol=0, rtol=0)


def test_mismatched_checkpoint_is_one_line_naming_the_file(tmp_path):
    other = tiny_vfm("dino_vitb8", embed_dim=48, num_heads=2)
    path = tmp_path / "wrong_width.pth"
    torch.save(other.model.state_dict(), path)
    with pytest.raises(ModelLoadError) as info:
        load_vfm("dino_vitb8", str(path), **TINY_VFM_KWARGS["dino_vitb8"])
    message = str(info.value)
    assert "\n" not in message and str(path) in message and "shape mismatch" in message and "48" in message
    partial = tmp_path / "partial.pth"
    torch.save({"cls_token": torch.zeros(1, 1, 32)}, partial)
    with pytest.raises(ModelLoadError, match="missing keys"):
        load_vfm("dino_vitb8", str(partial), **TINY_VFM_KWARGS["dino_vitb8"])


class _Evil:
    def __reduce__(self):
        return (print, ("pickled code ran",))


# torch's weights-only unpickler warns about the protocol of the (deliberately hostile) pickle before refusing it.
@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as fh:
        pickle.dump({"model": _Evil()}, fh)
    with pytest.raises(ModelLoadError, match="could not read checkpoint"):
        load_vfm("dino_vitb8", str(path), **TINY_VFM_KWARGS["dino_vitb8"])


@pytest.mark.parametrize("name, needle", [
    ("dino_vitb99", "unknown VFM 'dino_vitb99'"),
    ("resnet50", "not a ViT"),
    ("", "non-empty"),
], ids=["unknown", "not-a-vit", "empty"])
def test_bad_names_are_one_line_listing_the_known_names(name, needle):
    with pytest.raises(ModelLoadError) as info:
        load_vfm(name, None)
    message = str(info.value)
    assert needle in message and "\n" not in message
    assert all(known in message for known in VFM_NAMES)


def test_unknown_tag_and_non_file_path():
    with pytest.raises(ModelLoadError, match="unknown pretrained tag 'nope'.*known tags: .*dino"):
        load_vfm("dino_vitb8", "nope")
    with pytest.raises(ModelLoadError, match="neither an existing file nor a timm tag"):
        load_vfm("dino_vitb8", "/no/such/file.pth")


def _no_cache(monkeypatch):
    monkeypatch.setattr(nv, "_cached_tag_file", lambda pcfg: None)


def test_tag_without_network_fails_fast(monkeypatch):
    _no_cache(monkeypatch)

    def refuse(*args, **kwargs):
        raise OSError("network is unreachable (test)")

    monkeypatch.setattr(socket, "create_connection", refuse)
    start = time.perf_counter()
    with pytest.raises(ModelLoadError) as info:
        load_vfm("dino_vitb8", "default")
    assert time.perf_counter() - start < 10
    message = str(info.value)
    assert "vit_base_patch8_224.dino" in message and "vfm_pretrained='/path/to/" in message
    assert "weights_only=True" in message and "\n" not in message
    assert "--vfm-pretrained /path/to/" in info.value.cli_message


def test_offline_env_skips_the_probe(monkeypatch):
    _no_cache(monkeypatch)
    monkeypatch.setenv("NACLIP_OFFLINE", "1")
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: pytest.fail("probed the network"))
    with pytest.raises(ModelLoadError, match="no network"):
        load_vfm("sam_vitb", "default")


def test_cached_tag_loads_offline(tmp_path, monkeypatch):
    source = tiny_vfm("mae_vitb16", seed=5)
    path = tmp_path / "model.safetensors"
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in source.model.state_dict().items()}, str(path))
    monkeypatch.setattr(nv, "_cached_tag_file", lambda pcfg: str(path))
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: pytest.fail("probed the network"))
    loaded = load_vfm("mae_vitb16", "default", **TINY_VFM_KWARGS["mae_vitb16"])
    assert loaded.weights_id == "tag:vit_base_patch16_224.mae"
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(loaded(x)[0], source(x)[0], atol=0, rtol=0)


def test_wrapping_a_timm_model_and_bad_input():
    import timm
    with pytest.raises(ValueError, match="dynamic_img_size=True"):
        VFM(timm.create_model("vit_base_patch16_224", pretrained=False, depth=1, embed_dim=32, num_heads=2))
    with pytest.raises(TypeError, match="VisionTransformer"):
        VFM(torch.nn.Linear(2, 2))
    vfm = tiny_vfm("dino_vitb8")
    with pytest.raises(ValueError, match="multiples of the patch size"):
        vfm(torch.zeros(1, 3, 20, 24))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        vfm(torch.zeros(3, 16, 16))
    with pytest.raises(ValueError, match="dtype"):
        load_vfm("dino_vitb8", None, dtype=torch.int8)
