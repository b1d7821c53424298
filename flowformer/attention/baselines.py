"""Baseline attention ops compared against Flow-Attention in the paper's tables.

Every op follows the attention op contract (checked for every registered op by tests/test_attention_ops.py):

* constructor ``(head_dim, n_heads, **options)``;
* ``forward(q, k, v, *, causal=False, key_padding_mask=None, query_padding_mask=None)`` with
  q (B, H, L, d), k (B, H, S, d), v (B, H, S, dv) -> out (B, H, L, dv);
* masks are bool with True = padding. A padded key never contributes to any output or normaliser, outputs
  at padded queries are exactly 0, and real positions equal the output of the same sequence with the padding
  removed (exact for every op here except Reformer, see its docstring);
* ``causal=True`` needs L == S and makes output i depend only on positions <= i;
* a combination an op cannot do raises ``NotImplementedError`` naming the op and what to use instead.

Ops: :class:`SoftmaxAttention` (exact, SDPA), :class:`LinearAttention` (Katharopoulos et al. 2020),
:class:`PerformerAttention` (FAVOR+, Choromanski et al. 2021), :class:`CosformerAttention` (Qin et al. 2022)
and :class:`flowformer.attention.reformer.ReformerAttention` (LSH attention, Kitaev et al. 2020; needs the
optional ``[reformer]`` extra).

The three kernelised ops share :func:`_kernel_attention`, whose causal path is chunked so that memory stays
linear in the sequence length.

Mixed precision: under autocast every op takes q, k and v in the autocast dtype, as a matmul would. Softmax
attention then runs SDPA in that dtype (it accumulates its softmax in fp32 itself); the other ops compute in at
least fp32 with autocast off, because their normalisers and key-value states are sums over the whole sequence
(they overflow fp16 at long lengths) and Performer's random features are exponentials, which bf16 rounds
coarsely. Outputs come back in the input (or autocast) dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from flowformer.attention.flow import DEFAULT_CHUNK_SIZE, causal_linear_attention
from flowformer.attention.precision import autocast_inputs

__all__ = [
    "BaselineAttention",
    "CosformerAttention",
    "LinearAttention",
    "PerformerAttention",
    "SoftmaxAttention",
]



# --------------------------------------------------------------------------------------------------------------
# Shared checks and helpers
# --------------------------------------------------------------------------------------------------------------


def _check_inputs(
    op: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    key_padding_mask: torch.Tensor | None,
    query_padding_mask: torch.Tensor | None,
) -> None:
    """Validate shapes and masks against the op contract; raise with a message naming ``op``."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"{op}: q, k, v must be 4-D (B, H, len, head_dim); got shapes {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}. Split heads before calling the op (flowformer.attention.layer does this)."
        )
    b, h, l_len, d = q.shape
    s_len = k.shape[2]
    if k.shape != (b, h, s_len, d):
        raise ValueError(f"{op}: k must be (B, H, S, d) = ({b}, {h}, S, {d}); got {tuple(k.shape)}.")
    if v.shape[:3] != (b, h, s_len):
        raise ValueError(f"{op}: v must be (B, H, S, dv) with B, H, S = {b}, {h}, {s_len}; got {tuple(v.shape)}.")
    for mask_name, mask, length in (
        ("key_padding_mask", key_padding_mask, s_len),
        ("query_padding_mask", query_padding_mask, l_len),
    ):
        if mask is None:
            continue
        if mask.dtype != torch.bool:
            raise TypeError(f"{op}: {mask_name} must be a bool tensor (True = padding); got dtype {mask.dtype}.")
        if mask.shape != (b, length):
            raise ValueError(f"{op}: {mask_name} must have shape (B, len) = ({b}, {length}); got {tuple(mask.shape)}.")
    if causal and l_len != s_len:
        raise NotImplementedError(
            f"{op}: causal=True needs self-attention with L == S; got L={l_len}, S={s_len}. "
            "Use causal=False for cross-attention."
        )


def _zero_padded_queries(out: torch.Tensor, query_padding_mask: torch.Tensor | None) -> torch.Tensor:
    """Set outputs at padded query positions to exactly 0. out: (B, H, L, dv); mask: (B, L)."""
    if query_padding_mask is None:
        return out
    return out.masked_fill(query_padding_mask[:, None, :, None], 0.0)


def _kernel_attention(
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    chunk_size: int,
    eps: float | torch.Tensor,
) -> torch.Tensor:
    """Normalised kernel attention ``sum_j <phi_q_i, phi_k_j> v_j / (sum_j <phi_q_i, phi_k_j> + eps)``.

    phi_q: (B, H, L, m), phi_k: (B, H, S, m), v: (B, H, S, dv) -> (B, H, L, dv). ``eps`` is a float or a tensor
    broadcastable to (B, H, L, 1). With ``causal`` the sums run over j <= i (L == S) through
    :func:`flowformer.attention.flow.causal_linear_attention`. The normaliser is computed in the same pass by
    appending a column of ones to v.
    """
    ones = torch.ones_like(v[..., :1])
    v1 = torch.cat([v, ones], dim=-1)
    if causal:
        out1 = causal_linear_attention(phi_q, phi_k, v1, chunk_size=chunk_size)
    else:
        out1 = phi_q @ (phi_k.transpose(-1, -2) @ v1)
    return out1[..., :-1] / (out1[..., -1:] + eps)


def check_positive(op: str, name: str, value: float, *, allow_zero: bool = False) -> None:
    ok = value >= 0 if allow_zero else value > 0
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{op}: option {name} must be {bound}; got {value!r}. Fix it in conf/model/attention/.")


class BaselineAttention(nn.Module):
    """Common base: stores sizes and the capability flags that tests and the layer may read.

    ``shares_qk`` is True for ops that use one shared query/key tensor (Reformer); the multi-head layer should
    then tie the key projection to the query projection. ``float32_compute`` (default True) runs the op in at least
    fp32 with autocast off (see the module docstring). ``padding_invariant`` (default True) says that the outputs at
    real positions depend neither on how many padded positions there are nor on what they hold, at every length, so
    that a model may cut a batch's trailing padding (`MultiHeadAttention.padding_invariant`).
    """

    registry_name: str = ""
    shares_qk: bool = False
    padding_invariant: bool = True
    float32_compute: bool = True

    def __init__(self, head_dim: int, n_heads: int) -> None:
        super().__init__()
        if head_dim <= 0 or n_heads <= 0:
            raise ValueError(f"{self._op}: head_dim and n_heads must be positive; got {head_dim}, {n_heads}.")
        self.head_dim = int(head_dim)
        self.n_heads = int(n_heads)

    @property
    def _op(self) -> str:
        return f"{type(self).__name__} (attention '{self.registry_name}')"

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        causal: bool = False,
        key_padding_mask: torch.Tensor | None = None,
        query_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """q (B, H, L, d), k (B, H, S, d), v (B, H, S, dv) -> (B, H, L, dv); padded queries give exactly 0."""
        _check_inputs(self._op, q, k, v, causal, key_padding_mask, query_padding_mask)
        q, k, v = autocast_inputs(q, k, v)
        dtype = q.dtype
        if self.float32_compute:
            wide = torch.promote_types(dtype, torch.float32)
            with torch.autocast(q.device.type, enabled=False):
                out = self._attend(q.to(wide), k.to(wide), v.to(wide), causal, key_padding_mask, query_padding_mask)
        else:
            out = self._attend(q, k, v, causal, key_padding_mask, query_padding_mask)
        return _zero_padded_queries(out, query_padding_mask).to(dtype)

    def _attend(self, q, k, v, causal, key_padding_mask, query_padding_mask) -> torch.Tensor:
        """The op itself, on validated inputs; outputs at padded queries are zeroed by `forward`."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, n_heads={self.n_heads}"


class _NormalisedKernelAttention(BaselineAttention):
    """Base of the feature-map attentions with a normaliser: options `eps` and the causal `chunk_size`."""

    def __init__(
        self, head_dim: int, n_heads: int, eps: float = 1e-6, chunk_size: int = DEFAULT_CHUNK_SIZE
    ) -> None:
        super().__init__(head_dim, n_heads)
        check_positive(self._op, "eps", eps, allow_zero=True)
        check_positive(self._op, "chunk_size", chunk_size)
        self.eps = float(eps)
        self.chunk_size = int(chunk_size)


# --------------------------------------------------------------------------------------------------------------
# Softmax
# --------------------------------------------------------------------------------------------------------------


class SoftmaxAttention(BaselineAttention):
    """Exact scaled dot-product attention through ``F.scaled_dot_product_attention`` (scale 1/sqrt(d)).

    Options:
        dropout: dropout on the attention probabilities, training mode only (default 0.0).

    Supports causal self-attention and cross-attention. Rows with no key to attend to (a padded query, or a
    causal row whose visible keys are all padding) get output 0 rather than NaN.
    """

    registry_name = "softmax"
    float32_compute = False  # SDPA runs half inputs natively, with its softmax in fp32

    def __init__(self, head_dim: int, n_heads: int, dropout: float = 0.0) -> None:
        super().__init__(head_dim, n_heads)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"{self._op}: option dropout must be in [0, 1); got {dropout!r}.")
        self.dropout = float(dropout)

    def _attend(self, q, k, v, causal, key_padding_mask, query_padding_mask) -> torch.Tensor:
        l_len, s_len = q.shape[2], k.shape[2]
        dropout_p = self.dropout if self.training else 0.0
        scale = q.shape[-1] ** -0.5
        if key_padding_mask is None:
            # No padding: let SDPA pick its fused causal kernel; no row can be empty.
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal, scale=scale)
            return out

        # SDPA's bool mask uses True = "may attend", the opposite of our padding convention.
        allowed = ~key_padding_mask[:, None, None, :]  # (B, 1, 1, S)
        if causal:
            lower = torch.ones(l_len, s_len, dtype=torch.bool, device=q.device).tril()
            allowed = allowed & lower  # (B, 1, L, S)
        # A row with nothing to attend to would be softmax over all -inf = NaN. Open it up (its output is
        # overwritten with 0 below) so that neither the forward nor the backward pass sees a NaN.
        empty = ~allowed.any(dim=-1, keepdim=True)  # (B, 1, L or 1, 1)
        allowed = allowed | empty
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout_p, scale=scale)
        out = out.masked_fill(empty, 0.0)
        return out


# --------------------------------------------------------------------------------------------------------------
# Linear (Katharopoulos et al. 2020)
# --------------------------------------------------------------------------------------------------------------


class LinearAttention(_NormalisedKernelAttention):
    """Linear attention with feature map ``elu(x) + 1`` (Katharopoulos et al. 2020).

    ``out_i = phi(q_i)^T sum_j phi(k_j) v_j^T / (phi(q_i)^T sum_j phi(k_j) + eps)``; the sums run over real keys
    (and j <= i when causal). No 1/sqrt(d) scaling, as in the paper.

    Options:
        eps: added to the normaliser (default 1e-6, the paper's value).
        chunk_size: chunk length of the causal path (default 64); affects speed and memory only.
    """

    registry_name = "linear"

    def _attend(self, q, k, v, causal, key_padding_mask, query_padding_mask) -> torch.Tensor:
        phi_q = F.elu(q) + 1.0
        phi_k = F.elu(k) + 1.0
        if key_padding_mask is not None:
            phi_k = phi_k.masked_fill(key_padding_mask[:, None, :, None], 0.0)
        out = _kernel_attention(phi_q, phi_k, v, causal=causal, chunk_size=self.chunk_size, eps=self.eps)
        return out


# --------------------------------------------------------------------------------------------------------------
# Performer (FAVOR+, Choromanski et al. 2021)
# --------------------------------------------------------------------------------------------------------------


def default_nb_features(head_dim: int) -> int:
    """Default number of random features: ``int(d * ln d)``, at least ``d``.

    Choromanski et al. (2021) show m = Theta(d log d) features suffice for a uniform approximation; their public
    implementation uses the same default. The floor of ``d`` keeps tiny heads (d <= 2) from getting 0 features.
    """
    return max(head_dim, int(head_dim * math.log(head_dim)))


def orthogonal_gaussian_projection(nb_features: int, head_dim: int, generator: torch.Generator) -> torch.Tensor:
    """Draw the FAVOR+ projection: (nb_features, head_dim) block-orthogonal rows with chi(d)-distributed norms.

    Rows come in blocks of ``head_dim`` mutually orthogonal unit vectors (Q of a QR decomposition of a Gaussian
    matrix, sign-corrected so that it is Haar-distributed); the last block is truncated. Each row is then scaled
    by the norm of an independent d-dimensional standard Gaussian vector, so that every row has the marginal
    distribution of a Gaussian vector while rows within a block stay orthogonal (paper, section 2.4).
    Drawn on CPU from ``generator`` (a CPU generator) so that a seed gives the same matrix on any device.
    """
    blocks = []
    for _ in range(-(-nb_features // head_dim)):
        gaussian = torch.randn(head_dim, head_dim, generator=generator, dtype=torch.float64)
        q_mat, r_mat = torch.linalg.qr(gaussian)
        q_mat = q_mat * torch.sign(torch.diagonal(r_mat))[None, :]
        blocks.append(q_mat.T)
    directions = torch.cat(blocks, dim=0)[:nb_features]
    norms = torch.randn(nb_features, head_dim, generator=generator, dtype=torch.float64).norm(dim=1)
    return (directions * norms[:, None]).to(torch.float32)


class PerformerAttention(BaselineAttention):
    """FAVOR+ attention with positive orthogonal random features (Choromanski et al. 2021).

    Features: ``phi(x)_r = exp(w_r . x' - |x'|^2 / 2) / sqrt(m)`` with ``x' = x * d^(-1/4)``, so that
    ``E[phi(q) . phi(k)] = exp(q . k / sqrt(d))`` (softmax attention's kernel), and
    ``out_i = sum_j (phiq_i . phi(k_j)) v_j / (sum_j phiq_i . phi(k_j) + eps)`` where ``phiq_i`` is phi(q_i)
    divided by its largest entry times sqrt(m) (a per-query constant, which cancels except against eps).
    Numerically the key features are computed as ``exp(logit - c)`` with ``c`` the max over the real keys and
    features of a (batch, head) and eps rescaled by ``exp(-c)``, so that no exp overflows and ``c`` cancels
    exactly. That keeps the causal form strictly causal (``c`` sees later keys but changes nothing beyond rounding)
    and padded keys out of every output. The one limit: a key whose logit is ~87 below ``c`` (fp32; ~10 in fp16)
    underflows to 0, so in causal mode an extreme later key could zero out earlier ones; activations after a
    LayerNorm stay far from that.

    Options:
        nb_features: number of random features m (default :func:`default_nb_features`: int(d ln d), >= d).
        redraw_interval: redraw the projection after this many training-mode forward calls; 0 or None = never.
        seed: base seed of the projection; draw k (k = 0 for the initial one) uses ``seed + k``. None (default)
            takes the base seed from the global torch RNG at construction, so every layer gets a different
            projection and ``seed_everything`` still makes runs reproducible. An int gives every layer built with
            it the same projection.
        eps: added to the normaliser (default 1e-6).
        chunk_size: chunk length of the causal path (default 64).

    The projection is a buffer, and the redraw counters are saved as extra state, so a checkpoint resumes with the
    same features and the same redraw schedule. Eval mode never redraws.
    """

    registry_name = "performer"

    def __init__(
        self,
        head_dim: int,
        n_heads: int,
        nb_features: int | None = None,
        redraw_interval: int | None = 0,
        seed: int | None = None,
        eps: float = 1e-6,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> None:
        super().__init__(head_dim, n_heads)
        self.nb_features = default_nb_features(self.head_dim) if nb_features is None else int(nb_features)
        check_positive(self._op, "nb_features", self.nb_features)
        self.redraw_interval = int(redraw_interval or 0)
        check_positive(self._op, "redraw_interval", self.redraw_interval, allow_zero=True)
        check_positive(self._op, "eps", eps, allow_zero=True)
        check_positive(self._op, "chunk_size", chunk_size)
        self.eps = float(eps)
        self.chunk_size = int(chunk_size)
        if seed is None:
            seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
        self.seed = int(seed)
        self.n_draws = 0  # draws so far after the initial one; draw k uses seed + k
        self.calls_since_draw = 0  # training-mode forward calls since the last draw
        self.register_buffer("projection", self._draw(0), persistent=True)

    def _draw(self, index: int) -> torch.Tensor:
        generator = torch.Generator(device="cpu").manual_seed(self.seed + index)
        return orthogonal_gaussian_projection(self.nb_features, self.head_dim, generator)

    @torch.no_grad()
    def redraw_projection(self) -> None:
        """Replace the projection with the next seeded draw (``seed + n_draws + 1``)."""
        self.n_draws += 1
        self.projection.copy_(self._draw(self.n_draws).to(self.projection))
        self.calls_since_draw = 0

    def get_extra_state(self) -> dict:
        return {"seed": self.seed, "n_draws": self.n_draws, "calls_since_draw": self.calls_since_draw}

    def set_extra_state(self, state: dict) -> None:
        self.seed = int(state["seed"])
        self.n_draws = int(state["n_draws"])
        self.calls_since_draw = int(state["calls_since_draw"])

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, nb_features={self.nb_features}, redraw_interval={self.redraw_interval}, "
            f"seed={self.seed}"
        )

    def feature_map(
        self, x: torch.Tensor, *, is_query: bool, padding_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Stabilised positive random features of x (B, H, N, d).

        Returns ``(phi, c)``: phi (B, H, N, m) equals ``exp(logits - c) / sqrt(m)`` with zero rows at padded
        positions, and the detached stabiliser c is (B, H, N, 1) for queries (each row's max) or (B, H, 1, 1) for
        keys (one max over the real keys and features, so that it cancels between numerator and normaliser).
        """
        x = x * self.head_dim**-0.25
        proj = self.projection.to(dtype=x.dtype)
        logits = x @ proj.T - 0.5 * (x * x).sum(dim=-1, keepdim=True)
        if padding_mask is not None:
            # -inf before exp (not a fill afterwards): a huge padded logit would give inf, and inf * 0 = NaN in
            # the backward pass.
            logits = logits.masked_fill(padding_mask[:, None, :, None], float("-inf"))
        if is_query:
            stab = logits.amax(dim=-1, keepdim=True)
        else:
            stab = logits.amax(dim=(-2, -1), keepdim=True)
        # A row (or sequence) that is entirely padding has max -inf; any finite constant will do there.
        stab = torch.where(torch.isfinite(stab), stab, torch.zeros_like(stab)).detach()
        return torch.exp(logits - stab) * self.nb_features**-0.5, stab

    def _attend(self, q, k, v, causal, key_padding_mask, query_padding_mask) -> torch.Tensor:
        if self.training and self.redraw_interval:
            if self.calls_since_draw >= self.redraw_interval:
                self.redraw_projection()
            self.calls_since_draw += 1
        phi_q, _ = self.feature_map(q, is_query=True, padding_mask=query_padding_mask)
        phi_k, key_stab = self.feature_map(k, is_query=False, padding_mask=key_padding_mask)
        # Dividing the key features by exp(c) divides the normaliser too; scale eps alike so that c cancels
        # exactly. Work in logs and cap at the dtype's max so that exp(-c) cannot overflow (a capped eps just means
        # the keys' kernel mass is negligible against eps, and the output is ~0, as it would be without c).
        eps = torch.exp(math.log(self.eps) - key_stab).clamp_max(torch.finfo(q.dtype).max) if self.eps > 0 else 0.0
        out = _kernel_attention(phi_q, phi_k, v, causal=causal, chunk_size=self.chunk_size, eps=eps)
        return out


# --------------------------------------------------------------------------------------------------------------
# cosFormer (Qin et al. 2022)
# --------------------------------------------------------------------------------------------------------------


def _real_positions(
    length: int, mask: torch.Tensor | None, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank of each position among the real tokens, and the real length.

    Returns positions (B or 1, N) (padded slots get the rank of the previous real token; their value never
    matters) and lengths (B or 1,), both in ``dtype``.
    """
    if mask is None:
        positions = torch.arange(length, device=device, dtype=dtype)[None, :]
        return positions, torch.full((1,), float(length), device=device, dtype=dtype)
    real = (~mask).to(dtype)
    positions = (torch.cumsum(real, dim=-1) - 1.0).clamp_min(0.0)
    return positions, real.sum(dim=-1)


class CosformerAttention(_NormalisedKernelAttention):
    """cosFormer: ReLU features with cos-based re-weighting (Qin et al. 2022).

    ``sim(i, j) = relu(q_i) . relu(k_j) * cos(pi/2 * (i - j) / M)``, computed in linear form through
    ``cos(a - b) = cos a cos b + sin a sin b`` as kernel attention over 2d features. No 1/sqrt(d) scaling.

    Positions and M: i and j are ranks among the *real* tokens of each sequence and ``M = max(L_real, S_real)``
    per sequence (``max(L, S)`` without padding, as in the paper). This is what makes padded and unpadded
    batches give the same output; with right padding the ranks equal the absolute positions. In causal mode M is
    the real sequence length too, so outputs do not depend on the content of later tokens.

    Options:
        eps: added to the normaliser (default 1e-6). ReLU features can make the normaliser exactly 0; the output
            there is 0.
        chunk_size: chunk length of the causal path (default 64).
    """

    registry_name = "cosformer"

    def _attend(self, q, k, v, causal, key_padding_mask, query_padding_mask) -> torch.Tensor:
        l_len, s_len = q.shape[2], k.shape[2]
        # Angles in at least fp32: under autocast, fp16 positions / M would be coarse for long sequences.
        angle_dtype = torch.promote_types(q.dtype, torch.float32)
        pos_q, len_q = _real_positions(l_len, query_padding_mask, q.device, angle_dtype)
        pos_k, len_k = _real_positions(s_len, key_padding_mask, q.device, angle_dtype)
        big_m = torch.maximum(len_q, len_k).clamp_min(1.0)[:, None]  # (B or 1, 1)
        angle_q = (0.5 * math.pi * pos_q / big_m)[:, None, :, None]  # (B or 1, 1, L, 1)
        angle_k = (0.5 * math.pi * pos_k / big_m)[:, None, :, None]
        cos_q, sin_q = torch.cos(angle_q).to(q.dtype), torch.sin(angle_q).to(q.dtype)
        cos_k, sin_k = torch.cos(angle_k).to(k.dtype), torch.sin(angle_k).to(k.dtype)

        relu_q = F.relu(q)
        relu_k = F.relu(k)
        phi_q = torch.cat([relu_q * cos_q, relu_q * sin_q], dim=-1)
        phi_k = torch.cat([relu_k * cos_k, relu_k * sin_k], dim=-1)
        if key_padding_mask is not None:
            phi_k = phi_k.masked_fill(key_padding_mask[:, None, :, None], 0.0)
        out = _kernel_attention(phi_q, phi_k, v, causal=causal, chunk_size=self.chunk_size, eps=self.eps)
        return out
