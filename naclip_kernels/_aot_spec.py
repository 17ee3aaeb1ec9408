"""What the ahead-of-time (AOT) GPU-readiness check compiles.

Every op module that has Triton kernels exposes ``aot_configs() -> list[KernelConfig]`` listing *every*
configuration its autotuner (or heuristics) can pick, for the dtypes and head dims it supports.
:mod:`naclip_kernels.aot` compiles each for sm_80 and sm_90 without a GPU (``SPEC.md`` section 6) and reports
registers, spills and shared memory.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict


@dataclass(frozen=True)
class KernelConfig:
    """One compilable kernel specialisation.

    ``signature`` maps every kernel argument to a Triton type string (``"*fp16"``, ``"i32"``, ``"fp32"``,
    ``"constexpr"``); ``constexprs`` gives the value of each ``constexpr`` argument (block sizes and flags).
    ``default`` marks the configuration used when autotuning is off (the interpreter, or a fixed choice).
    """

    op: str
    name: str
    kernel: Any
    signature: Dict[str, str]
    constexprs: Dict[str, Any]
    num_warps: int = 4
    num_stages: int = 2
    default: bool = False
    tags: Dict[str, Any] = field(default_factory=dict)
