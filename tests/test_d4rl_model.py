"""The Decision Transformer: shapes, causality over (R, s, a) tokens, padding on either side, the loss."""

from __future__ import annotations

import pytest
import torch

from flowformer.attention.registry import REGISTERED_NAMES
from flowformer.models import DecisionTransformer

ATTENTIONS = ["flow", "softmax", "linear", "performer", "cosformer", "reformer"]


def tiny(attention="flow", **kwargs) -> DecisionTransformer:
    torch.manual_seed(0)
    node = {"name": attention, "clamp": 10.0} if attention == "flow" else {"name": attention}
    if attention == "reformer":
        node["allow_causal_hash_leak"] = True
    return DecisionTransformer(
        5,
        2,
        context_length=6,
        max_timestep=50,
        d_model=16,
        n_layers=2,
        n_heads=2,
        d_ff=32,
        attention=node,
        **kwargs,
    ).eval()


def window(batch=3, steps=6, seed=1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "states": torch.randn(batch, steps, 5, generator=g),
        "actions": torch.rand(batch, steps, 2, generator=g) * 2 - 1,
        "returns_to_go": torch.randn(batch, steps, generator=g),
        "timesteps": torch.randint(0, 50, (batch, steps), generator=g),
    }


def test_actions_have_the_window_shape_and_the_action_range():
    model = tiny(max_action=2.0)
    out = model(**window())
    assert out.shape == (3, 6, 2)
    assert out.abs().max() <= 2.0


@pytest.mark.parametrize("attention", ["flow", "softmax"])
def test_a_prediction_never_sees_its_own_action_or_later_steps(attention):
    model = tiny(attention)
    base = window()
    changed = {key: value.clone() for key, value in base.items()}
    changed["actions"][:, 3:] += 5.0  # the action of step 3 and everything after it
    changed["states"][:, 4:] += 5.0
    changed["returns_to_go"][:, 4:] -= 5.0
    torch.testing.assert_close(model(**changed)[:, :4], model(**base)[:, :4])
    assert not torch.allclose(model(**changed)[:, 4:], model(**base)[:, 4:])


@pytest.mark.parametrize("attention", ["flow", "softmax"])
def test_the_action_of_a_step_is_read_from_its_state_token(attention):
    """Output t changes with s_t: the state token of step t sees s_t, the return token R_t (before it) does not."""
    model = tiny(attention)
    base = window()
    for t in (0, 3, 5):
        changed = {key: value.clone() for key, value in base.items()}
        changed["states"][:, t] += 3.0
        before, after = model(**base), model(**changed)
        torch.testing.assert_close(after[:, :t], before[:, :t])
        assert (after[:, t] - before[:, t]).abs().min() > 1e-4, t


@pytest.mark.parametrize("attention", [name for name in ATTENTIONS if name != "reformer"])
@pytest.mark.parametrize("padding", ["right", "left"])
def test_padded_windows_give_the_outputs_of_the_unpadded_steps(attention, padding):
    """Masked pads on either side leave the real steps' predictions as in a window of only those steps."""
    model = tiny(attention)
    short = window(batch=1, steps=4)
    pads = {
        "states": torch.full((1, 2, 5), 7.0),
        "actions": torch.full((1, 2, 2), -10.0),
        "returns_to_go": torch.zeros(1, 2),
        "timesteps": torch.zeros(1, 2, dtype=torch.long),
    }
    order = (lambda real, pad: (real, pad)) if padding == "right" else (lambda real, pad: (pad, real))
    padded = {key: torch.cat(order(short[key], pads[key]), dim=1) for key in short}
    mask = torch.cat(order(torch.zeros(1, 4, dtype=torch.bool), torch.ones(1, 2, dtype=torch.bool)), dim=1)
    real = slice(0, 4) if padding == "right" else slice(2, 6)
    torch.testing.assert_close(model(**padded, padding_mask=mask)[:, real], model(**short), atol=2e-5, rtol=1e-4)


# every registered attention that has a causal form (flow_lra_official's competition over heads has none)
CAUSAL_ATTENTIONS = [name for name in REGISTERED_NAMES if name != "flow_lra_official"]


def test_the_causal_attentions_are_every_registered_one_with_a_causal_form():
    with pytest.raises(NotImplementedError, match="no causal form"):
        tiny("flow_lra_official")(**window())
    assert set(ATTENTIONS) <= set(CAUSAL_ATTENTIONS)


@pytest.mark.parametrize("attention", CAUSAL_ATTENTIONS)
def test_every_registered_causal_attention_trains(attention):
    """Real optimiser steps: every parameter gets a finite, non-zero gradient, every parameter moves, and the loss on
    the batch falls."""
    model = tiny(attention).train()
    batch = window()
    start = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}

    def eval_loss() -> float:
        model.eval()
        with torch.no_grad():
            loss = (model(**batch) - batch["actions"]).pow(2).mean().item()
        model.train()
        return loss

    before = eval_loss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(10):
        optimizer.zero_grad()
        (model(**batch) - batch["actions"]).pow(2).mean().backward()
        if step == 0:
            for name, parameter in model.named_parameters():
                assert parameter.grad is not None, f"{attention}: no gradient reaches {name}"
                assert torch.isfinite(parameter.grad).all(), f"{attention}: non-finite gradient of {name}"
                assert parameter.grad.abs().max() > 0, f"{attention}: zero gradient of {name}"
        optimizer.step()
    unchanged = [name for name, parameter in model.named_parameters() if torch.equal(parameter, start[name])]
    assert not unchanged, f"{attention}: {unchanged} did not move"
    after = eval_loss()
    assert after < 0.8 * before, (attention, before, after)


@pytest.mark.parametrize("experiment, leak", [("d4rl/hopper-medium", True), ("wikitext103/transformer_lm", True),
                                               ("uea/JapaneseVowels", False)])
def test_causal_domains_accept_reformers_hash_leak(experiment, leak):
    """The paper's causal Reformer baselines (D4RL, WikiText-103) accept LSH's hash leak; others keep the refusal."""
    from tests.helpers import compose_config

    cfg = compose_config([f"experiment={experiment}", "model/attention=reformer"])
    assert cfg.model.attention.allow_causal_hash_leak is leak


@pytest.mark.parametrize("attention", ["flow", "softmax"])
def test_bf16_autocast_trains_and_stays_close_to_fp32(attention):
    """trainer.precision=bf16-mixed runs the model under autocast: forward close to fp32, finite gradients."""
    model, batch = tiny(attention), window()
    reference = model(**batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = model(**batch)
    torch.testing.assert_close(mixed.float(), reference, atol=3e-2, rtol=0)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = (model(**batch).float() - batch["actions"]).pow(2).mean()
    loss.backward()
    grads = {name: parameter.grad for name, parameter in model.named_parameters()}
    assert all(grad is not None for grad in grads.values()), [name for name, grad in grads.items() if grad is None]
    assert all(torch.isfinite(grad).all() for grad in grads.values())


# ------------------------------------------------------------------------------------------------ the official recipe


def test_the_feed_forward_drops_out_once_after_its_output_as_gpt2s_mlp():
    """GPT-2's MLP is Linear -> activation -> Linear -> dropout; no dropout after the activation."""
    cfg = _composed_model()
    assert cfg.ffn_inner_dropout is False
    model = tiny(ffn_inner_dropout=cfg.ffn_inner_dropout)
    for block in model.blocks:
        layers = list(block.ffn)
        dropouts = [i for i, layer in enumerate(layers) if isinstance(layer, torch.nn.Dropout)]
        assert dropouts == [len(layers) - 1] and isinstance(layers[-2], torch.nn.Linear)
        assert layers[-1].p == 0.1


def test_other_domains_keep_the_dropout_after_the_activation():
    from flowformer.nn.blocks import EncoderBlock

    layers = list(EncoderBlock(8, 2, 16, dropout=0.1).ffn)
    assert [i for i, layer in enumerate(layers) if isinstance(layer, torch.nn.Dropout)] == [2, 4]


def test_only_the_transformer_blocks_start_from_gpt2s_normal_init():
    """As in the official code, N(0, 0.02) and zero biases are GPT-2's, inside the blocks; the timestep embedding
    keeps PyTorch's N(0, 1) and the embeddings and action head nn.Linear's uniform ±1/sqrt(fan_in) with biases."""
    torch.manual_seed(0)
    model = DecisionTransformer(17, 6, d_model=256, n_layers=2, n_heads=4, d_ff=1024, attention={"name": "softmax"})
    assert 0.9 < model.timestep_embedding.weight.std().item() < 1.1
    for layer in (model.action_head, model.state_embedding, model.return_embedding, model.action_embedding):
        bound = 1 / layer.in_features**0.5
        assert layer.weight.abs().max() <= bound and layer.weight.abs().max() > 0.9 * bound
        assert layer.bias.abs().max() > 0  # PyTorch's uniform bias, not GPT-2's zeros
    inner = [module for module in model.blocks.modules() if isinstance(module, torch.nn.Linear)]
    assert len(inner) == 2 * 6  # q, k, v, out and the feed-forward's two, per block
    for layer in inner:
        assert abs(layer.weight.std().item() - 0.02) < 0.002 and (layer.bias == 0).all()
    everywhere = DecisionTransformer(17, 6, d_model=256, n_layers=1, init_scope="all")  # CORL's choice
    assert abs(everywhere.timestep_embedding.weight.std().item() - 0.02) < 0.002
    assert (everywhere.action_head.bias == 0).all()


def test_the_softmax_dt_drops_out_attention_probabilities_as_gpt2():
    """The official "DT" column is GPT-2 with attn_pdrop 0.1; the D4RL model config gives softmax that default."""
    from tests.helpers import compose_config

    def first_op(*overrides):
        cfg = compose_config(["experiment=d4rl/hopper-medium", *overrides])
        model = DecisionTransformer(5, 2, d_model=16, n_heads=2, d_ff=32, n_layers=1, **_model_options(cfg))
        return model, model.blocks[0].attention.op

    model, op = first_op("model/attention=softmax")
    assert op.dropout == 0.1
    model.train()
    assert not torch.equal(model(**window()), model(**window()))  # a new dropout mask each call
    assert first_op("model/attention=softmax", "+model.attention.dropout=0")[1].dropout == 0
    assert not hasattr(first_op()[1], "dropout")  # flow has no attention probabilities to drop out


def _composed_model():
    from tests.helpers import compose_config

    return compose_config(["experiment=d4rl/hopper-medium"]).model


def _model_options(cfg) -> dict:
    from omegaconf import OmegaConf

    node = OmegaConf.to_container(cfg.model, resolve=True)
    return {
        key: node[key]
        for key in ("attention", "attention_defaults", "ffn_inner_dropout", "init_scope", "dropout")
    }
