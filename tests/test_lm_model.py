"""fairseq's transformer_lm: positions, tied embeddings, initialisation, causality with every registered attention."""

from __future__ import annotations

import math

import pytest
import torch

from flowformer.attention import REGISTERED_NAMES
from flowformer.models.transformer_lm import TransformerLM
from flowformer.nn.embeddings import FairseqSinusoidalPositions

CAUSAL_ATTENTIONS = [name for name in REGISTERED_NAMES if name != "flow_lra_official"]


def attention_node(name: str) -> dict:
    # Reformer refuses causal mode unless told to accept its hash leak (as the paper's baseline did)
    return {"name": name, "allow_causal_hash_leak": True} if name == "reformer" else {"name": name}


def tiny(name: str = "flow", **kwargs) -> TransformerLM:
    torch.manual_seed(0)
    options = dict(d_model=16, n_layers=2, n_heads=2, d_ff=32, dropout=0.0) | kwargs
    return TransformerLM(50, attention=attention_node(name), **options).eval()


def test_positions_are_fairseqs_sinusoids():
    d, half = 10, 5
    table = FairseqSinusoidalPositions(d, padding_idx=1)(3)
    for row, position in enumerate((2, 3, 4)):  # fairseq counts the first token as padding_idx + 1
        frequencies = [math.exp(-i * math.log(10000) / (half - 1)) for i in range(half)]
        expected = [math.sin(position * f) for f in frequencies] + [math.cos(position * f) for f in frequencies]
        torch.testing.assert_close(table[row], torch.tensor(expected), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(FairseqSinusoidalPositions(d)(2, offset=3), FairseqSinusoidalPositions(d)(5)[3:])
    assert FairseqSinusoidalPositions(7)(2)[:, -1].abs().sum() == 0  # odd width: last column zero


def test_tied_embeddings_and_fairseq_initialisation():
    model = TransformerLM(1000, d_model=64, n_layers=1, n_heads=4, d_ff=128)
    assert model.output_weight is model.embed_tokens.weight
    assert model.embed_tokens.weight[1].abs().sum() == 0  # <pad>
    assert model.embed_tokens.weight[2:].std().item() == pytest.approx(64**-0.5, rel=0.05)
    attn = model.layers[0].self_attn
    bound = math.sqrt(6 / (64 + 64)) * 2**-0.5  # xavier-uniform with gain 1/sqrt(2)
    assert attn.q_proj.weight.abs().max() <= bound and attn.q_proj.weight.abs().max() > 0.9 * bound
    assert attn.out_proj.bias.abs().sum() == 0
    untied = TransformerLM(1000, d_model=64, n_layers=1, n_heads=4, d_ff=128, tie_embeddings=False)
    assert untied.output_weight is not untied.embed_tokens.weight


@pytest.mark.parametrize("name", CAUSAL_ATTENTIONS)
def test_every_attention_is_causal_in_the_lm(name):
    model = tiny(name)
    tokens = torch.randint(4, 50, (2, 24), generator=torch.Generator().manual_seed(1))
    changed = tokens.clone()
    changed[:, 15:] = torch.randint(4, 50, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        hidden, hidden_changed = model(tokens), model(changed)
    assert hidden.shape == (2, 24, 16) and torch.isfinite(hidden).all()
    if name != "reformer":  # LSH buckets let later tokens regroup earlier ones (the leak it was told to accept)
        torch.testing.assert_close(hidden[:, :15], hidden_changed[:, :15], rtol=1e-5, atol=1e-5)


def test_the_official_lra_variant_has_no_causal_form():
    with pytest.raises(NotImplementedError, match="causal"):
        tiny("flow_lra_official")(torch.randint(4, 50, (1, 8)))


@pytest.mark.parametrize("name", ["flow", "softmax", "performer"])
def test_right_padding_leaves_real_positions_unchanged(name):
    model = tiny(name)
    tokens = torch.randint(4, 50, (2, 20), generator=torch.Generator().manual_seed(3))
    padded, mask = tokens.clone(), torch.zeros(2, 20, dtype=torch.bool)
    padded[1, 12:], mask[1, 12:] = 1, True
    with torch.no_grad():
        out = model(padded, padding_mask=mask)
        alone = model(tokens[1:, :12])
    torch.testing.assert_close(out[1, :12], alone[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[0], model(tokens[:1])[0], rtol=1e-5, atol=1e-5)
