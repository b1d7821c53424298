"""Reformer's LSH attention (Kitaev et al. 2020) as a baseline op, on top of the maintained ``reformer_pytorch``
package (the optional ``[reformer]`` extra, imported on first use)."""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from flowformer.attention.baselines import BaselineAttention, check_positive

__all__ = ["ReformerAttention"]

_REFORMER_INSTALL_HINT = "ReformerAttention needs the optional extra: pip install -e '.[reformer]'"


@functools.lru_cache(maxsize=1)
def _padded_lsh_class() -> type:
    """Build (once) a subclass of reformer_pytorch's LSHAttention that keeps padding out of the hash sort.

    The package hashes every slot, padding included, and sorts slots by (bucket, position); chunks of that sorted
    order are what attends to what. Padding that lands between real tokens would change which real tokens share
    a chunk, so the output would depend on the amount and content of padding. Here every padded slot is sent to
    the last bucket of each hashing round; since the caller also moves real tokens to the front, padding sorts
    after every real token and the chunks of real tokens are the same as for the unpadded sequence (the trick
    Trax and Hugging Face use: padding gets a bucket of its own).
    """
    try:
        from reformer_pytorch.reformer_pytorch import LSHAttention
    except ImportError as exc:
        raise ImportError(_REFORMER_INSTALL_HINT) from exc

    class _PaddedLSHAttention(LSHAttention):
        pad_slots: torch.Tensor | None = None  # (batch, seqlen) bool, True = padding; set per call

        def hash_vectors(self, n_buckets, vecs, key_namespace=None, fetch=False, set_cache=True):
            # The package caches buckets for its reversible network; we never use that, so skip the cache.
            buckets = super().hash_vectors(n_buckets, vecs, key_namespace=key_namespace, fetch=False, set_cache=False)
            if self.pad_slots is None:
                return buckets
            batch, seqlen = self.pad_slots.shape
            per_round = buckets.reshape(batch, self.n_hashes, seqlen)
            last_bucket = torch.arange(self.n_hashes, device=buckets.device) * n_buckets + (n_buckets - 1)
            per_round = torch.where(self.pad_slots[:, None, :], last_bucket[None, :, None], per_round)
            return per_round.reshape(batch, self.n_hashes * seqlen)

    # pickle finds the class by this module's name (through __getattr__ below), so models that hold it pickle
    _PaddedLSHAttention.__module__, _PaddedLSHAttention.__qualname__ = __name__, "_PaddedLSHAttention"
    return _PaddedLSHAttention


def __getattr__(name: str) -> type:
    """The padded LSH class, built on first use (reformer_pytorch is an optional extra): what pickle looks up."""
    if name == "_PaddedLSHAttention":
        return _padded_lsh_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@contextlib.contextmanager
def _fixed_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Run the block with the global RNG of ``device`` seeded to ``seed``; restore the previous state after."""
    is_cuda = device.type == "cuda"
    with torch.random.fork_rng(devices=[device] if is_cuda else []):
        torch.random.default_generator.manual_seed(seed)
        if is_cuda:
            index = device.index if device.index is not None else torch.cuda.current_device()
            torch.cuda.default_generators[index].manual_seed(seed)
        yield


class ReformerAttention(BaselineAttention):
    """LSH attention (Kitaev et al. 2020) via the maintained ``reformer_pytorch`` package (imported lazily).

    Shared query/key: Reformer attends with one tensor used as both query and key (keys are the unit-normalised
    queries). This op uses **q as the shared query/key and ignores k** (only its shape is checked);
    ``shares_qk = True`` tells the multi-head layer to tie the key projection to the query projection (otherwise
    the key projection gets no gradient). Cross-attention (L != S) raises NotImplementedError. Scores are scaled
    by 1/sqrt(d). As in the paper, a token attends to itself only when nothing else is visible to it.

    Lengths: the package needs a multiple of ``2 * bucket_size``; inputs are padded internally (masked, and kept
    in a bucket of their own) and cropped. Real tokens are moved to the front first, so real positions equal the
    unpadded output *exactly* whenever both calls use the same internal length (i.e. ceil(n / (2 *
    bucket_size)) agrees; always true for sequences up to 2 * bucket_size). Otherwise the number of buckets
    differs, the hashes differ and the outputs agree only in distribution: LSH attention is randomised.

    Randomness: training draws fresh hash rotations from the global torch RNG each call (as in the paper; the
    Lightning seed makes it reproducible). Eval mode draws them from a generator seeded with ``eval_seed``, so
    evaluation is deterministic; ``eval_seed=None`` keeps the global RNG in eval too.

    Causal: the package masks keys after the query, so no later *value* or score reaches output i. But the hash
    sort is global: later tokens' buckets change which earlier keys share a chunk with i, so output i can change
    when later queries/keys change. That breaks the strict causal contract, so ``causal=True`` raises
    NotImplementedError unless ``allow_causal_hash_leak=True``; set it to reproduce the paper's causal Reformer
    rows (WikiText-103, D4RL) and record that choice in the config.

    Options:
        bucket_size: slots per chunk (default 32).
        n_hashes: hashing rounds (default 4).
        dropout: dropout on the attention probabilities, training only (default 0.0).
        eval_seed: seed of the hash rotations in eval mode (default 0; None = global RNG).
        allow_causal_hash_leak: permit causal=True with the leak described above (default False).
    """

    registry_name = "reformer"
    shares_qk = True
    # the LSH chunks depend on the padded length beyond 2 * bucket_size (see Lengths above)
    padding_invariant = False

    def __init__(
        self,
        head_dim: int,
        n_heads: int,
        bucket_size: int = 32,
        n_hashes: int = 4,
        dropout: float = 0.0,
        eval_seed: int | None = 0,
        allow_causal_hash_leak: bool = False,
    ) -> None:
        super().__init__(head_dim, n_heads)
        check_positive(self._op, "bucket_size", bucket_size)
        check_positive(self._op, "n_hashes", n_hashes)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"{self._op}: option dropout must be in [0, 1); got {dropout!r}.")
        lsh_class = _padded_lsh_class()
        self.bucket_size = int(bucket_size)
        self.n_hashes = int(n_hashes)
        self.eval_seed = None if eval_seed is None else int(eval_seed)
        self.allow_causal_hash_leak = bool(allow_causal_hash_leak)
        self.lsh = lsh_class(bucket_size=self.bucket_size, n_hashes=self.n_hashes, dropout=dropout, causal=False)
        self.lsh_causal = lsh_class(bucket_size=self.bucket_size, n_hashes=self.n_hashes, dropout=dropout, causal=True)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, bucket_size={self.bucket_size}, n_hashes={self.n_hashes}, "
            f"eval_seed={self.eval_seed}, allow_causal_hash_leak={self.allow_causal_hash_leak}"
        )

    def _attend(self, q, k, v, causal, key_padding_mask, query_padding_mask) -> torch.Tensor:
        """q (B, H, L, d) is the shared query/key; k is ignored (its shape is checked); v (B, H, L, dv)."""
        b, h, length, d = q.shape
        dv = v.shape[-1]
        if k.shape[2] != length:
            raise NotImplementedError(
                f"{self._op}: LSH attention shares queries and keys, so it is self-attention only; got L={length}, "
                f"S={k.shape[2]}. Use 'softmax', 'linear', 'performer' or 'cosformer' for cross-attention."
            )
        if causal and not self.allow_causal_hash_leak:
            raise NotImplementedError(
                f"{self._op}: causal LSH attention is not strictly causal (later tokens' hash buckets change which "
                "earlier keys a query sees). Set model.attention.allow_causal_hash_leak=true to accept this, as "
                "the paper's Reformer baseline does, or use 'softmax', 'linear', 'performer' or 'cosformer'."
            )

        # Token mask for the shared query/key sequence: a padded key is never attended to, and its v is zeroed so
        # the package's "attend to self when alone" rule cannot leak it into any output.
        pad = key_padding_mask
        qk = q
        if pad is not None:
            qk = qk.masked_fill(pad[:, None, :, None], 0.0)
            v = v.masked_fill(pad[:, None, :, None], 0.0)
            # Real tokens first (stable, so order and hence causality are kept), padding after.
            order = torch.argsort(pad.to(torch.int8), dim=-1, stable=True)  # (B, L)
            qk = qk.gather(2, order[:, None, :, None].expand(b, h, length, d))
            v = v.gather(2, order[:, None, :, None].expand(b, h, length, dv))
            n_real = (~pad).sum(dim=-1)  # (B,)
            n_keep = max(int(n_real.max().item()), 1)
        else:
            n_real = torch.full((b,), length, device=q.device)
            n_keep = length
        qk, v = qk[:, :, :n_keep], v[:, :, :n_keep]

        # The package scales by 1/sqrt(width) and needs v as wide as qk. Zero columns change neither the
        # hash (argmax of a rotation of qk) nor the key normalisation, and the factor sqrt(width / d) restores the
        # 1/sqrt(d) scale (the package uses the raw qk as the query and the normalised qk as the key).
        width = max(d, dv)
        if width > d:
            qk = F.pad(qk, (0, width - d)) * math.sqrt(width / d)
        if width > dv:
            v = F.pad(v, (0, width - dv))
        multiple = 2 * self.bucket_size
        n_slots = -(-n_keep // multiple) * multiple
        qk = F.pad(qk, (0, 0, 0, n_slots - n_keep))
        v = F.pad(v, (0, 0, 0, n_slots - n_keep))
        slot_pad = torch.arange(n_slots, device=q.device)[None, :] >= n_real[:, None]  # (B, n_slots)
        slot_pad = slot_pad[:, None, :].expand(b, h, n_slots).reshape(b * h, n_slots)

        lsh = self.lsh_causal if causal else self.lsh
        rng = (
            _fixed_rng(self.eval_seed, q.device)
            if (not self.training and self.eval_seed is not None)
            else contextlib.nullcontext()
        )
        lsh.pad_slots = slot_pad
        try:
            with rng:
                out, _, _ = lsh(
                    qk.reshape(b * h, n_slots, width), v.reshape(b * h, n_slots, width), input_mask=~slot_pad
                )
        finally:
            lsh.pad_slots = None
        out = out.reshape(b, h, n_slots, width)[:, :, :n_keep, :dv]

        if pad is not None:
            # Undo the "real tokens first" permutation; positions beyond n_keep are padding and get 0.
            full = out.new_zeros(b, h, length, dv)
            full[:, :, :n_keep] = out
            inverse = torch.argsort(order, dim=-1)
            out = full.gather(2, inverse[:, None, :, None].expand(b, h, length, dv))
            out = out.masked_fill(pad[:, None, :, None], 0.0)
        return out
