"""The Triton neighbour-attention kernel against the float64 reference, on the CPU under TRITON_INTERPRET=1.

Sizes are tiny (N <= ~80 except one N=197 case) because the interpreter runs every tile op through NumPy. The cross
product similarity x sigma x prefix x grid x head_dim x dtype x layout is covered by slices rather than in full;
each slice varies one or two axes around the NACLIP setting (kk, sigma=5, one [CLS] token, D=64).
"""
from __future__ import annotations


import pytest
import torch

import naclip_kernels as nk
from naclip_kernels import reference
from naclip_kernels._alloc import poison_outputs
from naclip_kernels.ops import neighbour_attention as na_mod
from tests.conftest import requires_triton_interpreter, run_python, stub_autotuner_benchmark
from tests.tolerances import assert_close_to_reference

pytestmark = requires_triton_interpreter



def _inputs(rng, batch, heads, n_tokens, head_dim, dtype, layout="bhnd", magnitude=1.0):
    """q, k, v of logical shape [B, H, N, D]; layout "bnhd" gives non-contiguous views (transposed storage)."""
    tensors = []
    for _ in range(3):
        if layout == "bhnd":
            t = torch.randn(batch, heads, n_tokens, head_dim, generator=rng) * magnitude
        else:  # [B, N, H, D] storage, the layout a ViT produces before the head split
            t = (torch.randn(batch, n_tokens, heads, head_dim, generator=rng) * magnitude).transpose(1, 2)
        tensors.append(t.to(dtype))
    return tensors


def _expected(q, k, v, grid, sigma, prefix, similarity, scale=None):
    """float64 reference on the same (possibly quantised) inputs, upcast."""
    return reference.neighbour_attention(None if q is None else q.double(), k.double(), v.double(), grid, sigma,
                                         prefix, similarity, scale)


def _check(q, k, v, grid, sigma, prefix, similarity, scale=None, msg=""):
    with poison_outputs():
        out = nk.neighbour_attention(q, k, v, grid, sigma=sigma, prefix_tokens=prefix, similarity=similarity,
                                     scale=scale, backend="triton")
    assert_close_to_reference(out, _expected(q, k, v, grid, sigma, prefix, similarity, scale), "attention",
                              "triton", k.dtype, msg=msg)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Similarity x sigma x (prefix, grid), float32, D=32
# ---------------------------------------------------------------------------------------------------------------
GRIDS = [
    pytest.param(1, (3, 5), id="P1-3x5"),
    pytest.param(0, (4, 4), id="P0-4x4"),
    pytest.param(4, (2, 7), id="P4-2x7"),
    pytest.param(1, (1, 1), id="P1-1x1"),
]
SIGMAS = [pytest.param(5.0, id="sigma5"), pytest.param(None, id="nobias"), pytest.param(0.7, id="sigma0.7")]


@pytest.mark.parametrize("prefix,grid", GRIDS)
@pytest.mark.parametrize("sigma", SIGMAS)
@pytest.mark.parametrize("similarity", ["qk", "kk", "qq", "csa"])
def test_similarity_sigma_grid(rng, similarity, sigma, prefix, grid):
    n_tokens = prefix + grid[0] * grid[1]
    q, k, v = _inputs(rng, 1, 2, n_tokens, 32, torch.float32)
    _check(q, k, v, grid, sigma, prefix, similarity)


# ---------------------------------------------------------------------------------------------------------------
# dtype x head_dim (padding to a power of two with masks: 80 -> 128)
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("head_dim", [32, 64, 80, 128], ids=lambda d: f"D{d}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=lambda t: str(t).replace("torch.", ""))
def test_dtype_head_dim(rng, dtype, head_dim):
    q, k, v = _inputs(rng, 1, 2, 1 + 3 * 5, head_dim, dtype)
    _check(q, k, v, (3, 5), 5.0, 1, "kk")


@pytest.mark.parametrize("similarity", ["qk", "csa"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=lambda t: str(t).replace("torch.", ""))
def test_low_precision_other_similarities(rng, dtype, similarity):
    q, k, v = _inputs(rng, 1, 2, 4 + 4 * 4, 80, dtype)
    _check(q, k, v, (4, 4), 0.7, 4, similarity)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=lambda t: str(t).replace("torch.", ""))
def test_ragged_n197(rng, dtype):
    """N = 197 (ViT-B/16 at 224: 14x14 + [CLS]): several query blocks, a ragged last one, 4 rows per key tile."""
    q, k, v = _inputs(rng, 1, 1, 197, 64, dtype)
    _check(q, k, v, (14, 14), 5.0, 1, "kk")


def test_arbitrary_dim(rng):
    """A head dim that is not a multiple of 16 (masked padding to 16)."""
    q, k, v = _inputs(rng, 1, 1, 1 + 2 * 3, 8, torch.float32)
    _check(q, k, v, (2, 3), 5.0, 1, "qk")


# ---------------------------------------------------------------------------------------------------------------
# Layout, batch, q=None, scale, large logits
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("similarity", ["qk", "kk", "qq", "csa"])
def test_non_contiguous_batched(rng, similarity):
    q, k, v = _inputs(rng, 3, 2, 1 + 3 * 4, 64, torch.float16, layout="bnhd")
    assert not q.is_contiguous()
    _check(q, k, v, (3, 4), 5.0, 1, similarity)


def test_q_none_kk(rng):
    _, k, v = _inputs(rng, 2, 2, 1 + 4 * 3, 64, torch.float32)
    _check(None, k, v, (4, 3), 5.0, 1, "kk")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda t: str(t).replace("torch.", ""))
def test_large_logits_and_scale(rng, dtype):
    """Peaked softmax (logits up to ~100): the online max rescaling must keep exp2 in range."""
    q, k, v = _inputs(rng, 1, 2, 1 + 3 * 5, 32, dtype, magnitude=3.0)
    _check(q, k, v, (3, 5), 0.7, 1, "csa", scale=1.0)


def test_tiny_and_huge_sigma(rng):
    """sigma -> 0: omega is 1 on the diagonal only (no 0 * inf NaN); sigma -> inf: omega = 1 between all patches."""
    q, k, v = _inputs(rng, 1, 1, 1 + 3 * 3, 16, torch.float32)
    _check(q, k, v, (3, 3), 1e-25, 1, "qk")
    _check(q, k, v, (3, 3), 1e25, 1, "qk")


def test_mixed_strides_per_operand(rng):
    """q, k, v, each with different strides (one contiguous, one transposed, one sliced)."""
    q = torch.randn(2, 2, 13, 32, generator=rng)
    k = torch.randn(2, 13, 2, 32, generator=rng).transpose(1, 2)
    v = torch.randn(2, 2, 13, 64, generator=rng)[..., ::2]
    _check(q, k, v, (3, 4), 5.0, 1, "qk")


# ---------------------------------------------------------------------------------------------------------------
# Tile shapes other than the default: several column chunks per grid row, 2 and 4 grid rows per key tile,
# several query blocks, and the batch split used when batch * heads exceeds the CUDA grid limit.
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config,prefix,grid", [
    pytest.param((16, 16, 4, 2), 1, (3, 20), id="M16N16-w20-3chunks"),
    pytest.param((32, 32, 4, 2), 4, (9, 7), id="M32N32-w7-2rows"),
    pytest.param((16, 64, 4, 2), 0, (5, 9), id="M16N64-w9-4rows"),
    pytest.param((64, 32, 4, 2), 1, (2, 33), id="M64N32-w33-ragged-chunk"),
])
@pytest.mark.parametrize("similarity", ["kk", "csa"])
def test_tile_configs(rng, config, prefix, grid, similarity):
    n_tokens = prefix + grid[0] * grid[1]
    q, k, v = _inputs(rng, 1, 2, n_tokens, 32, torch.float32)
    h, w = grid
    with poison_outputs():
        out = na_mod._neighbour_attention_triton(q, k, v, h, w, 5.0, prefix, similarity, 32 ** -0.5, config=config)
    assert_close_to_reference(out, _expected(q, k, v, grid, 5.0, prefix, similarity), "attention", "triton",
                              torch.float32, msg=f"config={config}")


def test_batch_split_over_grid_limit(rng, monkeypatch):
    monkeypatch.setattr(na_mod, "_MAX_GRID_Y", 2)  # batch * heads = 6 > 2: three launches of one batch each
    q, k, v = _inputs(rng, 3, 2, 1 + 2 * 3, 32, torch.float32, layout="bnhd")
    _check(q, k, v, (2, 3), 5.0, 1, "qk")


# ---------------------------------------------------------------------------------------------------------------
# Errors and dispatch
# ---------------------------------------------------------------------------------------------------------------
def test_float64_raises_type_error(rng):
    q, k, v = _inputs(rng, 1, 1, 1 + 2 * 2, 16, torch.float64)
    with pytest.raises(TypeError, match=r"float64.*backend='torch'"):
        nk.neighbour_attention(q, k, v, (2, 2), backend="triton")


def test_empty_batch(rng):
    q, k, v = (torch.randn(0, 2, 5, 16) for _ in range(3))
    out = nk.neighbour_attention(q, k, v, (2, 2), backend="triton")
    assert out.shape == (0, 2, 5, 16)


def test_cpu_without_interpreter_raises_backend_unavailable():
    code = (
        "import torch, naclip_kernels as nk\n"
        "k = torch.randn(1, 1, 5, 16)\n"
        "try:\n"
        "    nk.neighbour_attention(None, k, k, (2, 2), backend='triton')\n"
        "except nk.BackendUnavailableError as e:\n"
        "    print('RAISED', e)\n"
    )
    result = run_python(code)
    assert "RAISED" in result.stdout, result.stdout + result.stderr
    assert "TRITON_INTERPRET=1" in result.stdout and "backend='torch'" in result.stdout


# ---------------------------------------------------------------------------------------------------------------
# Launcher helpers (pure Python)
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("w,block_n,expected", [(14, 64, 16), (1, 64, 16), (21, 64, 32), (28, 64, 32),
                                                (64, 64, 64), (200, 64, 64), (14, 32, 16), (33, 32, 32)])
def test_block_w(w, block_n, expected):
    assert na_mod._block_w(w, block_n, True) == expected
    assert na_mod._block_w(w, block_n, False) == block_n


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32],
                         ids=lambda t: str(t).replace("torch.", ""))
@pytest.mark.parametrize("block_d", [16, 32, 64, 128, 256])
@pytest.mark.parametrize("csa", [False, True], ids=["pair", "csa"])
@pytest.mark.parametrize("has_bias", [False, True], ids=["nobias", "bias"])
def test_autotune_pruning_keeps_default(dtype, block_d, csa, has_bias):
    """The pruned autotune list is never empty and always contains the default config."""
    configs = na_mod._neighbour_attention_fwd_tuned.configs
    v = torch.empty(0, dtype=dtype)
    kept = na_mod._prune_configs(configs, {"v_ptr": v}, BLOCK_D=block_d, CSA=csa, HAS_BIAS=has_bias)
    default = na_mod._default_config(block_d, csa, has_bias, v.element_size())
    as_tuples = [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in kept]
    assert default in as_tuples


# ---------------------------------------------------------------------------------------------------------------
# The autotuner path a GPU user's first call takes: triton.autotune -> early prune -> heuristics -> launch.
# Under the interpreter the launcher normally runs the default config directly; here autotune=True forces the
# tuned kernel, and Triton's benchmarking is stubbed (tests.conftest.stub_autotuner_benchmark).
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("sigma", [5.0, None], ids=["bias", "nobias"])
def test_autotuner_launch_path_prunes_benchmarks_and_runs(rng, monkeypatch, dtype, sigma):
    tuner = na_mod._neighbour_attention_fwd_tuned
    candidates = stub_autotuner_benchmark(monkeypatch, tuner)
    q, k, v = _inputs(rng, 1, 2, 1 + 4 * 5, 32, dtype)
    with poison_outputs():
        out = na_mod._neighbour_attention_triton(q, k, v, 4, 5, sigma, 1, "kk", 32 ** -0.5, autotune=True)
    assert_close_to_reference(out, _expected(q, k, v, (4, 5), sigma, 1, "kk"), "attention", "triton", dtype)

    allowed = na_mod._tune_configs(32, False, sigma is not None, v.element_size())
    assert len(tuner.cache) == 1
    best = next(iter(tuner.cache.values()))
    chosen = (best.kwargs["BLOCK_M"], best.kwargs["BLOCK_N"], best.num_warps, best.num_stages)
    if len(allowed) > 1:
        # Every spill-free candidate of this specialisation was benchmarked, and the stub's fastest one was kept.
        assert len(candidates) == len(allowed)
        assert chosen == allowed[-1]
    else:
        assert candidates == [] and chosen == allowed[0]  # a single candidate is taken without benchmarking
