"""The ops as PyTorch operators: ``torch.library`` registration, schemas, fake kernels and ``opcheck``.

``torch.library.opcheck`` runs the op for real and checks its schema (no input mutated or aliased), its fake
kernel against the real output (shape, dtype, strides), its autograd registration, and an AOT-dispatch trace with
dynamic shapes. It is run on every registered op (forward and backward) on CPU, across dtypes, ragged sizes
(odd grids, head dims that are not powers of two) and non-contiguous inputs.
"""
from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.library import opcheck

import naclip_kernels as nk
from naclip_kernels._library import NAMESPACE, _backward_schema
from tests.conftest import requires_triton_interpreter

OPS = ("neighbour_attention", "pamr", "proxy_attention")


def _strided(shape, dtype, rng, layout):
    """A random tensor of ``shape``: contiguous, or a non-contiguous view with the same values' distribution."""
    if layout == "contiguous":
        return torch.randn(shape, generator=rng).to(dtype)
    if layout == "transposed":          # [B, N, H, D] memory seen as [B, H, N, D], as nn.MultiheadAttention gives
        b, h, n, d = shape
        return torch.randn(b, n, h, d, generator=rng).to(dtype).transpose(1, 2)
    # "sliced": every other element of the last dim
    return torch.randn(*shape[:-1], 2 * shape[-1], generator=rng).to(dtype)[..., ::2]


def attention_args(rng, dtype, layout, similarity, grid=(5, 3), prefix=1, batch=2, heads=3, head_dim=12,
                   sigma=2.0):
    n = prefix + grid[0] * grid[1]
    q, k, v = (_strided((batch, heads, n, head_dim), dtype, rng, layout).requires_grad_() for _ in range(3))
    if similarity == "kk":
        q = None
    return (q, k, v, grid[0], grid[1], sigma, prefix, similarity, head_dim ** -0.5, "torch")


def pamr_args(rng, dtype, layout, mask_size=(5, 7), image_size=(9, 11), dilations=(1, 3)):
    image = torch.rand(2, 3, *image_size, generator=rng).to(dtype)
    if layout == "transposed":
        mask = torch.randn(2, *mask_size[::-1], 4, generator=rng).to(dtype).permute(0, 3, 2, 1)  # channels-last
    else:
        mask = _strided((2, 4, *mask_size), dtype, rng, layout)
    return (image.requires_grad_(), mask.requires_grad_(), 2, list(dilations), "torch")


def _cases(*layouts):
    """One case per dtype (float64, float32, float16, bfloat16), each with the next layout of ``layouts``."""
    dtypes = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
    return [pytest.param(dt, layout, id=f"{str(dt)[6:]}-{layout}") for dt, layout in zip(dtypes, layouts)]


def _opcheck_backward(name, grad, args):
    """opcheck of ``naclip_kernels::<name>_backward`` at the forward arguments ``args`` (detached)."""
    plain = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    opcheck(getattr(torch.ops.naclip_kernels, f"{name}_backward").default, (grad, *plain))


def test_ops_are_registered_in_the_namespace():
    for name in OPS:
        packet = getattr(getattr(torch.ops, NAMESPACE), name)
        assert str(packet.default).startswith(f"{NAMESPACE}.{name}")
        backward = getattr(getattr(torch.ops, NAMESPACE), f"{name}_backward")
        assert "Tensor[]" in str(backward.default._schema)
    schema = str(torch.ops.naclip_kernels.neighbour_attention.default._schema)
    for fragment in ("Tensor? q", "SymInt h", "SymInt w", "float? sigma", "str similarity", "float scale",
                     "str backend"):
        assert fragment in schema, schema
    schema = str(torch.ops.naclip_kernels.pamr.default._schema)
    assert "int[] dilations" in schema and "int num_iter" in schema, schema


def test_backward_schema_is_derived_from_the_forward():
    assert _backward_schema("(Tensor x, int n) -> Tensor") == "(Tensor grad_out, Tensor x, int n) -> Tensor[]"
    with pytest.raises(ValueError, match="must be"):
        _backward_schema("(Tensor x) -> (Tensor, Tensor)")


# Each dtype once, each with another layout and similarity: every dtype, layout and similarity is covered without
# the full product (opcheck's AOT trace costs ~0.3 s per case on two cores).
ATTENTION_CASES = [
    pytest.param(torch.float64, "transposed", "kk", id="float64-transposed-kk"),
    pytest.param(torch.float32, "sliced", "csa", id="float32-sliced-csa"),
    pytest.param(torch.float16, "contiguous", "qk", id="float16-contiguous-qk"),
    pytest.param(torch.bfloat16, "transposed", "qq", id="bfloat16-transposed-qq"),
]


@pytest.mark.parametrize("dtype,layout,similarity", ATTENTION_CASES)
def test_opcheck_neighbour_attention(rng, dtype, layout, similarity):
    args = attention_args(rng, dtype, layout, similarity)
    opcheck(torch.ops.naclip_kernels.neighbour_attention.default, args)


@pytest.mark.parametrize("case", [
    pytest.param(dict(similarity="qk", sigma=None), id="qk-no-bias"),
    pytest.param(dict(similarity="qq", prefix=0, grid=(1, 7)), id="qq-no-prefix-one-row"),
    pytest.param(dict(similarity="kk", batch=1, heads=1, head_dim=3), id="kk-tiny-head"),
])
def test_opcheck_neighbour_attention_variants(rng, case):
    similarity = case.pop("similarity")
    opcheck(torch.ops.naclip_kernels.neighbour_attention.default,
            attention_args(rng, torch.float32, "contiguous", similarity, **case))


def test_opcheck_neighbour_attention_backward(rng):
    args = attention_args(rng, torch.float64, "transposed", "qk")
    _opcheck_backward("neighbour_attention", torch.randn(args[2].shape, generator=rng, dtype=torch.float64), args)


PAMR_CASES = _cases("sliced", "transposed", "contiguous", "sliced")       # "transposed": a channels-last mask


@pytest.mark.parametrize("dtype,layout", PAMR_CASES)
def test_opcheck_pamr(rng, dtype, layout):
    opcheck(torch.ops.naclip_kernels.pamr.default, pamr_args(rng, dtype, layout))


def test_opcheck_pamr_same_size_mask_and_backward(rng):
    args = pamr_args(rng, torch.float32, "contiguous", mask_size=(6, 4), image_size=(6, 4), dilations=(2,))
    opcheck(torch.ops.naclip_kernels.pamr.default, args)
    _opcheck_backward("pamr", torch.randn(2, 4, 6, 4, generator=rng), args)


PROXY_CASES = _cases("contiguous", "transposed", "sliced", "contiguous")


@pytest.mark.parametrize("dtype,layout", PROXY_CASES)
def test_opcheck_proxy_attention(rng, dtype, layout):
    n_tokens = 3 * 5                                              # a ragged M
    feats = _strided((2, 1, n_tokens, 12), dtype, rng, "sliced" if layout == "sliced" else "contiguous")[:, 0]
    v = _strided((2, 3, n_tokens, 6), dtype, rng, layout)
    opcheck(torch.ops.naclip_kernels.proxy_attention.default,
            (feats.requires_grad_(), v.requires_grad_(), 1.2, 3.0, "torch"))


def test_opcheck_proxy_attention_backward(rng):
    feats = torch.randn(1, 10, 8, generator=rng, dtype=torch.float64)
    v = torch.randn(1, 2, 10, 4, generator=rng, dtype=torch.float64)
    _opcheck_backward("proxy_attention", torch.randn(1, 2, 10, 4, generator=rng, dtype=torch.float64),
                      (feats, v, 0.8, 2.0, "torch"))


@requires_triton_interpreter
def test_opcheck_triton_backend(rng):
    """The Triton launchers behind the same ops (under the interpreter): outputs conform to the fake kernels."""
    q, k, v = (torch.randn(1, 7, 2, 16, generator=rng).transpose(1, 2).requires_grad_() for _ in range(3))
    opcheck(torch.ops.naclip_kernels.neighbour_attention.default, (q, k, v, 2, 3, 2.0, 1, "csa", 0.25, "triton"))
    image = torch.rand(1, 3, 6, 5, generator=rng, requires_grad=True)
    mask = torch.randn(1, 2, 3, 4, generator=rng, requires_grad=True)
    opcheck(torch.ops.naclip_kernels.pamr.default, (image, mask, 2, [1, 2], "triton"))
    feats = torch.randn(1, 10, 8, generator=rng, requires_grad=True)
    opcheck(torch.ops.naclip_kernels.proxy_attention.default,
            (feats, torch.randn(1, 2, 10, 4, generator=rng, requires_grad=True), 1.2, 3.0, "triton"))


def test_fake_kernels_give_shapes_without_running():
    """Inputs far too large to compute on this machine: only the fake kernels can answer, and they do."""
    with FakeTensorMode():
        k = torch.empty(64, 16, 1 + 128 * 128, 64, dtype=torch.float16)
        out = nk.neighbour_attention(None, k, torch.empty_like(k), grid=(128, 128), backend="torch")
        assert out.shape == k.shape and out.dtype == torch.float16 and out.is_contiguous()
        image = torch.empty(32, 3, 2048, 2048)
        mask = torch.empty(32, 171, 64, 64, dtype=torch.bfloat16)
        refined = nk.pamr(image, mask, backend="torch")
        assert refined.shape == (32, 171, 2048, 2048) and refined.dtype == torch.bfloat16
        feats = torch.empty(64, 4096, 768, dtype=torch.float16)
        out = nk.proxy_attention(feats, torch.empty(64, 12, 4096, 64, dtype=torch.float16), backend="torch")
        assert out.shape == (64, 12, 4096, 64) and out.dtype == torch.float16


def test_meta_tensors_use_the_fake_kernels():
    k = torch.empty(2, 2, 1 + 6 * 6, 16, device="meta")
    out = nk.neighbour_attention(k, k, k, grid=(6, 6), similarity="qk")
    assert out.device.type == "meta" and out.shape == k.shape
    out = nk.pamr(torch.empty(1, 3, 20, 30, device="meta"), torch.empty(1, 5, 4, 6, device="meta"))
    assert out.device.type == "meta" and out.shape == (1, 5, 20, 30)


def test_autotuner_caches_its_results_across_processes():
    """Triton 3.8 takes ``cache_results``; the attention autotuner is built with it (checked without the
    interpreter, where Triton switches caching off by design)."""
    import inspect

    import triton

    from naclip_kernels._triton_compat import AUTOTUNE_CACHE_KWARGS
    from tests.conftest import run_python

    supported = "cache_results" in inspect.signature(triton.autotune).parameters
    assert AUTOTUNE_CACHE_KWARGS == ({"cache_results": True} if supported else {})
    proc = run_python("from naclip_kernels.ops import neighbour_attention as m\n"
                      "print(m._neighbour_attention_fwd_tuned.cache_results)")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(supported)
