"""Flow-Attention (Wu et al., ICML 2022): non-causal and causal, with padding masks and the paper's ablations.

One level per file:
    api.py              `flow_attention` and `apply_flow_attention`: checks, padding, mixed precision, dispatch
    options.py          `FlowOptions`, the one options object of every entry point (function, module, step mode)
    features.py         the feature map φ, real-token weights, prepared inputs
    noncausal.py        non-causal, "blocked" (CPU): cache-sized passes and a hand-written backward
    batched.py          non-causal, "batched" (GPU): a few large GEMMs in the input dtype, under autograd
    causal.py           causal, chunked: the forward pass, running sums, CPU inference in segments
    causal_backward.py  the causal pass's hand-written backward
    chunks.py           chunk and scan primitives (prefix sums over chunks, prefix softmax, causal linear attention)
The dense reference and the official formulations are in `flowformer/attention/reference.py`; the step mode for
generation (`flow_attention_prefill`, `flow_attention_step`) in `flowformer/attention/recurrent.py`.
"""

from flowformer.attention.flow.api import apply_flow_attention, flow_attention, resolve_backend
from flowformer.attention.flow.chunks import causal_linear_attention
from flowformer.attention.flow.features import feature_map
from flowformer.attention.flow.options import BACKENDS, DEFAULT_CHUNK_SIZE, KERNELS, FlowOptions

__all__ = [
    "BACKENDS",
    "DEFAULT_CHUNK_SIZE",
    "KERNELS",
    "FlowOptions",
    "apply_flow_attention",
    "causal_linear_attention",
    "feature_map",
    "flow_attention",
    "resolve_backend",
]
