"""Seeded, vectorised ListOps generator with the official distribution and text format (results/paper/official_code.md §2.6).

The official script (`lra_benchmarks/data/listops.py`) draws one tree at a time with Python recursion, keeps trees
with ``min_length < length < max_length`` in a `set` until enough unique ones exist, and is unseeded. This module
draws the same trees, vectorised with numpy over a batch of candidate trees and level by level:

* root at depth 1; below ``max_depth`` a node is an operator with probability ``OPERATOR_P`` = 0.25, otherwise a
  uniform digit 0–9; at ``max_depth`` it is always a digit;
* an operator draws ``randint(2, max_args)`` arguments and a uniform operator from MIN, MAX, MED, SM;
* length = digits + 2 · operators (the operator token and its ``]``), i.e. the token count the model sees;
* rejection keeps ``min_length < length < max_length``; duplicates are dropped, first occurrence wins.

Every random draw is independent, so the order in which draws are consumed does not change the distribution of
accepted trees. Trees that already exceed ``max_length`` stop growing early, which only saves work: they would be
rejected anyway. The stream depends only on the seed and the generator settings, never on the requested counts, so a
smaller request yields a prefix of a larger one.

Text form (identical to the official ``to_string``): an operator with arguments a1..ak prints as
``( ( … ( [OP a1 ) a2 ) … ak ) ] )`` — k+1 opening parentheses, then each argument followed by ``)``, then ``] )``.
Files are ``{task}_{train,val,test}.tsv`` with header ``Source<TAB>Target`` and ``\\r\\n`` line ends, as written by the
official script's `csv.writer`.

CLI:
    python -m tasks.lra.listops --seed 0 --num-train 96000 --num-val 2000 --num-test 2000 --out data/lra/listops-1000
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

OPERATORS = ("[MIN", "[MAX", "[MED", "[SM")
END = "]"
OPERATOR_P = 0.25  # the official VALUE_P: probability that a node above max_depth is an operator
SPLITS = ("train", "val", "test")

# Token codes used while serialising. Each code maps to the bytes it prints, including the separator after it.
_OPEN, _CLOSE, _END = 0, 1, 2
_OP0 = 3  # 3..6: the four operators
_DIGIT0 = 7  # 7..16: digits 0..9
_LAST_CLOSE = 17  # the final ")" of a line, followed by the TAB before the label
_LABEL0 = 18  # 18..27: "<label>\r\n"
_PIECES = (
    [b"( ", b") ", b"] "]
    + [op.encode() + b" " for op in OPERATORS]
    + [str(d).encode() + b" " for d in range(10)]
    + [b")\t"]
    + [str(d).encode() + b"\r\n" for d in range(10)]
)
_PIECE_LEN = np.array([len(p) for p in _PIECES], dtype=np.int64)
_PIECE_TABLE = np.zeros((len(_PIECES), int(_PIECE_LEN.max())), dtype=np.uint8)
for _code, _piece in enumerate(_PIECES):
    _PIECE_TABLE[_code, : len(_piece)] = np.frombuffer(_piece, dtype=np.uint8)

HEADER = b"Source\tTarget\r\n"


@dataclass(frozen=True)
class ListOpsSettings:
    """The official generator flags (defaults = the official defaults)."""

    max_depth: int = 10
    max_args: int = 10
    min_length: int = 500
    max_length: int = 2000

    def __post_init__(self) -> None:
        if self.max_depth < 1 or self.max_args < 2 or self.min_length + 1 >= self.max_length:
            raise ValueError(
                f"invalid ListOps settings {self}: need max_depth >= 1, max_args >= 2 and min_length + 1 < max_length"
            )


@dataclass
class TreeBatch:
    """Accepted trees of one candidate batch, serialised.

    tokens: (T,) uint8 token codes of all trees, concatenated (without the label pseudo-token).
    offsets: (n+1,) int64 start of each tree in `tokens`.
    labels: (n,) int64 values 0–9.
    lengths: (n,) int64 official lengths (digits + 2·operators).
    """

    tokens: np.ndarray
    offsets: np.ndarray
    labels: np.ndarray
    lengths: np.ndarray


def _group_starts(counts: np.ndarray) -> np.ndarray:
    """Exclusive cumulative sum: the start index of each contiguous group of the given sizes."""
    starts = np.zeros(len(counts), dtype=np.int64)
    if len(counts) > 1:
        np.cumsum(counts[:-1], out=starts[1:])
    return starts


def _median_truncated(sorted_values: np.ndarray, starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """int(np.median(group)) for groups of non-negative ints already sorted within each group."""
    upper = sorted_values[starts + counts // 2]
    lower = sorted_values[starts + (counts - 1) // 2]
    return (upper + lower) // 2  # equals upper for odd counts; truncation of the mean for even ones


def sample_batch(rng: np.random.Generator, n_candidates: int, settings: ListOpsSettings) -> TreeBatch:
    """Draw `n_candidates` trees from the official tree distribution and keep those within the length bounds.

    Returns the accepted trees in candidate order, serialised to token codes, with their labels and lengths.
    """
    s = settings
    # ---- grow level by level; per level keep, for every node: tree id, operator flag, arity, symbol, parent ----
    levels: list[dict[str, np.ndarray]] = []
    tree = np.arange(n_candidates, dtype=np.int64)
    parent = np.full(n_candidates, -1, dtype=np.int64)
    length = np.zeros(n_candidates, dtype=np.int64)  # running official length per tree
    for depth in range(1, s.max_depth + 1):
        n = len(tree)
        if n == 0:
            break
        if depth < s.max_depth:
            is_op = rng.random(n) < OPERATOR_P
        else:
            is_op = np.zeros(n, dtype=bool)
        n_ops = int(is_op.sum())
        arity = np.zeros(n, dtype=np.int64)
        arity[is_op] = rng.integers(2, s.max_args + 1, size=n_ops)
        symbol = np.empty(n, dtype=np.int64)  # operator index for operators, digit for leaves
        symbol[is_op] = rng.integers(0, len(OPERATORS), size=n_ops)
        symbol[~is_op] = rng.integers(0, 10, size=n - n_ops)
        np.add.at(length, tree, np.where(is_op, 2, 1))
        levels.append({"tree": tree, "is_op": is_op, "arity": arity, "symbol": symbol, "parent": parent})
        # Children of this level, grouped by parent in argument order. Each pending child adds at least 1 to the
        # length, so a tree whose bound is already >= max_length is rejected and need not grow further.
        bound = length.copy()
        np.add.at(bound, tree, arity)
        grow = is_op & (bound[tree] < s.max_length)
        parent = np.repeat(np.flatnonzero(grow), arity[grow])
        tree = tree[parent]

    # A tree is complete when every operator's arguments were drawn. An incomplete tree was pruned because its
    # length bound reached max_length, so it is rejected exactly as the official script would reject it.
    declared = np.zeros(n_candidates, dtype=np.int64)  # arguments declared by operators, per tree
    drawn = np.zeros(n_candidates, dtype=np.int64)  # non-root nodes drawn, per tree
    for i, level in enumerate(levels):
        np.add.at(declared, level["tree"], level["arity"])
        if i > 0:
            np.add.at(drawn, level["tree"], 1)
    accept = (declared == drawn) & (length > s.min_length) & (length < s.max_length)

    # ---- keep accepted trees only, re-indexing parents ----
    kept: list[dict[str, np.ndarray]] = []
    new_index_prev: np.ndarray | None = None
    for level in levels:
        mask = accept[level["tree"]]
        new_index = np.cumsum(mask) - 1
        entry = {key: value[mask] for key, value in level.items()}
        if new_index_prev is not None:
            entry["parent"] = new_index_prev[entry["parent"]]
        kept.append(entry)
        new_index_prev = new_index
    while kept and len(kept[-1]["tree"]) == 0:
        kept.pop()
    tree_ids = np.flatnonzero(accept)
    n_trees = len(tree_ids)
    remap = np.full(n_candidates, -1, dtype=np.int64)
    remap[tree_ids] = np.arange(n_trees)
    for entry in kept:
        entry["tree"] = remap[entry["tree"]]

    # ---- bottom-up: token counts (T) and values ----
    # T(leaf) = 1; T(op with k args) = (k+1) "(" + op + sum(T(child) + 1 for ")") + "]" + ")" = 2k + 4 + sum T(child)
    for depth in range(len(kept) - 1, -1, -1):
        entry = kept[depth]
        count = np.where(entry["is_op"], 2 * entry["arity"] + 4, 1).astype(np.int64)
        value = np.where(entry["is_op"], 0, entry["symbol"]).astype(np.int64)
        if depth + 1 < len(kept):
            child = kept[depth + 1]
            np.add.at(count, child["parent"], child["count"])
            ops = np.flatnonzero(entry["is_op"])
            arities = entry["arity"][ops]
            starts = _group_starts(arities)  # children are contiguous per parent, in parent order
            vals = child["value"]
            order = np.lexsort((vals, child["parent"]))
            sorted_vals = vals[order]
            reductions = np.stack(
                [
                    np.minimum.reduceat(vals, starts),
                    np.maximum.reduceat(vals, starts),
                    _median_truncated(sorted_vals, starts, arities),
                    np.add.reduceat(vals, starts) % 10,
                ]
            )
            value[ops] = reductions[entry["symbol"][ops], np.arange(len(ops))]
        entry["count"], entry["value"] = count, value

    if n_trees == 0:
        empty = np.zeros(0, dtype=np.int64)
        return TreeBatch(np.zeros(0, dtype=np.uint8), np.zeros(1, dtype=np.int64), empty, empty)

    # ---- top-down: start position of each node's text ----
    root = kept[0]
    total = root["count"]
    tree_start = _group_starts(total)
    root["start"] = tree_start
    for depth in range(1, len(kept)):
        entry, up = kept[depth], kept[depth - 1]
        # child j of an operator at s with k args starts at s + (k + 2) + sum_{i<j} (T_i + 1)
        step = entry["count"] + 1
        cum = np.cumsum(step) - step  # exclusive, over the whole level
        ops = np.flatnonzero(up["is_op"])
        first_child = _group_starts(up["arity"][ops])
        group_base = np.zeros(len(up["tree"]), dtype=np.int64)
        group_base[ops] = cum[first_child]
        p = entry["parent"]
        entry["start"] = up["start"][p] + up["arity"][p] + 2 + (cum - group_base[p])

    tokens = np.empty(int(total.sum()), dtype=np.uint8)
    for depth, entry in enumerate(kept):
        leaf = ~entry["is_op"]
        tokens[entry["start"][leaf]] = _DIGIT0 + entry["symbol"][leaf]
        ops = np.flatnonzero(entry["is_op"])
        starts, arities, counts = entry["start"][ops], entry["arity"][ops], entry["count"][ops]
        n_open = arities + 1
        open_pos = np.repeat(starts, n_open) + (np.arange(int(n_open.sum())) - np.repeat(_group_starts(n_open), n_open))
        tokens[open_pos] = _OPEN
        tokens[starts + n_open] = _OP0 + entry["symbol"][ops]
        tokens[starts + counts - 2] = _END
        tokens[starts + counts - 1] = _CLOSE
        if depth + 1 < len(kept):
            child = kept[depth + 1]
            tokens[child["start"] + child["count"]] = _CLOSE  # the ")" after each argument

    lengths = np.zeros(n_trees, dtype=np.int64)
    for entry in kept:
        np.add.at(lengths, entry["tree"], np.where(entry["is_op"], 2, 1))
    offsets = np.concatenate([tree_start, [tokens.size]])
    return TreeBatch(tokens, offsets, root["value"], lengths)


def _serialise(batch: TreeBatch, index: np.ndarray) -> bytes:
    """TSV lines (bytes) for the trees `index` of `batch`: ``<source>\\t<label>\\r\\n`` each."""
    parts = []
    for i in index:
        a, b = batch.offsets[i], batch.offsets[i + 1]
        line = np.empty(b - a + 1, dtype=np.int64)
        line[:-1] = batch.tokens[a:b]
        line[-2] = _LAST_CLOSE  # every tree ends with ")"; the TAB replaces its separator
        line[-1] = _LABEL0 + batch.labels[i]
        parts.append(line)
    if not parts:
        return b""
    codes = np.concatenate(parts)
    width = _PIECE_TABLE.shape[1]
    mask = np.arange(width)[None, :] < _PIECE_LEN[codes][:, None]
    return _PIECE_TABLE[codes][mask].tobytes()


def generate(
    seed: int, total: int, settings: ListOpsSettings = ListOpsSettings(), batch_size: int = 8192
) -> Iterator[bytes]:
    """Yield TSV lines (bytes, one chunk per candidate batch) of `total` unique trees, in a seed-determined order."""
    rng = np.random.default_rng(seed)
    seen: set[bytes] = set()
    produced = 0
    while produced < total:
        batch = sample_batch(rng, batch_size, settings)
        keep = []
        for i in range(len(batch.labels)):
            if produced + len(keep) >= total:
                break
            digest = hashlib.blake2b(
                batch.tokens[batch.offsets[i] : batch.offsets[i + 1]].tobytes(), digest_size=16
            ).digest()
            if digest in seen:
                continue
            seen.add(digest)
            keep.append(i)
        produced += len(keep)
        if keep:
            yield _serialise(batch, np.asarray(keep))


def write_splits(
    out_dir: Path,
    seed: int,
    num_train: int,
    num_val: int,
    num_test: int,
    settings: ListOpsSettings = ListOpsSettings(),
    task: str = "basic",
) -> dict[str, Path]:
    """Write ``{task}_{train,val,test}.tsv`` to `out_dir`: the first `num_train` trees, then val, then test.

    Files are written to temporary names and renamed at the end, so an interrupted run leaves no partial file.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = dict(zip(SPLITS, (num_train, num_val, num_test)))
    paths = {split: out_dir / f"{task}_{split}.tsv" for split in SPLITS}
    tmp = {split: path.with_suffix(".tsv.tmp") for split, path in paths.items()}
    with contextlib.ExitStack() as stack:
        handles = {split: stack.enter_context(open(tmp[split], "wb")) for split in SPLITS}
        for handle in handles.values():
            handle.write(HEADER)
        pending = [split for split in SPLITS for _ in range(counts[split])]  # destination of each line, in order
        position = 0
        for chunk in generate(seed, len(pending), settings):
            for line in chunk.splitlines(keepends=True):
                handles[pending[position]].write(line)
                position += 1
    for split in SPLITS:
        tmp[split].replace(paths[split])
    return paths


# ---------------------------------------------------------------------------------------------------------------
# Reading back: parsing and evaluating the text form (independent of the vectorised path above; used by tests).


def evaluate(source: str) -> int:
    """Value of a ListOps expression in the official text form (parentheses optional, ``]`` or ``X`` closes).

    MIN and MAX as usual, MED = int(np.median(args)) (truncates for even counts), SM = sum(args) % 10.
    """
    stack: list[tuple[str, list[int]]] = []
    result: int | None = None
    for token in source.split():
        if token in ("(", ")"):
            continue
        if token in OPERATORS:
            stack.append((token, []))
        elif token in (END, "X"):
            op, args = stack.pop()
            if op == "[MIN":
                value = min(args)
            elif op == "[MAX":
                value = max(args)
            elif op == "[MED":
                ordered = sorted(args)
                mid = len(ordered) // 2
                value = ordered[mid] if len(ordered) % 2 else int((ordered[mid - 1] + ordered[mid]) / 2)
            else:
                value = sum(args) % 10
            if stack:
                stack[-1][1].append(value)
            else:
                result = value
        elif token.isdigit():
            if stack:
                stack[-1][1].append(int(token))
            else:
                result = int(token)
        else:
            raise ValueError(f"unexpected ListOps token {token!r}")
    if stack or result is None:
        raise ValueError("unbalanced ListOps expression")
    return result


def official_length(source: str) -> int:
    """The official length of an expression: digits + 2·operators = tokens once parentheses are removed."""
    return sum(1 for token in source.split() if token not in ("(", ")"))


def tree_depth(source: str) -> int:
    """Depth of the expression tree, root at 1 (a bare digit has depth 1)."""
    depth = best = 0
    for token in source.split():
        if token in OPERATORS:
            depth += 1
            best = max(best, depth)
        elif token in (END, "X"):
            depth -= 1
        elif token.isdigit():
            best = max(best, depth + 1)
    return best


def _parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tasks.lra.listops", description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-train", type=int, default=96_000)
    parser.add_argument("--num-val", type=int, default=2_000)
    parser.add_argument("--num-test", type=int, default=2_000)
    parser.add_argument("--out", type=Path, required=True, help="output folder, e.g. data/lra/listops-1000")
    parser.add_argument("--task", default="basic", help="file prefix (official: basic)")
    parser.add_argument("--max-depth", type=int, default=10)
    parser.add_argument("--max-args", type=int, default=10)
    parser.add_argument("--min-length", type=int, default=500, help="exclusive lower bound")
    parser.add_argument("--max-length", type=int, default=2000, help="exclusive upper bound")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    settings = ListOpsSettings(args.max_depth, args.max_args, args.min_length, args.max_length)
    start = time.perf_counter()
    paths = write_splits(args.out, args.seed, args.num_train, args.num_val, args.num_test, settings, args.task)
    elapsed = time.perf_counter() - start
    for path in paths.values():
        print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    print(
        f"generated {args.num_train + args.num_val + args.num_test} expressions in {elapsed:.1f} s (seed {args.seed})"
    )


if __name__ == "__main__":
    main()
