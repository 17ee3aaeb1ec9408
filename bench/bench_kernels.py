"""Key comparisons as a pytest-benchmark suite: ``pytest bench/ --benchmark-only`` (``BENCH_QUICK=1`` for a smoke run).

Each group compares the eager reference with the alternatives at one realistic size; pytest-benchmark prints the
table (min/median/IQR per provider) and ``--benchmark-json F`` saves it. The full sweeps with memory, speedups and
plots are ``python -m bench attention|pamr|segment``.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import naclip_kernels as nk
from naclip_kernels import reference

from bench.conftest import DEVICE, DTYPE, QUICK, run_pedantic

pytest.importorskip("pytest_benchmark")

ATTN_CASES = [  # (label, batch, grid)
    ("VOC 21x28, B*H=12", 1, (21, 28)),
    ("32x32, B*H=12", 1, (32, 32)),
    ("36 windows of 14x14 (Cityscapes slide)", 36, (14, 14)),
]
if QUICK:
    ATTN_CASES = [("quick 6x8, B*H=12", 1, (6, 8)), ("quick 4 windows of 4x4", 4, (4, 4))]
ATTN_PROVIDERS = ["eager", "sdpa", "torch"] + (["triton"] if DEVICE == "cuda" else [])


def _attention_call(provider, k, v, grid):
    if provider == "eager":
        reference.neighbour_attention(None, k, v, grid, 5.0)          # build the cached bias outside the timing
        return lambda: reference.neighbour_attention(None, k, v, grid, 5.0)
    if provider == "sdpa":
        mask = reference.gaussian_bias(grid, 5.0, 1, device=k.device, dtype=k.dtype)
        return lambda: F.scaled_dot_product_attention(k, k, v, attn_mask=mask)
    return lambda: nk.neighbour_attention(None, k, v, grid, 5.0, backend=provider)


@pytest.mark.parametrize("provider", ATTN_PROVIDERS)
@pytest.mark.parametrize("label,batch,grid", ATTN_CASES, ids=[c[0] for c in ATTN_CASES])
def bench_attention(benchmark, provider, label, batch, grid):
    n = 1 + grid[0] * grid[1]
    gen = torch.Generator().manual_seed(0)
    k, v = (torch.randn(batch, 12, n, 64, generator=gen).to(DEVICE, DTYPE) for _ in range(2))
    try:
        fn = _attention_call(provider, k, v, grid)
        fn()
    except (NotImplementedError, nk.BackendUnavailableError) as exc:
        pytest.skip(f"{provider} unavailable: {exc}")
    run_pedantic(benchmark, fn, rounds=5 if QUICK else 10, group=f"attention {label}", provider=provider,
                 shape=[batch, 12, n, 64], flops=4.0 * n * n * 64 * batch * 12)


PAMR_CASES = [("336x448, 21 queries", (336, 448), 21)] if not QUICK else [("quick 48x64, 3 queries", (48, 64), 3)]


@pytest.mark.slow
@pytest.mark.parametrize("provider", ["reference", "torch"] + (["triton"] if DEVICE == "cuda" else []))
@pytest.mark.parametrize("label,size,classes", PAMR_CASES, ids=[c[0] for c in PAMR_CASES])
def bench_pamr(benchmark, provider, label, size, classes):
    gen = torch.Generator().manual_seed(0)
    image = torch.randn(1, 3, *size, generator=gen).to(DEVICE)
    mask = torch.randn(1, classes, -(-size[0] // 16), -(-size[1] // 16), generator=gen).to(DEVICE)
    if provider == "reference":
        fn = lambda: reference.pamr(image, mask, num_iter=10, dilations=(8, 16))  # noqa: E731
    else:
        fn = lambda: nk.pamr(image, mask, num_iter=10, dilations=(8, 16), backend=provider)  # noqa: E731
    try:
        fn()
    except (NotImplementedError, AttributeError, nk.BackendUnavailableError) as exc:
        pytest.skip(f"{provider} unavailable: {exc}")
    run_pedantic(benchmark, fn, rounds=2 if QUICK else 3, group=f"pamr {label}", provider=provider)


@pytest.mark.slow
@pytest.mark.parametrize("provider", ["reference", "fast"])
def bench_segment_voc(benchmark, provider):
    """Whole segmenter on a VOC-like image (whole-image inference, PAMR on), text embeddings cached."""
    import warnings

    pytest.importorskip("open_clip")
    from naclip import Segmenter

    size, lines, model = ((64, 96), ["cat", "dog", "sofa, couch"], "ViT-S-16") if QUICK else \
        ((336, 448), None, "ViT-B-16")
    if lines is None:
        from naclip import presets

        lines = list(presets.get_preset("voc21").classes)          # 56 queries
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        seg = Segmenter(model=model, pretrained=None, classes=lines, device=DEVICE, slide=None,
                        short_side=size[0], pamr=True, cache_dir=False,
                        backend="reference" if provider == "reference" else "auto",
                        window_batch_size=1 if provider == "reference" else 16,
                        templates=["a photo of a {}."])
    # Text encoding is outside the timing, so one prompt template per query keeps the suite short (80 templates
    # x 56 queries take minutes on a small CPU; `python -m bench segment` reports that first-run cost).
    seg.query_embeddings
    image = torch.rand(3, *size, generator=torch.Generator().manual_seed(0))
    run_pedantic(benchmark, lambda: seg(image), rounds=2 if QUICK else 3, group="segmenter VOC-like",
                 provider=provider, image=list(size), queries=len(seg.queries))
