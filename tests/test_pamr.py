"""PAMR (SPEC.md section 3): the reference against a per-pixel loop oracle, every backend against the float64
reference, edge cases, NaN poisoning, bad inputs, the nn.Module and the AOT compile list.

Triton cases need ``TRITON_INTERPRET=1`` set before import (the README test command sets it); sizes are tiny
because the interpreter runs each program with NumPy.
"""
from __future__ import annotations

import inspect
import math
import statistics

import pytest
import torch

import naclip_kernels as nk
from naclip_kernels import BackendUnavailableError
from naclip_kernels._aot_spec import KernelConfig
from naclip_kernels._alloc import poison_outputs
from naclip_kernels.ops import pamr as pamr_mod
from tests.conftest import requires_triton_interpreter, run_python
from tests.tolerances import assert_close_to_reference

TRITON = pytest.param("triton", marks=requires_triton_interpreter, id="triton")
# "torch" on CPU tensors runs the compiled CPU kernels (tests/test_pamr_native.py checks that it does); "torch-eager"
# is the same backend with them switched off (NACLIP_KERNELS_NATIVE=0): the eager path a machine without a C
# compiler, float64 inputs, or a CUDA device without Triton runs.
FAST_BACKENDS = [pytest.param("torch", id="torch"), pytest.param("torch-eager", id="torch-eager"), TRITON]


@pytest.fixture
def backend(request, monkeypatch):
    """The backend name to pass to nk.pamr: "torch-eager" becomes "torch" with the compiled kernels disabled."""
    if request.param == "torch-eager":
        monkeypatch.setenv("NACLIP_KERNELS_NATIVE", "0")
        return "torch"
    return request.param


@pytest.fixture
def eager_torch_path(monkeypatch):
    """Tests of the eager torch path's own machinery (chunking, padded buffers) switch the compiled kernels off."""
    monkeypatch.setenv("NACLIP_KERNELS_NATIVE", "0")


# ----------------------------------------------------------------------------------------------------------------
# A per-pixel oracle written from SPEC.md alone (Python floats, no torch ops), for tiny sizes
# ----------------------------------------------------------------------------------------------------------------
def _bilinear_align_corners(plane, out_h, out_w):
    in_h, in_w = len(plane), len(plane[0])

    def coord(i, n_in, n_out):
        src = i * (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
        lo = min(int(math.floor(src)), n_in - 1)
        return lo, min(lo + 1, n_in - 1), src - lo

    out = []
    for i in range(out_h):
        y0, y1, wy = coord(i, in_h, out_h)
        row = []
        for j in range(out_w):
            x0, x1, wx = coord(j, in_w, out_w)
            top = plane[y0][x0] * (1 - wx) + plane[y0][x1] * wx
            bottom = plane[y1][x0] * (1 - wx) + plane[y1][x1] * wx
            row.append(top * (1 - wy) + bottom * wy)
        out.append(row)
    return out


def naive_pamr(image, mask, num_iter, dilations):
    """SPEC.md section 3 pixel by pixel: returns a float64 tensor ``[B, C, H, W]``."""
    x = image.double().tolist()
    m = mask.double().tolist()
    batch, channels, height, width = image.shape
    taps = [(a, b) for a in (-1, 0, 1) for b in (-1, 0, 1) if (a, b) != (0, 0)]
    offsets = [(a * d, b * d) for d in dilations for a, b in taps]

    def at(plane, i, j):
        return plane[min(max(i, 0), height - 1)][min(max(j, 0), width - 1)]

    out = []
    for bi in range(batch):
        planes = [p if (len(p), len(p[0])) == (height, width) else _bilinear_align_corners(p, height, width)
                  for p in m[bi]]
        weights = [[None] * width for _ in range(height)]
        for i in range(height):
            for j in range(width):
                logits = [0.0] * len(offsets)
                for xc in x[bi]:
                    samples = [at(xc, i + a * d, j + b * d) for d in dilations for a in (-1, 0, 1) for b in (-1, 0, 1)]
                    std = statistics.stdev(samples)  # unbiased, 9 * len(dilations) samples
                    for n, (dy, dx) in enumerate(offsets):
                        logits[n] += -abs(xc[i][j] - at(xc, i + dy, j + dx)) / (1e-8 + 0.1 * std) / len(x[bi])
                top = max(logits)
                exps = [math.exp(v - top) for v in logits]
                weights[i][j] = [e / sum(exps) for e in exps]
        for _ in range(num_iter):
            planes = [[[sum(w * at(p, i + dy, j + dx) for w, (dy, dx) in zip(weights[i][j], offsets))
                        for j in range(width)] for i in range(height)] for p in planes]
        out.append(planes)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("b,k,h,w,c,mh,mw,dilations,num_iter", [
    pytest.param(1, 3, 4, 5, 2, 4, 5, (1, 2), 2, id="4x5_d12"),
    pytest.param(2, 2, 3, 4, 1, 2, 3, (1,), 2, id="B2_lowres_mask_2x3_to_3x4"),
    pytest.param(1, 1, 3, 3, 2, 3, 3, (2, 5), 1, id="dilation_larger_than_image"),
    pytest.param(1, 2, 1, 6, 2, 1, 3, (1, 3), 3, id="1x6_image_lowres_1x3_mask"),
])
def test_reference_matches_per_pixel_oracle(b, k, h, w, c, mh, mw, dilations, num_iter, rng):
    image = torch.randn(b, k, h, w, generator=rng, dtype=torch.float64)
    mask = torch.randn(b, c, mh, mw, generator=rng, dtype=torch.float64)
    expected = naive_pamr(image, mask, num_iter, dilations)
    actual = nk.reference.pamr(image, mask, num_iter, dilations)
    torch.testing.assert_close(actual, expected, atol=1e-12, rtol=1e-12)


def test_reference_keeps_constant_masks_and_mask_dtype(rng):
    """The weights are a softmax (sum to 1), so a constant mask is a fixed point; output dtype is the mask's."""
    image = torch.randn(1, 3, 6, 7, generator=rng)
    mask = torch.full((1, 2, 6, 7), 2.5, dtype=torch.float16)
    out = nk.reference.pamr(image, mask, 3, (1, 2))
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), mask.float(), atol=2e-3, rtol=0)


# ----------------------------------------------------------------------------------------------------------------
# Every fast backend against the float64 reference
# ----------------------------------------------------------------------------------------------------------------
# (B, K, H, W, C, mask h, mask w, dilations, num_iter)
CASES = [
    pytest.param((2, 3, 9, 11, 3, 9, 11, (1, 2), 3), id="B2_9x11_C3_d12"),
    pytest.param((1, 3, 7, 6, 2, 7, 6, (8, 16), 2), id="7x6_d8-16_clamped"),
    pytest.param((1, 3, 1, 1, 1, 1, 1, (8, 16), 2), id="1x1_C1"),
    pytest.param((1, 3, 1, 13, 2, 1, 13, (1, 3), 2), id="1x13"),
    pytest.param((1, 2, 12, 1, 2, 12, 1, (2,), 2), id="12x1_K2"),
    pytest.param((2, 3, 9, 10, 4, 3, 4, (1, 2), 2), id="B2_lowres_mask_3x4_to_9x10"),
    pytest.param((1, 3, 6, 7, 2, 11, 9, (1, 2), 2), id="highres_mask_11x9_to_6x7"),
    pytest.param((1, 1, 6, 5, 1, 6, 5, (1, 2, 3), 1, ), id="K1_C1_three_dilations_1iter"),
]


def _inputs(case, dtype, rng):
    b, k, h, w, c, mh, mw, dilations, num_iter = case
    image = torch.randn(b, k, h, w, generator=rng)
    mask = (2 * torch.randn(b, c, mh, mw, generator=rng)).clamp(-4, 4).to(dtype)
    return image, mask, dilations, num_iter


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("backend", FAST_BACKENDS, indirect=True)
def test_backend_matches_reference(backend, dtype, case, rng):
    image, mask, dilations, num_iter = _inputs(case, dtype, rng)
    expected = nk.reference.pamr(image.double(), mask.double(), num_iter, dilations)
    with poison_outputs():
        out = nk.pamr(image, mask, num_iter=num_iter, dilations=dilations, backend=backend)
    assert_close_to_reference(out, expected, "pamr", backend, dtype)


@pytest.mark.parametrize("case", CASES[:2] + CASES[5:6])
def test_torch_path_float64(case, rng):
    image, mask, dilations, num_iter = _inputs(case, torch.float64, rng)
    with poison_outputs():
        out = nk.pamr(image.double(), mask, num_iter=num_iter, dilations=dilations, backend="torch")
    expected = nk.reference.pamr(image.double(), mask, num_iter, dilations)
    assert_close_to_reference(out, expected, "pamr", "torch", torch.float64)


@pytest.mark.parametrize("image_dtype", [torch.float16, torch.bfloat16, torch.float64], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("backend", FAST_BACKENDS, indirect=True)
def test_image_dtype_differs_from_mask(backend, image_dtype, rng):
    """The image may have its own dtype; the output takes the mask's."""
    image = torch.randn(1, 3, 8, 9, generator=rng).to(image_dtype)
    mask = torch.randn(1, 2, 8, 9, generator=rng)
    with poison_outputs():
        out = nk.pamr(image, mask, num_iter=2, dilations=(1, 2), backend=backend)
    expected = nk.reference.pamr(image.double(), mask.double(), 2, (1, 2))
    assert_close_to_reference(out, expected, "pamr", backend, torch.float32)


@pytest.mark.parametrize("backend", FAST_BACKENDS, indirect=True)
def test_non_contiguous_inputs(backend, rng):
    """Channels-last image, transposed and strided mask views: the kernels take any strides."""
    image = torch.randn(2, 9, 10, 3, generator=rng).permute(0, 3, 1, 2)           # channels-last [2, 3, 9, 10]
    mask_full = torch.randn(2, 10, 8, 9, generator=rng).permute(0, 2, 3, 1)[:, ::2]   # [2, 4, 9, 10], odd strides
    mask_low = torch.randn(2, 3, 8, 5, generator=rng)[:, :, ::2, :]                    # [2, 3, 4, 5], resized
    # channels-last [2, 3, 10, 9] mask: interpolate returns channels-last, which must not reach a kernel's output
    mask_cl = torch.randn(2, 10, 9, 3, generator=rng).permute(0, 3, 1, 2)
    masks = (mask_full, mask_low, mask_cl)
    assert not image.is_contiguous() and not any(m.is_contiguous() for m in masks)
    for mask in masks:
        with poison_outputs():
            out = nk.pamr(image, mask, num_iter=3, dilations=(1, 4), backend=backend)
        expected = nk.reference.pamr(image.double().contiguous(), mask.double().contiguous(), 3, (1, 4))
        assert_close_to_reference(out, expected, "pamr", backend, torch.float32)


@pytest.mark.parametrize("backend", FAST_BACKENDS, indirect=True)
def test_many_channels(backend, rng):
    """C well past one channel block / program: 1030 queries on a tiny image."""
    image = torch.randn(1, 3, 3, 4, generator=rng)
    mask = torch.randn(1, 1030, 3, 4, generator=rng)
    with poison_outputs():
        out = nk.pamr(image, mask, num_iter=1, dilations=(1, 2), backend=backend)
    expected = nk.reference.pamr(image.double(), mask.double(), 1, (1, 2))
    assert_close_to_reference(out, expected, "pamr", backend, torch.float32)


@requires_triton_interpreter
def test_triton_channel_loop_and_batch_split(monkeypatch, rng):
    """Force several channels per program (small target grid) and one batch element per launch (grid-z limit)."""
    monkeypatch.setattr(pamr_mod, "_TARGET_PROGRAMS", 1)
    monkeypatch.setattr(pamr_mod, "_MAX_GRID_Z", 1)
    image = torch.randn(3, 3, 5, 6, generator=rng)
    mask = torch.randn(3, 5, 5, 6, generator=rng).to(torch.float16)
    with poison_outputs():
        out = nk.pamr(image, mask, num_iter=3, dilations=(1, 2), backend="triton")
    expected = nk.reference.pamr(image.double(), mask.double(), 3, (1, 2))
    assert_close_to_reference(out, expected, "pamr", "triton", torch.float16)


@pytest.mark.parametrize("chunk_elements", [1, 2 * 42, 5 * 42], ids=["1_plane", "2_planes", "5_planes"])
def test_torch_path_chunking(monkeypatch, eager_torch_path, chunk_elements, rng):
    """Chunks of 1 or 2 planes (per batch element, ragged last chunk, bfloat16 scratch) and of the whole batch."""
    monkeypatch.setattr(pamr_mod, "_CHUNK_ELEMENTS", chunk_elements)
    image = torch.randn(2, 3, 6, 7, generator=rng)
    mask = torch.randn(2, 3, 6, 7, generator=rng).to(torch.bfloat16)
    with poison_outputs():
        out = nk.pamr(image, mask, num_iter=4, dilations=(2, 3), backend="torch")
    expected = nk.reference.pamr(image.double(), mask.double(), 4, (2, 3))
    assert_close_to_reference(out, expected, "pamr", "torch", torch.bfloat16)


@pytest.mark.parametrize("pad", [1, 3, 7], ids=["pad_1", "pad_3", "pad_past_the_image"])
def test_torch_path_replicate_border_is_replicate_padding(pad, rng):
    """The in-place frame fill equals F.pad(mode="replicate"), also when the frame is wider than the image."""
    interior = torch.randn(2, 3, 4, 5, generator=rng)
    buf = torch.full((2, 3, 4 + 2 * pad, 5 + 2 * pad), float("nan"))
    buf[..., pad:pad + 4, pad:pad + 5] = interior
    pamr_mod._replicate_border(buf, pad, 4, 5)
    torch.testing.assert_close(buf, torch.nn.functional.pad(interior, (pad,) * 4, mode="replicate"), rtol=0, atol=0)


@pytest.mark.parametrize("mask_dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
@pytest.mark.parametrize("resize", [False, True], ids=["same_size", "resized"])
def test_torch_path_single_sweep(monkeypatch, eager_torch_path, mask_dtype, resize, rng):
    """num_iter=1 (one padded buffer, or a scratch one for a float16 mask), ragged 2-plane chunks, with and without
    the bilinear resize into the padded buffer."""
    monkeypatch.setattr(pamr_mod, "_CHUNK_ELEMENTS", 2 * 42)
    image = torch.randn(1, 3, 6, 7, generator=rng)
    mask = torch.randn(1, 5, 3 if resize else 6, 4 if resize else 7, generator=rng).to(mask_dtype)
    with poison_outputs():
        out = nk.pamr(image, mask, num_iter=1, dilations=(1, 4), backend="torch")
    expected = nk.reference.pamr(image.double(), mask.double(), 1, (1, 4))
    assert out.dtype == mask_dtype
    assert_close_to_reference(out, expected, "pamr", "torch", mask_dtype)


@pytest.mark.parametrize("backend", ["auto", "torch", "reference", TRITON])
def test_empty_batch_or_channels(backend):
    image = torch.randn(0, 3, 4, 5)
    assert nk.pamr(image, torch.randn(0, 2, 2, 2), backend=backend).shape == (0, 2, 4, 5)
    out = nk.pamr(torch.randn(1, 3, 4, 5), torch.randn(1, 0, 2, 2, dtype=torch.float16), backend=backend)
    assert out.shape == (1, 0, 4, 5) and out.dtype == torch.float16


def test_auto_and_module_match_functional(rng):
    image = torch.randn(1, 3, 6, 8, generator=rng)
    mask = torch.randn(1, 2, 3, 4, generator=rng)
    layer = nk.PAMR(num_iter=2, dilations=[1, 2])
    assert layer.dilations == (1, 2) and "dilations=(1, 2)" in repr(layer)
    assert len(list(layer.parameters())) == 0 and len(layer.state_dict()) == 0
    torch.testing.assert_close(layer(image, mask), nk.pamr(image, mask, 2, (1, 2), backend="torch"))
    torch.testing.assert_close(nk.pamr(image, mask, 2, (1, 2)), nk.pamr(image, mask, 2, (1, 2), backend="torch"))
    assert nk.PAMR(dilations=4).dilations == (4,)


# ----------------------------------------------------------------------------------------------------------------
# Bad inputs and unavailable backends
# ----------------------------------------------------------------------------------------------------------------
def _good():
    return torch.randn(1, 3, 4, 5), torch.randn(1, 2, 4, 5)


@pytest.mark.parametrize("make,kwargs,error,match", [
    pytest.param(lambda i, m: (i[0], m), {}, ValueError, "image must be 4-D", id="image_3d"),
    pytest.param(lambda i, m: (i, m[0]), {}, ValueError, "mask must be 4-D", id="mask_3d"),
    pytest.param(lambda i, m: (i, torch.cat([m, m])), {}, ValueError, "batch size", id="batch_mismatch"),
    pytest.param(lambda i, m: (i[:, :0], m), {}, ValueError, "K, H, W >= 1", id="image_no_channels"),
    pytest.param(lambda i, m: (i, m[:, :, :0]), {}, ValueError, "h, w >= 1", id="mask_empty_plane"),
    pytest.param(lambda i, m: ((i * 10).long(), m), {}, TypeError, "image must be a floating", id="int_image"),
    pytest.param(lambda i, m: (i, m.int()), {}, TypeError, "mask must be a floating", id="int_mask"),
    pytest.param(lambda i, m: (i.numpy(), m), {}, TypeError, "image must be a torch.Tensor", id="numpy_image"),
    pytest.param(lambda i, m: (i, m), {"num_iter": 0}, ValueError, "num_iter must be >= 1", id="num_iter_0"),
    pytest.param(lambda i, m: (i, m), {"num_iter": -3}, ValueError, "num_iter must be >= 1", id="num_iter_neg"),
    pytest.param(lambda i, m: (i, m), {"num_iter": 2.0}, TypeError, "num_iter must be an int", id="num_iter_float"),
    pytest.param(lambda i, m: (i, m), {"num_iter": True}, TypeError, "num_iter must be an int", id="num_iter_bool"),
    pytest.param(lambda i, m: (i, m), {"dilations": ()}, ValueError, "non-empty", id="empty_dilations"),
    pytest.param(lambda i, m: (i, m), {"dilations": (8, 0)}, ValueError, r"dilations\[1\] must be >= 1",
                 id="zero_dilation"),
    pytest.param(lambda i, m: (i, m), {"dilations": (-2,)}, ValueError, r"dilations\[0\] must be >= 1",
                 id="negative_dilation"),
    pytest.param(lambda i, m: (i, m), {"dilations": (1.5,)}, TypeError, r"dilations\[0\] must be an int",
                 id="float_dilation"),
    pytest.param(lambda i, m: (i, m), {"dilations": "816"}, TypeError, "sequence of ints", id="str_dilations"),
    pytest.param(lambda i, m: (i, m), {"backend": "cuda"}, ValueError, "backend must be one of", id="bad_backend"),
])
@pytest.mark.parametrize("fn", [nk.pamr, nk.reference.pamr], ids=["pamr", "reference"])
def test_bad_inputs_raise(fn, make, kwargs, error, match):
    image, mask = make(*_good())
    if fn is nk.reference.pamr and kwargs.get("backend") == "cuda":
        match = "backend must be 'reference'"
    with pytest.raises(error, match=match):
        fn(image, mask, **kwargs)


@pytest.mark.parametrize("kwargs,error", [
    pytest.param({"num_iter": 0}, ValueError, id="num_iter_0"),
    pytest.param({"dilations": []}, ValueError, id="empty_dilations"),
    pytest.param({"dilations": (8, -16)}, ValueError, id="negative_dilation"),
    pytest.param({"dilations": None}, TypeError, id="dilations_none"),
    pytest.param({"backend": "gpu"}, ValueError, id="bad_backend"),
])
def test_module_validates_at_construction(kwargs, error):
    with pytest.raises(error, match="PAMR"):
        nk.PAMR(**kwargs)


@requires_triton_interpreter
def test_triton_refuses_what_it_cannot_run():
    image, mask = _good()
    with pytest.raises(BackendUnavailableError, match="float64"):
        nk.pamr(image, mask.double(), backend="triton")
    many = tuple(range(1, pamr_mod._MAX_DILATIONS + 2))
    with pytest.raises(BackendUnavailableError, match="dilations"):
        nk.pamr(image, mask, dilations=many, backend="triton")
    # "auto" on CPU is the torch path, which takes both.
    assert nk.pamr(image, mask.double(), num_iter=1, dilations=many).dtype == torch.float64


def test_triton_on_cpu_without_interpreter_is_refused():
    # Interpret mode is fixed at import, so the compiled-mode refusal is checked in a process without it.
    code = (
        "import torch, naclip_kernels as nk\n"
        "try:\n"
        "    nk.pamr(torch.randn(1, 3, 6, 7), torch.randn(1, 2, 6, 7), backend='triton')\n"
        "except nk.BackendUnavailableError as e:\n"
        "    print('RAISED', e)\n"
    )
    result = run_python(code)
    assert "RAISED" in result.stdout and "TRITON_INTERPRET" in result.stdout, result.stdout + result.stderr


# ----------------------------------------------------------------------------------------------------------------
# AOT compile list (compiled for sm_80/sm_90 by naclip_kernels.aot; here only its consistency is checked)
# ----------------------------------------------------------------------------------------------------------------
def test_aot_configs_cover_every_launch():
    configs = pamr_mod.aot_configs()
    assert configs and all(isinstance(c, KernelConfig) and c.op == "pamr" for c in configs)
    assert len({c.name for c in configs}) == len(configs)
    for c in configs:
        fn = getattr(c.kernel, "fn", c.kernel)
        assert list(c.signature) == list(inspect.signature(fn).parameters), c.name
        assert {k for k, v in c.signature.items() if v == "constexpr"} == set(c.constexprs), c.name
    for num_dil in range(1, pamr_mod._MAX_DILATIONS + 1):
        for kernel in ("affinity", "propagate"):
            npad, block_p, warps = pamr_mod._block_config(num_dil, kernel)
            match = [c for c in configs if kernel in c.name and c.constexprs == {"BLOCK_P": block_p, "NPAD": npad}
                     and c.num_warps == warps and c.default]
            # affinity: 3 image dtypes; propagate: 7 (source, destination) dtype pairs
            assert len(match) == (3 if kernel == "affinity" else 7), (num_dil, kernel)
