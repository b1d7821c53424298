"""The Decision Transformer: shapes, causality over (R, s, a) tokens, padding on either side, the loss."""

from __future__ import annotations

import pytest
import torch

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


def test_every_registered_causal_attention_trains_a_step():
    for attention in ATTENTIONS:
        model = tiny(attention).train()
        batch = window()
        loss = (model(**batch) - batch["actions"]).pow(2).mean()
        loss.backward()
        assert torch.isfinite(loss), attention


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
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
