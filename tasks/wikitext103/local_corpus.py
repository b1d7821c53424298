"""A small corpus in the WikiText layout from text every Python installation has: the standard library's docstrings.

    python -m tasks.wikitext103.local_corpus [--out $DATA_DIR/pydoc-text]
    python -m experiments.train experiment=wikitext103/transformer_lm data.dataset=pydoc-text ...

It exercises the whole WikiText-103 pipeline (tokenisation, dictionary, training, fairseq-exact evaluation,
generation) where WikiText-103 cannot be downloaded. Each module of the standard library is an article
(" = module.name = "), each docstring paragraph a line; words and punctuation are separate tokens, and words seen
fewer than `--min-count` times in the training split become `<unk>`, as in WikiText. Modules are assigned to
train / valid / test by their position in name order (every 20th to valid, the one after it to test), so the same
Python version gives the same corpus (CPython 3.11: about 0.4 M tokens).
"""

from __future__ import annotations

import argparse
import ast
import re
import sysconfig
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from results.roots import data_root
from tasks.wikitext103.corpus import split_file

TOKEN = re.compile(r"\w+|[^\w\s]")
EVERY = 20  # one module in EVERY goes to valid, the next to test


def docstring_paragraphs(path: Path) -> list[str]:
    """The paragraphs of every docstring (module, classes, functions) of a source file, each on one line."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    paragraphs = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            text = ast.get_docstring(node) or ""
            paragraphs += [" ".join(block.split()) for block in re.split(r"\n\s*\n", text) if block.strip()]
    return paragraphs


def article(name: str, paragraphs: Sequence[str]) -> list[str]:
    """WikiText-style lines: title, blank, then each tokenised paragraph followed by a blank line."""
    lines = [f" = {name} = ", " "]
    for paragraph in paragraphs:
        lines += [" " + " ".join(TOKEN.findall(paragraph)) + " ", " "]
    return lines


def stdlib_articles(root: Path) -> list[tuple[str, list[str]]]:
    """(module name, article lines) of every non-test module under `root` with docstrings, in name order."""
    articles = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if any(part in ("test", "tests", "site-packages", "idle_test") for part in relative.parts):
            continue
        paragraphs = docstring_paragraphs(path)
        if paragraphs:
            articles.append((".".join(relative.with_suffix("").parts), article(relative.stem, paragraphs)))
    return articles


def replace_rare(lines: list[str], counts: Counter[str], min_count: int) -> list[str]:
    """Words seen fewer than `min_count` times in training become `<unk>`; blank lines stay as they are."""
    def replace(line: str) -> str:
        return " " + " ".join(w if counts[w] >= min_count else "<unk>" for w in line.split()) + " "

    return [replace(line) if line.strip() else line for line in lines]


def build(out: Path, min_count: int = 3, root: Path | None = None) -> dict[str, int]:
    """Write `out/wiki.{train,valid,test}.tokens`; returns the tokens per split (one `</s>` per line included)."""
    root = root or Path(sysconfig.get_paths()["stdlib"])
    splits: dict[str, list[str]] = {"train": [], "valid": [], "test": []}
    for index, (_, lines) in enumerate(stdlib_articles(root)):
        split = "valid" if index % EVERY == 0 else "test" if index % EVERY == 1 else "train"
        splits[split] += lines
    counts = Counter(word for line in splits["train"] for word in line.split())
    out.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for split, lines in splits.items():
        lines = replace_rare(lines, counts, min_count)
        split_file(out.parent, out.name, split).write_text("\n".join(lines) + "\n", encoding="utf-8")
        sizes[split] = sum(len(line.split()) + 1 for line in lines)
    return sizes


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.wikitext103.local_corpus", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=data_root() / "pydoc-text",
                        help="corpus folder (default $DATA_DIR/pydoc-text); train with data.dataset=<its name>")
    parser.add_argument("--min-count", type=int, default=3, help="rarer training words become <unk>")
    args = parser.parse_args(argv)
    sizes = build(args.out, args.min_count)
    print(f"wrote {args.out}/wiki.{{train,valid,test}}.tokens: " + ", ".join(f"{k} {v:,} tokens" for k, v in sizes.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
