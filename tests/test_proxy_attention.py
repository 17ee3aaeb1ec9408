"""Proxy attention (SPEC.md section 7): the reference against a float64 loop written from the SPEC and against
ProxyCLIP's original maths; the torch path against the float64 reference; validation, dispatch, memory."""
from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import naclip_kernels as nk
from naclip_kernels import reference
from naclip_kernels._alloc import poison_outputs
from naclip_kernels.ops import proxy_attention as proxy_op
from tests.proxy_helpers import proxy_inputs
from tests.test_attention import _LargestAllocation  # records the largest tensor any aten op produces
from tests.tolerances import assert_close_to_reference, tol

DTYPE_IDS = {torch.float64: "fp64", torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def spec_loop(feats: torch.Tensor, v: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """SPEC.md section 7 as scalar float64 loops: normalise (a zero vector stays zero), S, the per-image mean of
    all M*M entries, A = gamma (S - beta mu), mask A < 0 except the diagonal, softmax, the same weights for every
    head."""
    batch, heads, n_tokens, head_dim = v.shape
    out = torch.zeros(batch, heads, n_tokens, head_dim, dtype=torch.float64)
    for b in range(batch):
        rows = feats[b].double().tolist()
        xh = []
        for row in rows:
            norm = math.sqrt(sum(c * c for c in row))
            xh.append([c / norm if norm > 0 else 0.0 for c in row])
        sim = [[sum(a * c for a, c in zip(xh[t], xh[u])) for u in range(n_tokens)] for t in range(n_tokens)]
        mu = sum(sum(r) for r in sim) / (n_tokens * n_tokens)
        for t in range(n_tokens):
            scores = [gamma * (sim[t][u] - beta * mu) for u in range(n_tokens)]
            kept = [u for u in range(n_tokens) if scores[u] >= 0 or u == t]
            top = max(scores[u] for u in kept)
            weights = {u: math.exp(scores[u] - top) for u in kept}
            total = sum(weights.values())
            for h in range(heads):
                for u, w in weights.items():
                    out[b, h, t] += (w / total) * v[b, h, u].double()
    return out


def float64_reference(feats, v, beta=1.2, gamma=3.0):
    return reference.proxy_attention(feats.double(), v.double(), beta, gamma)


# ---------------------------------------------------------------------------------------------------------------
# The reference
# ---------------------------------------------------------------------------------------------------------------
SPEC_CASES = [
    pytest.param(1, 1, 9, 4, 3, 1.2, 3.0, id="M9-defaults"),
    pytest.param(2, 3, 12, 5, 2, 1.2, 3.0, id="B2-H3-M12"),
    pytest.param(1, 2, 10, 3, 4, 0.0, 1.0, id="beta0"),
    pytest.param(1, 2, 11, 6, 3, -0.5, 7.0, id="beta-negative"),
    pytest.param(2, 1, 8, 2, 3, 3.0, 2.0, id="beta3-diagonal-only-rows"),
    pytest.param(1, 1, 1, 3, 2, 1.2, 3.0, id="M1"),
]


@pytest.mark.parametrize("batch,heads,n_tokens,channels,head_dim,beta,gamma", SPEC_CASES)
def test_reference_matches_spec_loop(rng, batch, heads, n_tokens, channels, head_dim, beta, gamma):
    feats, v = proxy_inputs(rng, batch, heads, n_tokens, channels, head_dim, torch.float64, beta=beta, regions=2)
    expected = spec_loop(feats, v, beta, gamma)
    actual = reference.proxy_attention(feats, v, beta, gamma)
    t = tol("proxy_attention", "reference", torch.float64)
    torch.testing.assert_close(actual, expected, atol=t.atol, rtol=t.rtol)


def test_reference_keeps_exact_zero_and_diagonal(rng):
    """Orthogonal one-hot features with beta = 0: every off-diagonal A is exactly 0 (kept), the diagonal is gamma,
    so row t's weights are e^gamma on t and 1 elsewhere. With beta = 2 (mu = 1/M) every off-diagonal A is < 0 and
    only the diagonal survives: out = v."""
    n_tokens, gamma = 6, 2.0
    feats = torch.eye(n_tokens, dtype=torch.float64)[None] * 3.0
    v = torch.randn(1, 2, n_tokens, 4, generator=rng, dtype=torch.float64)
    weights = 1 + torch.eye(n_tokens, dtype=torch.float64) * (math.exp(gamma) - 1)
    weights = weights / weights.sum(-1, keepdim=True)
    for backend in ("reference", "torch"):
        out = nk.proxy_attention(feats, v, beta=0.0, gamma=gamma, backend=backend)
        torch.testing.assert_close(out, weights @ v, atol=1e-12, rtol=1e-12, msg=backend)
        diagonal_only = nk.proxy_attention(feats, v, beta=2.0, gamma=gamma, backend=backend)
        torch.testing.assert_close(diagonal_only, v, atol=1e-12, rtol=1e-12, msg=backend)


@pytest.mark.parametrize("n_tokens,channels,heads,beta", [(16, 8, 3, 1.2), (40, 32, 2, 1.2), (25, 3, 4, 0.5)],
                         ids=["M16-C8", "M40-C32", "M25-C3-beta0.5"])
def test_reference_reproduces_original_nan_free(rng, n_tokens, channels, heads, beta):
    """Batch size 1 (the original's sliding inference): ProxyCLIP's own maths (einsum, mask, repeat over heads,
    softmax, bmm) and the reference agree to float64 rounding wherever the original has no NaN row."""
    feats, v = proxy_inputs(rng, 1, heads, n_tokens, channels, 16, torch.float64, beta=beta, regions=3)
    original = reference.proxyclip_original_attention(feats, v, beta, 3.0)
    assert torch.isfinite(original).all(), "test case must be NaN-free for the original"
    t = tol("proxy_attention", "original", torch.float64)
    torch.testing.assert_close(reference.proxy_attention(feats, v, beta, 3.0), original, atol=t.atol, rtol=t.rtol)


def test_original_nan_rows_are_exactly_the_diagonal_rule(rng):
    """Rows whose every entry is masked come out NaN in the original and v_t here; all other rows agree.

    With unit-norm features ``S_tt = 1`` is each row's maximum, so a row is empty only if ``beta * mu > 1`` (then
    every row is) or if its token's feature vector is zero (``S_tt = 0``, as ``F.normalize`` leaves it)."""
    feats, v = proxy_inputs(rng, 1, 2, 13, 8, 4, torch.float64, regions=2)
    feats[0, 5] = 0
    original = reference.proxyclip_original_attention(feats, v)
    ours = reference.proxy_attention(feats, v)
    nan_rows = torch.isnan(original).any(dim=-1)[0, 0]
    assert nan_rows.tolist() == [t == 5 for t in range(13)]
    torch.testing.assert_close(ours[..., 5, :], v[..., 5, :], atol=0, rtol=0)
    keep = ~nan_rows
    t = tol("proxy_attention", "original", torch.float64)
    torch.testing.assert_close(ours[..., keep, :], original[..., keep, :], atol=t.atol, rtol=t.rtol)
    # Identical features (S = 1 everywhere, mu = 1) with beta > 1: every row is empty.
    same = feats[:, :1].expand(-1, 13, -1)
    assert torch.isnan(reference.proxyclip_original_attention(same, v, beta=1.2)).all()
    torch.testing.assert_close(reference.proxy_attention(same, v, beta=1.2), v, atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# The torch path against the float64 reference
# ---------------------------------------------------------------------------------------------------------------
TORCH_CASES = [
    pytest.param(1, 12, 49, 64, 64, 1.2, 3.0, id="7x7-H12-D64"),
    pytest.param(2, 3, 37, 24, 16, 1.2, 3.0, id="B2-ragged-M37"),
    pytest.param(1, 2, 130, 100, 32, 1.2, 3.0, id="M130-C100"),
    pytest.param(1, 1, 1, 8, 4, 1.2, 3.0, id="M1"),
    pytest.param(1, 2, 20, 1, 8, 1.2, 3.0, id="C1"),
    pytest.param(1, 2, 30, 16, 8, -1.0, 3.0, id="beta-negative-nothing-masked"),
    pytest.param(1, 2, 30, 16, 8, 4.0, 3.0, id="beta4-mostly-masked"),
    pytest.param(1, 2, 30, 16, 8, 1.2, 150.0, id="gamma150-shifted-exp"),
    pytest.param(1, 4, 24, 1280, 256, 1.2, 3.0, id="C1280-HD1024"),
]


@pytest.mark.parametrize("batch,heads,n_tokens,channels,head_dim,beta,gamma", TORCH_CASES)
def test_torch_path_matches_float64_reference(rng, batch, heads, n_tokens, channels, head_dim, beta, gamma):
    feats, v = proxy_inputs(rng, batch, heads, n_tokens, channels, head_dim, torch.float32, beta=beta, regions=3)
    with poison_outputs():
        out = nk.proxy_attention(feats, v, beta=beta, gamma=gamma, backend="torch")
    assert_close_to_reference(out, float64_reference(feats, v, beta, gamma), "proxy_attention", "torch",
                              torch.float32)
    assert out.is_contiguous()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_torch_path_dtypes_and_layouts(rng, dtype, layout):
    feats, v = proxy_inputs(rng, 2, 3, 42, 48, 16, dtype, layout=layout, regions=4)
    with poison_outputs():
        out = nk.proxy_attention(feats, v, backend="torch")
    assert_close_to_reference(out, float64_reference(feats, v), "proxy_attention", "torch", dtype)


@pytest.mark.parametrize("tile", [3, 5, 16], ids=["T3", "T5", "T16"])
def test_torch_path_many_tiles(rng, monkeypatch, tile):
    """Tiles of 3, 5 and 16 rows over M = 32 (ragged last tiles, mirrored off-diagonal tiles), 3 images."""
    monkeypatch.setattr(proxy_op, "_tile_rows", lambda n, device: tile)
    feats, v = proxy_inputs(rng, 3, 2, 32, 16, 8, torch.float32, regions=3)
    with poison_outputs():
        out = nk.proxy_attention(feats, v, backend="torch")
    assert_close_to_reference(out, float64_reference(feats, v), "proxy_attention", "torch", torch.float32)


class _CountAddmm(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += "addmm" in str(func)
        return func(*args, **(kwargs or {}))


def test_torch_path_skips_fully_masked_tiles(rng, monkeypatch):
    """Four regions of 8 tokens with orthogonal centres, tiles of 8: every off-diagonal tile is fully masked, so it
    costs its similarity product only (4 diagonal tiles x 2 products + 6 off-diagonal x 1 = 14, not 26), and the
    result is unchanged."""
    monkeypatch.setattr(proxy_op, "_tile_rows", lambda n, device: 8)
    centres = torch.eye(4, 16) * 3
    feats = (centres.repeat_interleave(8, 0) + 0.05 * torch.randn(32, 16, generator=rng))[None]
    v = torch.randn(1, 2, 32, 8, generator=rng)
    probe = _CountAddmm()
    with poison_outputs(), probe:  # the path itself: the registered op is one opaque call to a dispatch mode
        out = proxy_op._proxy_attention_torch(feats, v, 1.2, 3.0)
    assert probe.calls == 14
    assert_close_to_reference(out, float64_reference(feats, v), "proxy_attention", "torch", torch.float32)


@pytest.mark.parametrize("n_tokens,rows", [(32, 32), (100, 100), (1000, 500), (1764, 588), (4096, 683)])
def test_tile_rows_are_equal_and_cover(n_tokens, rows):
    got = proxy_op._tile_rows(n_tokens, torch.device("cpu"))
    assert got == rows
    tiles = -(-n_tokens // got)
    assert tiles * got - n_tokens < tiles  # equal tiles: the last one is short by less than one row per tile


def test_zero_feature_vectors_and_huge_gamma(rng):
    """A zero feature vector stays zero after normalisation (S = 0 in its row and column). With gamma = 1000 its
    row's weights underflow in the fast path (exp(-1000)), and those rows are redone by the literal maths."""
    feats, v = proxy_inputs(rng, 1, 2, 20, 8, 4, torch.float32, regions=2)
    feats[0, 3] = 0
    feats[0, 11] = 0
    for gamma in (3.0, 1000.0):
        for beta in (1.2, -1.0):  # a zero row is masked except its diagonal (beta mu > 0) or fully kept
            with poison_outputs():
                out = nk.proxy_attention(feats, v, beta=beta, gamma=gamma, backend="torch")
            assert_close_to_reference(out, float64_reference(feats, v, beta, gamma), "proxy_attention", "torch",
                                      torch.float32, msg=f"gamma={gamma} beta={beta}")


# ---------------------------------------------------------------------------------------------------------------
# Memory: never an M x M tensor
# ---------------------------------------------------------------------------------------------------------------
def test_torch_path_never_forms_m_by_m(rng, monkeypatch):
    monkeypatch.setattr(proxy_op, "_TILE_ELEMENTS", 1 << 14)
    n_tokens = 900
    feats, v = proxy_inputs(rng, 1, 2, n_tokens, 8, 4, torch.float32, margin=0.0)
    probe = _LargestAllocation()
    with probe:  # the path itself: the registered op is one opaque call to a dispatch mode
        proxy_op._proxy_attention_torch(feats, v, 1.2, 3.0)
    assert probe.largest <= max(1 << 14, v.numel() * 2), probe.largest
    assert probe.largest < n_tokens * n_tokens // 8


# ---------------------------------------------------------------------------------------------------------------
# Dispatch and validation
# ---------------------------------------------------------------------------------------------------------------
def test_reference_backend_and_auto(rng):
    feats, v = proxy_inputs(rng, 1, 2, 10, 4, 4, torch.float32)
    torch.testing.assert_close(nk.proxy_attention(feats, v, backend="reference"),
                               reference.proxy_attention(feats, v), atol=0, rtol=0)
    torch.testing.assert_close(nk.proxy_attention(feats, v), nk.proxy_attention(feats, v, backend="torch"),
                               atol=0, rtol=0)  # auto on CPU is the torch path


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_empty_inputs(backend):
    for feats, v in [(torch.randn(0, 5, 4), torch.randn(0, 2, 5, 3)), (torch.randn(2, 0, 4), torch.randn(2, 2, 0, 3)),
                     (torch.randn(1, 5, 4), torch.randn(1, 0, 5, 3))]:
        out = nk.proxy_attention(feats, v, backend=backend)
        assert out.shape == v.shape and out.dtype == v.dtype


def _bad(name):
    feats, v = torch.randn(1, 6, 4), torch.randn(1, 2, 6, 3)
    return {
        "feats-not-tensor": ((feats.tolist(), v), {}, TypeError, r"feats must be a torch.Tensor of shape \[B, M, C\]"),
        "feats-int": ((feats.long(), v), {}, TypeError, r"feats must be a floating tensor"),
        "feats-2d": ((feats[0], v), {}, ValueError, r"feats must be 3-D \[B, M, C\]"),
        "v-3d": ((feats, v[0]), {}, ValueError, r"v must be 4-D \[B, H, M, D\]"),
        "dtype-mismatch": ((feats, v.double()), {}, TypeError, r"v has dtype torch.float64 but feats has"),
        "M-mismatch": ((feats, v[:, :, :5]), {}, ValueError, r"v must be \[B, H, M, D\] with B=1 and M=6"),
        "B-mismatch": ((feats, v.expand(2, -1, -1, -1)), {}, ValueError, r"v must be .* with B=1 and M=6"),
        "C-too-large": ((torch.randn(1, 6, 1281), v), {}, ValueError, r"feats' channel dim C .* \[1, 1280\], got 1281"),
        "C-zero": ((torch.randn(1, 6, 0), v), {}, ValueError, r"feats' channel dim C .* got 0"),
        "beta-str": ((feats, v), {"beta": "1.2"}, TypeError, r"beta must be a number"),
        "beta-nan": ((feats, v), {"beta": float("nan")}, ValueError, r"beta must be a finite number"),
        "gamma-zero": ((feats, v), {"gamma": 0.0}, ValueError, r"gamma must be a finite number > 0"),
        "gamma-none": ((feats, v), {"gamma": None}, TypeError, r"gamma must be a positive number"),
        "backend": ((feats, v), {"backend": "cuda"}, ValueError, r"backend must be one of"),
    }[name]


@pytest.mark.parametrize("case", ["feats-not-tensor", "feats-int", "feats-2d", "v-3d", "dtype-mismatch",
                                  "M-mismatch", "B-mismatch", "C-too-large", "C-zero", "beta-str", "beta-nan",
                                  "gamma-zero", "gamma-none", "backend"])
def test_bad_input_raises_naming_the_argument(case):
    args, kwargs, error, pattern = _bad(case)
    with pytest.raises(error, match=r"^proxy_attention: " + pattern):
        nk.proxy_attention(*args, **kwargs)
    if "backend" not in kwargs:
        with pytest.raises(error, match=r"^reference.proxy_attention: " + pattern):
            reference.proxy_attention(*args, **kwargs)
