"""The Decision Transformer (Chen et al., 2021) with any registered causal attention.

The network of results/paper/official_code.md §4.2: each step t of a window contributes three tokens, its
return-to-go R_t, state s_t and action a_t, interleaved as (R_1, s_1, a_1, R_2, ...); a learned timestep embedding
is added to all three, the sequence is layer-normalised, and pre-LN causal blocks mix it. The action of step t is
predicted from the state token s_t (which sees R_≤t, s_≤t and a_<t) by a linear layer and tanh. There is no
position embedding besides the timestep. Padded steps (`padding_mask`, True = padding) are masked in attention, so
real steps get the outputs of the unpadded window whichever side the padding is on.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from flowformer.dropout import Dropout
from flowformer.nn.blocks import CausalDecoderBlock

TOKENS_PER_STEP = 3  # return-to-go, state, action
INIT_SCOPES = ("blocks", "all")


def with_attention_defaults(
    attention: Mapping[str, Any] | str, defaults: Mapping[str, Mapping[str, Any]] | None
) -> Mapping[str, Any] | str:
    """The `model.attention` node with the options `defaults` names for its attention added, where it sets none."""
    node = {"name": attention} if isinstance(attention, str) else dict(attention)
    extra = dict((defaults or {}).get(node.get("name"), {}))
    return {**extra, **node} if extra else attention


class DecisionTransformer(nn.Module):
    """Return-conditioned policy over windows of K steps.

    Args:
        state_dim, act_dim: sizes of a state and an action (from the data).
        context_length: K, steps per window (3K tokens).
        max_timestep: size of the timestep embedding (timesteps lie in [0, max_timestep)).
        d_model, n_layers, n_heads, d_ff, dropout, activation, ln_eps: the transformer; dropout applies to the
            embedded sequence, after attention and after the feed-forward's output projection.
        ffn_inner_dropout: also drop out after the feed-forward's activation. GPT-2's MLP, which the official
            Decision Transformer uses, has no such dropout (False).
        attention: the `model.attention` node (any registered causal attention).
        attention_defaults: per attention name, options that attention gets unless the node sets them, e.g.
            `{"softmax": {"dropout": 0.1}}` for GPT-2's dropout on the attention probabilities.
        max_action: actions are tanh(·) · max_action.
        init_std: the standard deviation of the N(0, init_std²) initialisation (biases start at 0).
        init_scope: which layers get it. "blocks" (the official code): the linear layers of the transformer blocks,
            where the official code's GPT-2 applies its `_init_weights`; the timestep, return, state and action
            embeddings and the action head, which the official code builds outside GPT-2, keep PyTorch's defaults
            (an embedding N(0, 1), a linear layer uniform in ±1/sqrt(fan_in)). "all" (CORL): every linear layer
            and embedding.
    """

    def __init__(
        self,
        state_dim: int,
        act_dim: int,
        context_length: int = 20,
        max_timestep: int = 1000,
        d_model: int = 256,
        n_layers: int = 3,
        n_heads: int = 4,
        d_ff: int = 1024,
        dropout: float = 0.1,
        activation: str = "relu",
        attention: Mapping[str, Any] | str = "flow",
        max_action: float = 1.0,
        ln_eps: float = 1e-5,
        init_std: float = 0.02,
        init_scope: str = "blocks",
        ffn_inner_dropout: bool = False,
        attention_defaults: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        super().__init__()
        if init_scope not in INIT_SCOPES:
            raise ValueError(f"model.init_scope={init_scope!r}; expected one of {', '.join(INIT_SCOPES)}")
        self.state_dim, self.act_dim, self.context_length = int(state_dim), int(act_dim), int(context_length)
        self.max_action = float(max_action)
        self.timestep_embedding = nn.Embedding(max_timestep, d_model)
        self.return_embedding = nn.Linear(1, d_model)
        self.state_embedding = nn.Linear(state_dim, d_model)
        self.action_embedding = nn.Linear(act_dim, d_model)
        self.embedding_norm = nn.LayerNorm(d_model, eps=ln_eps)
        self.embedding_dropout = Dropout(dropout)
        attention = with_attention_defaults(attention, attention_defaults)
        self.blocks = nn.ModuleList(
            CausalDecoderBlock(
                d_model,
                n_heads,
                d_ff,
                attention,
                dropout,
                norm_first=True,
                activation=activation,
                ln_eps=ln_eps,
                ffn_inner_dropout=ffn_inner_dropout,
            )
            for _ in range(n_layers)
        )
        self.final_norm = nn.LayerNorm(d_model, eps=ln_eps)
        self.action_head = nn.Linear(d_model, act_dim)
        self.init_std = float(init_std)
        (self.blocks if init_scope == "blocks" else self).apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.init_std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def embed(self, states: Tensor, actions: Tensor, returns_to_go: Tensor, timesteps: Tensor) -> Tensor:
        """The interleaved token sequence (B, 3K, D) of a window, before the blocks."""
        time = self.timestep_embedding(timesteps)
        tokens = torch.stack(
            [
                self.return_embedding(returns_to_go.unsqueeze(-1)) + time,
                self.state_embedding(states) + time,
                self.action_embedding(actions) + time,
            ],
            dim=2,
        )  # (B, K, 3, D)
        batch, steps = timesteps.shape
        return self.embedding_dropout(self.embedding_norm(tokens.reshape(batch, TOKENS_PER_STEP * steps, -1)))

    def forward(
        self,
        states: Tensor,
        actions: Tensor,
        returns_to_go: Tensor,
        timesteps: Tensor,
        padding_mask: Tensor | None = None,
    ) -> Tensor:
        """Predicted actions (B, K, act_dim) in [−max_action, max_action] for a batch of windows.

        states (B, K, state_dim) normalised; actions (B, K, act_dim); returns_to_go (B, K) scaled; timesteps (B, K)
        int64 in [0, max_timestep); padding_mask (B, K) bool, True = padded step, or None. The prediction for
        step t reads the state token of step t, so the action given at step t itself never enters it.
        """
        x = self.embed(states, actions, returns_to_go, timesteps)
        token_mask = None if padding_mask is None else padding_mask.repeat_interleave(TOKENS_PER_STEP, dim=1)
        for block in self.blocks:
            x = block(x, token_mask)
        state_tokens = self.final_norm(x[:, 1::TOKENS_PER_STEP])
        return torch.tanh(self.action_head(state_tokens)) * self.max_action


__all__ = ["DecisionTransformer"]
