"""The benchmarked attentions: each variant's description, where it runs and how it is built."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


def noncausal_matmul_flops(length: int, dim: int, dim_v: int, chunk: int) -> float:
    return 4.0 * length * dim * dim_v  # kᵀ(c v) and q (kᵀ v)


def causal_matmul_flops(length: int, dim: int, dim_v: int, chunk: int) -> float:
    # per chunk: scores (C,d)(d,C), intra (C,C)(C,dv), state (d,C)(C,dv), inter (C,d)(d,dv)
    return 2.0 * length * chunk * (dim + dim_v) + 4.0 * length * dim * dim_v


@dataclass(frozen=True)
class Variant:
    """One benchmarked attention. `flops(L, d, dv, chunk)` counts the matmul FLOPs per (batch, head)."""

    description: str
    causal: bool
    forward_only: bool = False
    flops: Callable[[int, int, int, int], float] | None = None
    device: str | None = None  # only on this device type
    dtypes: tuple[str, ...] | None = None  # only in these dtypes

    def runs_on(self, device: str, dtype: str | None = None) -> bool:
        return self.device in (None, device) and (dtype is None or self.dtypes is None or dtype in self.dtypes)


HALF = ("bfloat16", "float16")
VARIANTS: dict[str, Variant] = {
    "flow": Variant("Flow-Attention, non-causal (ours, backend='auto')", False, flops=noncausal_matmul_flops),
    "flow_blocked": Variant(
        "Flow-Attention, non-causal (ours, backend='blocked'; 'auto' on CPU, but for inference at 1024-8192 keys)",
        False, flops=noncausal_matmul_flops,
    ),
    "flow_batched": Variant(
        "Flow-Attention, non-causal (ours, backend='batched'; 'auto' on a GPU and for CPU inference at 1024-8192 keys)",
        False, flops=noncausal_matmul_flops,
    ),
    "flow_compiled": Variant(
        "Flow-Attention, non-causal, under torch.compile (ours: 'auto' runs 'batched' there; compiled once per shape, "
        "before timing)", False, flops=noncausal_matmul_flops,
    ),
    "flow_causal_compiled": Variant(
        "Flow-Attention, causal, under torch.compile (ours: the chunked passes as custom ops)", True,
        flops=causal_matmul_flops,
    ),
    "flow_official": Variant(
        "official non-causal maths as plain einsum (baseline)", False, flops=noncausal_matmul_flops
    ),
    "flow_causal": Variant("Flow-Attention, causal, chunked (ours)", True, flops=causal_matmul_flops),
    "flow_causal_materialised": Variant("official causal maths, materialised (B,H,L,d,dv) cumsum (baseline)", True),
    "softmax": Variant("softmax attention, SDPA", False),
    "softmax_causal": Variant("softmax attention, SDPA, causal", True),
    # SDPA picks its own kernel (cuDNN, flash, memory-efficient); these pin FlashAttention, the GPU yardstick
    "softmax_flash": Variant("softmax attention, SDPA pinned to FlashAttention", False, device="cuda", dtypes=HALF),
    "softmax_flash_causal": Variant(
        "softmax attention, SDPA pinned to FlashAttention, causal", True, device="cuda", dtypes=HALF
    ),
    "linear": Variant("linear attention (elu+1)", False),
    "linear_causal": Variant("linear attention (elu+1), causal", True),
    "performer": Variant("Performer (FAVOR+)", False),
    "performer_causal": Variant("Performer (FAVOR+), causal", True),
    "cosformer": Variant("cosFormer", False),
    "cosformer_causal": Variant("cosFormer, causal", True),
    "reformer": Variant("Reformer (LSH)", False),
    "matmul": Variant(
        "only the two matmuls of non-causal flow, kᵀv and q(kᵀv): the ceiling for these shapes", False,
        forward_only=True, flops=noncausal_matmul_flops,
    ),
    "matmul_causal": Variant(
        "only the four chunked GEMMs of causal flow (scores, intra, states, inter): the ceiling for these shapes",
        True, forward_only=True, flops=causal_matmul_flops,
    ),
}
DEFAULT_VARIANTS = (  # softmax_flash* run only with --device cuda
    "flow", "flow_blocked", "flow_batched", "flow_official", "flow_causal", "flow_causal_materialised", "softmax",
    "softmax_causal", "softmax_flash", "softmax_flash_causal", "linear", "linear_causal", "performer", "cosformer",
    "reformer", "matmul", "matmul_causal",
)
# The square GEMM that measures the machine's ceiling is a configuration of its own, not an attention variant.
GEMM = "gemm"


def parse_variant(spec: str) -> tuple[str, int | None]:
    """'flow_causal:32' -> ('flow_causal', 32); 'softmax' -> ('softmax', None)."""
    name, _, chunk = spec.partition(":")
    if name not in VARIANTS and name != GEMM:
        raise SystemExit(
            f"experiments/bench: unknown variant {name!r}. Known: {', '.join(VARIANTS)} "
            "(optionally with ':<chunk>' for the flow variants, e.g. flow_causal:128)."
        )
    return name, (int(chunk) if chunk else None)


def chunked_causal_matmuls(q, k, v, chunk: int):
    """The GEMMs of the chunked causal path alone, at its shapes (L a multiple of `chunk`): the matmul ceiling."""
    batch, heads, length, _ = q.shape
    n_chunks = length // chunk
    qc, kc, vc = (t.reshape(batch, heads, n_chunks, chunk, t.shape[-1]) for t in (q, k, v))
    scores = qc @ kc.transpose(-2, -1)
    states = kc.transpose(-2, -1) @ vc
    out = qc @ states
    out.view(-1, chunk, out.shape[-1]).baddbmm_(scores.view(-1, chunk, chunk), vc.reshape(-1, chunk, vc.shape[-1]))
    return out


def build_op(name: str, chunk: int | None, head_dim: int, n_heads: int) -> Callable:
    """The callable `op(q, k, v) -> out` of a variant."""
    import torch

    from flowformer.attention import build_attention, flow_attention
    from flowformer.attention.flow import DEFAULT_CHUNK_SIZE
    from flowformer.attention.reference import official_causal_flow, official_noncausal_flow

    causal = VARIANTS[name].causal
    if name == "flow_official":
        return official_noncausal_flow
    if name == "flow_causal_materialised":
        return official_causal_flow
    if name == "matmul":
        return lambda q, k, v: q @ (k.transpose(-2, -1) @ v)
    if name == "matmul_causal":
        return lambda q, k, v: chunked_causal_matmuls(q, k, v, chunk or DEFAULT_CHUNK_SIZE)
    if name.startswith("softmax_flash"):
        return _flash_attention(causal)
    if name.endswith("_compiled"):
        from flowformer.compile import configure_compiler

        configure_compiler()
        return torch.compile(lambda q, k, v: flow_attention(q, k, v, causal=causal, chunk_size=chunk), dynamic=False)
    if name.startswith("flow"):
        backend = name.removeprefix("flow_") if name in ("flow_blocked", "flow_batched") else "auto"
        return lambda q, k, v: flow_attention(q, k, v, causal=causal, chunk_size=chunk, backend=backend)
    op = build_attention(name.removesuffix("_causal"), head_dim, n_heads)
    op.eval()  # e.g. Reformer: fixed hash rotations, so every repeat does the same work
    return lambda q, k, v: op(q, k, v, causal=causal)


def _flash_attention(causal: bool) -> Callable:
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def op(q, k, v):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # an error, not a silent fallback, where flash cannot run
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return op
