"""The options of Flow-Attention, in one frozen object shared by every entry point.

`flow_attention`, the `FlowAttention` module, `flow_attention_prefill` / `flow_attention_step` and the
`model/attention=flow*` configs all describe the same maths with the same fields, so they are written down once,
here. A module exposes its options as `.options`; pass that object on
(`flow_attention_prefill(..., options=op.options)`) to run the same maths elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

KERNELS = ("sigmoid", "relu")
COMPETITION_AXES = ("keys", "heads")
# "blocked": cache-sized blocks of rows and a hand-written backward (the CPU form); "batched": a few large GEMMs
# over the whole sequence under autograd, in the input dtype (the GPU form); "auto" picks by device and length
# (see `flow.api.resolve_backend`). The causal path has one chunked form on every device.
BACKENDS = ("auto", "blocked", "batched")
# The chunk sweep on CPU at the default thread count (results/bench/chunk_sweep.md): 64 is the fastest, forward and
# forward+backward, with the lowest forward memory; 32 comes close, 16, 128 and 256 are clearly slower.
DEFAULT_CHUNK_SIZE = 64


@dataclass(frozen=True)
class FlowOptions:
    """How Flow-Attention is computed (see `flow_attention` for the meaning of each field).

    The first six fields define the maths; `chunk_size` and `backend` only change speed and memory, so two
    option objects that differ only there give the same function (`same_maths`). It unpacks as keywords, so
    `flow_attention(q, k, v, **options)` and `options["kernel"]` work too.
    """

    competition: bool = True
    allocation: bool = True
    clamp: float | None = 1.0
    eps: float = 1e-6
    kernel: str = "sigmoid"
    competition_over: str = "keys"
    chunk_size: int | None = None
    backend: str = "auto"

    def __post_init__(self) -> None:
        if self.kernel not in KERNELS:
            raise ValueError(f"unknown flow-attention kernel {self.kernel!r}; expected one of {KERNELS}")
        if self.competition_over not in COMPETITION_AXES:
            raise ValueError(f"competition_over must be one of {COMPETITION_AXES}, got {self.competition_over!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown flow-attention backend {self.backend!r}; available: {', '.join(BACKENDS)}")
        if self.chunk_size is not None and int(self.chunk_size) < 1:
            raise ValueError(
                f"chunk_size must be a positive integer or None (default {DEFAULT_CHUNK_SIZE}), got {self.chunk_size}"
            )

    def keys(self) -> tuple[str, ...]:
        return tuple(self.__dataclass_fields__)

    def __getitem__(self, name: str):
        if name not in self.__dataclass_fields__:
            raise KeyError(name)
        return getattr(self, name)

    @property
    def chunk(self) -> int:
        """The causal chunk length in tokens."""
        return int(self.chunk_size or DEFAULT_CHUNK_SIZE)

    def same_maths(self, other: FlowOptions) -> bool:
        """Whether `other` computes the same function (it may differ in chunk size and backend)."""
        return replace(self, chunk_size=None, backend="auto") == replace(other, chunk_size=None, backend="auto")

    def check_causal(self) -> None:
        """Raise where these options have no causal form."""
        if self.competition_over == "heads":
            raise NotImplementedError(
                "flow attention with competition over heads (flow_lra_official, the official LRA variant) has no "
                "causal form; use model/attention=flow (competition_over='keys') for causal models"
            )

    @classmethod
    def resolve(cls, options: FlowOptions | None, overrides: dict) -> FlowOptions:
        """`options` with `overrides` (field name -> value) applied; the defaults when `options` is None."""
        unknown = sorted(set(overrides) - set(cls.__dataclass_fields__))
        if unknown:
            raise TypeError(f"unknown flow-attention option(s) {unknown}; expected {sorted(cls.__dataclass_fields__)}")
        return replace(options, **overrides) if options is not None else cls(**overrides)
