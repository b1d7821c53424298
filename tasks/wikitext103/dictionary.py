"""fairseq's word dictionary, rebuilt natively so that token ids equal those of `fairseq-preprocess --only-source`.

The rules (fairseq's `Dictionary` with the preprocessing defaults, results/paper/official_code.md §6):
- a line is split on whitespace, and every line, a blank one included, ends with the end-of-sentence symbol `</s>`;
- the four specials come first: `<s>` 0, `<pad>` 1, `</s>` 2, `<unk>` 3 (the corpus's own `<unk>` is this symbol);
- then every other type of the *training* split, by decreasing count; ties in ascending code-point order (fairseq
  sorts the types by name before a stable sort by count);
- then `madeupword0000`, `madeupword0001`, ... until the size is a multiple of 8.
Words of valid/test that training never saw map to `<unk>`.

`Dictionary.save` writes fairseq's `dict.txt` ("<word> <count>" per line, specials omitted), so the checksum of
that file can be compared with the `dict.txt` of a fairseq `data-bin` folder.

Training also saves the dictionary into its run directory (`save_to_run`: `dict.txt` and `dict.txt.sha256`), so
that generating from a run needs the run folder alone (`load_from_run`), not the corpus and its token cache.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

from results.atomic_io import write_text_atomic
from tasks.common.download import read_record, record_hash, record_path

BOS, PAD, EOS, UNK = 0, 1, 2, 3
SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")
EOS_WORD = SPECIALS[EOS]
PADDING_FACTOR = 8
# in a run directory: the dictionary the run was trained with, and its sha256 in `sha256sum`'s format
RUN_DICTIONARY = "dict.txt"


class DictionaryFormatError(ValueError):
    """A dict.txt line is not `<word> <count>`."""


class RunDictionaryError(ValueError):
    """A run directory's dict.txt is not the dictionary its sha256 file records."""


class Dictionary:
    """Symbols (specials first) with their training counts; `index[word]` is a word's id."""

    def __init__(self, symbols: Sequence[str], counts: Sequence[int]) -> None:
        if tuple(symbols[: len(SPECIALS)]) != SPECIALS:
            raise ValueError(f"a dictionary starts with the specials {SPECIALS}; got {tuple(symbols[:4])}")
        self.symbols, self.counts = list(symbols), list(counts)
        self.index = {word: i for i, word in enumerate(self.symbols)}

    def __len__(self) -> int:
        return len(self.symbols)

    @classmethod
    def from_counts(cls, counts: Counter[str], padding_factor: int = PADDING_FACTOR) -> Dictionary:
        """The dictionary of training-split word counts (`</s>` and `<unk>` may be among them)."""
        special_counts = [counts.get(word, 0) for word in SPECIALS]
        words = sorted((word for word in counts if word not in SPECIALS), key=lambda w: (-counts[w], w))
        symbols, values = [*SPECIALS, *words], [*special_counts, *(counts[w] for w in words)]
        filler = 0
        while len(symbols) % padding_factor:
            symbols.append(f"madeupword{filler:04d}")
            values.append(0)
            filler += 1
        return cls(symbols, values)

    def encode_line(self, line: str) -> list[int]:
        """The ids of a line's whitespace tokens, then `</s>`."""
        index = self.index
        return [index.get(word, UNK) for word in line.split()] + [EOS]

    def decode(self, ids: Iterable[int]) -> str:
        """Words joined by spaces; `</s>` becomes a line break."""
        return " ".join(self.symbols[i] for i in ids).replace(f" {EOS_WORD} ", "\n").replace(EOS_WORD, "\n")

    def to_text(self) -> str:
        """fairseq's dict.txt: one "<word> <count>" line per non-special symbol, in id order."""
        return "".join(f"{word} {count}\n" for word, count in zip(self.symbols[4:], self.counts[4:]))

    @property
    def sha256(self) -> str:
        """Checksum of `to_text()` (equals `sha256sum dict.txt` of the saved file)."""
        return hashlib.sha256(self.to_text().encode("utf-8")).hexdigest()

    def save(self, path: Path) -> None:
        Path(path).write_text(self.to_text(), encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> Dictionary:
        """Read a fairseq dict.txt (ours or one from a fairseq `data-bin` folder)."""
        symbols, counts = list(SPECIALS), [0] * len(SPECIALS)
        try:
            with open(path, encoding="utf-8") as handle:
                for number, line in enumerate(handle, start=1):
                    word, _, count = line.rstrip("\n").rpartition(" ")
                    if not word or not count.isdigit():
                        raise DictionaryFormatError(f"{path}, line {number}: expected '<word> <count>', got {line!r}")
                    symbols.append(word)
                    counts.append(int(count))
        except UnicodeDecodeError as error:
            raise DictionaryFormatError(
                f"{path} is not UTF-8 text ({error.reason} at byte {error.start} of a read block); a fairseq dict.txt "
                "is UTF-8: copy it again from the data cache it was built in"
            ) from None
        return cls(symbols, counts)


def save_to_run(dictionary: Dictionary, run_dir: Path) -> Path:
    """Write `dictionary` as `<run_dir>/dict.txt` with its sha256 beside it (`sha256sum -c dict.txt.sha256` checks
    it); each file atomically, so processes of one DDP run may all write it. Returns the dict.txt path."""
    path = Path(run_dir) / RUN_DICTIONARY
    write_text_atomic(path, dictionary.to_text())
    record_hash(path, dictionary.sha256)
    return path


def load_from_run(run_dir: Path) -> Dictionary:
    """The dictionary saved by `save_to_run`, checked against its recorded sha256 (when that file is there).

    Raises FileNotFoundError when `<run_dir>/dict.txt` is absent (runs from before it was saved), and
    `RunDictionaryError` when it does not match its recorded checksum.
    """
    path = Path(run_dir) / RUN_DICTIONARY
    if not path.is_file():
        raise FileNotFoundError(f"no dictionary at {path}")
    dictionary = Dictionary.load(path)
    recorded = read_record(path)
    if recorded is not None:
        if recorded != dictionary.sha256:
            raise RunDictionaryError(
                f"{path} (sha256 {dictionary.sha256[:12]}...) is not the dictionary {record_path(path).name} records "
                f"({recorded[:12]}...): it was edited or replaced after training. Copy the training data's "
                f"<data_dir>/<dataset>/cache/dict.txt back into {path.parent}"
            )
    return dictionary


__all__ = [
    "BOS", "EOS", "EOS_WORD", "PAD", "RUN_DICTIONARY", "SPECIALS", "UNK", "Dictionary",
    "DictionaryFormatError", "RunDictionaryError", "load_from_run", "save_to_run",
]
