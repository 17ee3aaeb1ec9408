"""SCLIP (Wang et al., ECCV 2024): correlative self-attention ``softmax(qq^T) v + softmax(kk^T) v``, no bias.

SCLIP's code keeps the last block's residual and MLP around the new attention (``x = x + csa(ln_1(x))``, then
``x = x + mlp(ln_2(x))``), hence ``architecture="vanilla"``. The rest of the pipeline is NACLIP's (window 224/112,
short side 336, PAMR, logit scale 40); SCLIP's own post-processing settings are not reproduced here.
"""
from naclip.methods.naclip import attention_method

METHOD = attention_method("sclip", "SCLIP", "csa attention (qq + kk), no bias, residual and MLP kept",
                          similarity="csa", sigma=None, architecture="vanilla")
