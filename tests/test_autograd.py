"""Gradients through every public entry point: functional, nn.Module and the patched open_clip model.

The registered autograd formula recomputes the forward through each op's differentiable torch path (see
``naclip_kernels/_library.py``), whatever backend ran forward. Checked here: ``gradcheck`` in float64 on the torch
paths, gradients equal to those of the eager reference (float64, tolerances in tests/tolerances.py), float32
gradients against the float64 reference, and the Triton backend's gradients (interpreter) equal to the torch
backend's bit for bit, since both run the same backward.
"""
from __future__ import annotations

import pytest
import torch

import naclip_kernels as nk
from tests.conftest import requires_triton_interpreter
from tests.tolerances import tol

GRID = (3, 4)


def _qkv(rng, dtype=torch.float64, n=1 + 12, d=8, layout="transposed"):
    """q, k, v ``[2, 2, n, d]`` leaves (transposed views of ``[B, N, H, D]`` memory, as attention modules give)."""
    return [torch.randn(2, n, 2, d, generator=rng, dtype=torch.float64).to(dtype).transpose(1, 2)
            .detach().requires_grad_() for _ in range(3)]


def _grads(out, inputs, weight):
    present = [t for t in inputs if t is not None]
    return torch.autograd.grad((out * weight).sum(), present, allow_unused=True)


def _assert_grads_close(actual, expected, key, what):
    t = tol(*key)
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a is not None and e is not None, f"{what}: input {i} got no gradient"
        torch.testing.assert_close(a.double(), e.double(), atol=t.atol, rtol=t.rtol,
                                   msg=lambda m: f"{what}, input {i}: {m} [tolerance: {t.reason}]")


@pytest.mark.parametrize("similarity,sigma", [
    pytest.param("qk", 5.0, id="qk"), pytest.param("kk", 2.0, id="kk"), pytest.param("qq", None, id="qq-no-bias"),
    pytest.param("csa", 1.5, id="csa"),
])
def test_attention_gradcheck_float64(rng, similarity, sigma):
    q, k, v = _qkv(rng, n=1 + 6, d=4)
    q_arg = None if similarity == "kk" else q

    def f(*tensors):
        a, b, c = tensors if len(tensors) == 3 else (None, *tensors)
        return nk.neighbour_attention(a, b, c, grid=(2, 3), sigma=sigma, similarity=similarity, backend="torch")

    inputs = (k, v) if q_arg is None else (q, k, v)
    assert torch.autograd.gradcheck(f, inputs, fast_mode=True)


@pytest.mark.parametrize("dtype", [pytest.param(torch.float64, id="float64"),
                                   pytest.param(torch.float32, id="float32")])
@pytest.mark.parametrize("similarity", ["qk", "kk", "csa"])
def test_attention_gradients_equal_the_references(rng, dtype, similarity):
    q, k, v = _qkv(rng, dtype)
    q_arg = None if similarity == "kk" else q
    weight = torch.randn(q.shape, generator=rng, dtype=torch.float64)
    out = nk.neighbour_attention(q_arg, k, v, grid=GRID, sigma=3.0, similarity=similarity, backend="torch")
    grads = _grads(out, (q_arg, k, v), weight.to(dtype))
    ref_inputs = [None if t is None else t.detach().double().requires_grad_() for t in (q_arg, k, v)]
    ref = nk.reference.neighbour_attention(*ref_inputs, grid=GRID, sigma=3.0, similarity=similarity)
    expected = _grads(ref, ref_inputs, weight)
    _assert_grads_close(grads, expected, ("attention_grad", "torch", dtype), f"{similarity}/{dtype}")
    for g, t in zip(grads, [t for t in (q_arg, k, v) if t is not None]):
        assert g.dtype == t.dtype and g.shape == t.shape


def test_unused_q_gets_a_zero_gradient(rng):
    q, k, v = _qkv(rng)
    out = nk.neighbour_attention(q, k, v, grid=GRID, similarity="kk", backend="torch")
    gq, gk = torch.autograd.grad(out.sum(), (q, k), allow_unused=True)
    assert gq is None or torch.count_nonzero(gq) == 0
    assert torch.count_nonzero(gk) > 0


def test_only_the_inputs_that_need_it_get_gradients(rng):
    q, k, v = _qkv(rng)
    k = k.detach()
    out = nk.neighbour_attention(q, k, v, grid=GRID, similarity="qk", backend="torch")
    out.sum().backward()
    assert q.grad is not None and v.grad is not None and k.grad is None


def test_neighbour_attention_module_gradients(rng):
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(16, 2, batch_first=True).double()
    x = torch.randn(2, 1 + 12, 16, generator=rng, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(2, 1 + 12, 16, generator=rng, dtype=torch.float64)
    params = [x, mha.in_proj_weight, mha.out_proj.weight]
    out = nk.NeighbourAttention(mha, similarity="csa", backend="torch")(x, GRID)
    grads = _grads(out, params, weight)
    ref = nk.NeighbourAttention(mha, similarity="csa", backend="reference")(x, GRID)
    _assert_grads_close(grads, _grads(ref, params, weight), ("attention_grad", "torch", torch.float64), "module")


@pytest.mark.parametrize("num_iter,dilations,mask_size", [
    pytest.param(2, (1, 2), (3, 4), id="resized-mask"), pytest.param(3, (2,), (5, 6), id="same-size-mask"),
])
def test_pamr_gradcheck_float64(rng, num_iter, dilations, mask_size):
    image = torch.rand(1, 2, 5, 6, generator=rng, dtype=torch.float64, requires_grad=True)
    mask = torch.randn(1, 2, *mask_size, generator=rng, dtype=torch.float64, requires_grad=True)
    # fast_mode: Jacobian-vector products along random directions instead of the full Jacobian (one backward).
    assert torch.autograd.gradcheck(
        lambda img, m: nk.pamr(img, m, num_iter=num_iter, dilations=dilations, backend="torch"), (image, mask),
        fast_mode=True)


@pytest.mark.parametrize("dtype", [pytest.param(torch.float64, id="float64"),
                                   pytest.param(torch.float32, id="float32")])
def test_pamr_gradients_equal_the_reference(rng, dtype):
    image = torch.rand(2, 3, 12, 10, generator=rng, dtype=torch.float64)
    mask = torch.randn(2, 4, 6, 5, generator=rng, dtype=torch.float64)
    weight = torch.randn(2, 4, 12, 10, generator=rng, dtype=torch.float64)
    inputs = [image.to(dtype).requires_grad_(), mask.to(dtype).requires_grad_()]
    out = nk.PAMR(num_iter=3, dilations=(1, 3), backend="torch")(*inputs)
    grads = _grads(out, inputs, weight.to(dtype))
    ref_inputs = [image.clone().requires_grad_(), mask.clone().requires_grad_()]
    expected = _grads(nk.reference.pamr(*ref_inputs, num_iter=3, dilations=(1, 3)), ref_inputs, weight)
    _assert_grads_close(grads, expected, ("pamr_grad", "torch", dtype), f"pamr/{dtype}")


def test_mask_only_gradient_through_the_functional(rng):
    image = torch.rand(1, 3, 8, 8, generator=rng)
    mask = torch.randn(1, 3, 8, 8, generator=rng, requires_grad=True)
    nk.pamr(image, mask, num_iter=2, dilations=(1,), backend="torch").sum().backward()
    # Every row of each sweep's propagation matrix sums to 1 (softmaxed affinities), so d sum(out) / d mask sums
    # to the number of output pixels per channel.
    assert mask.grad is not None and mask.grad.shape == mask.shape
    torch.testing.assert_close(mask.grad.sum(dim=(2, 3)), torch.full((1, 3), 64.0))


def test_proxy_attention_gradcheck_float64(rng):
    feats = torch.randn(2, 9, 6, generator=rng, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 2, 9, 3, generator=rng, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda f, x: nk.proxy_attention(f, x, beta=0.9, gamma=2.0, backend="torch"),
                                    (feats, v), fast_mode=True)


@pytest.mark.parametrize("dtype", [pytest.param(torch.float64, id="float64"),
                                   pytest.param(torch.float32, id="float32")])
def test_proxy_attention_gradients_equal_the_reference(rng, dtype):
    feats = torch.randn(2, 15, 8, generator=rng, dtype=torch.float64)
    v = torch.randn(2, 3, 15, 4, generator=rng, dtype=torch.float64)
    weight = torch.randn(2, 3, 15, 4, generator=rng, dtype=torch.float64)
    inputs = [feats.to(dtype).requires_grad_(), v.to(dtype).requires_grad_()]
    grads = _grads(nk.proxy_attention(*inputs, backend="torch"), inputs, weight.to(dtype))
    ref_inputs = [feats.clone().requires_grad_(), v.clone().requires_grad_()]
    expected = _grads(nk.reference.proxy_attention(*ref_inputs), ref_inputs, weight)
    _assert_grads_close(grads, expected, ("attention_grad", "torch", dtype), f"proxy/{dtype}")


@pytest.mark.filterwarnings("ignore:.*RANDOM weights")
def test_patched_model_gradients_match_the_reference_backend(rng):
    from naclip.model import dense_features, patch_naclip
    from tests.naclip_helpers import tiny_clip

    model = tiny_clip().double()
    handle = patch_naclip(model, backend="torch")
    images = torch.randn(1, 3, 48, 64, generator=rng, dtype=torch.float64)
    weight = torch.randn(1, 12, 32, generator=rng, dtype=torch.float64)
    proj = model.visual.transformer.resblocks[-1].attn.in_proj_weight
    results = {}
    for backend in ("torch", "reference"):
        handle.block.backend = backend
        x = images.clone().requires_grad_()
        feats, _ = dense_features(model, x)
        results[backend] = _grads(feats, (x, proj), weight)
    _assert_grads_close(results["torch"], results["reference"], ("attention_grad", "torch", torch.float64),
                        "patched model")


@requires_triton_interpreter
def test_triton_backend_runs_the_torch_backward(rng):
    """Forward on the Triton kernel, backward through the recompute: the gradients are the torch backend's."""
    q, k, v = _qkv(rng, torch.float32, d=16)
    weight = torch.randn(q.shape, generator=rng)
    grads = {}
    for backend in ("triton", "torch"):
        out = nk.neighbour_attention(q, k, v, grid=GRID, similarity="csa", backend=backend)
        grads[backend] = _grads(out, (q, k, v), weight)
    for a, b in zip(grads["triton"], grads["torch"]):
        assert torch.equal(a, b)
    image = torch.rand(1, 3, 9, 8, generator=rng)
    mask = torch.randn(1, 2, 9, 8, generator=rng, requires_grad=True)
    g_triton, = torch.autograd.grad(nk.pamr(image, mask, num_iter=2, dilations=(1,), backend="triton").sum(), mask)
    g_torch, = torch.autograd.grad(nk.pamr(image, mask, num_iter=2, dilations=(1,), backend="torch").sum(), mask)
    assert torch.equal(g_triton, g_torch)


SECOND_ORDER = {
    "neighbour_attention": (lambda a, b, c: nk.neighbour_attention(a, b, c, grid=(2, 3), sigma=2.0, similarity="qk",
                                                                   backend="torch"), [(1, 1, 7, 4)] * 3),
    "pamr": (lambda a, b: nk.pamr(a, b, num_iter=2, dilations=(1,), backend="torch"), [(1, 2, 4, 5), (1, 2, 4, 5)]),
    "proxy_attention": (lambda a, b: nk.proxy_attention(a, b, beta=0.5, gamma=2.0, backend="torch"),
                        [(1, 6, 4), (1, 2, 6, 3)]),
}


@pytest.mark.parametrize("name", list(SECOND_ORDER))
def test_second_order_gradients(rng, name):
    """``create_graph=True``: the formula differentiates the recompute itself, so gradients of gradients work."""
    fn, shapes = SECOND_ORDER[name]
    inputs = [torch.rand(s, generator=rng, dtype=torch.float64).requires_grad_() for s in shapes]
    assert torch.autograd.gradgradcheck(fn, inputs, fast_mode=True)
