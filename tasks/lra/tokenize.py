"""Tokenisers of the official LRA pipelines (results/paper/official_code.md §2.5).

* ListOps: ``]`` becomes ``X`` and parentheses are removed; a whitespace tokenizer builds the vocabulary from the first
  1002 validation examples; ids follow tfds `TokenTextEncoder`: 0 = padding, 1..V = the vocabulary, V+1 = OOV.
* Text and Retrieval: tfds `ByteTextEncoder`: id = byte + 1 (UTF-8 bytes), 0 = padding, vocabulary 257.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

PAD_ID = 0
LISTOPS_VOCAB_EXAMPLES = 1002  # the official loop breaks after `i > 1000`, i.e. after 1002 examples
BYTE_VOCAB_SIZE = 257  # 256 bytes + padding
_LISTOPS_TRANSLATION = str.maketrans({"]": "X", "(": None, ")": None})


def preprocess_listops(source: str) -> str:
    """The official `rename_close_brackets`: ``]`` -> ``X``, parentheses removed."""
    return source.translate(_LISTOPS_TRANSLATION)


def build_listops_vocab(val_sources: Iterable[str], n_examples: int = LISTOPS_VOCAB_EXAMPLES) -> list[str]:
    """Token list from the first `n_examples` validation sources (raw text form).

    The official code takes `list(set(...))`, whose order depends on Python's string hashing; we sort it so ids are
    reproducible. A permutation of ids does not change what the model can learn.
    """
    vocab: set[str] = set()
    for i, source in enumerate(val_sources):
        if i >= n_examples:
            break
        vocab.update(preprocess_listops(source).split())
    return sorted(vocab)


class ListOpsEncoder:
    """Maps a raw ListOps source to ids like tfds `TokenTextEncoder(vocab)`: 1 + index, OOV = len(vocab) + 1."""

    def __init__(self, vocab: list[str]) -> None:
        self.vocab = list(vocab)
        self.token_to_id = {token: i + 1 for i, token in enumerate(self.vocab)}
        self.oov_id = len(self.vocab) + 1

    @property
    def vocab_size(self) -> int:
        """Embedding rows needed: padding + vocabulary + one OOV bucket."""
        return len(self.vocab) + 2

    def encode(self, source: str) -> np.ndarray:
        """(n,) uint8 ids of `source` (not truncated)."""
        get, oov = self.token_to_id.get, self.oov_id
        tokens = preprocess_listops(source).split()
        return np.fromiter((get(token, oov) for token in tokens), dtype=np.uint8, count=len(tokens))


def utf8_bytes(text: str | bytes) -> bytes:
    """The bytes the official `ByteTextEncoder` sees (`tf.compat.as_bytes`: UTF-8)."""
    return text if isinstance(text, bytes) else text.encode("utf-8")


def bytes_to_ids(raw: np.ndarray) -> np.ndarray:
    """uint8 bytes (n,) -> int64 ids (n,) = byte + 1, so that 0 stays free for padding."""
    return raw.astype(np.int64) + 1


__all__ = [
    "BYTE_VOCAB_SIZE",
    "LISTOPS_VOCAB_EXAMPLES",
    "PAD_ID",
    "ListOpsEncoder",
    "build_listops_vocab",
    "bytes_to_ids",
    "preprocess_listops",
    "utf8_bytes",
]
