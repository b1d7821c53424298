"""WikiText data as fairseq sees it: the dictionary, the token cache, the corpus sources and their errors."""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from tasks.wikitext103.cache import (
    DictionaryMismatchError,
    EmptySplitError,
    KnownSizeError,
    cache_dir_of,
    load_or_build,
)
from tasks.wikitext103.corpus import (
    HF_CONFIGS,
    HF_REPO,
    CorpusEncodingError,
    MissingSplitError,
    find_source,
    split_file,
)
from tasks.wikitext103.data import WikiTextDataModule
from tasks.wikitext103.dictionary import EOS, SPECIALS, UNK, Dictionary, DictionaryFormatError
from tests.fixtures.wikitext103 import UNSEEN, write_corpus


def fairseq_order(counts: Counter) -> list[str]:
    """fairseq's Dictionary.finalize, written out independently: sort the types by name, then most_common."""
    ordinary = Counter(dict(sorted((w, c) for w, c in counts.items() if w not in SPECIALS)))
    return [word for word, _ in ordinary.most_common(len(ordinary))]


def lines_of(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as handle:
        return list(handle)


def test_dictionary_follows_fairseq():
    counts = Counter({"b": 3, "a": 3, "Z": 3, "é": 3, "c": 5, "<unk>": 2, "</s>": 7, "d": 1})
    dictionary = Dictionary.from_counts(counts)
    assert dictionary.symbols[:4] == list(SPECIALS)  # <s> <pad> </s> <unk>
    assert dictionary.symbols[4:10] == fairseq_order(counts) == ["c", "Z", "a", "b", "é", "d"]  # ties: code points
    assert len(dictionary) == 16 and dictionary.symbols[10:] == [f"madeupword000{i}" for i in range(6)]
    assert dictionary.index["<unk>"] == UNK and dictionary.counts[EOS] == 7
    assert dictionary.encode_line(" c zz <unk>  \n") == [4, UNK, UNK, EOS]
    assert dictionary.encode_line(" \n") == [EOS]  # a blank line is one </s>


def test_dictionary_file_round_trip_and_checksum(tmp_path):
    dictionary = Dictionary.from_counts(Counter("the cat sat on the mat the end".split()))
    dictionary.save(tmp_path / "dict.txt")
    assert (tmp_path / "dict.txt").read_text().splitlines()[0] == "the 3"  # fairseq's "<word> <count>"
    assert hashlib.sha256((tmp_path / "dict.txt").read_bytes()).hexdigest() == dictionary.sha256
    loaded = Dictionary.load(tmp_path / "dict.txt")
    assert loaded.symbols == dictionary.symbols and loaded.counts[4:] == dictionary.counts[4:]


def test_cache_holds_every_line_with_its_eos(tmp_path):
    folder = write_corpus(tmp_path, "tiny-wiki")
    corpus = load_or_build(find_source(tmp_path, "tiny-wiki"), cache_dir_of(tmp_path, "tiny-wiki"))
    train_lines = lines_of(folder / "wiki.train.tokens")
    counts = Counter(w for line in train_lines for w in line.split()) + Counter({"</s>": len(train_lines)})
    assert corpus.dictionary.symbols == Dictionary.from_counts(counts).symbols
    for split in ("train", "valid", "test"):
        lines = lines_of(folder / f"wiki.{split}.tokens")
        expected = [i for line in lines for i in corpus.dictionary.encode_line(line)]
        stream = corpus.streams[split]
        assert stream.dtype == np.uint32 and stream.tolist() == expected
        assert int((stream == EOS).sum()) == len(lines)
    assert all(corpus.dictionary.index.get(word) is None for word in UNSEEN)  # seen only in valid/test
    assert UNK in corpus.streams["valid"].tolist()


def test_ids_beyond_uint16(tmp_path):
    """WikiText-103 has 267,744 ids: the cache must not wrap them like a uint16 would."""
    folder = tmp_path / "wide"
    folder.mkdir()
    words = [f"w{i}" for i in range(70_000)]
    (folder / "wiki.train.tokens").write_text(" " + " ".join(words) + " \n", encoding="utf-8")
    for split in ("valid", "test"):
        (folder / f"wiki.{split}.tokens").write_text(" w69999 w1 \n", encoding="utf-8")
    corpus = load_or_build(find_source(tmp_path, "wide"), cache_dir_of(tmp_path, "wide"))
    assert len(corpus.dictionary) == 70_008  # 4 + 70,000 padded to a multiple of 8
    last = corpus.dictionary.index["w69999"]
    assert last > 65_535 and corpus.streams["valid"].tolist() == [last, corpus.dictionary.index["w1"], EOS]


def test_lines_end_as_fairseq_reads_them(tmp_path):
    """Universal newlines (\\n, \\r\\n, \\r) end lines; a Unicode line separator splits words but ends no line."""
    folder = tmp_path / "newlines"
    folder.mkdir()
    (folder / "wiki.train.tokens").write_bytes(" a b \r\n \r\n c\u2028d e \r f \n".encode())
    for split in ("valid", "test"):
        (folder / f"wiki.{split}.tokens").write_bytes(b" a \n")
    corpus = load_or_build(find_source(tmp_path, "newlines"), cache_dir_of(tmp_path, "newlines"))
    words = [corpus.dictionary.symbols[i] for i in corpus.streams["train"]]
    assert words == ["a", "b", "</s>", "</s>", "c", "d", "e", "</s>", "f", "</s>"]


def test_cache_is_reused_then_rebuilt_when_corrupted(tmp_path, caplog):
    write_corpus(tmp_path, "tiny-wiki")
    source, cache = find_source(tmp_path, "tiny-wiki"), cache_dir_of(tmp_path, "tiny-wiki")
    first = load_or_build(source, cache).streams["test"].tolist()
    built_at = (cache / "test.bin").stat().st_mtime_ns
    load_or_build(source, cache)
    assert (cache / "test.bin").stat().st_mtime_ns == built_at  # not rebuilt

    data = (cache / "test.bin").read_bytes()
    (cache / "test.bin").write_bytes(data[:-4])  # a truncated file
    with caplog.at_level(logging.WARNING):
        rebuilt = load_or_build(source, cache)
    assert "rebuilding the token cache" in caplog.text and "test.bin" in caplog.text
    assert rebuilt.streams["test"].tolist() == first

    (cache / "meta.json").write_text("{not json")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert load_or_build(source, cache).streams["test"].tolist() == first
    assert "corrupted" in caplog.text


def test_changed_source_rebuilds_the_cache(tmp_path, caplog):
    folder = write_corpus(tmp_path, "tiny-wiki")
    source, cache = find_source(tmp_path, "tiny-wiki"), cache_dir_of(tmp_path, "tiny-wiki")
    before = load_or_build(source, cache).streams["valid"].size
    with open(folder / "wiki.valid.tokens", "a", encoding="utf-8") as handle:
        handle.write(" the river . \n")
    with caplog.at_level(logging.WARNING):
        after = load_or_build(find_source(tmp_path, "tiny-wiki"), cache).streams["valid"].size
    assert after == before + 4 and "changed" in caplog.text


def test_a_dictionary_that_does_not_match_its_cache_is_an_error(tmp_path):
    write_corpus(tmp_path, "tiny-wiki")
    source, cache = find_source(tmp_path, "tiny-wiki"), cache_dir_of(tmp_path, "tiny-wiki")
    load_or_build(source, cache)
    lines = (cache / "dict.txt").read_text().splitlines()
    lines[0], lines[1] = lines[1], lines[0]  # two words swap ids
    (cache / "dict.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(DictionaryMismatchError, match=r"dict\.txt.*Delete"):
        load_or_build(source, cache)


def test_missing_and_empty_splits_name_the_file(tmp_path):
    folder = write_corpus(tmp_path, "tiny-wiki")
    (folder / "wiki.test.tokens").unlink()
    with pytest.raises(MissingSplitError, match=r"wiki\.test\.tokens.*make data-wikitext103"):
        find_source(tmp_path, "tiny-wiki")
    (folder / "wiki.test.tokens").write_text("")
    with pytest.raises(EmptySplitError, match=r"test split .*wiki\.test\.tokens.* is empty"):
        load_or_build(find_source(tmp_path, "tiny-wiki"), cache_dir_of(tmp_path, "tiny-wiki"))


def test_wikitext103_sizes_are_checked(tmp_path):
    write_corpus(tmp_path, "wikitext-103")  # a folder named like the real corpus, but tiny
    with pytest.raises(KnownSizeError, match=r"train: .*expected 103,227,021.*vocab: .*expected 267,744"):
        load_or_build(find_source(tmp_path, "wikitext-103"), cache_dir_of(tmp_path, "wikitext-103"))


def test_hf_parquet_files_give_the_same_ids(tmp_path, monkeypatch):
    """The HF `Salesforce/wikitext` layout (one row per line, blank lines as "") read from the local hub cache."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from huggingface_hub import constants

    files = write_corpus(tmp_path / "files", "wikitext-2")
    snapshot = tmp_path / "hub" / f"datasets--{HF_REPO.replace('/', '--')}" / "snapshots" / ("0" * 40)
    config = snapshot / HF_CONFIGS["wikitext-2"]
    config.mkdir(parents=True)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    for split, name in (("train", "train"), ("valid", "validation"), ("test", "test")):
        rows = [line if line.strip() else "" for line in lines_of(files / f"wiki.{split}.tokens")]
        pq.write_table(pa.table({"text": rows}), config / f"{name}-00000-of-00001.parquet")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))

    hf = find_source(tmp_path / "elsewhere", "wikitext-2")  # no folder there: the cache is used
    assert hf.kind == "hf"
    from_hf = load_or_build(hf, cache_dir_of(tmp_path / "elsewhere", "wikitext-2"))
    from_files = load_or_build(find_source(tmp_path / "files", "wikitext-2"), cache_dir_of(tmp_path / "files",
                                                                                              "wikitext-2"))
    assert from_hf.dictionary.sha256 == from_files.dictionary.sha256
    for split in ("train", "valid", "test"):
        assert from_hf.streams[split].tolist() == from_files.streams[split].tolist()


def test_datamodule_reports_status_without_reading(tmp_path):
    module = WikiTextDataModule(dataset="tiny-wiki", data_dir=tmp_path)  # nothing there: construction reads nothing
    status = module.data_status()
    assert not status.available and "make data-wikitext103" in status.detail
    write_corpus(tmp_path, "tiny-wiki")
    assert module.data_status().available and not cache_dir_of(tmp_path, "tiny-wiki").exists()
    module.setup()
    info = module.data_info
    assert info["vocab_size"] == len(module.corpus.dictionary) and len(info["dictionary_sha256"]) == 64
    assert info["tokens"]["test"] == sum(len(line.split()) + 1 for line in lines_of(split_file(tmp_path, "tiny-wiki",
                                                                                                 "test")))
    assert module.model_dims() == {"vocab_size": info["vocab_size"], "padding_idx": 1}


@pytest.mark.parametrize("bad", [{"context_window": 512}, {"val_context_window": -1}, {"selection": "best"},
                                 {"source": "web"}, {"batch_size": 0}])
def test_datamodule_rejects_bad_settings(bad):
    with pytest.raises(ValueError, match="|".join(bad)):
        WikiTextDataModule(**bad)


@pytest.mark.data
def test_real_wikitext103_has_fairseqs_sizes():
    """On the real corpus: the known token counts and fairseq's 267,744-entry dictionary (slow the first time: it
    tokenises 103 M tokens into the cache)."""
    from results.roots import data_root

    module = WikiTextDataModule("wikitext-103", data_root())
    status = module.data_status()
    if not status.available:
        pytest.skip(f"WikiText-103 is not on disk ({status.detail})")
    module.setup()  # raises KnownSizeError on any difference
    assert module.data_info["tokens"] == {"train": 103_227_021, "valid": 217_646, "test": 245_569}
    assert module.data_info["vocab_size"] == 267_744


def test_bytes_that_are_not_utf8_name_the_file_line_and_fix_and_write_nothing(tmp_path):
    folder = write_corpus(tmp_path, "tiny-wiki")
    valid = folder / "wiki.valid.tokens"
    lines = valid.read_bytes().split(b"\n")
    offset = sum(len(line) + 1 for line in lines[:2]) + 3
    lines[2] = lines[2][:3] + b"caf\xe9" + lines[2][3:]  # Latin-1 é on line 3
    valid.write_bytes(b"\n".join(lines))
    cache = cache_dir_of(tmp_path, "tiny-wiki")
    with pytest.raises(CorpusEncodingError) as caught:
        load_or_build(find_source(tmp_path, "tiny-wiki"), cache)
    message = str(caught.value)
    assert str(valid) in message and "line 3" in message and f"byte offset {offset + 3}" in message
    assert "UTF-8" in message and "make data-wikitext103" in message and "iconv" in message
    assert sorted(path.name for path in cache.iterdir()) == [".lock"]  # train was fine, yet nothing was written

    # a cache that was complete stays as it was when its source turns bad
    write_corpus(tmp_path, "tiny-wiki")
    good = load_or_build(find_source(tmp_path, "tiny-wiki"), cache)
    before = {path.name: path.read_bytes() for path in cache.iterdir()}
    (folder / "wiki.test.tokens").write_bytes(b" ok \n \xff\xfe \n")
    with pytest.raises(CorpusEncodingError, match=r"wiki\.test\.tokens is not UTF-8 text: line 2, byte offset 6"):
        load_or_build(find_source(tmp_path, "tiny-wiki"), cache)
    assert {path.name: path.read_bytes() for path in cache.iterdir()} == before
    assert good.dictionary.sha256 == Dictionary.load(cache / "dict.txt").sha256


def test_a_dictionary_file_that_is_not_utf8_names_the_file(tmp_path):
    (tmp_path / "dict.txt").write_bytes(b"the 3\ncaf\xe9 1\n")
    with pytest.raises(DictionaryFormatError, match=r"dict\.txt is not UTF-8"):
        Dictionary.load(tmp_path / "dict.txt")
