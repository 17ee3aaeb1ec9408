"""``torch.compile`` and ``torch.export`` see the ops as single opaque operators.

* ``torch.compile(fullgraph=True, dynamic=True)`` of the patched open_clip visual tower and of modules calling each
  op: one graph, no graph break, and no recompilation across three image sizes (``error_on_recompile``), with the
  eager features. These use the ``aot_eager`` backend, which runs the whole AOT pipeline (fake kernels, symbolic
  shapes, functionalisation) without inductor's C++ code generation; one test compiles with inductor for real.
* ``torch.export.export`` of ``nk.NeighbourAttention`` keeps ``naclip_kernels.neighbour_attention`` as one node.
"""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch._dynamo
import torch._dynamo.testing
from torch._dynamo.utils import counters

import naclip_kernels as nk
from tests.tolerances import tol

GRIDS = [(5, 6), (6, 7), (7, 5)]   # three sizes, none of them the tiny model's native 4 x 4


@contextlib.contextmanager
def strict_dynamo():
    """Fresh dynamo state; a recompilation raises instead of happening silently."""
    torch._dynamo.reset()
    counters.clear()
    with torch._dynamo.config.patch(error_on_recompile=True):
        yield
    torch._dynamo.reset()


def _op_calls(graph_module, op):
    return sum(1 for n in graph_module.graph.nodes if n.op == "call_function" and n.target in (op, op.default))


def _assert_one_graph(counter, op=None):
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    graphs = [g for g in counter.graphs if len(g.graph.nodes)]
    assert len(graphs) == 1
    if op is not None:
        assert _op_calls(graphs[0], op) >= 1, graphs[0].graph


def _run_sizes(compiled, eager, make_inputs, key):
    t = tol(*key)
    for size in GRIDS:
        args = make_inputs(size)
        with torch.no_grad():
            actual, expected = compiled(*args), eager(*args)
        torch.testing.assert_close(actual, expected, atol=t.atol, rtol=t.rtol,
                                   msg=lambda m: f"size {size}: {m} [tolerance: {t.reason}]")


@pytest.mark.filterwarnings("ignore:.*RANDOM weights")
def test_patched_visual_tower_compiles_once_for_every_image_size(rng):
    from naclip.model import dense_features, patch_naclip
    from tests.naclip_helpers import tiny_clip

    model = tiny_clip()
    patch_naclip(model, backend="torch")

    class Tower(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, images):
            return dense_features(self.model, images)[0]

    tower = Tower()
    with strict_dynamo():
        counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
        compiled = torch.compile(tower, backend=counter, fullgraph=True, dynamic=True)
        _run_sizes(compiled, tower, lambda g: (torch.randn(1, 3, 16 * g[0], 16 * g[1], generator=rng),),
                   ("compile", "aot_eager", torch.float32))
        _assert_one_graph(counter, torch.ops.naclip_kernels.neighbour_attention)


def test_modules_calling_each_op_compile_once(rng):
    mha = torch.nn.MultiheadAttention(32, 2, batch_first=True).eval()
    attention = nk.NeighbourAttention(mha, similarity="csa", backend="torch")
    refine = nk.PAMR(num_iter=2, dilations=(1, 2), backend="torch")

    class Head(torch.nn.Module):
        """Attention over a patch grid, proxy attention with the input tokens as the "VFM" features, and the
        result as a mask refined by PAMR at twice the grid size."""

        def forward(self, x, image, h: int, w: int):
            batch = x.shape[0]
            y = attention(x, (h, w))[:, 1:]
            y = nk.proxy_attention(x[:, 1:], y.reshape(batch, h * w, 2, 16).transpose(1, 2), backend="torch")
            mask = y.transpose(1, 2).reshape(batch, h * w, 32).transpose(1, 2).reshape(batch, 32, h, w)
            return refine(image, mask)

    def inputs(size):
        h, w = size
        return (torch.randn(2, 1 + h * w, 32, generator=rng), torch.rand(2, 3, 2 * h, 2 * w, generator=rng), h, w)

    head = Head()
    with strict_dynamo():
        counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
        compiled = torch.compile(head, backend=counter, fullgraph=True, dynamic=True)
        _run_sizes(compiled, head, inputs, ("compile", "aot_eager", torch.float32))
        _assert_one_graph(counter)
        graph = [g for g in counter.graphs if len(g.graph.nodes)][0]
        assert _op_calls(graph, torch.ops.naclip_kernels.neighbour_attention) == 1
        assert _op_calls(graph, torch.ops.naclip_kernels.pamr) == 1
        assert _op_calls(graph, torch.ops.naclip_kernels.proxy_attention) == 1


def test_compiled_op_with_gradients(rng):
    """aot_eager traces the joint forward/backward graph: the backward op is traced opaquely too."""
    def f(q, k, v):
        return nk.neighbour_attention(q, k, v, grid=(3, 4), similarity="qk", backend="torch").square().sum()

    q, k, v = (torch.randn(1, 2, 13, 8, generator=rng, requires_grad=True) for _ in range(3))
    with strict_dynamo():
        compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
        got = torch.autograd.grad(compiled(q, k, v), (q, k, v))
    want = torch.autograd.grad(f(q, k, v), (q, k, v))
    t = tol("compile", "aot_eager", torch.float32)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=t.atol, rtol=t.rtol)


def test_inductor_compiles_attention_and_pamr(rng):
    """One real inductor build (C++ on CPU, ~15 s on two cores): the ops run as extern calls inside it."""
    mha = torch.nn.MultiheadAttention(32, 2, batch_first=True).eval()
    attention = nk.NeighbourAttention(mha, backend="torch")

    def f(x, image, h: int, w: int):
        mask = torch.tanh(attention(x, (h, w))[:, 1:].transpose(1, 2).reshape(x.shape[0], 32, h, w))
        return nk.pamr(image, mask, num_iter=2, dilations=(1, 2), backend="torch")

    def inputs(size):
        h, w = size
        return (torch.randn(1, 1 + h * w, 32, generator=rng), torch.rand(1, 3, 2 * h, 2 * w, generator=rng), h, w)

    with strict_dynamo():
        compiled = torch.compile(f, backend="inductor", fullgraph=True, dynamic=True)
        _run_sizes(compiled, f, inputs, ("compile", "inductor", torch.float32))


def test_export_keeps_neighbour_attention_as_one_node(rng):
    mha = torch.nn.MultiheadAttention(32, 4, batch_first=True).eval()
    module = nk.NeighbourAttention(mha, similarity="kk", backend="torch").eval()
    x = torch.randn(2, 1 + 3 * 5, 32, generator=rng)
    exported = torch.export.export(module, (x, (3, 5)))
    op = torch.ops.naclip_kernels.neighbour_attention.default
    nodes = [n for n in exported.graph.nodes if n.op == "call_function" and n.target == op]
    assert len(nodes) == 1, exported.graph
    assert nodes[0].meta["val"].shape == (2, 4, 16, 8)      # from the fake kernel
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x, (3, 5)), module(x, (3, 5)))
