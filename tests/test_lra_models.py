"""LRA models: shapes, CLS handling, masked padding, the shared dual encoder, Flax initialisation, baselines."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from flowformer.models.lra import LRADualEncoder, LRASequenceClassifier, lra_sinusoid_table, pool

CONF = str(Path(__file__).resolve().parent.parent / "conf")
OFFICIAL = {
    "name": "flow_lra_official",
    "kernel": "relu",
    "clamp": None,
    "competition_over": "heads",
    "proj_bias": False,
}
BASELINES = ["softmax", "linear", "performer", "cosformer", "reformer"]
TINY = {"d_model": 16, "n_layers": 2, "n_heads": 2, "qkv_dim": 8, "mlp_dim": 24}


def classifier(attention=OFFICIAL, **kw) -> LRASequenceClassifier:
    torch.manual_seed(0)
    return LRASequenceClassifier(
        vocab_size=17, num_classes=10, max_len=40, attention=attention, **{**TINY, **kw}
    ).eval()


def padded_batch(lengths: list[int], width: int, vocab: int = 17) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    tokens = torch.randint(1, vocab, (len(lengths), width))
    mask = torch.arange(width)[None, :] >= torch.tensor(lengths)[:, None]
    return tokens.masked_fill(mask, 0), mask


def test_classifier_shapes_and_cls_prepended():
    model = classifier()
    tokens, mask = padded_batch([12, 7, 3], 12)
    assert model(tokens, mask).shape == (3, 10)
    assert model.encoder.positions.table.shape == (41, 16)  # max_len + 1 for the CLS token
    assert torch.count_nonzero(model.encoder.cls) == 0  # zero-initialised, as in the official model
    softmax = classifier({"name": "softmax"})
    before = softmax(tokens, mask)
    with torch.no_grad():
        softmax.encoder.cls.normal_()  # not a constant: LayerNorm would remove a uniform shift
    assert (softmax(tokens, mask) - before).abs().max() > 1e-2  # the pooled position is the CLS token
    mean = classifier(pooling="mean")
    assert mean.encoder.cls is None and mean.encoder.positions.table.shape == (40, 16)


@pytest.mark.parametrize(
    "attention", [OFFICIAL, {"name": "flow"}, {"name": "softmax"}], ids=["official", "flow", "softmax"]
)
@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_classifier_output_is_invariant_to_padding(attention, pooling):
    model = classifier(attention, pooling=pooling)
    tokens, mask = padded_batch([12, 7, 3], 12)
    batched = model(tokens, mask)
    for row, length in enumerate([12, 7, 3]):
        alone = model(tokens[row : row + 1, :length])
        torch.testing.assert_close(batched[row], alone[0], rtol=1e-4, atol=1e-5)
    # the pad id is irrelevant once masked
    torch.testing.assert_close(model(tokens.masked_fill(mask, 5), mask), batched, rtol=1e-4, atol=1e-5)


def test_mean_pooling_ignores_padded_positions():
    encoded = torch.arange(12.0).view(1, 4, 3)
    mask = torch.tensor([[False, False, True, True]])
    torch.testing.assert_close(pool(encoded, mask, "mean"), encoded[:, :2].mean(1))
    torch.testing.assert_close(pool(encoded, None, "cls"), encoded[:, 0])


def test_dual_encoder_shares_one_encoder():
    torch.manual_seed(0)
    model = LRADualEncoder(vocab_size=257, num_classes=2, max_len=30, attention=OFFICIAL, **TINY).eval()
    assert model.encoder.cls is None  # no CLS token: "CLS" pooling is the first byte, as in the official code
    a, mask_a = padded_batch([20, 9], 20, vocab=257)
    b, mask_b = padded_batch([5, 14], 14, vocab=257)
    logits = model(a, b, mask_a, mask_b)
    assert logits.shape == (2, 2)
    # one set of encoder weights: the same document gives the same embedding in either slot
    torch.testing.assert_close(model.embed(a, mask_a), model.embed(a[:, :20], mask_a))
    swapped = torch.cat([model.embed(b, mask_b), model.embed(a, mask_a)], -1)
    torch.testing.assert_close(model.head(swapped), model(b, a, mask_b, mask_a))
    # both documents send gradients into the same parameters
    model.train()
    model(a, b, mask_a, mask_b).sum().backward()
    assert model.encoder.embedding.weight.grad[b[0, :5]].abs().sum() > 0
    head_in = [layer.in_features for layer in model.head if isinstance(layer, torch.nn.Linear)]
    head_out = [layer.out_features for layer in model.head if isinstance(layer, torch.nn.Linear)]
    assert head_in == [32, 24, 12] and head_out == [24, 12, 2]  # concat -> mlp -> mlp/2 -> classes
    n_encoders = sum(1 for m in model.modules() if type(m).__name__ == "LRAEncoder")
    assert n_encoders == 1


def test_dual_encoder_is_invariant_to_padding():
    torch.manual_seed(0)
    model = LRADualEncoder(vocab_size=257, num_classes=2, max_len=30, attention=OFFICIAL, **TINY).eval()
    a, mask_a = padded_batch([20, 9], 20, vocab=257)
    torch.testing.assert_close(model.embed(a, mask_a)[1], model.embed(a[1:, :9])[0], rtol=1e-4, atol=1e-5)


def test_flax_sinusoid_table():
    table = lra_sinusoid_table(50, 8)
    half, pos = 4, 7
    for i in range(half):
        rate = math.exp(-math.log(10000.0) * i / (half - 1))
        assert table[pos, i].item() == pytest.approx(math.sin(pos * rate), abs=1e-6)
        assert table[pos, half + i].item() == pytest.approx(math.cos(pos * rate), abs=1e-6)
    assert torch.all(table[0, :half] == 0) and torch.all(table[0, half:] == 1)


def test_flax_initialisation_and_official_attention_has_no_biases():
    torch.manual_seed(0)
    model = LRASequenceClassifier(vocab_size=257, num_classes=2, max_len=100, d_model=64, n_layers=1, n_heads=4,
                                  qkv_dim=32, mlp_dim=128, attention=OFFICIAL, pos_emb="learned")  # fmt: skip
    assert model.encoder.embedding.weight.std().item() == pytest.approx(1.0, abs=0.05)
    assert model.encoder.positions.table.std().item() == pytest.approx(0.02, abs=0.003)
    attention = model.encoder.encoder.layers[0].attention
    assert all(getattr(attention, f"{p}_proj").bias is None for p in "qkv") and attention.out_proj.bias is None
    assert attention.q_proj.weight.shape == (32, 64)  # qkv_dim x emb_dim
    bound = math.sqrt(6 / (64 + 32))  # xavier uniform
    assert attention.q_proj.weight.abs().max() <= bound
    ffn = model.encoder.encoder.layers[0].ffn
    assert ffn[0].bias.abs().max() < 1e-5 and ffn[0].bias.abs().max() > 0  # N(0, 1e-6)
    assert model.encoder.encoder.layers[0].norm1.eps == 1e-6
    assert isinstance(ffn[1], torch.nn.GELU) and ffn[1].approximate == "tanh"
    head = model.head[0]
    assert torch.count_nonzero(head.bias) == 0 and head.weight.abs().max() <= 2 * math.sqrt(1 / 64) / 0.8796 + 1e-6


def test_too_long_input_and_bad_pooling_are_explained():
    with pytest.raises(ValueError, match="max_len"):
        classifier()(torch.ones(1, 41, dtype=torch.long))
    with pytest.raises(ValueError, match="pooling"):
        classifier(pooling="first")


@pytest.mark.parametrize("attention", BASELINES)
def test_every_baseline_runs_with_masks(attention):
    model = classifier({"name": attention})
    tokens, mask = padded_batch([16, 9], 16)
    out = model(tokens, mask)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    torch.testing.assert_close(out[1], model(tokens[1:, :9])[0], rtol=1e-4, atol=1e-4)


TASK_DIMS = {
    "listops": {"vocab_size": 17, "num_classes": 10, "max_len": 2000},
    "text": {"vocab_size": 257, "num_classes": 2, "max_len": 1000},
    "retrieval": {"vocab_size": 257, "num_classes": 2, "max_len": 4000},
    "image": {"vocab_size": 256, "num_classes": 10, "max_len": 1024},
    "pathfinder": {"vocab_size": 256, "num_classes": 2, "max_len": 1024},
}
# (emb, layers, heads, head dim, mlp, dropout, pooling, positions) per results/paper/official_code.md §2.4
PAPER = {
    "listops": (512, 1, 2, 256, 1024, 0.1, "cls", "sinusoidal"),
    "text": (256, 1, 4, 64, 1024, 0.1, "cls", "sinusoidal"),
    "retrieval": (128, 4, 4, 32, 512, 0.1, "first", "sinusoidal"),
    "image": (128, 1, 4, 16, 128, 0.3, "cls", "learned"),
    "pathfinder": (256, 1, 8, 16, 256, 0.2, "mean", "sinusoidal"),
}


@pytest.mark.parametrize("task", list(TASK_DIMS))
def test_experiment_models_have_the_paper_sizes_and_run_with_every_attention(task):
    for attention in ["flow_lra_official", "flow", *BASELINES]:
        overrides = [f"experiment=lra/{task}"] + (
            [] if attention == "flow_lra_official" else [f"model/attention={attention}"]
        )
        with initialize_config_dir(config_dir=CONF, version_base="1.3"):
            cfg = compose("train", overrides=overrides)
        model = instantiate(cfg.model, **TASK_DIMS[task], _convert_="all").eval()
        layer = model.encoder.encoder.layers[0]
        emb, layers, heads, head_dim, mlp, dropout, pooling, positions = PAPER[task]
        assert (model.encoder.embedding.embedding_dim, len(model.encoder.encoder.layers)) == (emb, layers)
        assert (layer.attention.n_heads, layer.attention.d_head, layer.ffn[0].out_features) == (heads, head_dim, mlp)
        assert model.pooling == pooling and model.encoder.dropout.p == dropout
        assert type(model.encoder.positions).__name__ == (
            "LearnedPositionalEncoding" if positions == "learned" else "LRASinusoidalPositions"
        )
        tokens = torch.randint(1, 17, (2, 24))
        mask = torch.zeros(2, 24, dtype=torch.bool)
        mask[1, 20:] = True
        with torch.no_grad():
            out = model(tokens, tokens, mask, mask) if task == "retrieval" else model(tokens, mask)
        assert out.shape == (2, TASK_DIMS[task]["num_classes"]) and torch.isfinite(out).all(), (task, attention)
