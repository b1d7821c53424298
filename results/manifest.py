"""Table manifests (``experiments/manifests/<table>.yaml``): one paper table, declared as data.

A manifest says how its table looks (title, metric, direction, row keys, average row) and lists experiments; each
experiment is run for every attention x seed, under one selection protocol, and fills one or more rows of the
table with one metric. With the paper's numbers in ``results/paper/<table>.csv`` that is all a new table needs:
``make reproduce-<table>`` and ``make tables`` find every manifest. Schema (top level; every per-experiment key may
be overridden inside an ``experiments`` entry)::

    table: uea                      # the table's name: results/paper/<table>.csv, results/tables/<table>.*
    title: UEA multivariate time-series classification
    metric_label: accuracy (%)
    lower_is_better: false          # true for perplexity
    key_columns: [dataset]          # the paper CSV's columns that name a row (joined by "/")
    row_header: Dataset             # the first column's header in the rendered table
    average_row: Average Accuracy   # the paper's average row (null: none)
    descriptive_rows: []            # rows that describe the models (size), shown but never compared
    order: 2                        # the table's place in results/README.md
    columns: {softmax: DT}          # attention -> our model column in this table (default: results.naming)
    paper_columns: {}               # our model column -> the paper column it is compared with, when named otherwise
    description: free text
    selection: best_test            # the paper's protocol (results.run_record.SELECTIONS): passed as `selection=`;
                                    # the experiment's config defaults to the same value (a test holds them equal)
    protocol_reason: free text      # why that is the paper's protocol (what the official code did)
    seeds: [0, 1, 2]
    attentions: [flow, softmax]     # registered names (conf/model/attention/<name>.yaml)
    metric: primary_value           # or metrics.<key>, e.g. metrics.test/acc
    scale: 1.0                      # multiply the metric (e.g. 100 when a metric is a fraction)
    overrides: []                   # pinned Hydra `key=value` overrides, passed to every run and checked
    notes: []                       # protocol notes printed with the table (no numbers: they would go stale)
    variants:                       # named departures from the recipe, tabulated beside the paper's rows
      dt_kzl:
        overrides: [preset=d4rl/dt_kzl]   # what the variant adds to each cell's overrides
        attentions: [softmax]             # its model columns (default: all)
        note: the Decision Transformer authors' own recipe
    experiments:
      - experiment: uea/JapaneseVowels
        row: JapaneseVowels         # default: the experiment's name after its domain
        rows:                       # instead of row/metric: one experiment filling several rows
          - {row: top1_acc, metric: primary_value}
        columns: {flow: DeiT+Flowformer}   # attention -> paper column, for this experiment only

Both ``experiments/reproduce.py`` (what to run) and ``results/aggregate.py`` (which metric fills which
cell) read manifests through this module, so the two never disagree.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from results.naming import ATTENTION_COLUMNS
from results.run_record import SELECTIONS

MANIFEST_DIR = Path(__file__).resolve().parents[1] / "experiments" / "manifests"

_SPEC_KEYS = {"title", "metric_label", "lower_is_better", "key_columns", "row_header", "average_row",
              "descriptive_rows"}
_TOP_KEYS = {"table", "description", "selection", "protocol_reason", "seeds", "attentions", "metric", "scale",
             "overrides", "notes", "variants", "experiments", "order", "columns", "paper_columns", *_SPEC_KEYS}
_ENTRY_KEYS = {"experiment", "row", "rows", "selection", "protocol_reason", "seeds", "attentions", "metric", "scale",
               "overrides", "columns", "note"}
_VARIANT_KEYS = {"overrides", "attentions", "note"}


class ManifestError(ValueError):
    """A manifest file does not follow the schema in results/manifest.py; the message names file and key."""


@dataclass(frozen=True)
class TableSpec:
    """How one paper table looks.

    ``key_columns`` are the paper CSV's columns that name a row; a row's label is their values joined by ``/``
    (D4RL: ``medium-expert/HalfCheetah``). ``average_row`` is the label of the paper's printed average row (or None
    when the table has none). ``lower_is_better`` flips the meaning of "better" (perplexity). ``descriptive_rows``
    describe the models rather than score them (ImageNet's parameters and MACs): shown beside the paper's value,
    never counted as within, better or worse.
    """

    name: str
    title: str
    metric_label: str
    key_columns: tuple[str, ...] = ("row",)
    average_row: str | None = None
    lower_is_better: bool = False
    row_header: str = "Row"
    descriptive_rows: tuple[str, ...] = ()


@dataclass(frozen=True)
class RowSpec:
    """One table row filled by an experiment: the row label and the metric that fills it."""

    row: str
    metric: str = "primary_value"
    scale: float = 1.0


@dataclass(frozen=True)
class ExperimentEntry:
    """One experiment of a manifest with its resolved (top-level defaults applied) settings."""

    experiment: str
    rows: tuple[RowSpec, ...]
    attentions: tuple[str, ...]
    seeds: tuple[int, ...]
    selection: str
    overrides: tuple[str, ...]
    columns: dict[str, str] = field(default_factory=dict)
    protocol_reason: str = ""


@dataclass(frozen=True)
class VariantSpec:
    """A named departure from the recipe: the overrides it adds to every cell, the attentions it runs (None: the
    cell's own) and what it is."""

    name: str
    overrides: tuple[str, ...]
    attentions: tuple[str, ...] | None = None
    note: str = ""


@dataclass
class Manifest:
    """A parsed manifest; ``entries`` keep file order (which is the row order of the rendered table)."""

    table: str
    path: Path
    spec: TableSpec
    selection: str
    entries: list[ExperimentEntry]
    description: str = ""
    notes: tuple[str, ...] = ()
    variants: dict[str, VariantSpec] = field(default_factory=dict)
    columns: dict[str, str] = field(default_factory=dict)
    paper_columns: dict[str, str] = field(default_factory=dict)
    order: int = 100

    def column(self, attention: str, entry: ExperimentEntry | None = None) -> str:
        """Our model column for `attention`: the entry's `columns`, then the table's, then the paper's usual name
        (`results.naming.ATTENTION_COLUMNS`), else the registered name itself (visible rather than dropped)."""
        for mapping in (entry.columns if entry else {}, self.columns, ATTENTION_COLUMNS):
            if attention in mapping:
                return mapping[attention]
        return attention

    def paper_column(self, model: str, paper_models: list[str] | tuple[str, ...]) -> str | None:
        """The paper column whose numbers our column `model` is compared with, or None when the paper has none."""
        if model in paper_models:
            return model
        reference = self.paper_columns.get(model)
        return reference if reference in paper_models else None

    def entry(self, experiment: str) -> ExperimentEntry | None:
        for e in self.entries:
            if e.experiment == experiment:
                return e
        return None

    def paper_selection(self, row: str) -> str | None:
        """The protocol of the paper's code for `row` (the selection of the experiment that fills it)."""
        for e in self.entries:
            if any(r.row == row for r in e.rows):
                return e.selection
        return None

    @property
    def rows(self) -> list[str]:
        """Row labels in manifest order (deduplicated)."""
        out: list[str] = []
        for e in self.entries:
            for r in e.rows:
                if r.row not in out:
                    out.append(r.row)
        return out

    @property
    def models(self) -> list[str]:
        """Model column labels in manifest order (deduplicated)."""
        out: list[str] = []
        for e in self.entries:
            for a in e.attentions:
                m = self.column(a, e)
                if m not in out:
                    out.append(m)
        return out

    def expected_cells(self) -> list[tuple[str, str, str]]:
        """(selection, row, model) for every cell the manifest asks for."""
        out = []
        for e in self.entries:
            for r in e.rows:
                for a in e.attentions:
                    cell = (e.selection, r.row, self.column(a, e))
                    if cell not in out:
                        out.append(cell)
        return out


def _fail(path: Path, msg: str) -> ManifestError:
    return ManifestError(f"{path}: {msg} (schema: see the docstring of results/manifest.py)")


def _str_list(path: Path, key: str, value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _fail(path, f"`{key}` must be a list of strings, got {value!r}")
    return tuple(value)


def _seeds(path: Path, key: str, value: Any) -> tuple[int, ...]:
    ints = isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    if not ints or not value:
        raise _fail(path, f"`{key}` must be a non-empty list of integers, got {value!r}")
    return tuple(value)


def parse_manifest(data: dict[str, Any], path: Path) -> Manifest:
    """Validate and resolve a manifest dict (as loaded from YAML)."""
    if not isinstance(data, dict):
        raise _fail(path, "expected a mapping at the top level")
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise _fail(path, f"unknown key(s) {sorted(unknown)}; allowed: {sorted(_TOP_KEYS)}")
    table = data.get("table")
    if not isinstance(table, str) or not table.replace("_", "").isalnum():
        raise _fail(path, f"`table` must be a name of letters, digits and _ (its files' name), got {table!r}")
    spec = _table_spec(path, table, data)
    selection = data.get("selection", "best_test")
    if selection not in SELECTIONS:
        raise _fail(path, f"`selection` must be one of {SELECTIONS}, got {selection!r}")
    reason = str(data.get("protocol_reason", ""))
    seeds = _seeds(path, "seeds", data.get("seeds", [0, 1, 2]))
    attentions = _str_list(path, "attentions", data.get("attentions"))
    metric = data.get("metric", "primary_value")
    scale = float(data.get("scale", 1.0))
    overrides = _str_list(path, "overrides", data.get("overrides"))
    raw_entries = data.get("experiments")
    if not isinstance(raw_entries, list) or not raw_entries:
        raise _fail(path, "`experiments` must be a non-empty list")

    entries: list[ExperimentEntry] = []
    for i, raw in enumerate(raw_entries):
        where = f"experiments[{i}]"
        if isinstance(raw, str):
            raw = {"experiment": raw}
        if not isinstance(raw, dict) or not isinstance(raw.get("experiment"), str):
            raise _fail(path, f"{where} needs `experiment: <domain>/<Name>`")
        unknown = set(raw) - _ENTRY_KEYS
        if unknown:
            raise _fail(path, f"{where} has unknown key(s) {sorted(unknown)}; allowed: {sorted(_ENTRY_KEYS)}")
        exp = raw["experiment"]
        e_metric = raw.get("metric", metric)
        e_scale = float(raw.get("scale", scale))
        if "rows" in raw:
            if "row" in raw:
                raise _fail(path, f"{where} ({exp}) gives both `row` and `rows`; use one")
            rows_raw = raw["rows"]
            if not isinstance(rows_raw, list) or not rows_raw:
                raise _fail(path, f"{where} ({exp}): `rows` must be a non-empty list of {{row, metric}}")
            rows = []
            for r in rows_raw:
                if not isinstance(r, dict) or not isinstance(r.get("row"), str):
                    raise _fail(path, f"{where} ({exp}): each `rows` item needs `row: <label>`")
                rows.append(RowSpec(r["row"], r.get("metric", e_metric), float(r.get("scale", e_scale))))
        else:
            row = raw.get("row") or exp.partition("/")[2]
            if not row:
                raise _fail(path, f"{where}: no row for {exp!r}; add `row: <paper row label>`")
            rows = [RowSpec(row, e_metric, e_scale)]
        e_sel = raw.get("selection", selection)
        if e_sel not in SELECTIONS:
            raise _fail(path, f"{where} ({exp}): `selection` must be one of {SELECTIONS}, got {e_sel!r}")
        e_att = _str_list(path, f"{where}.attentions", raw["attentions"]) if "attentions" in raw else attentions
        if not e_att:
            raise _fail(path, f"{where} ({exp}): no attentions (set top-level `attentions` or the entry's)")
        columns = raw.get("columns") or {}
        if not isinstance(columns, dict):
            raise _fail(path, f"{where} ({exp}): `columns` must map attention -> paper column")
        entries.append(
            ExperimentEntry(
                experiment=exp,
                rows=tuple(rows),
                attentions=e_att,
                seeds=_seeds(path, f"{where}.seeds", raw["seeds"]) if "seeds" in raw else seeds,
                selection=e_sel,
                overrides=overrides + _str_list(path, f"{where}.overrides", raw.get("overrides")),
                columns={str(k): str(v) for k, v in columns.items()},
                protocol_reason=str(raw.get("protocol_reason", reason if e_sel == selection else "")),
            )
        )
    seen = [e.experiment for e in entries]
    dups = sorted({x for x in seen if seen.count(x) > 1})
    if dups:
        raise _fail(path, f"experiment(s) listed twice: {dups}")
    return Manifest(
        table=table,
        path=path,
        spec=spec,
        selection=selection,
        entries=entries,
        description=str(data.get("description", "")),
        notes=_str_list(path, "notes", data.get("notes")),
        variants=_variants(path, data.get("variants")),
        columns=_str_map(path, "columns", data.get("columns")),
        paper_columns=_str_map(path, "paper_columns", data.get("paper_columns")),
        order=int(data.get("order", 100)),
    )


def _table_spec(path: Path, table: str, data: dict[str, Any]) -> TableSpec:
    for key in ("title", "metric_label"):
        if not isinstance(data.get(key), str):
            raise _fail(path, f"`{key}` must name the table's {key.replace('_', ' ')} (text)")
    average = data.get("average_row")
    return TableSpec(
        name=table,
        title=data["title"],
        metric_label=data["metric_label"],
        key_columns=_str_list(path, "key_columns", data.get("key_columns")) or ("row",),
        average_row=str(average) if average is not None else None,
        lower_is_better=bool(data.get("lower_is_better", False)),
        row_header=str(data.get("row_header", "Row")),
        descriptive_rows=_str_list(path, "descriptive_rows", data.get("descriptive_rows")),
    )


def _str_map(path: Path, key: str, value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _fail(path, f"`{key}` must map names to names, got {value!r}")
    return {str(k): str(v) for k, v in value.items()}


def _variants(path: Path, raw: Any) -> dict[str, VariantSpec]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise _fail(path, "`variants` must map a variant name to {overrides, attentions, note}")
    out = {}
    for name, spec in raw.items():
        where = f"variants.{name}"
        if not isinstance(spec, dict) or not isinstance(spec.get("overrides"), list):
            raise _fail(path, f"{where} needs `overrides: [<hydra override>, ...]`")
        unknown = set(spec) - _VARIANT_KEYS
        if unknown:
            raise _fail(path, f"{where} has unknown key(s) {sorted(unknown)}; allowed: {sorted(_VARIANT_KEYS)}")
        attentions = _str_list(path, f"{where}.attentions", spec["attentions"]) if "attentions" in spec else None
        out[str(name)] = VariantSpec(str(name), _str_list(path, f"{where}.overrides", spec["overrides"]), attentions,
                                     str(spec.get("note", "")))
    return out


def load_manifest(path: str | Path) -> Manifest:
    """Load one manifest file."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise _fail(path, f"not valid YAML: {exc}") from exc
    return parse_manifest(data, path)


def load_manifests(directory: str | Path = MANIFEST_DIR) -> dict[str, Manifest]:
    """Load every ``*.yaml`` in ``directory``, keyed by table, in their `order`. A missing directory gives {}.

    An experiment may fill cells of one table only (a record must know its table)."""
    out: dict[str, Manifest] = {}
    directory = Path(directory)
    if not directory.is_dir():
        return out
    owners: dict[str, Path] = {}
    for path in sorted(directory.glob("*.yaml")):
        m = load_manifest(path)
        if m.table in out:
            raise _fail(path, f"table {m.table!r} is already described by {out[m.table].path}")
        for entry in m.entries:
            if entry.experiment in owners:
                raise _fail(path, f"experiment {entry.experiment!r} is already a cell of {owners[entry.experiment]}")
            owners[entry.experiment] = path
        out[m.table] = m
    return dict(sorted(out.items(), key=lambda item: (item[1].order, item[0])))
