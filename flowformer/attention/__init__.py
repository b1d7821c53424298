"""Attention ops: Flow-Attention, its dense reference, the baselines, the registry and the multi-head layer."""

from flowformer.attention.flow import causal_linear_attention, flow_attention
from flowformer.attention.layer import MultiHeadAttention
from flowformer.attention.modules import FlowAttention
from flowformer.attention.recurrent import FlowState, flow_attention_prefill, flow_attention_step
from flowformer.attention.registry import REGISTERED_NAMES, build_attention, get_entry

__all__ = [
    "REGISTERED_NAMES",
    "FlowAttention",
    "FlowState",
    "MultiHeadAttention",
    "build_attention",
    "causal_linear_attention",
    "flow_attention",
    "flow_attention_prefill",
    "flow_attention_step",
    "get_entry",
]
