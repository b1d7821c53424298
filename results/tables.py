"""Group the observations of a paper table into cells and render them (long CSV, wide Markdown, LaTeX).

A table has sections. The **paper-protocol** section fills every row under the selection protocol of the paper's
own code for that row (the manifest's `selection`, with its reason); a section per **other protocol** holds the
rows that also have runs under it. Protocols are never pooled. Within a section, a **variant** of a row (a run
that departs from the recipe, `results.cells`) gets its own line beside the row, with the paper's value for
reference; variants never enter a status count or an average.

Arithmetic, per (section, row, variant, model):
- ``mean`` over seeds, ``std`` the sample std (ddof=1; None when n = 1), ``delta = mean - paper``.
- An average (the paper's "Avg" row) is computed for a model only when every paper row of that column has a
  result in the section; otherwise it is shown as missing with the number of rows present. The average's ``std`` is
  the mean of the per-row stds, which is how the paper's D4RL table computes its "±" (results/paper/official_code.md
  §9).
- A cell is "within" the paper when |mean - paper| <= max(1 point, the paper's std); beyond that it is "better"
  or "worse" according to the table's direction (perplexity: lower is better).
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from statistics import fmean

import pandas as pd

from results.cells import RECIPE, Observation
from results.manifest import Manifest
from results.paper_tables import AverageCheck, PaperTable
from results.run_record import SELECTIONS

MISSING = "—"
CSV_COLUMNS = ("table", "row", "variant", "model", "selection", "protocol", "n", "mean", "std", "paper", "delta")
WITHIN_POINTS = 1.0
PAPER_SECTION = "paper"


def summarize(values: pd.Series | Iterable[float]) -> tuple[int, float | None, float | None]:
    """(n, mean, sample std with ddof=1) of ``values``; mean is None for n = 0 and std None for n < 2."""
    values = values if isinstance(values, pd.Series) else pd.Series(list(values), dtype=float)
    n = int(values.count())
    if n == 0:
        return 0, None, None
    return n, float(values.mean()), (float(values.std(ddof=1)) if n > 1 else None)


def cell_statistics(observations: Iterable[Observation]) -> dict[tuple[str, str, str, str], tuple]:
    """{(selection, row, variant, model): (n, mean, std)} over the observations' seeds."""
    frame = pd.DataFrame([asdict(o) for o in observations], columns=list(Observation.__dataclass_fields__))
    keys = ["selection", "row", "variant", "model"]
    return {key: summarize(group) for key, group in frame.groupby(keys)["value"]}


@dataclass(frozen=True)
class Line:
    """One line of a section: a paper row, or a variant of it (`variant` non-empty)."""

    row: str
    variant: str = RECIPE


@dataclass
class Cell:
    """Our statistics for one (section, line, model) beside the paper's value."""

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
    variant: str = RECIPE

    @property
    def delta(self) -> float | None:
        return None if self.mean is None or self.paper is None else self.mean - self.paper


@dataclass
class Average:
    """Our average of one model column (None unless every averaged row is present) beside the paper's."""

    model: str
    section: str
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
    """How our cells compare with the paper's, for one section (variants are not counted)."""

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
class Section:
    """The paper-protocol section (key "paper") or another protocol's (key: that selection)."""

    key: str
    lines: list[Line]
    selection_of: dict[str, str]  # row -> the selection its cells come from

    @property
    def is_paper(self) -> bool:
        return self.key == PAPER_SECTION

    @property
    def rows(self) -> list[str]:
        return [line.row for line in self.lines if line.variant == RECIPE]

    @property
    def title(self) -> str:
        return "Paper protocol" if self.is_paper else f"Selection `{self.key}` (not the paper's protocol)"

    @property
    def slug(self) -> str:
        return "paper_protocol" if self.is_paper else self.key


@dataclass
class TableResult:
    """Everything needed to render one table."""

    name: str
    paper: PaperTable
    manifest: Manifest
    sections: list[Section]
    models: list[str]
    cells: dict[tuple[str, Line, str], Cell]
    averages: dict[tuple[str, str], Average] = field(default_factory=dict)

    @property
    def spec(self):
        return self.paper.spec

    def scored_rows(self, section: Section) -> list[str]:
        """Rows whose values are compared with the paper's (not the descriptive ones, such as model size)."""
        return [r for r in section.rows if r not in self.spec.descriptive_rows]

    def status(self, section: Section) -> Status:
        st = Status()
        for row in self.scored_rows(section):
            for model in self.models:
                c = self.cells[(section.key, Line(row), model)]
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
            col = self.manifest.paper_column(model, self.paper.models)
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


def _lines(rows: list[str], selection_of: dict[str, str], observations: list[Observation]) -> list[Line]:
    """Each row, followed by its variants that have runs under the row's selection in this section."""
    lines = []
    for row in rows:
        lines.append(Line(row))
        variants = sorted({o.variant for o in observations
                           if o.row == row and o.variant != RECIPE and o.selection == selection_of[row]})
        lines += [Line(row, v) for v in variants]
    return lines


def _sections(rows: list[str], paper_selection: dict[str, str], observations: list[Observation]) -> list[Section]:
    """The paper-protocol section, then one per other protocol with runs (holding the rows it is not the paper's
    protocol of)."""
    sections = [Section(PAPER_SECTION, _lines(rows, paper_selection, observations), dict(paper_selection))]
    found = {o.selection for o in observations}
    for sel in [s for s in SELECTIONS if s in found] + sorted(found - set(SELECTIONS)):
        other_rows = [r for r in rows if paper_selection[r] != sel]
        if not any(o.selection == sel and o.row in other_rows for o in observations):
            continue
        selection_of = {r: sel for r in other_rows}
        sections.append(Section(sel, _lines(other_rows, selection_of, observations), selection_of))
    return sections


def build_table(manifest: Manifest, paper: PaperTable, observations: Iterable[Observation]) -> TableResult:
    """Group the observations of the manifest's table into sections, cells and averages.

    Rows: the manifest's rows. Models: the manifest's model columns, then any other found in runs.
    """
    name = manifest.table
    obs = [o for o in observations if o.table == name]
    rows = manifest.rows
    paper_selection = {r: manifest.paper_selection(r) or "best_test" for r in rows}
    models = _ordered_union(manifest.models, (o.model for o in obs))
    expected = {(row, model) for _, row, model in manifest.expected_cells()}
    statistics = cell_statistics(obs)
    sections = _sections(rows, paper_selection, obs)

    cells: dict[tuple[str, Line, str], Cell] = {}
    for section in sections:
        for line in section.lines:
            sel = section.selection_of[line.row]
            for model in models:
                n, mean, std = statistics.get((sel, line.row, line.variant, model), (0, None, None))
                col = manifest.paper_column(model, paper.models)
                cells[(section.key, line, model)] = Cell(
                    row=line.row, model=model, selection=sel, n=n, mean=mean, std=std,
                    paper=paper.value(line.row, col), paper_std=paper.std(line.row, col),
                    paper_text=paper.text(line.row, col), paper_std_text=paper.std_texts.get((line.row, col), ""),
                    expected=section.is_paper and line.variant == RECIPE and (line.row, model) in expected,
                    variant=line.variant,
                )
    result = TableResult(name, paper, manifest, sections, models, cells)

    avg_label = paper.spec.average_row
    if avg_label is not None:
        needed = paper.rows
        for section in sections:
            if not set(needed) <= set(section.rows):
                continue  # another protocol that is not every row's alternative: no average to compare
            for model in models:
                col = manifest.paper_column(model, paper.models)
                done = [cells[(section.key, Line(r), model)] for r in needed
                        if (section.key, Line(r), model) in cells and cells[(section.key, Line(r), model)].n]
                complete = len(done) == len(needed)
                stds = [c.std for c in done]
                result.averages[(section.key, model)] = Average(
                    model=model, section=section.key,
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
    """Long format: one line per cell that has runs or that the manifest asks for, then complete averages.
    `protocol` says whether the line's selection is the paper's protocol for its row or another one."""
    lines = []
    for section in result.sections:
        protocol = "paper" if section.is_paper else "other"
        for line in section.lines:
            for model in result.models:
                c = result.cells[(section.key, line, model)]
                if c.n or c.expected:
                    lines.append((result.name, line.row, line.variant, model, c.selection, protocol, c.n, c.mean,
                                  c.std, c.paper, c.delta))
        for model in result.models:
            a = result.averages.get((section.key, model))
            if a is not None and a.complete:
                selection = "/".join(sorted(set(section.selection_of.values())))
                lines.append((result.name, result.spec.average_row, RECIPE, model, selection, protocol, a.n, a.mean,
                              a.std, a.paper, a.delta))
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


def _line_label(result: TableResult, line: Line) -> str:
    label = line.row.replace("/", " / ") if len(result.spec.key_columns) > 1 else line.row
    if line.variant:
        return f"{label} † {line.variant}"
    return f"{label} *" if line.row not in result.paper.rows else label


def _status_line(result: TableResult, section: Section) -> str:
    st = result.status(section)
    direction = "lower" if result.spec.lower_is_better else "higher"
    line = (f"**Status ({section.slug.replace('_', ' ')}):** {st.within} of {st.with_paper} cells within "
            f"max(1 point, paper std) of the paper; {st.better} better ({direction}) and {st.worse} worse beyond "
            f"that; {st.missing} missing.")
    if st.no_paper:
        line += f" Our cells without a paper value: {st.no_paper}."
    return line


def protocol_line(result: TableResult, section: Section) -> str:
    """Which protocol each row of the section used (and, in the paper's section, why it is the paper's)."""
    groups: dict[tuple[str, str], list[str]] = {}
    for row in section.rows:
        reason = _reason(result.manifest, row) if section.is_paper else ""
        groups.setdefault((section.selection_of[row], reason), []).append(row)
    parts = []
    for (sel, reason), rows in groups.items():
        where = "every row" if len(groups) == 1 else ", ".join(rows)
        parts.append(f"`{sel}` for {where}" + (f" ({reason})" if reason else ""))
    return "**Protocol:** " + "; ".join(parts) + "."


def _reason(manifest: Manifest, row: str) -> str:
    entry = next((e for e in manifest.entries if any(r.row == row for r in e.rows)), None)
    return entry.protocol_reason.rstrip(".") if entry else ""


def display_frame(result: TableResult, section: Section, marks: dict[str, list[int]] | None = None) -> pd.DataFrame:
    """The wide table of one section as display strings: a line per row and variant (then the average row),
    columns (row header, "") and (model, "ours" | "paper"). `marks` adds footnote numbers to paper averages."""
    spec, marks = result.spec, marks or {}
    columns = [(spec.row_header, "")] + [(m, side) for m in result.models for side in ("ours", "paper")]
    lines = []
    for line in section.lines:
        cells = [_line_label(result, line)]
        for m in result.models:
            c = result.cells[(section.key, line, m)]
            cells += [_ours(c.mean, c.std, c.n), _paper_cell(c.paper_text, c.paper_std_text)]
        lines.append(cells)
    if _has_average(result, section):
        cells = [spec.average_row]
        for m in result.models:
            a = result.averages[(section.key, m)]
            ours = (_ours(a.mean, a.std if a.paper_std_text else None, a.n) if a.complete
                    else f"{MISSING} ({a.rows_done}/{a.rows_needed} rows)")
            paper = _paper_cell(a.paper_text, a.paper_std_text)
            if m in marks and a.paper_text:
                paper += " " + "".join(f"[{i}]" for i in marks[m])
            cells += [ours, paper]
        lines.append(cells)
    return pd.DataFrame(lines, columns=pd.MultiIndex.from_tuples(columns))


def _has_average(result: TableResult, section: Section) -> bool:
    return any((section.key, m) in result.averages for m in result.models)


def render_markdown(result: TableResult, heading_level: int = 2) -> str:
    """A wide table per section: our mean ± std (n) beside the paper's value for every model."""
    spec = result.spec
    h = "#" * heading_level
    arrow = "↓ lower is better" if spec.lower_is_better else "↑ higher is better"
    lines = [f"{h} {spec.title}: {spec.metric_label} ({arrow})", ""]
    notes = result.footnotes()
    marks: dict[str, list[int]] = {}
    for i, (model, _) in enumerate(notes, 1):
        marks.setdefault(model, []).append(i)

    if result.manifest.notes:
        lines += [" ".join(result.manifest.notes), ""]
    for section in result.sections:
        lines += [f"{h}# {section.title}", "", protocol_line(result, section), "", _status_line(result, section), ""]
        frame = display_frame(result, section, marks)
        if _has_average(result, section):
            frame.iloc[-1, 0] = f"**{frame.iloc[-1, 0]}**"
        frame.columns = [side and f"{model} ({side})" or model for model, side in frame.columns]
        align = ["left"] + ["right"] * (frame.shape[1] - 1)
        lines += [frame.to_markdown(index=False, tablefmt="pipe", colalign=align, disable_numparse=True), ""]

    legend = [f"Ours: mean ± sample std over seeds (number of seeds); {MISSING} = no completed run."]
    if spec.average_row is not None:
        legend.append(f"Averages are computed only for columns with every paper row present; "
                      f"\"{MISSING} (k/N rows)\" marks an incomplete column.")
        if any(row == spec.average_row and text for (row, _), text in result.paper.std_texts.items()):
            legend.append("The average's ± is the mean of the per-row stds, as in the paper.")
    for m in result.models:
        col = result.manifest.paper_column(m, result.paper.models)
        if col and col != m:
            legend.append(f"\"{m} (paper)\" shows the paper's {col} column, which that code produced.")
    if any(line.variant for section in result.sections for line in section.lines):
        legend.append("† a variant of the row's recipe (named, or by the keys it changed; results/README.md lists "
                      "them): shown beside the paper's value, never counted in the status or an average.")
    if any(r not in result.paper.rows for section in result.sections for r in section.rows):
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
_CAPTION_ESCAPES = str.maketrans({"%": r"\%", "_": r"\_", "&": r"\&", "#": r"\#", "`": ""})


def render_tex(result: TableResult) -> str:
    """A booktabs ``table`` per section: ours and the paper's value side by side per model."""
    spec = result.spec
    out = [f"% Generated by results/aggregate.py for table {result.name}; do not edit by hand.",
           "% Needs \\usepackage{booktabs}."]
    for section in result.sections:
        protocols = ", ".join(sorted(set(section.selection_of.values())))
        caption = (f"{spec.title}, {spec.metric_label} ({section.title}: {protocols}). "
                   "Ours: mean ± sample std over seeds (number of seeds).")
        styler = display_frame(result, section).style.hide(axis="index").format(escape="latex")
        latex = styler.format_index(escape="latex", axis=1).to_latex(
            caption=caption.translate(_CAPTION_ESCAPES), position="t", position_float="centering", hrules=True,
            column_format="l" + "rr" * len(result.models), multicol_align="c",
        )
        out.append(latex.replace("±", "$\\pm$").replace(MISSING, "--").replace("†", "$\\dagger$"))
    return "\n".join(out)
