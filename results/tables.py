"""Group run records into the paper's tables and render them (long CSV, wide Markdown, LaTeX).

Arithmetic, all per (table, row, model, selection); different selection protocols are never pooled:
- ``mean`` over seeds, ``std`` the sample std (ddof=1; None when n = 1), ``delta = mean - paper``.
- An average (the paper's "Avg" row) is computed for a model only when every paper row of that column has
  a result; otherwise it is shown as missing with the number of rows present. Rows outside the paper never
  enter an average. The average's ``std`` is the mean of the per-row stds, which is how the paper's D4RL
  table computes its "±" (results/paper/official_code.md §9).
- A cell is "within" the paper when |mean - paper| <= max(1 point, the paper's std); beyond that it is
  "better" or "worse" according to the table's direction (perplexity: lower is better).
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from statistics import fmean

import pandas as pd

from results.manifest import Manifest, RowSpec
from results.naming import TABLES, attention_column, experiment_row, paper_column, table_of
from results.paper_tables import AverageCheck, PaperTable
from results.records import Problem, Record, check_config, metric_value

MISSING = "—"
CSV_COLUMNS = ("table", "row", "model", "selection", "n", "mean", "std", "paper", "delta")
WITHIN_POINTS = 1.0


@dataclass(frozen=True)
class Observation:
    """One number for one table cell from one run (seed)."""

    table: str
    row: str
    model: str
    selection: str
    seed: int
    value: float
    path: str
    finished_at: str = ""


def summarize(values: pd.Series | Iterable[float]) -> tuple[int, float | None, float | None]:
    """(n, mean, sample std with ddof=1) of ``values``; mean is None for n = 0 and std None for n < 2."""
    values = values if isinstance(values, pd.Series) else pd.Series(list(values), dtype=float)
    n = int(values.count())
    if n == 0:
        return 0, None, None
    return n, float(values.mean()), (float(values.std(ddof=1)) if n > 1 else None)


def cell_statistics(observations: Iterable[Observation]) -> dict[tuple[str, str, str], tuple]:
    """{(selection, row, model): (n, mean, std)} over the observations' seeds."""
    frame = pd.DataFrame([asdict(o) for o in observations], columns=list(Observation.__dataclass_fields__))
    return {key: summarize(group) for key, group in frame.groupby(["selection", "row", "model"])["value"]}


def observations_from_records(
    records: Iterable[Record], manifests: dict[str, Manifest]
) -> tuple[list[Observation], list[Problem]]:
    """Map each record onto its table cells (one per manifest row it fills), reporting what cannot be used.

    A record whose config differs from its manifest cell is reported as ``mismatch`` and skipped. When two
    records give the same (table, row, model, selection, seed), the later ``finished_at`` wins and the other
    is reported as ``duplicate``.
    """
    problems: list[Problem] = []
    chosen: dict[tuple, Observation] = {}
    for rec in records:
        exp = rec.experiment
        table = table_of(exp)
        if table is None:
            problems.append(Problem(rec.path, "unknown", f"experiment {exp!r} belongs to no paper table "
                                    f"(known domains: {', '.join(sorted(TABLES))})"))
            continue
        manifest = manifests.get(table)
        entry = manifest.entry(exp) if manifest else None
        diffs = check_config(rec, entry)
        if diffs:
            where = f" (manifest {manifest.path})" if manifest else ""
            problems.append(Problem(rec.path, "mismatch", f"config is not the recipe of its cell{where}: "
                                    + "; ".join(diffs)))
            continue
        if entry is not None:
            row_specs = entry.rows
        else:
            row = experiment_row(exp)
            if row is None:
                problems.append(Problem(rec.path, "unknown", f"{exp!r} is no cell of the {table} table, so it stays "
                                        f"out of it (a run on stand-in data, say); to make it one, give it a "
                                        f"`row: <paper row label>` in experiments/manifests/{table}.yaml"))
                continue
            row_specs = (RowSpec(row),)
        model = attention_column(table, rec.attention, entry.columns if entry else None)
        for spec in row_specs:
            value = metric_value(rec.data, spec.metric)
            if value is None:
                problems.append(Problem(rec.path, "missing-metric", f"no finite number at `{spec.metric}` "
                                        f"(it fills row {spec.row!r} of table {table})"))
                continue
            obs = Observation(table, spec.row, model, rec.selection, rec.seed, value * spec.scale, rec.path,
                              str(rec.data.get("finished_at", "")))
            key = (table, spec.row, model, rec.selection, rec.seed)
            old = chosen.get(key)
            if old is None:
                chosen[key] = obs
                continue
            keep, drop = (obs, old) if obs.finished_at > old.finished_at else (old, obs)
            chosen[key] = keep
            problems.append(Problem(drop.path, "duplicate", f"same cell {key[1:]} as {keep.path} (newer, kept)"))
    return list(chosen.values()), problems


@dataclass
class Cell:
    """Our statistics for one (selection, row, model) beside the paper's value."""

    row: str
    model: str
    selection: str
    n: int
    mean: float | None
    std: float | None
    paper: float | None
    paper_std: float | None = None
    paper_text: str = ""
    paper_std_text: str = ""
    expected: bool = False

    @property
    def delta(self) -> float | None:
        return None if self.mean is None or self.paper is None else self.mean - self.paper


@dataclass
class Average:
    """Our average of one model column (None unless every averaged row is present) beside the paper's."""

    model: str
    selection: str
    mean: float | None
    std: float | None
    n: int
    rows_done: int
    rows_needed: int
    paper: float | None
    paper_text: str
    paper_std_text: str
    check: AverageCheck | None

    @property
    def complete(self) -> bool:
        return self.rows_done == self.rows_needed and self.rows_needed > 0

    @property
    def delta(self) -> float | None:
        return None if self.mean is None or self.paper is None else self.mean - self.paper


@dataclass
class Status:
    """How our cells compare with the paper's, for one selection protocol."""

    within: int = 0
    better: int = 0
    worse: int = 0
    missing: int = 0
    no_paper: int = 0

    @property
    def compared(self) -> int:
        return self.within + self.better + self.worse

    @property
    def with_paper(self) -> int:
        return self.compared + self.missing


@dataclass
class TableResult:
    """Everything needed to render one table."""

    name: str
    paper: PaperTable
    manifest: Manifest | None
    selections: list[str]
    rows: list[str]
    models: list[str]
    cells: dict[tuple[str, str, str], Cell]
    averages: dict[tuple[str, str], Average] = field(default_factory=dict)

    @property
    def spec(self):
        return self.paper.spec

    def extra_rows(self) -> list[str]:
        """Rows we have that the paper does not (not averaged, no paper value)."""
        return [r for r in self.rows if r not in self.paper.rows]

    def scored_rows(self) -> list[str]:
        """Rows whose values are compared with the paper's (not the descriptive ones, such as model size)."""
        return [r for r in self.rows if r not in self.spec.descriptive_rows]

    def status(self, selection: str) -> Status:
        st = Status()
        for row in self.scored_rows():
            for model in self.models:
                c = self.cells[(selection, row, model)]
                if c.paper is None:
                    st.no_paper += c.mean is not None
                    continue
                if c.mean is None:
                    st.missing += 1
                    continue
                verdict = classify(c.mean, c.paper, c.paper_std, self.spec.lower_is_better)
                setattr(st, verdict, getattr(st, verdict) + 1)
        return st

    def footnotes(self) -> list[tuple[str, str]]:
        """(model, text) for each shown model whose paper average disagrees with its own cells."""
        out = []
        if self.spec.average_row is None:
            return out
        for model in self.models:
            col = paper_column(self.name, model, self.paper.models)
            check = self.paper.average_check(col) if col else None
            if check is None:
                continue
            if not check.agrees:
                out.append((model, f"{col}: the paper prints {check.printed_text} as the average, but its own "
                                   f"per-row values average {check.recomputed:.2f}."))
            if not check.std_agrees:
                out.append((model, f"{col}: the paper prints ± {check.printed_std:g} for the average, but its "
                                   f"per-row stds average {check.recomputed_std:.2f}."))
        return out


def classify(mean: float, paper: float, paper_std: float | None, lower_is_better: bool) -> str:
    """"within" if |mean - paper| <= max(1 point, paper std), else "better" or "worse" by the table's direction."""
    tol = max(WITHIN_POINTS, paper_std or 0.0)
    delta = mean - paper
    if abs(delta) <= tol + 1e-9:
        return "within"
    improved = delta < 0 if lower_is_better else delta > 0
    return "better" if improved else "worse"


def _ordered_union(*seqs: Iterable[str]) -> list[str]:
    out: list[str] = []
    for seq in seqs:
        for x in seq:
            if x not in out:
                out.append(x)
    return out


def build_table(name: str, paper: PaperTable, manifest: Manifest | None,
                observations: Iterable[Observation]) -> TableResult:
    """Group the observations of table ``name`` into cells and averages.

    Rows: the manifest's rows (else the paper's numeric rows), then any other rows found in runs. Models:
    the manifest's model columns, then any other found in runs. Selections: the manifest's, then any other
    found in runs (each rendered as its own table).
    """
    obs = [o for o in observations if o.table == name]
    m_rows = manifest.rows if manifest else paper.numeric_rows
    m_models = manifest.models if manifest else []
    m_sels = [s for s, _, _ in manifest.expected_cells()] if manifest else []
    rows = _ordered_union(m_rows, (o.row for o in obs))
    models = _ordered_union(m_models, (o.model for o in obs))
    selections = _ordered_union(m_sels, sorted({o.selection for o in obs}))
    expected = set(manifest.expected_cells()) if manifest else set()

    statistics = cell_statistics(obs)

    cells: dict[tuple[str, str, str], Cell] = {}
    for sel in selections:
        for row in rows:
            for model in models:
                n, mean, std = statistics.get((sel, row, model), (0, None, None))
                col = paper_column(name, model, paper.models)
                cells[(sel, row, model)] = Cell(
                    row=row, model=model, selection=sel, n=n, mean=mean, std=std,
                    paper=paper.value(row, col), paper_std=paper.std(row, col),
                    paper_text=paper.text(row, col), paper_std_text=paper.std_texts.get((row, col), ""),
                    expected=(sel, row, model) in expected,
                )
    result = TableResult(name, paper, manifest, selections, rows, models, cells)

    avg_label = paper.spec.average_row
    if avg_label is not None:
        needed = paper.rows
        for sel in selections:
            for model in models:
                col = paper_column(name, model, paper.models)
                done = [cells[(sel, r, model)] for r in needed if (sel, r, model) in cells and cells[(sel, r, model)].n]
                complete = len(done) == len(needed)
                stds = [c.std for c in done]
                result.averages[(sel, model)] = Average(
                    model=model, selection=sel,
                    mean=fmean(c.mean for c in done) if complete else None,
                    std=fmean(stds) if complete and all(s is not None for s in stds) else None,
                    n=min(c.n for c in done) if complete else 0,
                    rows_done=len(done), rows_needed=len(needed),
                    paper=paper.value(avg_label, col), paper_text=paper.text(avg_label, col),
                    paper_std_text=paper.std_texts.get((avg_label, col), "") if col else "",
                    check=paper.average_check(col) if col else None,
                )
    return result


# ----------------------------------------------------------------------------------------------- rendering

def _num(x: float | None) -> float | None:
    """A CSV number rounded to 6 decimals (hides float noise such as 0.1000000001); None stays empty."""
    return None if x is None else round(x, 6)


def render_csv(result: TableResult) -> str:
    """Long format: one line per cell that has runs or that the manifest asks for, then complete averages."""
    lines = []
    for sel in result.selections:
        for row in result.rows:
            for model in result.models:
                c = result.cells[(sel, row, model)]
                if c.n or c.expected:
                    lines.append((result.name, row, model, sel, c.n, c.mean, c.std, c.paper, c.delta))
        for model in result.models:
            a = result.averages.get((sel, model))
            if a is not None and a.complete:
                lines.append((result.name, result.spec.average_row, model, sel, a.n, a.mean, a.std, a.paper, a.delta))
    frame = pd.DataFrame(lines, columns=CSV_COLUMNS).astype({"n": int})
    for column in ("mean", "std", "paper", "delta"):
        frame[column] = [_num(x) for x in frame[column]]
    return frame.to_csv(index=False, lineterminator="\n")


def _ours(mean: float | None, std: float | None, n: int) -> str:
    if mean is None:
        return MISSING
    return f"{mean:.2f} ± {std:.2f} ({n})" if std is not None else f"{mean:.2f} ({n})"


def _paper_cell(text: str, std_text: str) -> str:
    if not text:
        return MISSING
    return f"{text} ± {std_text}" if std_text else text


def _row_label(result: TableResult, row: str) -> str:
    label = row.replace("/", " / ") if len(result.spec.key_columns) > 1 else row
    extra = row not in result.paper.rows and row != result.spec.average_row
    return f"{label} *" if extra else label


def _status_line(result: TableResult, sel: str) -> str:
    st = result.status(sel)
    direction = "lower" if result.spec.lower_is_better else "higher"
    line = (f"**Status ({sel}):** {st.within} of {st.with_paper} cells within max(1 point, paper std) of the "
            f"paper; {st.better} better ({direction}) and {st.worse} worse beyond that; {st.missing} missing.")
    if st.no_paper:
        line += f" Our cells without a paper value: {st.no_paper}."
    return line


def display_frame(result: TableResult, sel: str, marks: dict[str, list[int]] | None = None) -> pd.DataFrame:
    """The wide table of one selection protocol as display strings: a row per paper row (then the average row),
    columns (row header, "") and (model, "ours" | "paper"). `marks` adds footnote numbers to paper averages."""
    spec, marks = result.spec, marks or {}
    columns = [(spec.row_header, "")] + [(m, side) for m in result.models for side in ("ours", "paper")]
    lines = []
    for row in result.rows:
        line = [_row_label(result, row)]
        for m in result.models:
            c = result.cells[(sel, row, m)]
            line += [_ours(c.mean, c.std, c.n), _paper_cell(c.paper_text, c.paper_std_text)]
        lines.append(line)
    if spec.average_row is not None:
        line = [_row_label(result, spec.average_row)]
        for m in result.models:
            a = result.averages[(sel, m)]
            ours = (_ours(a.mean, a.std if a.paper_std_text else None, a.n) if a.complete
                    else f"{MISSING} ({a.rows_done}/{a.rows_needed} rows)")
            paper = _paper_cell(a.paper_text, a.paper_std_text)
            if m in marks and a.paper_text:
                paper += " " + "".join(f"[{i}]" for i in marks[m])
            line += [ours, paper]
        lines.append(line)
    return pd.DataFrame(lines, columns=pd.MultiIndex.from_tuples(columns))


def render_markdown(result: TableResult, heading_level: int = 2) -> str:
    """Wide table per selection protocol: our mean ± std (n) beside the paper's value for every model."""
    spec = result.spec
    h = "#" * heading_level
    arrow = "↓ lower is better" if spec.lower_is_better else "↑ higher is better"
    lines = [f"{h} {spec.title}: {spec.metric_label} ({arrow})", ""]
    if not result.models:
        lines += [f"No manifest (experiments/manifests/{result.name}.yaml) and no runs for this table.", ""]
        return "\n".join(lines)
    notes = result.footnotes()
    marks: dict[str, list[int]] = {}
    for i, (model, _) in enumerate(notes, 1):
        marks.setdefault(model, []).append(i)

    if result.manifest is not None and result.manifest.notes:
        lines += [" ".join(result.manifest.notes), ""]
    for sel in result.selections:
        lines += [f"{h}# Selection `{sel}`", "", _status_line(result, sel), ""]
        frame = display_frame(result, sel, marks)
        if spec.average_row is not None:
            frame.iloc[-1, 0] = f"**{frame.iloc[-1, 0]}**"
        frame.columns = [side and f"{model} ({side})" or model for model, side in frame.columns]
        align = ["left"] + ["right"] * (frame.shape[1] - 1)
        lines += [frame.to_markdown(index=False, tablefmt="pipe", colalign=align, disable_numparse=True), ""]

    legend = [f"Ours: mean ± sample std over seeds (number of seeds); {MISSING} = no completed run."]
    if spec.average_row is not None:
        legend.append(f"Averages are computed only for columns with every paper row present; "
                      f"\"{MISSING} (k/N rows)\" marks an incomplete column.")
        if spec.name == "d4rl":
            legend.append("The average's ± is the mean of the per-row stds, as in the paper.")
    for m in result.models:
        col = paper_column(result.name, m, result.paper.models)
        if col and col != m:
            legend.append(f"\"{m} (paper)\" shows the paper's {col} column, which that code produced.")
    if result.extra_rows():
        legend.append("\\* not in the paper; no paper value and not part of any average.")
    if spec.descriptive_rows:
        legend.append(f"Rows {', '.join(spec.descriptive_rows)} describe the models and are not compared.")
    legend.append(f"Paper values: results/paper/{result.name}.csv.")
    lines += [" ".join(legend), ""]
    for i, (_, text) in enumerate(notes, 1):
        lines.append(f"[{i}] {text}  ")
    if notes:
        lines.append("")
    return "\n".join(lines)


# the caption is plain text that Styler passes through as LaTeX; titles and labels hold these specials
_CAPTION_ESCAPES = str.maketrans({"%": r"\%", "_": r"\_", "&": r"\&", "#": r"\#"})


def render_tex(result: TableResult) -> str:
    """A booktabs ``table`` per selection protocol: ours and the paper's value side by side per model."""
    spec = result.spec
    out = [f"% Generated by results/aggregate.py for table {result.name}; do not edit by hand.",
           "% Needs \\usepackage{booktabs}."]
    for sel in result.selections:
        caption = (f"{spec.title}, {spec.metric_label} (selection: {sel}). "
                   "Ours: mean ± sample std over seeds (number of seeds).")
        styler = display_frame(result, sel).style.hide(axis="index").format(escape="latex")
        latex = styler.format_index(escape="latex", axis=1).to_latex(
            caption=caption.translate(_CAPTION_ESCAPES), position="t", position_float="centering", hrules=True,
            column_format="l" + "rr" * len(result.models), multicol_align="c",
        )
        out.append(latex.replace("±", "$\\pm$").replace(MISSING, "--"))
    return "\n".join(out)
