"""Load the paper's numbers from ``results/paper/<table>.csv`` and check the paper's own averages.

Orientation of every CSV: rows are tasks/datasets/metrics (named by the table's key columns), columns are
models; a column ``<model> std`` holds that model's ± (D4RL only).
"""
from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from statistics import fmean

from results.manifest import TableSpec

PAPER_DIR = Path(__file__).resolve().parent / "paper"
STD_SUFFIX = " std"


def _to_float(text: str) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def _decimals(text: str) -> int:
    return len(text.split(".", 1)[1]) if "." in text else 0


@dataclass(frozen=True)
class AverageCheck:
    """The paper's printed average for one model beside the mean of its own per-row values.

    ``tolerance`` allows for rounding: half a printed digit of the average plus half a digit of the cells
    (each cell's rounding error is at most that, so their mean's is too).
    """

    model: str
    printed: float | None
    printed_text: str
    recomputed: float | None
    tolerance: float
    printed_std: float | None = None
    recomputed_std: float | None = None
    std_tolerance: float = 0.0

    @property
    def agrees(self) -> bool:
        if self.printed is None or self.recomputed is None:
            return True
        return abs(self.printed - self.recomputed) <= self.tolerance + 1e-9

    @property
    def std_agrees(self) -> bool:
        if self.printed_std is None or self.recomputed_std is None:
            return True
        return abs(self.printed_std - self.recomputed_std) <= self.std_tolerance + 1e-9


@dataclass
class PaperTable:
    """One paper table: data rows in paper order, model columns, and values keyed by (row, model)."""

    spec: TableSpec
    rows: list[str]
    models: list[str]
    texts: dict[tuple[str, str], str] = field(default_factory=dict)
    std_texts: dict[tuple[str, str], str] = field(default_factory=dict)

    def text(self, row: str, model: str | None) -> str:
        """The paper's cell exactly as printed ('' when absent)."""
        return self.texts.get((row, model), "") if model else ""

    def value(self, row: str, model: str | None) -> float | None:
        """The paper's number for (row, model), or None when it has none (or a non-number such as 'O(n d^2)')."""
        return _to_float(self.text(row, model))

    def std(self, row: str, model: str | None) -> float | None:
        return _to_float(self.std_texts.get((row, model), "")) if model else None

    def average_check(self, model: str) -> AverageCheck | None:
        """Compare the printed average of ``model`` with the mean of its per-row values (None: no average row)."""
        avg = self.spec.average_row
        if avg is None or model not in self.models:
            return None
        cells = [self.text(r, model) for r in self.rows]
        values = [_to_float(c) for c in cells]
        printed_text = self.text(avg, model)
        recomputed = fmean(values) if values and all(v is not None for v in values) else None
        digits = max((_decimals(c) for c in cells), default=0)
        tol = 0.5 * 10 ** -_decimals(printed_text) + 0.5 * 10 ** -digits
        std_cells = [self.std_texts.get((r, model), "") for r in self.rows]
        stds = [_to_float(c) for c in std_cells]
        printed_std_text = self.std_texts.get((avg, model), "")
        rec_std = fmean(stds) if stds and all(s is not None for s in stds) else None
        std_digits = max((_decimals(c) for c in std_cells), default=0)
        std_tol = 0.5 * 10 ** -_decimals(printed_std_text) + 0.5 * 10 ** -std_digits
        return AverageCheck(
            model=model,
            printed=_to_float(printed_text),
            printed_text=printed_text,
            recomputed=recomputed,
            tolerance=tol,
            printed_std=_to_float(printed_std_text),
            recomputed_std=rec_std,
            std_tolerance=std_tol,
        )


def load_paper_table(spec: TableSpec, paper_dir: str | Path = PAPER_DIR) -> PaperTable:
    """Read ``<paper_dir>/<table>.csv`` into a :class:`PaperTable` laid out as the manifest's `spec` says.

    Raises FileNotFoundError / ValueError naming the file and the expected layout.
    """
    name = spec.name
    path = Path(paper_dir) / f"{name}.csv"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: paper table missing. The paper's numbers live only in results/paper/; restore the file "
            f"from git (`git checkout -- results/paper/{name}.csv`) or pass the folder that holds it with --paper."
        )
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        header = list(reader.fieldnames or [])
        missing = [k for k in spec.key_columns if k not in header]
        if missing:
            raise ValueError(f"{path}: expected key column(s) {missing} in header {header}")
        models = [c for c in header if c not in spec.key_columns and not c.endswith(STD_SUFFIX)]
        table = PaperTable(spec=spec, rows=[], models=models)
        for record in reader:
            label = "/".join(record[k].strip() for k in spec.key_columns)
            if label != spec.average_row:
                table.rows.append(label)
            for col in header:
                if col in spec.key_columns:
                    continue
                text = (record.get(col) or "").strip()
                if col.endswith(STD_SUFFIX):
                    table.std_texts[(label, col[: -len(STD_SUFFIX)])] = text
                else:
                    table.texts[(label, col)] = text
    return table
