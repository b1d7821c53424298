"""`python -m experiments.profile`: the faithful hierarchical network and DeiT-S count the official parameters, and
the MACs equal the networks' matrix products and convolutions counted by hand, the attention's included."""

from __future__ import annotations

from experiments.profile import main, profile


def hierarchical_macs(image_size: int, attention_macs_per_block) -> int:
    """Stem, 2x2 convolutions, 12·N·C² per block (qkv 3, proj 1, MLP 8), the head, and the attention's own."""
    dims, depths = (96, 192, 384, 768), (3, 3, 10, 3)
    tokens = [(image_size // 4 // 2**i) ** 2 for i in range(4)]
    convs = tokens[0] * dims[0] * 3 * 16 + sum(tokens[i] * dims[i] * dims[i - 1] * 4 for i in range(1, 4))
    blocks = sum(depth * (12 * n * c * c + attention_macs_per_block(n, c)) for n, c, depth in zip(tokens, dims, depths))
    return convs + blocks + dims[-1] * 1000


def deit_small_macs(image_size: int) -> int:
    patches, width = (image_size // 16) ** 2, 384
    tokens = patches + 1  # the class token
    block = 12 * tokens * width**2 + 2 * tokens**2 * width  # projections and MLP, then softmax's two products
    return patches * width * 3 * 256 + 12 * block + width * 1000


def test_the_faithful_hierarchical_network_counts_what_the_official_code_counts():
    experiment, attention, image_size, flow = profile(["experiment=imagenet/hierarchical"])
    assert (experiment, attention, image_size) == ("imagenet/hierarchical", "flow", 224)
    assert flow.params == 43_311_304 and round(flow.params_m, 2) == 43.31
    assert flow.macs - flow.attention_macs == hierarchical_macs(224, lambda n, c: 0)
    assert 0 < flow.attention_macs < 0.05 * flow.macs  # linear in the tokens: a small share at 3136 tokens


def test_softmax_in_the_same_network_counts_its_quadratic_products():
    *_, softmax = profile(["experiment=imagenet/hierarchical", "model/attention=softmax", "data.image_size=64"])
    assert softmax.macs == hierarchical_macs(64, lambda n, c: 2 * n * n * c)


def test_deit_small_counts_timms_figures():
    _, attention, _, deit = profile(["experiment=imagenet/deit_small", "model/attention=softmax"])
    assert attention == "softmax" and deit.params == 22_050_664
    assert deit.macs == deit_small_macs(224)
    assert abs(deit.gmacs - 4.61) < 0.05  # timm's published figure, which also counts a few elementwise ops


def test_the_command_prints_one_row_per_attention(capsys):
    main(["experiment=imagenet/hierarchical", "data.image_size=32", "model.dims=[8,16,32,64]", "model.heads=2",
          "--attentions", "flow", "linear"])
    lines = capsys.readouterr().out.splitlines()
    assert "params (M)" in lines[0] and "GMACs" in lines[0]
    assert [line.split("|")[2].strip() for line in lines[2:]] == ["flow", "linear"]
