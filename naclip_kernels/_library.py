"""``torch.library`` registration shared by every op: one custom op, its fake kernel and its autograd formula.

Each public functional (``nk.neighbour_attention``, ``nk.pamr``, ``nk.proxy_attention``) validates its arguments
eagerly in Python and then calls ``torch.ops.naclip_kernels.<op>``, registered here with
:func:`torch.library.custom_op`. That is what makes the kernels visible to PyTorch:

* ``torch.compile`` treats the op as one opaque node whose output shape comes from the *fake* kernel (no graph
  break, and symbolic sizes flow through it, so a new image size does not recompile);
* ``torch.export`` keeps it as one node ``torch.ops.naclip_kernels.<op>.default``;
* autograd uses the registered formula.

Why ``custom_op`` and not ``torch.library.triton_op`` (which this torch has): ``triton_op`` registers the
implementation itself as the fake kernel and inlines it into the graph under ``torch.compile``. Our ops have one
implementation per backend behind a ``backend`` argument, and the CPU (torch) path is a Python loop over query or
channel blocks sized from the input shape; traced symbolically, that loop would guard on every size and recompile
for each new image size, which is exactly what registration is for avoiding. An opaque custom op runs the same
code eagerly inside the compiled graph (the Triton kernels keep their own autotuning and launch).

Backward: the Triton kernels are forward-only. Every op's autograd formula calls a second custom op,
``naclip_kernels::<op>_backward``, which recomputes the forward through the op's *differentiable torch path*
under ``torch.enable_grad()`` and returns ``torch.autograd.grad`` of it: the maths of all backends is identical,
so these are the exact gradients of whatever backend ran forward (up to that backend's rounding). The backward is
its own op so that compiled graphs with gradients keep it opaque too. With ``create_graph=True`` (a second
derivative to come) the formula differentiates the recompute directly instead, so higher-order gradients work.
"""
from __future__ import annotations

import re
from typing import Callable, Optional, Sequence

import torch

NAMESPACE = "naclip_kernels"

__all__ = ["NAMESPACE", "define_op"]


def _backward_schema(schema: str) -> str:
    """``"(Tensor x, int n) -> Tensor"`` -> ``"(Tensor grad_out, Tensor x, int n) -> Tensor[]"``."""
    match = re.fullmatch(r"\((.*)\)\s*->\s*Tensor", schema.strip())
    if match is None:
        raise ValueError(f"define_op: schema must be '(args) -> Tensor', got {schema!r}")
    args = match.group(1).strip()
    return f"(Tensor grad_out{', ' + args if args else ''}) -> Tensor[]"


_AUTOGRAD_KEYS = tuple(getattr(torch._C.DispatchKey, name) for name in
                       ("AutogradFunctionality", "AutogradOther", "AutogradNestedTensor", "ADInplaceOrView"))


def _autograd_reenabled():
    """A dispatch-key guard under which autograd records again inside a custom op's kernel.

    A custom op's kernel runs below the autograd dispatch key (its autograd wrapper excludes the autograd keys
    from the thread-local dispatch set before redispatching), so ``torch.enable_grad()`` alone records nothing
    there. The backward op needs a real autograd graph of the recompute, so it lifts that exclusion for the
    duration of the recompute; the previous sets are restored on exit.
    """
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in _AUTOGRAD_KEYS:
        exclude = exclude.remove(key)
    return torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude)


def define_op(name: str, schema: str, impl: Callable[..., torch.Tensor], fake: Callable[..., torch.Tensor],
              differentiable: Callable[..., torch.Tensor], tensor_args: Sequence[int],
              twice_differentiable: Optional[Callable[..., torch.Tensor]] = None):
    """Register ``naclip_kernels::<name>`` with a fake kernel and a recompute-based autograd formula.

    Args:
        name: the op name (one op per file under ``naclip_kernels/ops``).
        schema: the op's schema without the name, e.g. ``"(Tensor? q, Tensor k, SymInt h, str backend) -> Tensor"``;
            the op returns one new (never aliasing, contiguous) tensor.
        impl: the implementation for every device (dispatches on its ``backend`` argument).
        fake: same arguments; returns an empty tensor of the output's shape, dtype, device and strides.
        differentiable: same arguments; a differentiable torch computation of the same maths (used only by the
            backward: it runs under ``torch.enable_grad()`` on detached copies of the tensor arguments).
        tensor_args: positions of the tensor arguments (``Tensor`` or ``Tensor?``) in ``schema``.
        twice_differentiable: same arguments; a computation whose backward is differentiable again, for
            ``create_graph=True`` (default ``differentiable``; attention's fused SDPA has no double backward).

    Returns:
        The forward :class:`torch.library.CustomOpDef` (callable like the function).
    """
    tensor_args = tuple(tensor_args)
    qualname = f"{NAMESPACE}::{name}"
    op = torch.library.custom_op(qualname, impl, mutates_args=(), schema=schema)
    op.register_fake(fake)

    def backward_impl(grad_out, *args):
        present = [i for i in tensor_args if args[i] is not None]
        leaves = {i: args[i].detach().requires_grad_(True) for i in present}
        if grad_out.numel() == 0:
            return [torch.zeros_like(args[i]) for i in present]
        call = [leaves.get(i, arg) for i, arg in enumerate(args)]
        with _autograd_reenabled(), torch.enable_grad():
            out = differentiable(*call)
            grads = torch.autograd.grad(out, [leaves[i] for i in present], grad_out, allow_unused=True)
        # An input that does not reach the output (q for similarity="kk") has a zero gradient.
        return [torch.zeros_like(args[i]) if g is None else g.contiguous() for i, g in zip(present, grads)]

    def backward_fake(grad_out, *args):
        return [args[i].new_empty(args[i].shape) for i in tensor_args if args[i] is not None]

    backward_op = torch.library.custom_op(f"{qualname}_backward", backward_impl, mutates_args=(),
                                          schema=_backward_schema(schema))
    backward_op.register_fake(backward_fake)

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*(inputs[i] for i in tensor_args))
        # Non-tensor arguments as they are; tensor slots refilled from saved_tensors in backward.
        ctx.args = tuple(None if i in tensor_args else arg for i, arg in enumerate(inputs))

    def backward(ctx, grad_out):
        args = list(ctx.args)
        for i, tensor in zip(tensor_args, ctx.saved_tensors):
            args[i] = tensor
        result = [None] * len(args)
        if torch.is_grad_enabled():
            # create_graph=True (a second derivative is coming): differentiate the recompute of the saved inputs
            # themselves, so that the gradients are part of the graph and higher orders work.
            wanted = [i for i in tensor_args if args[i] is not None and ctx.needs_input_grad[i]]
            out = (twice_differentiable or differentiable)(*args)
            grads = torch.autograd.grad(out, [args[i] for i in wanted], grad_out, create_graph=True,
                                        allow_unused=True)
            for i, g in zip(wanted, grads):
                result[i] = torch.zeros_like(args[i]) if g is None else g
            return tuple(result)
        grads = iter(backward_op(grad_out, *args))
        for i in tensor_args:
            if args[i] is not None:
                g = next(grads)
                result[i] = g if ctx.needs_input_grad[i] else None
        return tuple(result)

    op.register_autograd(backward, setup_context=setup_context)
    return op
