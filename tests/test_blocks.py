"""Blocks and the multi-head layer: pre/post-LN, causal decoding, padding, and the time-series classifier."""

from __future__ import annotations

import pytest
import torch

from flowformer.attention.layer import MultiHeadAttention
from flowformer.attention.registry import REGISTERED_NAMES
from flowformer.models import TimeSeriesClassifier
from flowformer.nn.blocks import CausalDecoderBlock, Encoder, EncoderBlock


@pytest.mark.parametrize("norm_first", [True, False])
@pytest.mark.parametrize("attention", ["flow", "softmax", "linear"])
def test_encoder_block_ignores_padding(norm_first, attention):
    torch.manual_seed(0)
    block = EncoderBlock(16, 2, 32, attention=attention, dropout=0.0, norm_first=norm_first).eval()
    x = torch.randn(2, 9, 16)
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[0, 6:] = True
    out = block(x, mask)
    torch.testing.assert_close(out[0, :6], block(x[:1, :6])[0], rtol=1e-5, atol=1e-5)
    assert out.shape == x.shape


def test_pre_and_post_ln_differ():
    torch.manual_seed(0)
    pre = EncoderBlock(8, 2, 16, dropout=0.0, norm_first=True).eval()
    post = EncoderBlock(8, 2, 16, dropout=0.0, norm_first=False).eval()
    post.load_state_dict(pre.state_dict())
    x = torch.randn(1, 5, 8)
    assert not torch.allclose(pre(x), post(x))
    # post-LN ends with a LayerNorm: every position is normalised
    torch.testing.assert_close(post(x).mean(-1), torch.zeros(1, 5), atol=1e-5, rtol=0)


@pytest.mark.parametrize("attention", ["flow", "softmax", "linear", "cosformer", "performer"])
def test_causal_decoder_block_is_causal(attention):
    torch.manual_seed(0)
    block = CausalDecoderBlock(16, 2, 32, attention=attention, dropout=0.0).eval()
    x = torch.randn(1, 12, 16)
    changed = x.clone()
    changed[:, 7:] = torch.randn(1, 5, 16)
    torch.testing.assert_close(block(x)[:, :7], block(changed)[:, :7], rtol=1e-6, atol=1e-6)


def test_layer_options_and_bias():
    layer = MultiHeadAttention(16, 4, attention={"name": "flow_lra_official", "proj_bias": False})
    assert layer.q_proj.bias is None and layer.out_proj.bias is None
    assert layer.op.options["competition_over"] == "heads" and layer.op.options["kernel"] == "relu"
    cross = MultiHeadAttention(16, 4, attention={"name": "flow", "clamp": 5.0})
    assert cross(torch.randn(2, 3, 16), torch.randn(2, 7, 16)).shape == (2, 3, 16)
    with pytest.raises(ValueError, match="divisible"):
        MultiHeadAttention(10, 4)


def test_encoder_stack_and_final_norm():
    encoder = Encoder(3, final_norm=True, d_model=8, n_heads=2, d_ff=16, dropout=0.0)
    assert len(encoder.layers) == 3
    assert encoder(torch.randn(2, 4, 8)).shape == (2, 4, 8)


def test_time_series_classifier_ignores_padded_steps():
    torch.manual_seed(0)
    model = TimeSeriesClassifier(3, 4, 10, d_model=16, n_heads=2, n_layers=2, d_ff=32, attention={"name": "flow", "clamp": None}).eval()
    x = torch.randn(1, 10, 3)
    mask = torch.zeros(1, 10, dtype=torch.bool)
    mask[:, 7:] = True
    noisy = x.clone()
    noisy[:, 7:] = 100.0
    torch.testing.assert_close(model(x, mask), model(noisy, mask))
    with pytest.raises(ValueError, match="max_len=10"):
        model(torch.randn(1, 11, 3))


@pytest.mark.parametrize("attention", REGISTERED_NAMES)
def test_a_batch_cut_to_its_longest_series_is_the_padded_batch(attention):
    """The classifier takes a batch shorter than max_len as padded to it: the same logits and gradients, with the
    encoder run at the batch's length where every op ignores padding, and at max_len otherwise."""
    torch.manual_seed(0)
    model = TimeSeriesClassifier(3, 4, 40, d_model=16, n_heads=2, n_layers=2, d_ff=32, dropout=0.0,
                                 attention=attention)
    lengths = torch.tensor([5, 17, 9, 12])
    mask = torch.arange(40)[None, :] >= lengths[:, None]
    x = torch.randn(4, 40, 3).masked_fill(mask[..., None], 0.0)
    encoder_lengths = []
    model.encoder.register_forward_hook(lambda module, inputs, output: encoder_lengths.append(output.shape[1]))

    def logits_and_gradients(x, mask):
        model.zero_grad()
        torch.manual_seed(1)  # Performer and Reformer draw in training mode
        logits = model(x, mask)
        logits.square().sum().backward()
        return logits, [p.grad for p in model.parameters() if p.grad is not None]

    padded = logits_and_gradients(x, mask)
    cut = logits_and_gradients(x[:, :17], mask[:, :17])
    torch.testing.assert_close(cut[0], padded[0], rtol=1e-5, atol=1e-6)
    for expected, actual in zip(padded[1], cut[1], strict=True):
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-6)
    assert encoder_lengths == [40, 17 if model.runs_short_batches else 40]
    assert model.runs_short_batches == (attention != "reformer")


@pytest.mark.parametrize("rate", [0.0, 0.2, 1.0])
def test_drop_path_is_torchvisions_row_stochastic_depth(rate):
    """flowformer stays pure PyTorch; its DropPath draws and scales exactly as torchvision's StochasticDepth."""
    from torchvision.ops import StochasticDepth

    from flowformer.nn.blocks import DropPath

    x = torch.randn(8, 5, 3)
    torch.manual_seed(0)
    expected = StochasticDepth(rate, mode="row").train()(x)
    torch.manual_seed(0)
    assert torch.equal(DropPath(rate).train()(x), expected)
    assert torch.equal(DropPath(rate).eval()(x), x)


def test_the_library_imports_nothing_but_torch_and_numpy():
    """The layering rule: flowformer (models included) never pulls in Lightning, Hydra, tasks, results or the other
    libraries the suite uses (timm is loaded only when a DeiT model is built)."""
    import subprocess
    import sys

    code = ("import sys, flowformer, flowformer.models, flowformer.nn, flowformer.attention\n"
            "banned = ('lightning', 'pytorch_lightning', 'hydra', 'omegaconf', 'tasks', 'results', 'experiments', "
            "'torchvision', 'timm', 'einops')\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & set(banned)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
