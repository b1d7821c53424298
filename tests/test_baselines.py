"""Op-specific checks of the baseline attentions against dense formulas written out here.

The contract every op shares (masks, padding invariance, causality, errors) is in test_attention_ops.py. These
tests hold each baseline to the formula of its paper, computed densely in float64.
"""

from __future__ import annotations

import math
import sys

import pytest
import torch
import torch.nn.functional as F

from flowformer.attention import causal_linear_attention, reformer
from flowformer.attention.baselines import (
    CosformerAttention,
    LinearAttention,
    PerformerAttention,
    SoftmaxAttention,
    default_nb_features,
    orthogonal_gaussian_projection,
)
from flowformer.attention.reformer import ReformerAttention

F64 = torch.float64


def randn(*shape, seed=0, scale=1.0, dtype=F64):
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def dense_attention(scores: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor, eps: float) -> torch.Tensor:
    """Kernel attention from an explicit non-negative score matrix: sum_j s_ij v_j / (sum_j s_ij + eps)."""
    scores = scores * allowed
    return (scores @ v) / (scores.sum(-1, keepdim=True) + eps)


def allowed_mask(l_len, s_len, causal, key_padding_mask=None):
    allowed = torch.ones(1, 1, l_len, s_len, dtype=F64)
    if causal:
        allowed = allowed * torch.ones(l_len, s_len, dtype=F64).tril()
    if key_padding_mask is not None:
        allowed = allowed * (~key_padding_mask)[:, None, None, :].to(F64)
    return allowed


# ---------------------------------------------------------------------------------------------------------------
# The chunked causal helper shared by the kernelised ops
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [1, 7, 13])
@pytest.mark.parametrize("chunk_size", [1, 3, 5, 8, 64])
def test_causal_helper_matches_dense_forward_and_backward(length, chunk_size):
    phi_q = randn(2, 3, length, 4, seed=1).abs().requires_grad_()
    phi_k = randn(2, 3, length, 4, seed=2).abs().requires_grad_()
    v = randn(2, 3, length, 5, seed=3).requires_grad_()
    out = causal_linear_attention(phi_q, phi_k, v, chunk_size=chunk_size)
    lower = torch.ones(length, length, dtype=F64).tril()
    expected = ((phi_q @ phi_k.transpose(-1, -2)) * lower) @ v
    torch.testing.assert_close(out, expected)

    weights = randn(*out.shape, seed=4)
    grads = torch.autograd.grad((out * weights).sum(), (phi_q, phi_k, v))
    expected_grads = torch.autograd.grad((expected * weights).sum(), (phi_q, phi_k, v))
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want)


# ---------------------------------------------------------------------------------------------------------------
# Softmax
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
def test_softmax_matches_dense(causal):
    q, k, v = randn(2, 2, 6, 8, seed=1), randn(2, 2, 6, 8, seed=2), randn(2, 2, 6, 5, seed=3)
    mask = torch.tensor([[False] * 6, [False] * 4 + [True] * 2])
    out = SoftmaxAttention(8, 2)(q, k, v, causal=causal, key_padding_mask=mask, query_padding_mask=mask)
    logits = (q @ k.transpose(-1, -2)) / math.sqrt(8)
    logits = logits.masked_fill(allowed_mask(6, 6, causal, mask) == 0, float("-inf"))
    expected = torch.softmax(logits, dim=-1) @ v
    expected = expected.masked_fill(mask[:, None, :, None], 0.0)
    torch.testing.assert_close(out, expected)


def test_softmax_row_with_no_visible_key_is_zero_not_nan():
    # Causal + left padding: the first real query is at position 2, so queries 0 and 1 see only padded keys.
    q, k, v = (randn(1, 2, 5, 4, seed=s).requires_grad_() for s in (1, 2, 3))
    mask = torch.tensor([[True, True, False, False, False]])
    out = SoftmaxAttention(4, 2)(q, k, v, causal=True, key_padding_mask=mask)  # queries not marked as padding
    assert torch.isfinite(out).all()
    assert (out[:, :, :2] == 0).all()
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


# ---------------------------------------------------------------------------------------------------------------
# Linear attention
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
def test_linear_matches_dense(causal):
    q, k, v = randn(2, 2, 9, 6, seed=1), randn(2, 2, 9, 6, seed=2), randn(2, 2, 9, 3, seed=3)
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[1, [2, 7, 8]] = True
    op = LinearAttention(6, 2, chunk_size=4)
    out = op(q, k, v, causal=causal, key_padding_mask=mask, query_padding_mask=mask)
    scores = (F.elu(q) + 1) @ (F.elu(k) + 1).transpose(-1, -2)
    expected = dense_attention(scores, v, allowed_mask(9, 9, causal, mask), op.eps)
    expected = expected.masked_fill(mask[:, None, :, None], 0.0)
    torch.testing.assert_close(out, expected)


def test_linear_cross_attention_matches_dense():
    q, k, v = randn(1, 2, 4, 6, seed=1), randn(1, 2, 10, 6, seed=2), randn(1, 2, 10, 7, seed=3)
    op = LinearAttention(6, 2)
    scores = (F.elu(q) + 1) @ (F.elu(k) + 1).transpose(-1, -2)
    torch.testing.assert_close(op(q, k, v), dense_attention(scores, v, allowed_mask(4, 10, False), op.eps))


# ---------------------------------------------------------------------------------------------------------------
# cosFormer
# ---------------------------------------------------------------------------------------------------------------


def cosformer_dense(q, k, v, causal, eps):
    """The paper's formula on an unpadded batch: relu(q_i).relu(k_j) cos(pi/2 (i - j) / M), M = max(L, S)."""
    l_len, s_len = q.shape[2], k.shape[2]
    big_m = max(l_len, s_len)
    i = torch.arange(l_len, dtype=F64)[:, None]
    j = torch.arange(s_len, dtype=F64)[None, :]
    scores = (F.relu(q) @ F.relu(k).transpose(-1, -2)) * torch.cos(0.5 * math.pi * (i - j) / big_m)
    return dense_attention(scores, v, allowed_mask(l_len, s_len, causal), eps)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("chunk_size", [3, 64])
def test_cosformer_matches_dense(causal, chunk_size):
    q, k, v = randn(2, 2, 11, 6, seed=1), randn(2, 2, 11, 6, seed=2), randn(2, 2, 11, 4, seed=3)
    op = CosformerAttention(6, 2, chunk_size=chunk_size)
    torch.testing.assert_close(op(q, k, v, causal=causal), cosformer_dense(q, k, v, causal, op.eps))


def test_cosformer_cross_attention_uses_the_longer_length():
    q, k, v = randn(1, 2, 4, 6, seed=1), randn(1, 2, 9, 6, seed=2), randn(1, 2, 9, 3, seed=3)
    op = CosformerAttention(6, 2)
    torch.testing.assert_close(op(q, k, v), cosformer_dense(q, k, v, False, op.eps))


def test_cosformer_positions_are_ranks_among_real_tokens():
    # Padding in the middle: the re-weighting must use each real token's rank, and M = the real length.
    q, k, v = randn(1, 2, 8, 6, seed=1), randn(1, 2, 8, 6, seed=2), randn(1, 2, 8, 3, seed=3)
    mask = torch.tensor([[False, True, True, False, False, True, False, False]])
    real = ~mask[0]
    op = CosformerAttention(6, 2)
    for causal in (False, True):
        out = op(q, k, v, causal=causal, key_padding_mask=mask, query_padding_mask=mask)
        expected = cosformer_dense(q[:, :, real], k[:, :, real], v[:, :, real], causal, op.eps)
        torch.testing.assert_close(out[:, :, real], expected)


# ---------------------------------------------------------------------------------------------------------------
# Performer
# ---------------------------------------------------------------------------------------------------------------


def test_performer_default_feature_count():
    assert default_nb_features(64) == int(64 * math.log(64)) == 266
    assert default_nb_features(2) == 2  # floor of d: d ln d would give 1
    assert PerformerAttention(16, 2).nb_features == int(16 * math.log(16))


def test_orthogonal_projection_blocks_are_orthogonal_with_chi_norms():
    d, m = 8, 20
    w = orthogonal_gaussian_projection(m, d, torch.Generator().manual_seed(0)).to(F64)
    assert w.shape == (m, d)
    for start in range(0, m, d):
        block = w[start : start + d]
        gram = block @ block.T
        off_diagonal = gram - torch.diag(torch.diagonal(gram))
        assert off_diagonal.abs().max() < 1e-5
    norms = w.norm(dim=1)
    # Norms follow chi(d) (mean ~ sqrt(d - 1/2)), not all equal as plain orthonormal rows would be.
    assert norms.std() > 0.1
    assert 0.5 * math.sqrt(d) < norms.mean() < 1.5 * math.sqrt(d)


def favor_error(nb_features: int, causal: bool) -> float:
    """Max abs error of Performer against exact softmax attention (scale 1/sqrt(d)) on a fixed input."""
    d = 8
    q, k, v = (randn(2, 2, 24, d, seed=s, scale=0.6, dtype=torch.float32) for s in (1, 2, 3))
    op = PerformerAttention(d, 2, nb_features=nb_features, seed=11)
    out = op(q, k, v, causal=causal)
    logits = (q @ k.transpose(-1, -2)) / math.sqrt(d)
    if causal:
        logits = logits.masked_fill(torch.ones(24, 24, dtype=torch.bool).triu(1), float("-inf"))
    return (out - torch.softmax(logits, -1) @ v).abs().max().item()


@pytest.mark.parametrize("causal", [False, True])
def test_performer_approximates_softmax_with_many_features(causal):
    many = favor_error(4096, causal)
    assert many < 0.08, f"Performer with 4096 features is {many:.3f} from softmax attention"
    assert many < favor_error(8, causal)  # the estimator improves with more features


def test_performer_padded_and_causal_paths_match_dense_favor():
    # The stabilisers must cancel: compare with the unstabilised FAVOR+ formula in float64.
    d = 8
    q, k, v = randn(2, 2, 10, d, seed=1), randn(2, 2, 10, d, seed=2), randn(2, 2, 10, 3, seed=3)
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[1, 6:] = True
    op = PerformerAttention(d, 2, nb_features=32, seed=5).to(F64)

    def phi(x):
        x = x * d**-0.25
        return torch.exp(x @ op.projection.T - 0.5 * (x * x).sum(-1, keepdim=True)) / math.sqrt(32)

    for causal in (False, True):
        out = op(q, k, v, causal=causal, key_padding_mask=mask, query_padding_mask=mask)
        # eps enters against query features scaled so that their largest entry is 1/sqrt(m).
        phi_q = phi(q)
        phi_q = phi_q / (phi_q.amax(-1, keepdim=True) * math.sqrt(32))
        expected = dense_attention(phi_q @ phi(k).transpose(-1, -2), v, allowed_mask(10, 10, causal, mask), op.eps)
        expected = expected.masked_fill(mask[:, None, :, None], 0.0)
        torch.testing.assert_close(out, expected)


def test_performer_redraw_is_seeded_and_resumable():
    d = 8
    first, second = (PerformerAttention(d, 2, nb_features=16, redraw_interval=2, seed=3).train() for _ in range(2))
    initial = first.projection.clone()
    torch.testing.assert_close(initial, second.projection)
    q = k = v = randn(1, 2, 5, d, dtype=torch.float32)
    for _ in range(2):
        first(q, k, v)
    torch.testing.assert_close(first.projection, initial)  # 2 calls on the initial draw
    first(q, k, v)  # third call: redraw with seed + 1
    expected = orthogonal_gaussian_projection(16, d, torch.Generator().manual_seed(3 + 1))
    torch.testing.assert_close(first.projection, expected)
    assert not torch.allclose(first.projection, initial)

    # Eval never redraws.
    first.eval()
    for _ in range(5):
        first(q, k, v)
    torch.testing.assert_close(first.projection, expected)

    # A checkpoint restores the projection and the schedule: the next redraw uses seed + 2 in both.
    second.load_state_dict(first.state_dict())
    for op in (first, second):
        op.train()
        op(q, k, v)  # call 2 on draw 1
        op(q, k, v)  # call 3: redraw
    torch.testing.assert_close(second.projection, first.projection)
    third_draw = orthogonal_gaussian_projection(16, d, torch.Generator().manual_seed(3 + 2))
    torch.testing.assert_close(first.projection, third_draw)


def test_performer_seed_none_follows_the_global_rng():
    torch.manual_seed(0)
    a, b = PerformerAttention(8, 2), PerformerAttention(8, 2)
    torch.manual_seed(0)
    a_again = PerformerAttention(8, 2)
    assert not torch.allclose(a.projection, b.projection)  # layers differ
    torch.testing.assert_close(a.projection, a_again.projection)  # but runs are reproducible


# ---------------------------------------------------------------------------------------------------------------
# Reformer
# ---------------------------------------------------------------------------------------------------------------


def reformer_short_dense(q, v):
    """LSH attention when every token shares a chunk: softmax over j != i of q_i . (q_j / |q_j|) / sqrt(d)."""
    d = q.shape[-1]
    logits = (q @ F.normalize(q, dim=-1).transpose(-1, -2)) / math.sqrt(d)
    eye = torch.eye(q.shape[2], dtype=torch.bool)
    return torch.softmax(logits.masked_fill(eye, float("-inf")), dim=-1) @ v


@pytest.mark.parametrize("dv", [8, 5, 12])
def test_reformer_short_sequence_is_shared_qk_softmax(dv):
    # With bucket_size >= L every real token lands in the same chunk in every hashing round, so LSH attention is
    # exact: shared-QK softmax attention in which a token does not attend to itself. dv != d checks the padding
    # of the narrower of qk and v.
    q, v = randn(2, 2, 10, 8, seed=1), randn(2, 2, 10, dv, seed=2)
    op = ReformerAttention(8, 2, bucket_size=16, n_hashes=2).eval()
    out = op(q, torch.zeros_like(q), v)  # k is ignored: Reformer shares queries and keys
    torch.testing.assert_close(out, reformer_short_dense(q, v))


def test_reformer_padding_matches_unpadded_when_internal_lengths_agree():
    # bucket_size=4, so hashing really splits the sequence (16 slots = 4 buckets). Real lengths 13 and 10 both
    # round up to 16 slots, the length used for the padded batch too, so the hashes and the chunks of real
    # tokens are identical and the outputs equal exactly. (Different internal lengths would change the number
    # of buckets, and outputs would then agree only in distribution.)
    q, v = randn(2, 2, 16, 8, seed=1), randn(2, 2, 16, 8, seed=2)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, [1, 5, 15]] = True  # 13 real
    mask[1, [0, 3, 4, 8, 9, 12]] = True  # 10 real
    op = ReformerAttention(8, 2, bucket_size=4, n_hashes=2).eval()
    out = op(q, q, v, key_padding_mask=mask, query_padding_mask=mask)
    for b in range(2):
        real = ~mask[b]
        alone = op(q[b : b + 1, :, real], q[b : b + 1, :, real], v[b : b + 1, :, real])
        torch.testing.assert_close(out[b : b + 1, :, real], alone)
    assert (out[mask[:, None, :, None].expand_as(out)] == 0).all()


def test_reformer_eval_is_seeded_and_training_is_random():
    q, v = randn(1, 2, 32, 8, seed=1, dtype=torch.float32), randn(1, 2, 32, 8, seed=2, dtype=torch.float32)
    op = ReformerAttention(8, 2, bucket_size=4, n_hashes=1)
    op.eval()
    rng_before = torch.random.get_rng_state()
    first = op(q, q, v)
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # eval seeding leaves the global RNG alone
    torch.testing.assert_close(op(q, q, v), first, rtol=0, atol=0)
    op.train()
    assert not torch.equal(op(q, q, v), op(q, q, v))  # fresh hash rotations each training call


def test_reformer_causal_needs_opt_in_and_leaks_only_through_hashing():
    q, v = randn(1, 2, 32, 8, seed=1, dtype=torch.float32), randn(1, 2, 32, 8, seed=2, dtype=torch.float32)
    with pytest.raises(NotImplementedError, match="allow_causal_hash_leak"):
        ReformerAttention(8, 2).eval()(q, q, v, causal=True)

    op = ReformerAttention(8, 2, bucket_size=4, n_hashes=2, allow_causal_hash_leak=True).eval()
    out = op(q, q, v, causal=True)
    t = 15
    future = (torch.arange(32) > t)[None, None, :, None]
    v_new = torch.where(future, randn(*v.shape, seed=3, dtype=torch.float32), v)
    # Later values never reach an earlier output ...
    torch.testing.assert_close(op(q, q, v_new, causal=True)[:, :, : t + 1], out[:, :, : t + 1], rtol=0, atol=0)
    # ... but later queries/keys move the chunk boundaries, which is why causal=True is opt-in. If this ever
    # stops holding (a strictly causal LSH implementation), the opt-in flag can go.
    q_new = torch.where(future, randn(*q.shape, seed=4, dtype=torch.float32), q)
    assert not torch.allclose(op(q_new, q_new, v, causal=True)[:, :, : t + 1], out[:, :, : t + 1])


def test_reformer_rejects_cross_attention():
    q, k, v = randn(1, 2, 4, 8), randn(1, 2, 6, 8), randn(1, 2, 6, 8)
    with pytest.raises(NotImplementedError, match="ReformerAttention.*cross-attention"):
        ReformerAttention(8, 2)(q, k, v)


def test_reformer_missing_package_names_the_extra(monkeypatch):
    reformer._padded_lsh_class.cache_clear()
    monkeypatch.setitem(sys.modules, "reformer_pytorch.reformer_pytorch", None)  # import now raises ImportError
    try:
        with pytest.raises(ImportError, match=r"pip install -e '\.\[reformer\]'"):
            ReformerAttention(8, 2)
    finally:
        reformer._padded_lsh_class.cache_clear()


# ---------------------------------------------------------------------------------------------------------------
# Input checks shared by all baselines
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [SoftmaxAttention, LinearAttention, PerformerAttention, CosformerAttention])
def test_bad_inputs_raise_clear_errors(cls):
    op = cls(8, 2)
    q = randn(1, 2, 5, 8, dtype=torch.float32)
    with pytest.raises(TypeError, match="bool"):
        op(q, q, q, key_padding_mask=torch.zeros(1, 5))
    with pytest.raises(ValueError, match="key_padding_mask"):
        op(q, q, q, key_padding_mask=torch.zeros(1, 4, dtype=torch.bool))
    with pytest.raises(NotImplementedError, match=f"{cls.__name__}.*L == S"):
        op(q, q[:, :, :3], q[:, :, :3], causal=True)
    with pytest.raises(TypeError, match="unexpected keyword"):
        cls(8, 2, no_such_option=1)
