"""The ImageNet networks: the hierarchical Flowformer (official structure and counts, every attention, the
corrected heads), DeiT-S through timm (weights load, softmax equals timm's own attention), and the flow variant."""

from __future__ import annotations

import pytest
import torch

from flowformer.attention import REGISTERED_NAMES, build_attention
from flowformer.models.deit import deit_small
from flowformer.models.hierarchical_vit import HierarchicalFlowformer
from flowformer.models.qkv_attention import QkvAttention
from tasks.imagenet.complexity import count_parameters
from tests.helpers import relative_error

TINY = {"dims": (8, 16, 32, 64), "depths": (1, 1, 2, 1), "heads": (1, 1, 2, 4)}


def test_hierarchical_structure_follows_the_official_code():
    model = HierarchicalFlowformer(num_classes=1000)
    assert count_parameters(model) == 43_311_304  # the official code's 43.31 M
    blocks = [block for stage in model.stages for block in stage]
    assert [len(stage) for stage in model.stages] == [3, 3, 10, 3]
    assert [block.attn.num_heads for block in blocks] == [12] * 19
    assert [block.attn.head_dim for block in blocks[:1]] + [model.stages[3][0].attn.head_dim] == [8, 64]
    rates = [block.drop_path.rate for block in blocks]
    assert rates[0] == 0 and rates[-1] == pytest.approx(0.2) and rates == sorted(rates)
    assert all(torch.all(block.gamma == 1e-5) and block.gamma.shape == block.norm2.weight.shape for block in blocks)
    assert model.pos_embed.shape == (1, 56 * 56, 96)
    assert [conv.stride for conv in model.downsamples] == [(4, 4), (2, 2), (2, 2), (2, 2)]
    assert model.norm.eps == 1e-6


def test_layer_scale_is_on_the_mlp_branch_only():
    model = HierarchicalFlowformer(num_classes=5, image_size=32, **TINY).eval()
    block = model.stages[0][0]
    x = torch.randn(2, 16 * 16 // 4, 8)
    with torch.no_grad():
        block.gamma.zero_()  # the MLP branch vanishes; the attention branch stays
        expected = x + block.attn(block.norm1(x))
        assert torch.allclose(block(x), expected)


def test_corrected_heads_keep_16_channels_per_head():
    model = HierarchicalFlowformer(num_classes=1000, heads=[6, 12, 12, 12])
    widths = [stage[0].attn.head_dim for stage in model.stages]
    assert widths == [16, 16, 32, 64]
    assert count_parameters(model) == 43_311_304  # heads do not change the parameters


@pytest.mark.parametrize("attention", REGISTERED_NAMES)
def test_every_registered_attention_plugs_into_the_hierarchical_network(attention):
    torch.manual_seed(0)
    model = HierarchicalFlowformer(num_classes=7, image_size=32, attention={"name": attention}, **TINY)
    images = torch.randn(2, 3, 32, 32)
    logits = model(images)
    assert logits.shape == (2, 7)
    logits.sum().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)  # every parameter is used (DDP-safe)


def test_bad_sizes_name_the_key():
    with pytest.raises(ValueError, match="data.image_size=100 must be a multiple of 32"):
        HierarchicalFlowformer(num_classes=2, image_size=100)
    with pytest.raises(ValueError, match="model.heads"):
        HierarchicalFlowformer(num_classes=2, heads=[6, 12])
    model = HierarchicalFlowformer(num_classes=2, image_size=32, **TINY)
    with pytest.raises(ValueError, match="data.image_size"):
        model(torch.randn(1, 3, 64, 64))


def test_no_weight_decay_names_exist():
    model = HierarchicalFlowformer(num_classes=2, image_size=32, **TINY)
    assert model.no_weight_decay() <= dict(model.named_parameters()).keys()


@pytest.mark.parametrize("attention", ["flow", "softmax"])
def test_deit_small_has_timms_parameters_and_loads_its_weights(attention):
    import timm

    ours = deit_small(num_classes=1000, attention={"name": attention})
    reference = timm.create_model("deit_small_patch16_224")
    assert count_parameters(ours) == count_parameters(reference) == 22_050_664
    assert ours.load_state_dict(reference.state_dict(), strict=True).missing_keys == []
    assert all(isinstance(block.attn, QkvAttention) for block in ours.blocks)


def test_deit_small_with_softmax_computes_what_timm_computes():
    import timm

    torch.manual_seed(0)
    reference = timm.create_model("deit_small_patch16_224", num_classes=10, img_size=64).eval()
    ours = deit_small(num_classes=10, image_size=64, attention="softmax").eval()
    ours.load_state_dict(reference.state_dict())
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert relative_error(ours(images), reference(images)) < 1e-5


def test_qkv_attention_refuses_what_it_cannot_do():
    layer = QkvAttention(16, 2, "flow")
    with pytest.raises(NotImplementedError, match="attn_mask"):
        layer(torch.randn(1, 4, 16), attn_mask=torch.ones(4, 4, dtype=torch.bool))
    with pytest.raises(NotImplementedError, match="qk_norm"):
        QkvAttention(16, 2, "flow", qk_norm=True)


def official_cv_flow(q, k, v, outer_eps, eps=1e-6, clamp=1.0):
    """The official CV module's flow attention (results/paper/official_code.md §1.4), written out densely:
    sigmoid kernel, ε inside each dot product, and `outer_eps` added outside each of the four (1e-6 there)."""
    q, k = torch.sigmoid(q), torch.sigmoid(k)
    n_sinks, n_sources = q.shape[-2], k.shape[-2]

    def dot(a, b):
        return (a * b).sum(-1)

    incoming = dot(q + eps, k.sum(-2, keepdim=True) + eps) + outer_eps
    outgoing = dot(k + eps, q.sum(-2, keepdim=True) + eps) + outer_eps
    conserved_sink = dot(q + eps, (k / outgoing[..., None]).sum(-2, keepdim=True) + eps) + outer_eps
    conserved_source = dot(k + eps, (q / incoming[..., None]).sum(-2, keepdim=True) + eps) + outer_eps
    allocation = torch.sigmoid(conserved_sink * n_sinks / n_sources)
    competition = torch.softmax(conserved_source.clamp(-clamp, clamp), dim=-1) * n_sources
    kv = k.transpose(-2, -1) @ (v * competition[..., None])
    return (q @ kv) / incoming[..., None] * allocation[..., None]


@pytest.mark.parametrize("tokens,width", [(3136, 8), (49, 64)])
def test_registered_flow_differs_from_the_cv_variant_below_fp32_noise(tokens, width):
    # The recorded choice (conf/model/hierarchical_flowformer.yaml): the registered flow attention, without the CV
    # module's extra 1e-6 outside each dot product, at the head shapes of stage 1 and stage 4.
    q, k, v = (torch.randn(1, 2, tokens, width, dtype=torch.float64, generator=torch.Generator().manual_seed(i))
               for i in range(3))
    ours = build_attention("flow", head_dim=width, n_heads=2)(q, k, v)
    assert relative_error(ours, official_cv_flow(q, k, v, outer_eps=0.0)) < 1e-12  # the reference is right
    assert relative_error(ours, official_cv_flow(q, k, v, outer_eps=1e-6)) < 2e-6


def test_proj_bias_of_the_attention_node_reaches_both_projections():
    # flow_lra_official has bias-free projections; the node's proj_bias overrides what the network (timm) passes
    node = {"name": "flow_lra_official", "proj_bias": False}
    layer = QkvAttention(16, 2, node, qkv_bias=True, proj_bias=True)
    assert layer.qkv.bias is None and layer.proj.bias is None
    hierarchical = HierarchicalFlowformer(num_classes=3, image_size=32, attention=node, **TINY)
    deit = deit_small(num_classes=3, image_size=32, attention=node)
    for model in (hierarchical, deit):
        assert not [name for name, _ in model.named_parameters() if ".attn." in name and name.endswith("bias")]
    assert QkvAttention(16, 2, {"name": "flow"}).qkv.bias is not None  # no key: the constructor's choice stands


@pytest.mark.parametrize("attention", REGISTERED_NAMES)
def test_deit_variants_pickle_and_compute_the_same_after(attention):
    import io
    import pickle

    torch.manual_seed(0)
    model = deit_small(num_classes=3, image_size=32, attention={"name": attention}).eval()
    images = torch.randn(2, 3, 32, 32)
    buffer = io.BytesIO()
    torch.save(model, buffer)  # what torch.save(model) and strategy=ddp_spawn need
    buffer.seek(0)
    copies = [pickle.loads(pickle.dumps(model)), torch.load(buffer, weights_only=False)]
    with torch.no_grad():
        expected = model(images)
        for copy in copies:
            assert type(copy.blocks[0].attn).__name__ == f"QkvAttention[{attention}]"
            assert torch.equal(copy.eval()(images), expected)


@pytest.fixture(scope="module")
def timm_state():
    """A stand-in for timm's released DeiT-S weights (no download): a freshly built timm DeiT-S's state."""
    import timm

    torch.manual_seed(1)
    return timm.create_model("deit_small_patch16_224", num_classes=3, img_size=32).state_dict()


@pytest.mark.parametrize("attention", REGISTERED_NAMES)
def test_pretrained_weights_load_into_every_deit_variant(attention, timm_state, monkeypatch, caplog):
    from flowformer.models import deit

    monkeypatch.setattr(deit, "timm_pretrained_state", lambda num_classes, image_size: timm_state)
    torch.manual_seed(0)
    model = deit_small(num_classes=3, image_size=32, attention={"name": attention}, pretrained=True)
    ours = model.state_dict()
    shared = [key for key in timm_state if "attn.qkv" not in key]
    assert all(torch.equal(ours[key], timm_state[key]) for key in shared)  # all but the attention's own tensors
    qkv, expected = ours["blocks.3.attn.qkv.weight"], timm_state["blocks.3.attn.qkv.weight"]
    if attention == "reformer":  # keys are the queries: the query and value thirds of timm's qkv
        assert torch.equal(qkv, torch.cat([expected[:384], expected[768:]]))
        assert "reformer attention ties keys to queries" in caplog.text
    else:
        assert torch.equal(qkv, expected)
    if attention == "performer":  # its random features are not in timm's weights: kept, and said so
        assert "performer attention variant in part" in caplog.text and "blocks.*.attn.op.projection (12)" in caplog.text
    else:
        assert "in part" not in caplog.text


def test_pretrained_weights_skip_what_a_variant_lacks(timm_state, caplog):
    from flowformer.models.deit import load_timm_weights

    model = deit_small(num_classes=3, image_size=32, attention={"name": "flow_lra_official", "proj_bias": False})
    result = load_timm_weights(model, timm_state, "flow_lra_official")
    assert result.missing == () and len(result.unused) == 24 and all("attn" in key for key in result.unused)
    assert "flow_lra_official attention variant in part" in caplog.text and "blocks.*.attn.qkv.bias (12)" in caplog.text
