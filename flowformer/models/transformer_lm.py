"""fairseq's `transformer_lm` as the paper trained it on WikiText-103 (results/paper/official_code.md §6), with any
registered attention, and incremental decoding for generation.

Network (fairseq's `base_lm_architecture` with `--share-decoder-input-output-embed`): token embedding × √D plus
fairseq's sinusoidal positions → dropout → n pre-LN decoder layers (x += dropout(attn(LN(x))); x += dropout(fc2(
relu(fc1(LN(x)))))) → final LayerNorm → output layer tied to the token embedding (no bias). Initialisation as
fairseq: embedding N(0, D^-1/2) with a zero `<pad>` row; q/k/v projections xavier-uniform with gain 2^-1/2, output
projection xavier-uniform with zero bias; feed-forward layers keep PyTorch's default.

The attention is the `model.attention` node, causal: Flow-Attention with the NLP clamp (5, set by the task's
`flow_clamp`), its ablations, or any baseline. `forward` returns the final hidden states; the loss over the full
vocabulary is computed from them and `output_weight` in chunks (tasks/wikitext103/loss.py), so the (B, L, V)
logits are never materialised.

Incremental decoding (`extend`): layers keep a state between calls, so each new token costs what one position
costs. Flow-Attention keeps its recurrent running sums (`flow_attention_prefill` / `flow_attention_step`, constant
time and memory per token); softmax attention keeps the keys and values (a KV cache). Other attentions have no
incremental form here (`supports_incremental()` is False): generation recomputes the whole sequence for them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from flowformer.attention import FlowAttention, MultiHeadAttention, flow_attention_prefill, flow_attention_step
from flowformer.attention.baselines import SoftmaxAttention
from flowformer.dropout import Dropout
from flowformer.nn.blocks import make_activation
from flowformer.nn.embeddings import FairseqSinusoidalPositions


@dataclass
class KVCache:
    """Keys and values of the tokens so far, (B, H, capacity, d) buffers filled up to `length` (grown by doubling,
    so that appending a token copies nothing in the common case)."""

    keys: Tensor
    values: Tensor
    length: int

    @classmethod
    def start(cls, k: Tensor, v: Tensor) -> KVCache:
        return cls(k.contiguous(), v.contiguous(), k.shape[2])

    def append(self, k: Tensor, v: Tensor) -> KVCache:
        """Add k (B, H, n, d) and v (B, H, n, dv) in place (growing the buffers when full)."""
        needed = self.length + k.shape[2]
        if needed > self.keys.shape[2]:
            capacity = max(needed, 2 * self.keys.shape[2])
            grow = lambda t: torch.cat([t, t.new_empty(*t.shape[:2], capacity - t.shape[2], t.shape[3])], dim=2)
            self.keys, self.values = grow(self.keys), grow(self.values)
        self.keys[:, :, self.length : needed] = k
        self.values[:, :, self.length : needed] = v
        self.length = needed
        return self

    def view(self) -> tuple[Tensor, Tensor]:
        return self.keys[:, :, : self.length], self.values[:, :, : self.length]


@dataclass
class DecodingState:
    """What `TransformerLM.extend` carries between calls: one state per layer and the tokens processed so far."""

    layers: list[Any] = field(default_factory=list)
    length: int = 0

    def nbytes(self) -> int:
        """Memory held by the layer states (flow: running sums; softmax: the filled part of the KV cache)."""
        total = 0
        for state in self.layers:
            tensors = state.view() if isinstance(state, KVCache) else state.tensors().values()
            total += sum(t.numel() * t.element_size() for t in tensors)
        return total


class DecoderLayer(nn.Module):
    """fairseq's pre-LN `TransformerDecoderLayer` without cross-attention, around any registered attention."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, attention: dict[str, Any] | str, dropout: float,
                 activation: str, activation_dropout: float) -> None:  # fmt: skip
        super().__init__()
        self.attn_norm = nn.LayerNorm(d_model)
        self.self_attn = MultiHeadAttention(d_model, n_heads, attention, dropout=dropout)
        self.ffn_norm = nn.LayerNorm(d_model)
        self.ffn = nn.Sequential(
            nn.Linear(d_model, d_ff), make_activation(activation), Dropout(activation_dropout),
            nn.Linear(d_ff, d_model), Dropout(dropout),
        )

    def forward(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """x (B, L, D), padding_mask (B, L) bool (True = padding) -> (B, L, D), causally."""
        x = x + self.self_attn(self.attn_norm(x), causal=True, key_padding_mask=padding_mask)
        return x + self.ffn(self.ffn_norm(x))

    @property
    def incremental_kind(self) -> str | None:
        """"flow" (recurrent running sums), "softmax" (KV cache), or None (no incremental form)."""
        op = self.self_attn.op
        if isinstance(op, FlowAttention) and op.options.competition_over == "keys":
            return "flow"
        return "softmax" if isinstance(op, SoftmaxAttention) else None

    def extend(self, x: Tensor, state: Any) -> tuple[Tensor, Any]:
        """The outputs of new positions x (B, n, D) given the state after the earlier ones (None: none yet)."""
        attn, kind = self.self_attn, self.incremental_kind
        if kind is None:
            raise NotImplementedError(f"attention {type(attn.op).__name__} has no incremental form; recompute instead")
        h = self.attn_norm(x)
        heads = lambda t: t.view(*t.shape[:2], attn.n_heads, -1).transpose(1, 2)  # (B, n, H·d) -> (B, H, n, d)
        q, k, v = heads(attn.q_proj(h)), heads(attn.k_proj(h)), heads(attn.v_proj(h))
        if kind == "flow":
            options = attn.op.options
            if state is not None and x.shape[1] == 1:
                out, state = flow_attention_step(q, k, v, state, options=options)
            else:
                out, state = flow_attention_prefill(q, k, v, state=state, options=options)
        elif state is None:  # softmax: the prompt, then a KV cache
            out, state = attn.op(q, k, v, causal=True), KVCache.start(k, v)
        elif x.shape[1] == 1:
            out = attn.op(q, *state.append(k, v).view(), causal=False)
        else:
            raise NotImplementedError("a softmax KV cache extends one token at a time after the prompt")
        out = attn.dropout(attn.out_proj(out.transpose(1, 2).reshape(*x.shape[:2], -1)))
        x = x + out
        return x + self.ffn(self.ffn_norm(x)), state


class TransformerLM(nn.Module):
    """A causal word-level language model (see the module docstring).

    Args:
        vocab_size: V, from the data (the fairseq dictionary, padded to a multiple of 8).
        d_model, n_layers, n_heads, d_ff: width D, depth, heads, feed-forward width (paper: 512, 6, 8, 2048).
        attention: the `model.attention` config node (`{"name": ..., options}`) or a registered name.
        dropout: after the embedding, the attention output and the feed-forward output (paper: 0.1).
        activation, activation_dropout: the feed-forward activation and the dropout after it (fairseq: relu, 0).
        padding_idx: the `<pad>` id (fairseq: 1): its embedding row is zero and positions count from it.
        tie_embeddings: the output layer is the token embedding (paper: yes).
        scale_embeddings: multiply the token embedding by √D (fairseq's default).
    """

    def __init__(
        self,
        vocab_size: int,
        d_model: int = 512,
        n_layers: int = 6,
        n_heads: int = 8,
        d_ff: int = 2048,
        attention: dict[str, Any] | str = "flow",
        dropout: float = 0.1,
        activation: str = "relu",
        activation_dropout: float = 0.0,
        padding_idx: int = 1,
        tie_embeddings: bool = True,
        scale_embeddings: bool = True,
    ) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab_size, d_model, padding_idx=padding_idx)
        self.embed_scale = math.sqrt(d_model) if scale_embeddings else 1.0
        self.embed_positions = FairseqSinusoidalPositions(d_model, padding_idx)
        self.dropout = Dropout(dropout)
        self.layers = nn.ModuleList(
            DecoderLayer(d_model, n_heads, d_ff, attention, dropout, activation, activation_dropout)
            for _ in range(n_layers)
        )
        self.final_norm = nn.LayerNorm(d_model)
        self.output_projection = None if tie_embeddings else nn.Linear(d_model, vocab_size, bias=False)
        self._init_like_fairseq()

    def _init_like_fairseq(self) -> None:
        nn.init.normal_(self.embed_tokens.weight, std=self.embed_tokens.embedding_dim**-0.5)
        with torch.no_grad():
            self.embed_tokens.weight[self.embed_tokens.padding_idx].zero_()
        if self.output_projection is not None:
            nn.init.normal_(self.output_projection.weight, std=self.embed_tokens.embedding_dim**-0.5)
        for layer in self.layers:
            attn = layer.self_attn
            for projection in (attn.q_proj, attn.k_proj, attn.v_proj):
                if projection is not None:  # Reformer shares queries and keys: no key projection
                    nn.init.xavier_uniform_(projection.weight, gain=2**-0.5)
            nn.init.xavier_uniform_(attn.out_proj.weight)
            if attn.out_proj.bias is not None:
                nn.init.zeros_(attn.out_proj.bias)

    @property
    def output_weight(self) -> Tensor:
        """(V, D): logits = hidden @ output_weight.T."""
        return self.embed_tokens.weight if self.output_projection is None else self.output_projection.weight

    def embed(self, tokens: Tensor, offset: int = 0) -> Tensor:
        """tokens (B, L) at positions offset.. -> (B, L, D) input of the first layer."""
        positions = self.embed_positions(tokens.shape[1], offset, device=tokens.device)
        return self.dropout(self.embed_scale * self.embed_tokens(tokens) + positions)

    def forward(self, tokens: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """tokens (B, L) int64 -> final hidden states (B, L, D). padding_mask (B, L) bool, True = padding (on the
        right: positions are counted from the first token)."""
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x, padding_mask)
        return self.final_norm(x)

    def logits(self, hidden: Tensor) -> Tensor:
        """(..., D) -> (..., V). Materialises the logits: use it for a few positions (generation), not a batch."""
        return hidden @ self.output_weight.T

    def supports_incremental(self) -> bool:
        """Whether every layer's attention has an incremental form (flow: recurrent; softmax: KV cache)."""
        return all(layer.incremental_kind is not None for layer in self.layers)

    def extend(self, tokens: Tensor, state: DecodingState | None = None) -> tuple[Tensor, DecodingState]:
        """Final hidden states (B, n, D) of new tokens (B, n) after the tokens `state` has seen, and the new state.

        The first call (state None) takes the prompt; later calls one token each. The hidden states equal those of
        `forward` on the whole sequence (up to rounding); `tests/test_lm_generation.py` holds them equal.
        """
        state = state or DecodingState([None] * len(self.layers), 0)
        x = self.embed(tokens, offset=state.length)
        layer_states = []
        for layer, layer_state in zip(self.layers, state.layers):
            x, layer_state = layer.extend(x, layer_state)
            layer_states.append(layer_state)
        return self.final_norm(x), DecodingState(layer_states, state.length + tokens.shape[1])


__all__ = ["DecoderLayer", "DecodingState", "KVCache", "TransformerLM"]
