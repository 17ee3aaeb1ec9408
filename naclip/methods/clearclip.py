"""ClearCLIP (Lan et al., ECCV 2024): self-self ``qq`` attention in a last block without residual and MLP.

The pipeline is NACLIP's (window 224/112, short side 336, PAMR, logit scale 40); ClearCLIP's own settings
(e.g. its logit scale) are not reproduced here.
"""
from naclip.methods.naclip import attention_method

METHOD = attention_method("clearclip", "ClearCLIP", "qq attention, no bias, no residual/MLP in the last block",
                          similarity="qq", sigma=None, architecture="reduced")
