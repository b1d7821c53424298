"""The ListOps generator: seeded, correct labels and text form, official bounds, and the official distribution."""

from __future__ import annotations

import math
import random
import time

import numpy as np
import pytest

from tasks.lra import listops
from tasks.lra.listops import ListOpsSettings, evaluate, generate, official_length, tree_depth, write_splits

SMALL = ListOpsSettings(min_length=5, max_length=60)


def _lines(chunks) -> list[tuple[str, int]]:
    out = []
    for chunk in chunks:
        for line in chunk.decode().split("\r\n")[:-1]:
            source, label = line.split("\t")
            out.append((source, int(label)))
    return out


# --------------------------------------------------------------------------------------------------------------
# A straightforward re-implementation of the official sampler (lra_benchmarks/data/listops.py), seeded.


def _official_tree(rng: random.Random, depth: int, max_depth: int, max_args: int):
    r = rng.random() if depth < max_depth else 1.0
    if r > 0.25:
        return rng.choice(range(10)), 1
    n_args = rng.randint(2, max_args)
    args, length = [], 2
    for _ in range(n_args):
        subtree, sub_length = _official_tree(rng, depth + 1, max_depth, max_args)
        args.append(subtree)
        length += sub_length
    tree = (rng.choice(listops.OPERATORS), args[0])
    for arg in args[1:]:
        tree = (tree, arg)
    return (tree, "]"), length


def _official_to_string(tree) -> str:
    if isinstance(tree, str):
        return tree
    if isinstance(tree, int):
        return str(tree)
    return "( " + _official_to_string(tree[0]) + " " + _official_to_string(tree[1]) + " )"


def _official_sample(n: int, settings: ListOpsSettings, seed: int) -> list[str]:
    rng, seen, out = random.Random(seed), set(), []
    while len(out) < n:
        tree, length = _official_tree(rng, 1, settings.max_depth, settings.max_args)
        if settings.min_length < length < settings.max_length and tree not in seen:
            seen.add(tree)
            out.append(_official_to_string(tree))
    return out


def _parse(source: str):
    """Text form -> nested (op, [args]) / int, checking the official parenthesisation along the way."""
    tokens = source.split()
    pos = 0

    def node():
        nonlocal pos
        # an operator with k args starts with k + 1 "(" then the operator
        opens = 0
        while tokens[pos] == "(":
            opens += 1
            pos += 1
        if tokens[pos].isdigit():
            assert opens == 0
            pos += 1
            return int(tokens[pos - 1])
        op = tokens[pos]
        assert op in listops.OPERATORS, op
        pos += 1
        args = []
        while tokens[pos] != "]":
            args.append(node())
            assert tokens[pos] == ")"
            pos += 1
        pos += 1
        assert tokens[pos] == ")"
        pos += 1
        assert opens == len(args) + 1, "an operator with k arguments opens k + 1 parentheses"
        return (op, args)

    tree = node()
    assert pos == len(tokens)
    return tree


def _to_official_tuple(tree):
    if isinstance(tree, int):
        return tree
    op, args = tree
    out = (op, _to_official_tuple(args[0]))
    for arg in args[1:]:
        out = (out, _to_official_tuple(arg))
    return (out, "]")


def _arities(tree) -> list[int]:
    if isinstance(tree, int):
        return []
    return [len(tree[1])] + [a for arg in tree[1] for a in _arities(arg)]


def _chi2_homogeneity(a: np.ndarray, b: np.ndarray) -> tuple[float, int]:
    """Two-sample chi-square statistic over histogram bins (empty bins dropped) and its degrees of freedom."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    keep = (a + b) > 0
    a, b = a[keep], b[keep]
    na, nb = a.sum(), b.sum()
    stat = float((((a * math.sqrt(nb / na) - b * math.sqrt(na / nb)) ** 2) / (a + b)).sum())
    return stat, int(keep.sum()) - 1


def _chi2_critical(df: int, z: float = 3.0902) -> float:
    """Upper quantile of chi-square(df) by the Wilson-Hilferty approximation; z = 3.09 is p = 0.001."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


# --------------------------------------------------------------------------------------------------------------


def test_evaluate_semantics():
    assert evaluate("( ( ( [MAX 4 ) 3 ) ] )") == 4
    assert evaluate("[MIN 4 3 7 ]") == 3
    assert evaluate("[MED 1 2 ]") == 1  # int(np.median([1, 2])) truncates 1.5
    assert evaluate("[MED 3 6 4 5 ]") == 4  # int(4.5)
    assert evaluate("[MED 9 1 5 ]") == 5
    assert evaluate("[SM 9 8 7 ]") == 4  # 24 % 10
    assert evaluate("[MAX 2 [MIN 5 7 X 3 ]") == 5  # X is the tokenised form of ]
    assert all(
        evaluate(f"[MED {' '.join(map(str, v))} ]") == int(np.median(v)) for v in ([0, 9], [2, 7, 1, 8], [5, 5, 6])
    )


def test_same_seed_gives_identical_files_and_other_seeds_differ(tmp_path):
    a = write_splits(tmp_path / "a", 7, 30, 5, 5, SMALL)
    b = write_splits(tmp_path / "b", 7, 30, 5, 5, SMALL)
    c = write_splits(tmp_path / "c", 8, 30, 5, 5, SMALL)
    for split in listops.SPLITS:
        assert a[split].read_bytes() == b[split].read_bytes()
    assert a["train"].read_bytes() != c["train"].read_bytes()
    # the stream does not depend on the requested counts: a smaller request is a prefix of a larger one
    assert _lines(generate(7, 10, SMALL)) == _lines(generate(7, 40, SMALL))[:10]


def test_files_have_the_official_format_labels_bounds_and_unique_rows(tmp_path):
    paths = write_splits(tmp_path, 3, 200, 20, 20, SMALL, task="basic")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["basic_test.tsv", "basic_train.tsv", "basic_val.tsv"]
    rows = []
    for split, n in (("train", 200), ("val", 20), ("test", 20)):
        data = paths[split].read_bytes()
        assert data.startswith(b"Source\tTarget\r\n")  # csv.writer's excel dialect, as the official script writes
        lines = data.decode().split("\r\n")
        assert lines[-1] == "" and len(lines) == n + 2
        rows += [line.split("\t") for line in lines[1:-1]]
    sources = [source for source, _ in rows]
    assert len(set(sources)) == len(sources), "expressions must be unique across all splits"
    for source, label in rows:
        assert int(label) == evaluate(source)
        assert SMALL.min_length < official_length(source) < SMALL.max_length
        assert tree_depth(source) <= SMALL.max_depth
        tree = _parse(source)
        assert all(2 <= k <= SMALL.max_args for k in _arities(tree))
        # the official to_string of the same tree reproduces the text exactly
        assert _official_to_string(_to_official_tuple(tree)) == source


def test_depth_and_arity_limits_are_respected():
    settings = ListOpsSettings(max_depth=3, max_args=4, min_length=4, max_length=40)
    rows = _lines(generate(0, 150, settings))
    assert max(tree_depth(s) for s, _ in rows) == 3  # reached, never exceeded
    assert {k for s, _ in rows for k in _arities(_parse(s))} == {2, 3, 4}


LENGTH_BINS = [501, 600, 700, 800, 950, 1100, 1300, 1550, 2000]


@pytest.fixture(scope="module")
def official_500() -> list[str]:
    """500 expressions from the straightforward official procedure at the official bounds (500, 2000)."""
    return _official_sample(500, ListOpsSettings(), seed=11)


def _length_statistic(ours: list[tuple[str, int]], official: list[str]) -> tuple[float, float]:
    hist_ours, _ = np.histogram([official_length(s) for s, _ in ours], LENGTH_BINS)
    hist_official, _ = np.histogram([official_length(s) for s in official], LENGTH_BINS)
    stat, df = _chi2_homogeneity(hist_ours, hist_official)
    return stat, _chi2_critical(df)


def test_label_and_length_histograms_match_the_official_procedure(official_500):
    """Our vectorised sampler against the straightforward official procedure at the official bounds."""
    ours = _lines(generate(11, len(official_500), ListOpsSettings()))
    label_ours = np.bincount([label for _, label in ours], minlength=10)
    label_official = np.bincount([evaluate(s) for s in official_500], minlength=10)
    stat, df = _chi2_homogeneity(label_ours, label_official)
    assert stat < _chi2_critical(df), (label_ours, label_official)
    # labels 0 and 9 are the most frequent in ListOps (MIN/MAX of many digits)
    assert label_ours[[0, 9]].min() > label_ours[1:9].max()

    stat, critical = _length_statistic(ours, official_500)
    assert stat < critical, stat
    lengths = np.array([official_length(s) for s, _ in ours])
    assert lengths.min() > 500 and lengths.max() < 2000
    assert np.histogram(lengths, LENGTH_BINS)[0][0] > np.histogram(lengths, LENGTH_BINS)[0][-1]  # tail decays


@pytest.mark.parametrize("wrong", [ListOpsSettings(max_args=8), ListOpsSettings(max_depth=9)])
def test_length_check_detects_a_different_tree_distribution(official_500, wrong):
    """The same check has power: a generator with other depth or arity limits fails it."""
    stat, critical = _length_statistic(_lines(generate(11, len(official_500), wrong)), official_500)
    assert stat > critical, stat


def test_cli_writes_the_three_files(tmp_path, capsys):
    listops.main(
        ["--seed", "1", "--num-train", "6", "--num-val", "2", "--num-test", "2", "--out", str(tmp_path),
         "--min-length", "5", "--max-length", "30"]
    )  # fmt: skip
    assert "generated 10 expressions" in capsys.readouterr().out
    assert len((tmp_path / "basic_val.tsv").read_text().splitlines()) == 3


def test_invalid_settings_are_rejected():
    with pytest.raises(ValueError, match="min_length"):
        ListOpsSettings(min_length=100, max_length=100)


@pytest.mark.slow
def test_full_96k_2k_2k_generation_is_fast_enough(tmp_path):
    start = time.perf_counter()
    paths = write_splits(tmp_path, 0, 96_000, 2_000, 2_000)
    elapsed = time.perf_counter() - start
    assert elapsed < 600, f"generation took {elapsed:.0f} s"
    with open(paths["test"], "rb") as handle:
        assert sum(1 for _ in handle) == 2_001
