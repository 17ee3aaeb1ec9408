"""Neighbour-aware attention: torch path and reference against the float64 reference, the bias constructions,
the NaN-poisoning contract, and the "never an N x N tensor" memory property."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import naclip_kernels as nk
from naclip_kernels import reference
from naclip_kernels._alloc import poison_outputs
from naclip_kernels.ops import neighbour_attention as attention_op
from tests.tolerances import assert_close_to_reference

SIMILARITIES = ("qk", "kk", "qq", "csa")


def make_qkv(shape, dtype, generator, *, layout="contiguous"):
    """Fresh random q, k, v of ``shape`` [B, H, N, D]; ``layout="strided"`` returns non-contiguous views."""
    batch, heads, n_tokens, head_dim = shape
    if layout == "strided":
        # The layout a ViT produces: [B, N, H, D] transposed to [B, H, N, D] (non-contiguous, like F.linear + view).
        tensors = [torch.randn(batch, n_tokens, heads, head_dim, generator=generator).to(dtype).transpose(1, 2)
                   for _ in range(3)]
        assert not tensors[0].is_contiguous()
    else:
        tensors = [torch.randn(*shape, generator=generator).to(dtype) for _ in range(3)]
    return tensors


def float64_reference(q, k, v, **kwargs):
    """The oracle: the reference on the same (possibly quantised) inputs upcast to float64."""
    up = lambda t: None if t is None else t.double()
    return reference.neighbour_attention(up(q), up(k), up(v), **kwargs)


# (grid, prefix_tokens, head_dim, sigma, batch, heads): square and non-square grids, ragged N, prefixes 0/1/4.
CASES = [
    pytest.param((14, 14), 1, 64, 5.0, 1, 2, id="vit224-N197-D64"),
    pytest.param((3, 5), 0, 32, 5.0, 2, 3, id="3x5-P0-D32"),
    pytest.param((4, 7), 4, 80, 2.0, 1, 2, id="4x7-P4-D80-sigma2"),
    pytest.param((1, 1), 1, 16, 5.0, 2, 1, id="1x1-P1"),
    pytest.param((6, 2), 1, 128, 0.7, 1, 1, id="6x2-D128-sigma0.7"),
    pytest.param((8, 8), 1, 64, None, 1, 2, id="8x8-no-bias"),
]


@pytest.mark.parametrize("similarity", SIMILARITIES)
@pytest.mark.parametrize("grid,prefix,head_dim,sigma,batch,heads", CASES)
def test_torch_path_matches_float64_reference(grid, prefix, head_dim, sigma, batch, heads, similarity, rng):
    shape = (batch, heads, prefix + grid[0] * grid[1], head_dim)
    q, k, v = make_qkv(shape, torch.float32, rng)
    kwargs = dict(grid=grid, sigma=sigma, prefix_tokens=prefix, similarity=similarity)
    with poison_outputs():
        out = nk.neighbour_attention(q, k, v, backend="torch", **kwargs)
    assert_close_to_reference(out, float64_reference(q, k, v, **kwargs), "attention", "torch", torch.float32)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16],
                         ids=["fp64", "fp32", "fp16", "bf16"])
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_torch_path_dtypes_and_layouts(dtype, layout, rng):
    grid, prefix = (5, 6), 1
    q, k, v = make_qkv((2, 3, prefix + 30, 32), dtype, rng, layout=layout)
    kwargs = dict(grid=grid, sigma=5.0, prefix_tokens=prefix, similarity="csa")
    with poison_outputs():
        out = nk.neighbour_attention(q, k, v, backend="torch", **kwargs)
    assert_close_to_reference(out, float64_reference(q, k, v, **kwargs), "attention", "torch", dtype)


def test_q_may_be_none_for_kk(rng):
    q, k, v = make_qkv((1, 2, 1 + 12, 16), torch.float32, rng)
    with_q = nk.neighbour_attention(q, k, v, grid=(3, 4), similarity="kk", backend="torch")
    without_q = nk.neighbour_attention(None, k, v, grid=(3, 4), similarity="kk", backend="torch")
    torch.testing.assert_close(with_q, without_q, atol=0, rtol=0)


def test_bias_slices_cover_every_query_block(rng, monkeypatch):
    """A tiny bias-slice budget forces many query blocks (one row each): every output row must still be written."""
    monkeypatch.setattr(attention_op, "_BIAS_SLICE_ELEMENTS", 64)
    grid, prefix = (5, 7), 4
    q, k, v = make_qkv((2, 3, prefix + 35, 8), torch.float32, rng)
    kwargs = dict(grid=grid, sigma=3.0, prefix_tokens=prefix, similarity="csa")
    with poison_outputs():
        out = nk.neighbour_attention(q, k, v, backend="torch", **kwargs)
    assert_close_to_reference(out, float64_reference(q, k, v, **kwargs), "attention", "torch", torch.float32)


def test_reference_backend_through_the_functional(rng):
    q, k, v = make_qkv((1, 1, 10, 8), torch.float64, rng)
    a = nk.neighbour_attention(q, k, v, grid=(3, 3), backend="reference")
    b = reference.neighbour_attention(q, k, v, grid=(3, 3))
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_sigma_none_equals_plain_attention(rng):
    """With the bias off and qk similarity the op is ordinary scaled dot-product attention."""
    q, k, v = make_qkv((2, 2, 1 + 20, 16), torch.float64, rng)
    out = nk.neighbour_attention(q, k, v, grid=(4, 5), sigma=None, similarity="qk", backend="torch")
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)


def test_custom_scale_is_used(rng):
    q, k, v = make_qkv((1, 1, 1 + 9, 8), torch.float64, rng)
    kwargs = dict(grid=(3, 3), sigma=5.0, similarity="qk")
    a = nk.neighbour_attention(q, k, v, scale=0.3, backend="torch", **kwargs)
    b = reference.neighbour_attention(q, k, v, scale=0.3, **kwargs)
    c = reference.neighbour_attention(q, k, v, **kwargs)
    torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    assert not torch.allclose(b, c)


def test_empty_batch_returns_empty(rng):
    k = torch.randn(0, 2, 10, 8)
    out = nk.neighbour_attention(None, k, k, grid=(3, 3), backend="torch")
    assert out.shape == k.shape


# ------------------------------------------------------------------------------------------------ the bias
@pytest.mark.parametrize("grid,prefix", [((3, 4), 1), ((5, 5), 0), ((2, 7), 4), ((1, 1), 1), ((6, 3), 1)],
                         ids=["3x4-P1", "5x5-P0", "2x7-P4", "1x1-P1", "6x3-P1"])
@pytest.mark.parametrize("sigma", [5.0, 1.3], ids=["sigma5", "sigma1.3"])
def test_closed_form_bias_equals_naclip_convolution(grid, prefix, sigma):
    """SPEC.md section 1: NACLIP's window-convolution construction equals the closed form."""
    closed = reference.gaussian_bias(grid, sigma, prefix, dtype=torch.float64)
    conv = reference.naclip_gaussian_bias(grid, sigma, prefix, dtype=torch.float64)
    torch.testing.assert_close(closed, conv, atol=1e-12, rtol=0)
    n = prefix + grid[0] * grid[1]
    assert closed.shape == (n, n)
    assert torch.all(closed[:prefix] == 0) and torch.all(closed[:, :prefix] == 0)
    assert torch.all(torch.diagonal(closed)[prefix:] == 1)
    patch = closed[prefix:, prefix:]
    assert torch.all(patch > 0) and torch.all(patch <= 1), "omega is in (0, 1] and never sparse"


def test_bias_value_at_known_offset():
    bias = reference.gaussian_bias((4, 5), 2.0, 1, dtype=torch.float64)
    t = 1 + 0 * 5 + 0        # patch (0, 0)
    u = 1 + 3 * 5 + 4        # patch (3, 4): distance^2 = 9 + 16 = 25
    assert bias[t, u].item() == pytest.approx(torch.exp(torch.tensor(-25 / 8.0, dtype=torch.float64)).item())


def test_torch_bias_rows_match_dense_bias():
    grid, prefix, sigma = (5, 4), 3, 2.5
    rows = attention_op._BiasRows(*grid, sigma, prefix, "cpu", torch.float64)
    dense = reference.gaussian_bias(grid, sigma, prefix, dtype=torch.float64)
    n = prefix + 20
    for m0, m1 in [(0, n), (0, 2), (2, 9), (7, n)]:
        torch.testing.assert_close(rows(m0, m1), dense[m0:m1], atol=1e-15, rtol=0)


# ------------------------------------------------------------------------------------------------ memory
class _LargestAllocation(TorchDispatchMode):
    """Records the largest tensor any aten op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("sigma", [5.0, None], ids=["bias", "no-bias"])
def test_torch_path_never_forms_n_by_n(rng, monkeypatch, sigma):
    """Extra memory is O(M * N) for an [M, N] bias slice, not O(N^2) or O(B*H*N^2): no op output reaches one
    head's N x N scores. (This also catches SDPA silently falling back to its materialising math path.)"""
    budget = 1 << 16
    monkeypatch.setattr(attention_op, "_BIAS_SLICE_ELEMENTS", budget)
    grid, prefix = (24, 24), 1
    n = prefix + grid[0] * grid[1]
    q, k, v = make_qkv((1, 4, n, 8), torch.float32, rng)
    probe = _LargestAllocation()
    with probe:
        nk.neighbour_attention(q, k, v, grid=grid, sigma=sigma, similarity="csa", backend="torch")
    largest_input = q.numel()
    assert probe.largest <= max(budget, largest_input), (probe.largest, n * n)
    assert probe.largest < n * n


# ------------------------------------------------------------------------------------------------ property
@settings(max_examples=40, deadline=None)
@given(
    h=st.integers(1, 7), w=st.integers(1, 7), prefix=st.integers(0, 4), head_dim=st.sampled_from([1, 4, 16, 33]),
    heads=st.integers(1, 3), batch=st.integers(1, 2), similarity=st.sampled_from(SIMILARITIES),
    sigma=st.one_of(st.none(), st.floats(0.05, 50.0)), seed=st.integers(0, 2**31 - 1),
)
def test_property_torch_path_matches_reference(h, w, prefix, head_dim, heads, batch, similarity, sigma, seed):
    generator = torch.Generator().manual_seed(seed)
    q, k, v = make_qkv((batch, heads, prefix + h * w, head_dim), torch.float32, generator)
    kwargs = dict(grid=(h, w), sigma=sigma, prefix_tokens=prefix, similarity=similarity)
    with poison_outputs():
        out = nk.neighbour_attention(q, k, v, backend="torch", **kwargs)
    assert_close_to_reference(out, float64_reference(q, k, v, **kwargs), "attention", "torch", torch.float32)


def test_torch_path_gradients_match_reference(rng):
    """The torch path is built from differentiable ops: its gradients equal the reference's (float64)."""
    q, k, v = (t.requires_grad_() for t in make_qkv((1, 2, 1 + 12, 8), torch.float64, rng))
    kwargs = dict(grid=(3, 4), sigma=2.0, prefix_tokens=1, similarity="csa")
    weights = torch.randn(1, 2, 13, 8, dtype=torch.float64, generator=rng)
    fast = torch.autograd.grad((nk.neighbour_attention(q, k, v, backend="torch", **kwargs) * weights).sum(), (q, k, v))
    slow = torch.autograd.grad((reference.neighbour_attention(q, k, v, **kwargs) * weights).sum(), (q, k, v))
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
