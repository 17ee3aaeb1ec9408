"""The one tolerance table of the test suite, with the reason for every entry.

Every fast path is compared with the float64 reference (``naclip_kernels.reference`` run on the inputs upcast to
float64). A tolerance is ``(atol, rtol)`` applied as ``|fast - ref| <= atol + rtol * |ref|`` elementwise, the
``torch.testing.assert_close`` rule. Keys are ``(op, backend, dtype)``. Add new entries here, never inline.
"""
from __future__ import annotations

from typing import Dict, NamedTuple, Tuple

import torch


class Tol(NamedTuple):
    atol: float
    rtol: float
    reason: str


TOLERANCES: Dict[Tuple[str, str, torch.dtype], Tol] = {
    # ---------------------------------------------------------------- neighbour attention
    # Outputs are convex combinations of v rows (|out| <= max |v| ~ 4 for randn), so absolute error is the measure.
    ("attention", "torch", torch.float64): Tol(1e-10, 1e-10, "same maths as the reference in float64; only the "
                                               "summation order of the blocked softmax differs"),
    ("attention", "torch", torch.float32): Tol(2e-5, 2e-5, "float32 compute (eps 1.2e-7) over N <= ~600 keys: "
                                               "softmax normalisation and a length-N dot product, ~100 eps"),
    ("attention", "torch", torch.float16): Tol(4e-3, 4e-3, "inputs quantised to float16 before the op (the float64 "
                                               "reference sees the same quantised inputs) and the output rounded "
                                               "to float16: half an ulp of |out| <= 4 is 2e-3"),
    ("attention", "torch", torch.bfloat16): Tol(3e-2, 2e-2, "output rounded to bfloat16 (8-bit mantissa): half an "
                                                "ulp of |out| <= 4 is 1.6e-2"),
    ("attention", "triton", torch.float32): Tol(5e-5, 5e-5, "float32 (IEEE, no TF32) dot products; online softmax "
                                                "rescaling adds a few eps per key block over the torch path"),
    ("attention", "triton", torch.float16): Tol(8e-3, 8e-3, "P is cast to float16 before the P@V tensor-core dot "
                                                "(as in flash attention): one float16 rounding of probabilities "
                                                "plus the output rounding"),
    ("attention", "triton", torch.bfloat16): Tol(6e-2, 4e-2, "P cast to bfloat16 before P@V (8-bit mantissa) plus "
                                                 "the bfloat16 output rounding"),
    # ---------------------------------------------------------------- proxy attention (tests/test_proxy_attention*.py)
    # Outputs are convex combinations of v rows (|out| <= max |v| ~ 4 for randn). The test inputs keep every
    # off-diagonal similarity >= 2e-5 away from the mask threshold (tests/proxy_helpers.py), so no implementation
    # difference flips a mask decision; what is left is the rounding of S, the weights and the sums.
    ("proxy_attention", "reference", torch.float64): Tol(1e-12, 1e-12, "the float64 SPEC loop and the vectorised "
                                                         "reference differ only in summation order (M, C <= 12)"),
    ("proxy_attention", "original", torch.float64): Tol(1e-12, 1e-12, "ProxyCLIP's einsum/repeat/bmm maths and the "
                                                        "reference in float64: the same operations, in another "
                                                        "summation order"),
    ("proxy_attention", "torch", torch.float64): Tol(1e-10, 1e-10, "same maths as the reference in float64; mu "
                                                     "from ||sum xh||^2 / M^2 and a blocked, unshifted exp"),
    ("proxy_attention", "torch", torch.float32): Tol(2e-5, 2e-5, "float32 S (C <= 1280 terms) times gamma, exp "
                                                     "and length-M sums: ~100 eps of |out| <= 4"),
    ("proxy_attention", "torch", torch.float16): Tol(4e-3, 4e-3, "inputs quantised to float16 before the op (the "
                                                     "float64 reference sees the same values), float32 compute, "
                                                     "output rounded to float16: half an ulp of 4 is 2e-3"),
    ("proxy_attention", "torch", torch.bfloat16): Tol(3e-2, 2e-2, "float32 compute, output rounded to bfloat16 "
                                                      "(8-bit mantissa): half an ulp of |out| <= 4 is 1.6e-2"),
    ("proxy_attention", "triton", torch.float32): Tol(5e-5, 5e-5, "IEEE float32 dots of the raw features scaled "
                                                      "by inverse norms afterwards, online-softmax rescaling per "
                                                      "key tile: a few eps over the torch path"),
    ("proxy_attention", "triton", torch.float16): Tol(8e-3, 8e-3, "P cast to float16 before the P@V tensor-core "
                                                      "dot (as in flash attention) plus the float16 output rounding"),
    ("proxy_attention", "triton", torch.bfloat16): Tol(6e-2, 4e-2, "P cast to bfloat16 before P@V (8-bit "
                                                       "mantissa) plus the bfloat16 output rounding"),
    # ---------------------------------------------------------------- PAMR (tests/test_pamr.py)
    # Outputs are convex combinations of mask values (|m| <= ~4 for randn), so absolute error is the measure. The
    # softmax arguments -|x(p) - x(p+o)| / (1e-8 + 0.1 std) reach ~30 in magnitude, so float32 rounding of them
    # (~1e-7 relative) moves each weight by ~3e-6 relative; the sweeps are convex combinations and do not amplify it.
    ("pamr", "torch", torch.float64): Tol(1e-10, 1e-10, "same maths as the reference in float64; only the "
                                          "summation order (chunked multiply-adds, two-pass variance of centred "
                                          "samples) differs"),
    ("pamr", "torch", torch.float32): Tol(3e-5, 1e-5, "float32 affinities (softmax arguments up to ~30, ~3e-6 "
                                          "relative weight error) times |m| <= ~4, through convex sweeps"),
    ("pamr", "torch", torch.float16): Tol(4e-3, 4e-3, "mask quantised to float16 before the op (the float64 "
                                          "reference sees the same values), float32 sweeps, output rounded to "
                                          "float16: half an ulp of |out| <= 4 is 2e-3"),
    ("pamr", "torch", torch.bfloat16): Tol(3e-2, 2e-2, "float32 sweeps, output rounded to bfloat16 (8-bit "
                                           "mantissa): half an ulp of |out| <= 4 is 1.6e-2"),
    ("pamr", "triton", torch.float32): Tol(5e-5, 2e-5, "as the torch path, plus the GPU's approximate exp/sqrt/"
                                           "division (a few ulp) in the affinity kernel"),
    ("pamr", "triton", torch.float16): Tol(4e-3, 4e-3, "float32 affinities and float32 ping-pong buffers; only the "
                                           "final store rounds to float16 (half an ulp of 4 is 2e-3)"),
    ("pamr", "triton", torch.bfloat16): Tol(3e-2, 2e-2, "float32 sweeps; only the final store rounds to bfloat16: "
                                            "half an ulp of 4 is 7.8e-3 on a GPU (round to nearest), a full ulp "
                                            "(1.6e-2) under TRITON_INTERPRET=1, whose fp32->bf16 cast truncates"),
    # ---------------------------------------------------------------- segmenter (end to end, tests/test_segmenter.py)
    # Cosine-similarity logits (|logit| <= 1) of a whole NACLIP segmenter, backend="auto" (torch path on CPU) vs
    # backend="reference", both float32 (the reference is not float64 here: the whole CLIP tower runs in float32).
    ("segmenter", "auto", torch.float32): Tol(1e-5, 0.0, "two float32 pipelines that differ only in the last "
                                              "block's attention (~1e-6 apart) and PAMR's summation order; that "
                                              "passes through out_proj, ln_post (divides by a token's std: can "
                                              "amplify ~10x), proj and L2 normalisation, and PAMR averages it. "
                                              "Measured max 2e-7 on the random ViT-B-16 test (50x margin)"),
    ("segmenter", "triton", torch.float32): Tol(2e-5, 0.0, "as ('segmenter', 'auto') with the Triton kernels' "
                                                "float32 tolerances (attention 5e-5, PAMR 5e-5 on |m| ~ 4) scaled to "
                                                "cosine logits of |l| <= 1 (tiny model, interpreter on CPU)"),
    # ProxyCLIP segmenter (tests/test_proxyclip_segmenter.py): cosine logits (|l| <= 1). The proxy attention's mask
    # (A < 0 -> -inf) is a step: a similarity within rounding of gamma*beta*mu can be kept by one implementation and
    # masked by the other, which moves that query's output by ~1/(kept keys) of a value difference. With M ~ 1000
    # keys per query and ~10^6 similarities per window a few such flips are expected, hence the looser atol.
    ("proxyclip_segmenter", "literal", torch.float32): Tol(1e-4, 0.0, "float32 head vs the float64 SPEC loop on tiny "
                                                          "models (M <= 48): float32 rounding through out_proj, "
                                                          "ln_post and proj plus the rare mask flip; measured 1e-6"),
    ("proxyclip_segmenter", "auto", torch.float32): Tol(5e-4, 0.0, "torch path vs reference, ViT-B-16 + DINO "
                                                       "ViT-B/8 (M = 784 per window): float32 summation order and "
                                                       "mask flips at the threshold; measured max 6e-5"),
    ("proxyclip_segmenter", "triton", torch.float32): Tol(5e-4, 0.0, "as ('proxyclip_segmenter', 'auto') with the "
                                                         "Triton kernel's exp2 and block order (tiny models)"),
    # L2-normalised dense patch features (|x| <= 1) of a model loaded in half precision vs the same weights in float32
    # (tests/test_model.py): two transformer blocks of half-precision matmuls and residual adds, LayerNorms in float32.
    ("dense_features", "torch", torch.float16): Tol(5e-3, 0.0, "float16 weights and activations through 2 blocks: "
                                                   "a few ulp (2^-11 relative) per block; measured 1e-3"),
    ("dense_features", "torch", torch.bfloat16): Tol(5e-2, 0.0, "bfloat16 (2^-8 relative) through 2 blocks; "
                                                    "measured 1e-2"),
    # ---------------------------------------------------------------- text (tests/test_text.py)
    # L2-normalised template-ensemble embeddings (|x| <= 1): prompts batched by token length (no padding, last block
    # on the pooled token only) vs batched in prompt order, both float32 through the same weights.
    ("text", "grouped", torch.float32): Tol(1e-5, 0.0, "same maths; the matmuls see other batch shapes (other "
                                            "blocking, summation order) and the last block's attention one query "
                                            "row: float32 rounding through the text tower; measured ~1e-7"),
    # ---------------------------------------------------------------- gradients (tests/test_autograd.py)
    # Gradients of sum(out * weight) (weight ~ randn) w.r.t. the inputs, against the float64 reference's autograd.
    ("attention_grad", "torch", torch.float64): Tol(1e-9, 1e-9, "the recompute backward differentiates the blocked "
                                                    "SDPA path; float64 with only a different summation order "
                                                    "(|grad| ~ 10, eps 2e-16 times ~N terms)"),
    ("attention_grad", "torch", torch.float32): Tol(2e-4, 1e-4, "float32 SDPA backward (softmax Jacobian, length-N "
                                                    "dot products) against float64: ~100 eps on |grad| up to ~10"),
    ("pamr_grad", "torch", torch.float64): Tol(1e-9, 1e-9, "float64; the backward differentiates out-of-place "
                                               "sweeps instead of the reference's neighbour stack (summation order)"),
    ("pamr_grad", "torch", torch.float32): Tol(2e-4, 1e-4, "float32 affinities: the image gradient goes through "
                                               "1 / (1e-8 + 0.1 std) and the softmax (arguments up to ~30), which "
                                               "amplify float32 rounding ~100x"),
    # ---------------------------------------------------------------- torch.compile (tests/test_compile.py)
    ("compile", "aot_eager", torch.float32): Tol(2e-5, 1e-5, "the compiled graph runs the same kernels but aten "
                                                 "decompositions reorder a few float32 reductions (LayerNorm, "
                                                 "bicubic interpolation); measured 2e-6 on L2-normalised features"),
    ("compile", "inductor", torch.float32): Tol(5e-5, 1e-5, "inductor fuses and reorders the float32 pointwise ops "
                                                "and reductions around the opaque op"),
}


def tol(op: str, backend: str, dtype: torch.dtype) -> Tol:
    try:
        return TOLERANCES[(op, backend, dtype)]
    except KeyError:
        raise KeyError(f"no tolerance for {(op, backend, dtype)}: add one with its reason to tests/tolerances.py")


def assert_close_to_reference(actual: torch.Tensor, expected: torch.Tensor, op: str, backend: str,
                              dtype: torch.dtype, msg: str = "") -> None:
    """Compare ``actual`` (any dtype) with the float64 ``expected`` under the table's tolerance."""
    t = tol(op, backend, dtype)
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)} {msg}"
    assert actual.dtype == dtype, f"output dtype {actual.dtype} != input dtype {dtype} {msg}"
    assert torch.isfinite(actual).all(), f"non-finite output (unwritten/poisoned elements?) {msg}"
    torch.testing.assert_close(actual.double(), expected.double(), atol=t.atol, rtol=t.rtol,
                               msg=lambda m: f"{op}/{backend}/{dtype}: {m} {msg} [tolerance: {t.reason}]")
