"""The Triton proxy-attention kernel against the float64 reference, on the CPU under TRITON_INTERPRET=1.

Sizes are small (M <= ~140, C <= 1280 only with M tiny) because the interpreter runs every tile op through NumPy.
Each test varies one or two axes around ProxyCLIP's setting (beta 1.2, gamma 3, region-structured features).
"""
from __future__ import annotations

import pytest
import torch

import naclip_kernels as nk
from naclip_kernels import reference
from naclip_kernels._alloc import poison_outputs
from naclip_kernels.ops import proxy_attention as proxy_op
from tests.conftest import requires_triton_interpreter, run_python, stub_autotuner_benchmark
from tests.proxy_helpers import proxy_inputs
from tests.tolerances import assert_close_to_reference

pytestmark = requires_triton_interpreter

DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16"),
          pytest.param(torch.bfloat16, id="bf16")]


def _expected(feats, v, beta=1.2, gamma=3.0):
    return reference.proxy_attention(feats.double(), v.double(), beta, gamma)


def _check(feats, v, beta=1.2, gamma=3.0, msg="", **launch):
    with poison_outputs():
        if launch:
            out = proxy_op._proxy_attention_triton(feats, v, beta, gamma, **launch)
        else:
            out = nk.proxy_attention(feats, v, beta=beta, gamma=gamma, backend="triton")
    assert_close_to_reference(out, _expected(feats, v, beta, gamma), "proxy_attention", "triton", v.dtype, msg=msg)
    assert out.is_contiguous()
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_tokens,channels,heads,head_dim", [
    pytest.param(37, 24, 3, 16, id="ragged-M37-C24"),
    pytest.param(70, 100, 2, 32, id="M70-C100-not-pow2"),
    pytest.param(16, 40, 12, 64, id="H12xD64-HD768"),
])
def test_matches_float64_reference(rng, dtype, n_tokens, channels, heads, head_dim):
    feats, v = proxy_inputs(rng, 2, heads, n_tokens, channels, head_dim, dtype, regions=3)
    _check(feats, v)


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous(rng, dtype):
    feats, v = proxy_inputs(rng, 2, 3, 29, 20, 8, dtype, layout="strided", regions=2)
    _check(feats, v)


def test_mixed_strides(rng):
    """feats sliced along C, v with a stepped last dim: no layout assumption anywhere."""
    feats, v = proxy_inputs(rng, 1, 2, 21, 32, 16, torch.float32, regions=2)
    feats = torch.cat([feats, feats], dim=-1)[..., ::2]
    v = torch.stack([v, v], dim=-1).flatten(-2)[..., ::2]
    assert not feats.is_contiguous() and not v.is_contiguous()
    _check(feats, v)


def test_large_channels_and_value_width(rng):
    """C = 1280 (several BLOCK_C steps with a masked tail) and H*D = 1024 (several column splits)."""
    feats, v = proxy_inputs(rng, 1, 4, 9, 1280, 256, torch.float16, regions=2)
    _check(feats, v)


@pytest.mark.parametrize("beta,gamma", [(-1.0, 3.0), (4.0, 3.0), (1.2, 150.0), (0.0, 0.5)],
                         ids=["nothing-masked", "diagonal-only", "gamma150", "beta0-gamma0.5"])
def test_beta_gamma(rng, beta, gamma):
    feats, v = proxy_inputs(rng, 1, 2, 40, 16, 16, torch.float32, beta=beta, regions=3)
    _check(feats, v, beta=beta, gamma=gamma)


def test_zero_feature_vectors(rng):
    """Zero features (S = 0 in their row and column, diagonal kept) and a huge gamma: the online max starts at
    the diagonal score, so no row underflows or divides 0 by 0."""
    feats, v = proxy_inputs(rng, 1, 2, 33, 8, 8, torch.float32, regions=2)
    feats[0, 0] = 0
    feats[0, 20] = 0
    for gamma in (3.0, 1000.0):
        _check(feats, v, gamma=gamma, msg=f"gamma={gamma}")


def test_region_features_skip_masked_tiles(rng):
    """Four regions of 32 tokens each and 16-key tiles: most key tiles are masked for a whole query block and are
    skipped; the result is the same."""
    feats, v = proxy_inputs(rng, 1, 2, 128, 16, 16, torch.float32, regions=4)
    config = (16, 16, 16, 32, 1, 4, 2)
    _check(feats, v, config=config)


@pytest.mark.parametrize("config", [
    pytest.param((16, 16, 16, 16, 1, 4, 2), id="M16N16C16HD16-4splits"),
    pytest.param((32, 16, 32, 16, 3, 4, 2), id="3chunks-of-16-ragged"),
    pytest.param((16, 32, 16, 16, 4, 4, 2), id="4chunks"),
    pytest.param((32, 64, 64, 64, 2, 4, 2), id="M32N64-1split"),
])
def test_tile_configs(rng, config):
    feats, v = proxy_inputs(rng, 2, 3, 45, 40, 16, torch.float32, regions=3)  # H*D = 48
    _check(feats, v, config=config, msg=f"config={config}")


def test_autotune_path(rng, monkeypatch):
    """The launch a GPU user's first call takes: autotuner, early pruning to this dtype's entries specialised to
    H*D, benchmark, launch. Triton's benchmarker needs a GPU driver, so a stub runs each candidate once (really,
    interpreted) and makes the last one win."""
    tuner = proxy_op._proxy_attention_fwd_tuned
    ran = stub_autotuner_benchmark(monkeypatch, tuner)
    feats, v = proxy_inputs(rng, 1, 2, 24, 16, 160, torch.float16, regions=2)  # H*D = 320: 2 chunks of 128
    _check(feats, v, autotune=True)
    allowed = [proxy_op._specialise(base, 320) for base in proxy_op._HALF_TUNE]
    assert len(ran) == len(allowed)
    assert proxy_op._config_tuple(next(iter(tuner.cache.values()))) == allowed[-1]


def test_batch_split_over_grid_limit(rng, monkeypatch):
    monkeypatch.setattr(proxy_op, "_MAX_GRID", 2)  # 5 images: launches of 2, 2 and 1
    feats, v = proxy_inputs(rng, 5, 2, 12, 8, 8, torch.float32, regions=2)
    _check(feats, v)


# ---------------------------------------------------------------------------------------------------------------
# Errors, dispatch and launcher helpers
# ---------------------------------------------------------------------------------------------------------------
def test_float64_raises_type_error(rng):
    feats, v = proxy_inputs(rng, 1, 1, 5, 4, 4, torch.float64)
    with pytest.raises(TypeError, match=r"float64.*backend='torch'"):
        nk.proxy_attention(feats, v, backend="triton")


def test_empty(rng):
    out = nk.proxy_attention(torch.randn(0, 5, 4), torch.randn(0, 2, 5, 3), backend="triton")
    assert out.shape == (0, 2, 5, 3)


def test_cpu_without_interpreter_raises_backend_unavailable():
    code = (
        "import torch, naclip_kernels as nk\n"
        "try:\n"
        "    nk.proxy_attention(torch.randn(1, 4, 8), torch.randn(1, 2, 4, 4), backend='triton')\n"
        "except nk.BackendUnavailableError as e:\n"
        "    print('RAISED', e)\n"
    )
    result = run_python(code)
    assert "RAISED" in result.stdout and "TRITON_INTERPRET=1" in result.stdout, result.stdout + result.stderr


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("hd", [16, 64, 128, 256, 768, 1024, 1280])
def test_autotune_pruning_keeps_default(dtype, hd):
    """The pruned autotune list is never empty and contains the default specialised to H*D."""
    v = torch.empty(0, dtype=dtype)
    kept = proxy_op._prune_configs(proxy_op._proxy_attention_fwd_tuned.configs, {"v_ptr": v, "hd": hd})
    assert proxy_op._default_config(v.element_size(), hd) in [proxy_op._config_tuple(c) for c in kept]
    for c in kept:
        _, _, _, block_hd, chunks, _, _ = proxy_op._config_tuple(c)
        assert (chunks - 1) * block_hd < hd  # no accumulator chunk is entirely padding
