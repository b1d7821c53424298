"""Attention ops behind one API: Flow-Attention (`flow/`), its plain formulations (`reference.py`), the step mode
for generation (`recurrent.py`), the baselines (`baselines.py`, `reformer.py`), the registry (config name -> op) and
the multi-head layer."""

from flowformer.attention.flow import FlowOptions, causal_linear_attention, flow_attention
from flowformer.attention.layer import MultiHeadAttention
from flowformer.attention.modules import FlowAttention
from flowformer.attention.recurrent import FlowState, flow_attention_prefill, flow_attention_step
from flowformer.attention.registry import REGISTERED_NAMES, build_attention, get_entry, split_attention_config

__all__ = [
    "REGISTERED_NAMES",
    "FlowAttention",
    "FlowOptions",
    "FlowState",
    "MultiHeadAttention",
    "build_attention",
    "causal_linear_attention",
    "flow_attention",
    "flow_attention_prefill",
    "flow_attention_step",
    "get_entry",
    "split_attention_config",
]
