"""The attention op's contract at its edges: argument validation, backend dispatch, the nn.Module, and imports."""
from __future__ import annotations


import pytest
import torch

import naclip_kernels as nk
from naclip_kernels._backend import resolve_backend
from naclip_kernels._triton_compat import HAS_TRITON, interpreter_enabled
from tests.conftest import run_python

GRID = (3, 4)
N = 1 + 12


def qkv(n=N, d=8, dtype=torch.float32):
    return [torch.randn(2, 2, n, d, dtype=dtype) for _ in range(3)]


# ------------------------------------------------------------------------------------------------ validation
def _call(**overrides):
    q, k, v = qkv()
    args = dict(q=q, k=k, v=v, grid=GRID, sigma=5.0, prefix_tokens=1, similarity="kk", scale=None, backend="torch")
    args.update(overrides)
    return nk.neighbour_attention(**args)


BAD_INPUTS = [
    pytest.param(dict(k=torch.randn(2, N, 8)), ValueError, "k must be 4-D", id="k-wrong-rank"),
    pytest.param(dict(q=torch.randn(2, 2, N, 8, 1)), ValueError, "q must be 4-D", id="q-wrong-rank"),
    pytest.param(dict(v=torch.randn(2, 2, N, 4)), ValueError, "v must have the shape of k", id="v-shape"),
    pytest.param(dict(q=torch.randn(2, 2, N, 4), similarity="qk"), ValueError, "q and k must have the same shape",
                 id="q-shape"),
    pytest.param(dict(grid=(4, 4)), ValueError, "N (dim 2 of q/k/v) must equal prefix_tokens + h*w", id="N-vs-grid"),
    pytest.param(dict(prefix_tokens=0), ValueError, "must equal prefix_tokens + h*w", id="N-vs-prefix"),
    pytest.param(dict(grid=(3,)), TypeError, "grid must be a pair", id="grid-not-pair"),
    pytest.param(dict(grid=(0, 4)), ValueError, "grid[0] (h) must be >= 1", id="grid-zero"),
    pytest.param(dict(grid=(3.0, 4)), TypeError, "grid[0] (h) must be an int", id="grid-float"),
    pytest.param(dict(prefix_tokens=-1), ValueError, "prefix_tokens must be >= 0", id="prefix-negative"),
    pytest.param(dict(sigma=0.0), ValueError, "sigma must be a finite number > 0", id="sigma-zero"),
    pytest.param(dict(sigma=-2.0), ValueError, "sigma must be a finite number > 0", id="sigma-negative"),
    pytest.param(dict(sigma=float("nan")), ValueError, "sigma must be a finite number > 0", id="sigma-nan"),
    pytest.param(dict(sigma="5"), TypeError, "sigma must be a number", id="sigma-string"),
    pytest.param(dict(similarity="kq"), ValueError, "similarity must be one of", id="unknown-similarity"),
    pytest.param(dict(backend="cuda"), ValueError, "backend must be one of", id="unknown-backend"),
    pytest.param(dict(scale=float("inf")), ValueError, "scale must be a finite number", id="scale-inf"),
    pytest.param(dict(q=None, similarity="qk"), TypeError, "q may be None only for similarity='kk'", id="q-none-qk"),
    pytest.param(dict(k=torch.ones(2, 2, N, 8, dtype=torch.int64)), TypeError, "k must be a floating tensor",
                 id="k-integer"),
    pytest.param(dict(v=torch.ones(2, 2, N, 8, dtype=torch.bool)), TypeError, "v must be a floating tensor",
                 id="v-bool"),
    pytest.param(dict(k=[[1.0]]), TypeError, "k must be a torch.Tensor", id="k-list"),
    pytest.param(dict(v=torch.randn(2, 2, N, 8, dtype=torch.float64)), TypeError, "v has dtype torch.float64",
                 id="dtype-mismatch"),
    pytest.param(dict(q=torch.randn(2, 2, N, 300), k=torch.randn(2, 2, N, 300), v=torch.randn(2, 2, N, 300)),
                 ValueError, "head_dim (last dim of q/k/v) must be in [1, 256]", id="head-dim-over-256"),
]


@pytest.mark.parametrize("overrides,error,message", BAD_INPUTS)
def test_bad_inputs_raise_naming_the_argument(overrides, error, message):
    with pytest.raises(error) as info:
        _call(**overrides)
    assert message in str(info.value)
    assert str(info.value).startswith("neighbour_attention:")


def test_device_mismatch_is_reported():
    q, k, v = qkv()
    meta_v = torch.empty(v.shape, device="meta")
    with pytest.raises(ValueError, match="v is on meta but q is on cpu"):
        nk.neighbour_attention(q, k, meta_v, grid=GRID, backend="torch")


def test_reference_validates_the_same_way():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="reference.neighbour_attention: N"):
        nk.reference.neighbour_attention(q, k, v, grid=(5, 5))
    with pytest.raises(ValueError, match="backend must be 'reference'"):
        nk.reference.neighbour_attention(q, k, v, grid=GRID, backend="torch")


# ------------------------------------------------------------------------------------------------ dispatch
def test_auto_picks_torch_on_cpu():
    assert resolve_backend("auto", torch.device("cpu"), "op") == "torch"


@pytest.mark.skipif(not HAS_TRITON, reason="Triton not installed")
def test_auto_picks_triton_for_cuda_tensors_when_compiled_mode():
    expected = "torch" if interpreter_enabled() else "triton"
    assert resolve_backend("auto", torch.device("cuda"), "op") == expected


def test_auto_avoids_triton_for_inputs_the_kernel_cannot_take():
    """A per-input reason (e.g. float64) sends auto to the torch path on CUDA; an explicit 'triton' is left to the op.

    In a process without the interpreter, where auto would pick Triton for CUDA tensors (no GPU is needed to ask).
    """
    proc = run_python(
        "import torch\n"
        "from naclip_kernels._backend import resolve_backend\n"
        "cuda = torch.device('cuda')\n"
        "print(resolve_backend('auto', cuda, 'op'), resolve_backend('auto', cuda, 'op', auto_avoids_triton='fp64'),\n"
        "      resolve_backend('triton', cuda, 'op', auto_avoids_triton='fp64'))\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["triton", "torch", "triton"]


def test_import_without_triton_and_open_clip():
    """``import naclip_kernels`` works on a laptop without Triton or open_clip, and the torch path still runs."""
    code = (
        "import sys, torch\n"
        "for name in [m for m in sys.modules if m.split('.')[0] == 'triton']:\n"
        "    del sys.modules[name]\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('triton', 'open_clip'):\n"
        "            raise ImportError('blocked for the test: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import naclip_kernels as nk\n"
        "assert 'triton' not in sys.modules and 'open_clip' not in sys.modules\n"
        "k = torch.randn(1, 2, 1 + 6, 8)\n"
        "out = nk.neighbour_attention(None, k, k, grid=(2, 3))\n"
        "try:\n"
        "    nk.neighbour_attention(None, k, k, grid=(2, 3), backend='triton')\n"
        "except nk.BackendUnavailableError as e:\n"
        "    print('NO-TRITON', e)\n"
        "print('OK', tuple(out.shape))\n"
    )
    # torch probes triton while it imports, so torch comes first; then triton is hidden from naclip_kernels.
    result = run_python(code)
    assert "OK (1, 2, 7, 8)" in result.stdout, result.stdout + result.stderr
    assert "NO-TRITON" in result.stdout and "Triton is not installed" in result.stdout


# ------------------------------------------------------------------------------------------------ module
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch-first", "seq-first"])
def test_module_with_bias_off_equals_multihead_attention(batch_first):
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(32, 4, batch_first=batch_first).double()
    x = torch.randn(2, 1 + 12, 32, dtype=torch.float64)
    if not batch_first:
        x = x.transpose(0, 1)
    module = nk.NeighbourAttention(mha, sigma=None, similarity="qk")
    expected = mha(x, x, x, need_weights=False)[0]
    torch.testing.assert_close(module(x, (3, 4)), expected, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("similarity", ["kk", "qq", "csa"])
def test_module_matches_functional_reference(similarity):
    torch.manual_seed(1)
    mha = torch.nn.MultiheadAttention(24, 3, batch_first=True).double()
    x = torch.randn(2, 1 + 20, 24, dtype=torch.float64)
    module = nk.NeighbourAttention(mha, sigma=5.0, similarity=similarity, backend="torch")
    q, k, v = torch.nn.functional.linear(x, mha.in_proj_weight, mha.in_proj_bias).chunk(3, dim=-1)
    heads = lambda t: t.view(2, 21, 3, 8).transpose(1, 2)
    attn = nk.reference.neighbour_attention(heads(q), heads(k), heads(v), grid=(4, 5), similarity=similarity)
    expected = mha.out_proj(attn.transpose(1, 2).reshape(2, 21, 24))
    torch.testing.assert_close(module(x, (4, 5)), expected, atol=1e-12, rtol=1e-12)


def test_module_shares_weights_and_state_dict():
    mha = torch.nn.MultiheadAttention(16, 2)
    module = nk.NeighbourAttention(mha)
    assert module.attn is mha
    assert module.state_dict()["attn.in_proj_weight"].data_ptr() == mha.in_proj_weight.data_ptr()


@pytest.mark.parametrize("bad,error,message", [
    (lambda: nk.NeighbourAttention(torch.nn.Linear(4, 4)), TypeError, "must be an nn.MultiheadAttention"),
    (lambda: nk.NeighbourAttention(torch.nn.MultiheadAttention(8, 2, kdim=4, vdim=4)), ValueError, "packed"),
    (lambda: nk.NeighbourAttention(torch.nn.MultiheadAttention(8, 2, add_bias_kv=True)), ValueError, "add_bias_kv"),
    (lambda: nk.NeighbourAttention(torch.nn.MultiheadAttention(8, 2), similarity="x"), ValueError, "similarity"),
    (lambda: nk.NeighbourAttention(torch.nn.MultiheadAttention(8, 2), sigma=-1), ValueError, "sigma"),
    (lambda: nk.NeighbourAttention(torch.nn.MultiheadAttention(8, 2))(torch.randn(5, 8), (2, 2)), ValueError,
     "x must be a 3-D tensor"),
    (lambda: nk.NeighbourAttention(torch.nn.MultiheadAttention(8, 2))(torch.randn(5, 1, 6), (2, 2)), ValueError,
     "embed_dim=8"),
], ids=["not-mha", "unpacked", "bias-kv", "similarity", "sigma", "x-rank", "x-width"])
def test_module_bad_arguments(bad, error, message):
    with pytest.raises(error, match=message):
        bad()
