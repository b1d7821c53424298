"""Flow-Attention's hand-written passes as `torch.library` custom ops: what `torch.compile` sees of them.

Dynamo cannot trace the blocked and chunked passes (they write into slices of preallocated tensors, in loops sized by
the cache), so every attention call would break a compiled model's graph in pieces. As custom ops, each pass is one
opaque node of the graph, forward and backward, and keeps its hand-written backward; the compiler fuses what lies
around it (projections, feature map, padding, residuals, norms). Outside the compiler, calling `blocked_flow` or
`causal_flow` runs the autograd Functions (`BlockedFlow`, `CausalFlow`) directly; both run the same forward and
backward code.

A forward op returns the output and then what its backward reads. Custom ops may not return a tensor that aliases
an input or another output, so saved views and inputs are returned as copies, and a field an option leaves out as an
empty uint8 tensor (no saved tensor is an integer tensor).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from flowformer.attention.flow.causal_backward import CausalFlow, causal_backward, causal_forward
from flowformer.attention.flow.noncausal import BlockedFlow, blocked_backward, blocked_forward
from flowformer.attention.flow.options import FlowOptions

# the `FlowOptions` fields an op takes, as the schema types them (the backend is the op itself)
_OPTIONS = "bool competition, bool allocation, float? clamp, float eps, str kernel, str competition_over, int? chunk_size"
_OPTION_NAMES = tuple(argument.split()[-1] for argument in _OPTIONS.split(", "))
_FORWARD_SCHEMA = f"(Tensor q, Tensor k, Tensor v, Tensor? q_real, Tensor? k_real, {_OPTIONS}) -> Tensor[]"
_BACKWARD_SCHEMA = f"(Tensor grad_out, Tensor[] saved, {_OPTIONS}) -> Tensor[]"


def _option_args(options: FlowOptions) -> tuple:
    return tuple(getattr(options, name) for name in _OPTION_NAMES)


def _options(args: Sequence) -> FlowOptions:
    return FlowOptions(**dict(zip(_OPTION_NAMES, args, strict=True)), backend="blocked")


def _storage(tensor: Tensor) -> int:
    # the identity of the memory a tensor views; unlike `_base`, it is kept where an op's body runs (below autograd,
    # where views are not tracked) and defined for the compiler's fake tensors, which have no data pointer
    return tensor.untyped_storage()._cdata


def _pack(out: Tensor, saved: Sequence[Tensor | None], inputs: Sequence[Tensor | None]) -> list[Tensor]:
    """[out, *saved] as tensors that alias no input and no other output (see the module docstring)."""
    packed: list[Tensor] = []
    taken = {_storage(tensor) for tensor in inputs if tensor is not None}
    for tensor in (out, *saved):
        if tensor is None:
            tensor = out.new_empty(0, dtype=torch.uint8)
        elif _storage(tensor) in taken:
            tensor = tensor.clone(memory_format=torch.contiguous_format)
        taken.add(_storage(tensor))
        packed.append(tensor)
    return packed


def _unpack(saved: Sequence[Tensor]) -> tuple[Tensor | None, ...]:
    return tuple(None if tensor.dtype == torch.uint8 else tensor for tensor in saved)


class _FlowOp:
    """One hand-written pass as a pair of custom ops, `flowformer::<name>` and `flowformer::<name>_backward`,
    differentiable through the second. Calling it returns the (B, H, L, dv) output: through the ops while
    `torch.compile` traces, else through the pass's autograd Function `eager` (the same forward and backward)."""

    def __init__(self, name: str, forward: Callable, backward: Callable, eager: type[torch.autograd.Function]) -> None:
        self.eager = eager
        def forward_impl(q, k, v, q_real, k_real, *options):
            out, saved = forward(q, k, v, q_real, k_real, _options(options))
            return _pack(out, saved, (q, k, v, q_real, k_real))

        def backward_impl(grad_out, saved, *options):
            return list(backward(_unpack(saved), _options(options), grad_out))

        self.forward = torch.library.custom_op(f"flowformer::{name}", forward_impl, mutates_args=(),
                                               schema=_FORWARD_SCHEMA)
        self.backward = torch.library.custom_op(f"flowformer::{name}_backward", backward_impl, mutates_args=(),
                                                schema=_BACKWARD_SCHEMA)
        # Under the compiler's fake tensors the passes run as they are: they only read shapes, so the shapes and
        # strides of every output are exactly those of a real call.
        self.forward.register_fake(forward_impl)
        self.backward.register_fake(backward_impl)
        self.forward.register_autograd(self._backward, setup_context=self._setup_context)

    @staticmethod
    def _setup_context(ctx, inputs, output) -> None:
        ctx.options = tuple(inputs[5:])
        ctx.save_for_backward(*output[1:])

    def _backward(self, ctx, grads):
        grad_q, grad_k, grad_v = self.backward(grads[0], list(ctx.saved_tensors), *ctx.options)
        return (grad_q, grad_k, grad_v) + (None,) * (2 + len(ctx.options))

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, q_real: Tensor | None, k_real: Tensor | None,
                 options: FlowOptions) -> Tensor:
        if not torch.compiler.is_compiling():
            return self.eager.apply(q, k, v, q_real, k_real, options)
        return self.forward(q, k, v, q_real, k_real, *_option_args(options))[0]


blocked_flow = _FlowOp("flow_blocked", blocked_forward, blocked_backward, BlockedFlow)
causal_flow = _FlowOp("flow_causal", causal_forward, causal_backward, CausalFlow)
