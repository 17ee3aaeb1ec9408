"""Vanilla CLIP dense features (the baseline): the last block as trained, ``qk`` attention, no bias.

The patched model computes exactly what the unpatched one does (``tests/test_model.py`` holds it to that); only the
per-patch tokens are read out instead of the pooled class token. NACLIP's pipeline around it.
"""
from naclip.methods.naclip import attention_method

METHOD = attention_method("clip", "CLIP", "the unmodified last block (qk attention, residual and MLP)",
                          similarity="qk", sigma=None, architecture="vanilla")
