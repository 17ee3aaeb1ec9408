"""naclip.model: loading (offline behaviour, local checkpoints), the removable NACLIP patch, the dense forward."""
from __future__ import annotations

import pickle
import socket
import time

import pytest
import torch
import torch.nn.functional as F

open_clip = pytest.importorskip("open_clip")

import naclip_kernels  # noqa: E402
from naclip import model as nm  # noqa: E402
from naclip.model import (ModelLoadError, NaclipBlock, NotAViTError, dense_features, get_patch,  # noqa: E402
                          interpolate_pos_embed, load_clip, patch_naclip)
from tests.naclip_helpers import register_tiny_config, tiny_clip  # noqa: E402
from tests.tolerances import tol  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*RANDOM weights.*")


def _unpatched_tokens(model, images, pos):
    """The visual tower run by hand, block by block, with the original blocks and a given positional embedding."""
    v = model.visual
    x = v.conv1(images).flatten(2).transpose(1, 2)
    x = torch.cat([v.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1), x], 1) + pos
    x = v.ln_pre(x)
    for blk in v.transformer.resblocks:
        x = blk(x)
    return v.ln_post(x) @ v.proj


# ---------------------------------------------------------------------------------------------------- the patch
def test_patch_keeps_state_dict_and_remove_restores_exactly():
    model = tiny_clip()
    blocks = model.visual.transformer.resblocks
    original = blocks[-1]
    before = model.state_dict()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model.encode_image(images)

    handle = patch_naclip(model, similarity="kk", sigma=5.0)
    assert isinstance(blocks[-1], NaclipBlock) and blocks[-1] is not original
    after = model.state_dict()
    assert list(after) == list(before), "patching changed state_dict keys"
    for key in before:
        # Shared, not copied: same storage and values.
        assert after[key].data_ptr() == before[key].data_ptr(), key
        assert torch.equal(after[key], before[key]), key
    assert get_patch(model) is handle

    handle.remove()
    assert blocks[-1] is original, "remove() must put back the very same block object"
    assert get_patch(model) is None
    with torch.no_grad():
        assert torch.equal(model.encode_image(images), ref)
    handle.remove()  # idempotent


def test_patch_twice_raises_and_context_manager_removes():
    model = tiny_clip()
    original = model.visual.transformer.resblocks[-1]
    with patch_naclip(model) as handle:
        with pytest.raises(RuntimeError, match="already patched"):
            patch_naclip(model)
        assert get_patch(model) is handle
    assert model.visual.transformer.resblocks[-1] is original
    patch_naclip(model).remove()  # patchable again after removal


@pytest.mark.parametrize("kwargs, message", [
    (dict(similarity="kq"), "similarity"),
    (dict(architecture="full"), "architecture"),
    (dict(backend="cuda"), "backend"),
])
def test_patch_rejects_bad_options(kwargs, message):
    model = tiny_clip()
    original = model.visual.transformer.resblocks[-1]
    with pytest.raises(ValueError, match=message):
        patch_naclip(model, **kwargs)
    assert model.visual.transformer.resblocks[-1] is original


def test_reduced_block_follows_spec():
    """x_L = out_proj(attention_kk_omega(ln_1(x))) with q, k, v from the block's own in_proj (SPEC.md section 2)."""
    model = tiny_clip()
    blk = model.visual.transformer.resblocks[-1]
    grid = (3, 5)
    x = torch.randn(2, 1 + 15, 64)
    heads, dim = blk.attn.num_heads, 64 // blk.attn.num_heads

    def split(t):
        return t.view(2, 16, heads, dim).transpose(1, 2)

    y = blk.ln_1(x)
    q, k, v = (split(t) for t in F.linear(y, blk.attn.in_proj_weight, blk.attn.in_proj_bias).chunk(3, dim=-1))
    for similarity, sigma in [("kk", 5.0), ("qq", None), ("csa", None), ("qk", 2.0)]:
        att = naclip_kernels.reference.neighbour_attention(q.double(), k.double(), v.double(), grid=grid,
                                                           sigma=sigma, similarity=similarity)
        expected = blk.attn.out_proj(att.float().transpose(1, 2).reshape(2, 16, 64))
        with patch_naclip(model, similarity=similarity, sigma=sigma, architecture="reduced") as h:
            with torch.no_grad():
                got = h.block(x, grid=grid)
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=2e-5, msg=f"{similarity}/{sigma}")


def test_vanilla_qk_without_bias_equals_unpatched_model():
    """architecture='vanilla', similarity='qk', sigma=None is CLIP's own block: open_clip's encode_image (which
    calls the patched block without a grid: inferred as square) must not change."""
    model = tiny_clip()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model.encode_image(images)
        with patch_naclip(model, similarity="qk", sigma=None, architecture="vanilla"):
            got = model.encode_image(images)
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("size", [(64, 64), (48, 96), (80, 32)])
def test_dense_features_match_manual_forward_at_any_size(size):
    model = tiny_clip()
    images = torch.randn(2, 3, *size)
    grid = (size[0] // 16, size[1] // 16)
    pos = interpolate_pos_embed(model.visual.positional_embedding.detach(), (4, 4), grid)
    with torch.no_grad():
        expected = _unpatched_tokens(model, images, pos)[:, 1:]
        with patch_naclip(model, similarity="qk", sigma=None, architecture="vanilla"):
            feats, got_grid = dense_features(model, images)
    assert got_grid == grid and feats.shape == (2, grid[0] * grid[1], 32)
    torch.testing.assert_close(feats, expected, atol=2e-5, rtol=2e-5)


def test_pos_embed_interpolation_is_bicubic_and_identity_at_native_grid():
    pos = torch.randn(1 + 4 * 4, 8)
    assert torch.equal(interpolate_pos_embed(pos, (4, 4), (4, 4)), pos)
    out = interpolate_pos_embed(pos, (4, 4), (6, 3))
    assert out.shape == (1 + 18, 8) and torch.equal(out[0], pos[0])
    grid = pos[1:].reshape(1, 4, 4, 8).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(6, 3), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(18, 8)
    torch.testing.assert_close(out[1:], expected)


def test_pos_embed_cache_is_per_grid_and_invalidated_by_weight_updates():
    model = tiny_clip()
    handle = patch_naclip(model)
    images = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        a, _ = dense_features(model, images)
        assert len(handle._pos_cache) == 1
        dense_features(model, images)
        assert len(handle._pos_cache) == 1
        dense_features(model, torch.randn(1, 3, 48, 48))
        assert len(handle._pos_cache) == 2
        model.load_state_dict({**model.state_dict(),
                               "visual.positional_embedding": model.visual.positional_embedding * 2})
        b, _ = dense_features(model, images)
    assert not torch.allclose(a, b), "a stale interpolated positional embedding was served after a weight update"


def test_seq_first_transformer_layout():
    """Older open_clip runs the vision transformer sequence-first (nn.MultiheadAttention(batch_first=False))."""
    model = tiny_clip()
    images = torch.randn(2, 3, 48, 64)
    with torch.no_grad():
        with patch_naclip(model):
            ref, _ = dense_features(model, images)
        model.visual.transformer.batch_first = False
        for blk in model.visual.transformer.resblocks:
            blk.attn.batch_first = False
        with patch_naclip(model):
            got, _ = dense_features(model, images)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_dense_features_errors():
    model = tiny_clip()
    with pytest.raises(RuntimeError, match="not patched"):
        dense_features(model, torch.randn(1, 3, 64, 64))
    patch_naclip(model)
    with pytest.raises(ValueError, match="multiples of the patch size"):
        dense_features(model, torch.randn(1, 3, 60, 64))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        dense_features(model, torch.randn(3, 64, 64))


def test_square_grid_inference_error():
    model = tiny_clip()
    handle = patch_naclip(model)
    with pytest.raises(ValueError, match="grid"):
        handle.block(torch.randn(1, 1 + 12, 64))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_model_dense_features(dtype):
    """What CUDA users run: open_clip's fp16/bf16 model (LayerNormFp32, float32 class/pos embeddings) through the
    patched dense forward; checked on the CPU against the same weights in float32."""
    name = register_tiny_config()
    full = load_clip(name, None, dtype=torch.float32).model
    half = load_clip(name, None, dtype=dtype).model
    half.load_state_dict(full.state_dict())
    images = torch.randn(2, 3, 48, 80)
    out = []
    for model in (full, half):
        with patch_naclip(model), torch.inference_mode():
            feats, _ = dense_features(model, images)
        out.append(feats)
    assert out[1].dtype == dtype
    t = tol("dense_features", "torch", dtype)
    torch.testing.assert_close(F.normalize(out[1].float(), dim=-1), F.normalize(out[0], dim=-1), atol=t.atol,
                               rtol=t.rtol, msg=lambda m: f"{m} [tolerance: {t.reason}]")


# ---------------------------------------------------------------------------------------------------- loading
@pytest.mark.parametrize("name, kind", [("RN50", "ResNet"), ("convnext_base", "timm")])
def test_non_vit_models_are_rejected_before_building(name, kind):
    if open_clip.get_model_config(name) is None:
        pytest.skip(f"{name} not in this open_clip")
    start = time.perf_counter()
    with pytest.raises(NotAViTError, match=kind):
        load_clip(name, pretrained=None)
    assert time.perf_counter() - start < 5


def test_check_vit_rejects_a_resnet_tower():
    from open_clip.model import CLIP
    model = CLIP(embed_dim=32, vision_cfg=dict(layers=(1, 1, 1, 1), width=8, image_size=64),
                 text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=1))
    with pytest.raises(NotAViTError, match="ResNet"):
        patch_naclip(model)


def test_unknown_model_and_tag():
    with pytest.raises(ModelLoadError, match="unknown open_clip model"):
        load_clip("ViT-Q-99", pretrained=None)
    with pytest.raises(ModelLoadError, match="known tags"):
        load_clip("ViT-B-16", pretrained="no_such_tag")
    with pytest.raises(ModelLoadError, match="neither an existing file"):
        load_clip("ViT-B-16", pretrained="/no/such/file.pt")


def test_random_weights_warn():
    name = register_tiny_config()
    with pytest.warns(UserWarning, match="RANDOM weights"):
        loaded = load_clip(name, pretrained=None)
    assert loaded.weights_id is None and not loaded.model.training
    assert loaded.mean == tuple(open_clip.OPENAI_DATASET_MEAN)


def test_local_checkpoint_loads_with_weights_only(tmp_path, monkeypatch):
    name = register_tiny_config()
    source = tiny_clip(seed=3)
    path = tmp_path / "tiny.pt"
    torch.save(source.state_dict(), path)

    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    loaded = load_clip(name, pretrained=str(path))
    assert calls and all(flag is True for flag in calls), f"torch.load called with weights_only={calls}"
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key
    assert loaded.weights_id.startswith("file:") and str(path) in loaded.weights_id


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickled_code_is_refused(tmp_path):
    name = register_tiny_config()
    path = tmp_path / "evil.pt"
    with open(path, "wb") as fh:
        pickle.dump({"state_dict": _Evil()}, fh)
    with pytest.raises(ModelLoadError, match="could not load checkpoint"):
        load_clip(name, pretrained=str(path))


def test_mismatched_checkpoint_is_a_clear_error(tmp_path):
    name = register_tiny_config()
    path = tmp_path / "wrong.pt"
    torch.save({"visual.conv1.weight": torch.zeros(1)}, path)
    with pytest.raises(ModelLoadError, match="could not load checkpoint"):
        load_clip(name, pretrained=str(path))


def _no_cache(monkeypatch):
    # Make the test independent of whatever a developer's machine has downloaded.
    monkeypatch.setattr(nm, "_cached_weights_file", lambda *a, **k: None)


def test_pretrained_tag_without_network_fails_fast(monkeypatch):
    _no_cache(monkeypatch)

    def refuse(*args, **kwargs):
        raise OSError("network is unreachable (test)")

    monkeypatch.setattr(socket, "create_connection", refuse)
    start = time.perf_counter()
    with pytest.raises(ModelLoadError) as info:
        load_clip("ViT-B-16", pretrained="openai")
    assert time.perf_counter() - start < 10
    message = str(info.value)
    assert "openai" in message and "pretrained='/path/to/" in message and "weights_only=True" in message


def test_pretrained_tag_with_hanging_network_fails_fast(monkeypatch):
    """A resolver or firewall that hangs instead of refusing must not hang load_clip."""
    _no_cache(monkeypatch)
    def hang(*args, **kwargs):
        time.sleep(30)
        raise OSError("timed out (test)")

    monkeypatch.setattr(socket, "create_connection", hang)
    start = time.perf_counter()
    with pytest.raises(ModelLoadError, match="no network"):
        load_clip("ViT-B-16", pretrained="openai")
    assert time.perf_counter() - start < 10


def test_cached_tag_loads_offline_with_the_tags_activation(tmp_path, monkeypatch):
    """A tag already in the download cache loads without network, with the tag's QuickGELU setting (OpenAI weights
    need it; open_clip itself would only warn)."""
    name = register_tiny_config()
    source = tiny_clip(seed=6)
    path = tmp_path / "cached.pt"
    torch.save(source.state_dict(), path)
    fake_tags = {"fake_openai": open_clip.pretrained._pcfg(hf_hub="nobody/nothing/", quick_gelu=True)}
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, name, fake_tags)
    monkeypatch.setattr(nm, "_cached_weights_file", lambda open_clip, cfg, cache_dir: str(path))
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: pytest.fail("probed the network"))
    loaded = load_clip(name, pretrained="fake_openai")
    assert loaded.weights_id == "tag:fake_openai"
    assert type(loaded.model.visual.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key


@pytest.mark.skipif(nm._network_reachable(timeout=2.0), reason="network reachable: a real tag would download")
def test_real_offline_machine_fails_fast():
    """Unpatched: on this project's offline machines a real pretrained tag fails within seconds."""
    start = time.perf_counter()
    with pytest.raises(ModelLoadError, match="pretrained="):
        load_clip("ViT-B-16", pretrained="laion2b_s34b_b88k")
    assert time.perf_counter() - start < 15


def test_import_naclip_is_cheap_and_works_without_open_clip():
    import subprocess
    import sys
    code = (
        "import sys\n"
        "sys.modules['open_clip'] = None\n"          # makes `import open_clip` raise ImportError
        "import naclip\n"
        "from naclip import Segmenter, load_clip, patch_naclip, load_image\n"
        "try:\n"
        "    load_clip('ViT-B-16', pretrained=None)\n"
        "except ImportError as exc:\n"
        "    assert 'pip install' in str(exc), exc\n"
        "else:\n"
        "    raise SystemExit('load_clip worked without open_clip?')\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
    plain = subprocess.run([sys.executable, "-c", "import sys, naclip; print('open_clip' in sys.modules)"],
                           capture_output=True, text=True, timeout=120,
                           cwd=str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    assert plain.stdout.strip() == "False", plain.stderr
