"""The attention op contract, checked for every registered op.

Each op is built through `flowformer.attention.registry.build_attention(name, head_dim=d, n_heads=H)` with its
registry defaults and called in eval mode (so random ops such as Reformer's LSH are deterministic). The contract
(also stated in the docstring of flowformer/attention/baselines.py):

* q (B, H, L, d), k (B, H, S, d), v (B, H, S, dv) -> (B, H, L, dv), same dtype, finite values and gradients;
* masks are bool, True = padding; a padded key is never attended to; padded query outputs are exactly 0;
* real positions equal the output of the same sequence with the padding removed;
* causal=True: output i depends only on positions <= i;
* a combination an op cannot do raises NotImplementedError naming the op.
"""

from __future__ import annotations

import pytest
import torch

try:
    from flowformer.attention import registry as _registry

    NAMES: tuple[str, ...] = tuple(_registry.REGISTERED_NAMES)
    _REGISTRY_ERROR: Exception | None = None
except ImportError as exc:  # fail every test loudly below rather than collecting nothing
    _registry = None
    NAMES = ("<registry not importable>",)
    _REGISTRY_ERROR = exc

B, H = 2, 2
SHAPES = [(length, d) for length in (1, 7, 33) for d in (8, 12)]

# Absolute tolerance for comparisons that are exact in real arithmetic (padding invariance, untouched past under
# causal masking). Every op is exact here, Reformer included: its LSH buckets depend on the internal length,
# ceil(n / (2 * bucket_size)) * 2 * bucket_size, which is the same (64) for every length in these tests with the
# default bucket_size=32, and padding is kept out of the hash sort. For longer sequences whose padded and
# unpadded internal lengths differ, Reformer agrees only in distribution (see ReformerAttention's docstring).
DEFAULT_ATOL = 2e-5
ATOL: dict[str, float] = {}


def _atol(name: str) -> float:
    return ATOL.get(name, DEFAULT_ATOL)


def build(name: str, d: int) -> torch.nn.Module:
    if _registry is None:
        pytest.fail(
            f"flowformer.attention.registry is not importable ({_REGISTRY_ERROR!r}); the attention op contract "
            "cannot be checked. Fix the import, or install the package: pip install -e '.[dev]'"
        )
    return _registry.build_attention(name, head_dim=d, n_heads=H).eval()


def qkv(length: int, d: int, *, s_len: int | None = None, dv: int | None = None, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    s_len = length if s_len is None else s_len
    dv = d if dv is None else dv
    q = torch.randn(B, H, length, d, generator=gen)
    k = torch.randn(B, H, s_len, d, generator=gen)
    v = torch.randn(B, H, s_len, dv, generator=gen)
    return q, k, v


def right_padding(length: int) -> torch.Tensor:
    """Sequence 0 full, sequence 1 with its last ~half padded. (B, L) bool, True = padding."""
    real = torch.tensor([length, max(1, (length + 1) // 2)])
    return torch.arange(length)[None, :] >= real[:, None]


def scattered_padding(length: int, seed: int = 1) -> torch.Tensor:
    """Padding anywhere (first token always real), for checks that must not depend on where padding sits."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, length, generator=gen) < 0.4
    mask[:, 0] = False
    return mask


def call(op, q, k, v, causal, mask):
    return op(q, k, v, causal=causal, key_padding_mask=mask, query_padding_mask=mask)


def assert_names_op(exc: Exception, name: str, op: torch.nn.Module) -> None:
    message = str(exc).lower()
    squashed = "".join(ch for ch in message if ch.isalnum())  # "flow attention" names FlowAttention too
    assert name.lower() in message or type(op).__name__.lower() in squashed, (
        f"NotImplementedError from attention {name!r} must name the op (its registered name or class "
        f"{type(op).__name__}) and say what to use instead; got: {exc}"
    )


def run_or_unsupported(op, q, k, v, causal, mask):
    """Call the op; None if it declares the combination unsupported (messages: test_unsupported_names_the_op)."""
    try:
        return call(op, q, k, v, causal, mask)
    except NotImplementedError:
        return None


@pytest.mark.parametrize("length,d", SHAPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", NAMES)
def test_shape_dtype_finite_and_gradients(name, causal, length, d):
    op = build(name, d)
    q, k, v = (t.requires_grad_() for t in qkv(length, d))
    mask = right_padding(length)
    out = run_or_unsupported(op, q, k, v, causal, mask)
    if out is None:
        return
    assert out.shape == (B, H, length, d)
    assert out.dtype == q.dtype
    assert torch.isfinite(out).all()
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    (out * weights).sum().backward()
    for tensor_name, tensor in (("q", q), ("k", k), ("v", v)):
        if tensor_name == "k" and getattr(op, "shares_qk", False):
            # Ops with shared query/key (Reformer) read q as the key; k is shape-checked only.
            assert tensor.grad is None or not tensor.grad.any()
            continue
        assert tensor.grad is not None, f"{name}: no gradient reached {tensor_name}"
        assert torch.isfinite(tensor.grad).all(), f"{name}: non-finite gradient for {tensor_name}"


@pytest.mark.parametrize("length,d", SHAPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", NAMES)
def test_padded_queries_are_zero_and_padded_keys_are_ignored(name, causal, length, d):
    op = build(name, d)
    q, k, v = qkv(length, d)
    mask = right_padding(length) if causal else scattered_padding(length)
    out = run_or_unsupported(op, q, k, v, causal, mask)
    if out is None:
        return
    padded = mask[:, None, :, None].expand_as(out)
    assert (out[padded] == 0).all(), f"{name}: outputs at padded queries must be exactly 0"

    # Garbage (large values) at padded positions of q, k and v must not reach any real output.
    gen = torch.Generator().manual_seed(7)
    noise = [10.0 * torch.randn(t.shape, generator=gen) for t in (q, k, v)]
    q2, k2, v2 = (torch.where(mask[:, None, :, None], n, t) for t, n in zip((q, k, v), noise))
    out2 = call(op, q2, k2, v2, causal, mask)
    torch.testing.assert_close(out2, out, atol=_atol(name), rtol=1e-4)


@pytest.mark.parametrize("length,d", SHAPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", NAMES)
def test_real_positions_equal_unpadded_output(name, causal, length, d):
    op = build(name, d)
    q, k, v = qkv(length, d, seed=3)
    # Causal: right padding, so real positions keep their absolute index. Non-causal: padding anywhere.
    mask = right_padding(length) if causal else scattered_padding(length)
    out = run_or_unsupported(op, q, k, v, causal, mask)
    if out is None:
        return
    for b in range(B):
        real = ~mask[b]
        alone = call(op, q[b : b + 1, :, real], k[b : b + 1, :, real], v[b : b + 1, :, real], causal, None)
        torch.testing.assert_close(
            out[b : b + 1, :, real], alone, atol=_atol(name), rtol=1e-4,
            msg=lambda m, b=b: f"{name}: sequence {b} with padding differs from the same sequence without it. {m}",
        )


@pytest.mark.parametrize("name", NAMES)
def test_ops_that_declare_padding_invariance_hold_it_at_any_padded_length(name):
    """`padding_invariant` lets a model cut a batch's trailing padding (the time-series classifier does): the real
    positions must come out the same with 10 and with 150 padded steps, beyond the lengths where Reformer's chunks
    agree, which is why Reformer does not declare it."""
    op = build(name, 8)
    if not getattr(op, "padding_invariant", False):
        assert name == "reformer", f"{name}: every op but Reformer ignores padding at any length; declare it"
        return
    q, k, v = qkv(190, 8, seed=11)
    real = 40
    short, long = (torch.arange(length)[None, :].expand(B, -1) >= real for length in (real + 10, 190))
    for causal in (False, True):
        cut = run_or_unsupported(op, q[:, :, : real + 10], k[:, :, : real + 10], v[:, :, : real + 10], causal, short)
        if cut is None:
            continue
        full = call(op, q, k, v, causal, long)
        torch.testing.assert_close(cut[:, :, :real], full[:, :, :real], atol=_atol(name), rtol=1e-4)


def test_the_layer_reads_the_ops_padding_invariance_and_assumes_none_where_an_op_is_silent(monkeypatch):
    from flowformer.attention import layer

    assert layer.MultiHeadAttention(16, 2, "flow").padding_invariant
    assert not layer.MultiHeadAttention(16, 2, "reformer").padding_invariant
    monkeypatch.setattr(layer, "build_attention", lambda *args, **kwargs: torch.nn.Identity())  # a user's own op
    assert not layer.MultiHeadAttention(16, 2, "flow").padding_invariant


@pytest.mark.parametrize("length,d", [(7, 8), (33, 12)])
@pytest.mark.parametrize("name", NAMES)
def test_causal_output_ignores_the_future(name, length, d):
    op = build(name, d)
    q, k, v = qkv(length, d, seed=4)
    out = run_or_unsupported(op, q, k, v, True, None)
    if out is None:
        return
    t = length // 2
    gen = torch.Generator().manual_seed(9)
    future = torch.arange(length) > t
    future = future[None, None, :, None]
    q2, k2, v2 = (torch.where(future, 3.0 * torch.randn(x.shape, generator=gen), x) for x in (q, k, v))
    out2 = call(op, q2, k2, v2, True, None)
    torch.testing.assert_close(out2[:, :, : t + 1], out[:, :, : t + 1], atol=_atol(name), rtol=1e-4)
    assert not torch.allclose(out2[:, :, t + 1 :], out[:, :, t + 1 :]), f"{name}: later positions ignored their inputs"


@pytest.mark.parametrize("d", [8, 12])
@pytest.mark.parametrize("name", NAMES)
def test_cross_attention(name, d):
    op = build(name, d)
    l_len, s_len, dv = 5, 9, 6
    q, k, v = qkv(l_len, d, s_len=s_len, dv=dv, seed=6)
    key_mask = torch.zeros(B, s_len, dtype=torch.bool)
    key_mask[1, 6:] = True
    try:
        out = op(q, k, v, key_padding_mask=key_mask)
    except NotImplementedError:
        return  # the message is checked in test_unsupported_names_the_op
    assert out.shape == (B, H, l_len, dv)
    assert torch.isfinite(out).all()
    alone = op(q[1:], k[1:, :, :6], v[1:, :, :6])
    torch.testing.assert_close(out[1:], alone, atol=_atol(name), rtol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_unsupported_names_the_op(name):
    """Every NotImplementedError names the op; causal cross-attention (L != S) must always raise one."""
    d = 8
    op = build(name, d)
    self_qkv = qkv(7, d)
    cross_qkv = qkv(5, d, s_len=9, seed=2)
    for q, k, v, causal in (self_qkv + (True,), cross_qkv + (False,)):
        try:
            op(q, k, v, causal=causal)
        except NotImplementedError as exc:
            assert_names_op(exc, name, op)
    # Causal attention is defined only for L == S; every op must say so rather than guess an alignment.
    q, k, v = cross_qkv
    with pytest.raises(NotImplementedError) as info:
        op(q, k, v, causal=True)
    assert_names_op(info.value, name, op)


@pytest.mark.parametrize("experiment", ["uea/JapaneseVowels", "lra/listops", "wikitext103/transformer_lm"])
@pytest.mark.parametrize("name", NAMES)
def test_every_attention_config_agrees_with_its_registered_variant(experiment, name):
    """conf/model/attention/<name>.yaml restates the options that define the variant (a run records its config):
    the op is built from the composed node, and a contradiction would raise instead of silently winning."""
    from tests.helpers import compose_config

    cfg = compose_config([f"experiment={experiment}", f"model/attention={name}"])
    op_name, options, _ = _registry.split_attention_config(dict(cfg.model.attention))
    assert op_name == name
    _registry.build_attention(op_name, head_dim=8, n_heads=2, **options)


def test_an_option_that_contradicts_the_variant_is_an_error():
    with pytest.raises(ValueError, match=r"'flow_no_allocation' is defined by allocation=False, but its options "
                                         r"set allocation=True"):
        _registry.build_attention("flow_no_allocation", head_dim=8, n_heads=2, allocation=True)
