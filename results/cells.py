"""Which table cell each run record fills, and under which recipe.

For every record: the table of its experiment, the manifest entry that lists the experiment, the cell's recipe
composed as the planner runs it (`results.recipe`), and the comparison of the two. The record then
- fills its paper cell (it is the recipe);
- fills a cell of a variant of the recipe (named in the manifest, or named by what it changed), tabulated beside
  the paper's row and never pooled with it; or
- is left out with the reason (a debug run, an experiment outside the manifest, a missing metric).
Two different records for the same cell and seed are an error that names both files: nothing decides silently which
one counts.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from results.manifest import ExperimentEntry, Manifest
from results.naming import domain_of
from results.recipe import CONF_DIR, DEBUG_KEYS, CellRecipe, KeyDiff, RecipeCheck, cell_recipe
from results.records import Problem, Record, config_value, metric_value

RECIPE = ""  # the variant of a record that is its cell's recipe


@dataclass(frozen=True)
class Observation:
    """One number for one table cell from one run (seed). `variant` is "" for the paper recipe."""

    table: str
    row: str
    model: str
    selection: str
    seed: int
    value: float
    path: str
    variant: str = RECIPE


@dataclass(frozen=True)
class OffRecipe:
    """A record that is not its cell's recipe: a variant (tabulated apart) or a debug run (left out)."""

    path: str
    experiment: str
    attention: str
    selection: str
    seed: int
    kind: str  # variant | debug
    name: str | None
    diffs: tuple[KeyDiff, ...]


@dataclass
class Placement:
    """Where the records went: observations for the tables, the off-recipe runs, and the records left out."""

    observations: list[Observation] = field(default_factory=list)
    off_recipe: list[OffRecipe] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    @property
    def used(self) -> list[str]:
        """The paths of the records behind the tables (recipe runs and variants)."""
        return sorted({o.path for o in self.observations})


class DuplicateRunsError(ValueError):
    """Two different records claim the same cell and seed."""


class RecipeBook:
    """Each manifest cell's recipe, composed once (per experiment, attention, selection, seed) and kept."""

    def __init__(self, conf_dir: str | Path = CONF_DIR) -> None:
        self.conf_dir = conf_dir
        self._cache: dict[tuple, CellRecipe] = {}

    def recipe(self, manifest: Manifest, entry: ExperimentEntry, attention: str, seed: int,
               selection: str) -> CellRecipe:
        key = (manifest.table, entry.experiment, attention, seed, selection)
        if key not in self._cache:
            variants = {name: spec.overrides for name, spec in manifest.variants.items()
                        if spec.attentions is None or attention in spec.attentions}
            self._cache[key] = cell_recipe(entry.experiment, attention, seed, selection, pinned=entry.overrides,
                                           variants=variants, conf_dir=self.conf_dir)
        return self._cache[key]

    def check(self, record: Record, manifest: Manifest, entry: ExperimentEntry) -> RecipeCheck:
        """How `record` relates to the recipe of its cell (see `results.recipe.check`)."""
        recipe = self.recipe(manifest, entry, record.attention, record.seed, record.selection)
        return recipe.check(record.data.get("config") or {}, world_size=record.data.get("world_size"),
                            claimed=record.variant)


def _entry_of(record: Record, manifests: dict[str, Manifest]) -> tuple[Manifest, ExperimentEntry] | Problem:
    """The manifest and entry that list the record's experiment, or the problem that says why there is none."""
    for manifest in manifests.values():
        entry = manifest.entry(record.experiment)
        if entry is not None:
            return manifest, entry
    domain = domain_of(record.experiment)
    near = [m for m in manifests.values() if any(domain_of(e.experiment) == domain for e in m.entries)]
    if not near:
        return Problem(record.path, "unknown", f"experiment {record.experiment!r} belongs to no table (manifests: "
                       f"{', '.join(manifests) or 'none'}); a table lists its experiments in "
                       "experiments/manifests/<table>.yaml")
    return Problem(record.path, "unknown", f"{record.experiment!r} is no cell of the {near[0].table} table, so it "
                   f"stays out of it (a run on stand-in data, say); to make it one, list it in {near[0].path}")


IDENTITY_KEYS = {"experiment": "experiment_name", "attention": "model.attention.name", "seed": "seed",
                 "selection": "selection", "variant": "variant"}


def identity_mismatch(record: Record) -> str | None:
    """Where the record's identity fields disagree with its own config (an edited or mixed-up record), or None."""
    config = record.data.get("config") or {}
    wrong = []
    for field_name, dotted in IDENTITY_KEYS.items():
        _, node = config_value(config, dotted)
        if node != record.data.get(field_name) and not (field_name == "variant" and node is None):
            wrong.append(f"`{field_name}` is {record.data.get(field_name)!r} but the config's `{dotted}` is {node!r}")
    return "; ".join(wrong) or None


def place_records(records: Iterable[Record], manifests: dict[str, Manifest], *,
                  book: RecipeBook | None = None) -> Placement:
    """Map each record onto its table cells (one per manifest row it fills); see the module docstring.

    Raises DuplicateRunsError when two different records fill the same cell and seed (identical copies, such as
    the same record under two runs folders, count once)."""
    book = book or RecipeBook()
    placement = Placement()
    claims: dict[tuple, Record] = {}
    duplicates: list[tuple[Record, Record]] = []
    for record in records:
        found = _entry_of(record, manifests)
        if isinstance(found, Problem):
            placement.problems.append(found)
            continue
        manifest, entry = found
        mismatch = identity_mismatch(record)
        if mismatch:
            placement.problems.append(Problem(record.path, "mismatch", f"{mismatch}; the record contradicts itself, "
                                              "so it cannot be placed (rerun the cell)"))
            continue
        try:
            result = book.check(record, manifest, entry)
        except Exception as error:  # a recipe that no longer composes: say so instead of guessing
            placement.problems.append(Problem(record.path, "unknown", f"the recipe of its cell does not compose "
                                              f"({type(error).__name__}: {error}); it cannot be checked"))
            continue
        if result.kind != "recipe":
            placement.off_recipe.append(OffRecipe(record.path, record.experiment, record.attention, record.selection,
                                                  record.seed, result.kind, result.name, result.diffs))
        if result.kind == "debug":
            changed = ", ".join(str(d) for d in result.diffs if d.key in DEBUG_KEYS)
            placement.problems.append(Problem(record.path, "debug", f"a debug run ({changed}); debug runs never "
                                              "fill a table"))
            continue
        variant = result.name or RECIPE
        model = manifest.column(record.attention, entry)
        for spec in entry.rows:
            value = metric_value(record.data, spec.metric)
            if value is None:
                placement.problems.append(Problem(record.path, "missing-metric", f"no finite number at "
                                                  f"`{spec.metric}` (it fills row {spec.row!r} of table "
                                                  f"{manifest.table})"))
                continue
            key = (manifest.table, spec.row, model, record.selection, result.key, record.seed)
            other = claims.get(key)
            if other is not None:
                if _same_run(other, record):
                    continue
                duplicates.append((other, record))
                continue
            claims[key] = record
            placement.observations.append(Observation(manifest.table, spec.row, model, record.selection, record.seed,
                                                      value * spec.scale, record.path, variant))
    if duplicates:
        raise DuplicateRunsError(_duplicates_message(duplicates))
    return placement


def _same_run(a: Record, b: Record) -> bool:
    """The same record read twice (copied between runs folders): equal in everything but where it lies."""
    strip = lambda data: {k: v for k, v in data.items() if k != "run_dir"}
    return strip(a.data) == strip(b.data)


def _duplicates_message(pairs: Sequence[tuple[Record, Record]]) -> str:
    lines = [f"{len(pairs)} cell(s) have two different records for the same seed; nothing decides which one counts:"]
    for first, second in pairs:
        lines.append(f"  - {first.experiment} {first.attention} {first.selection} seed {first.seed}"
                     + (f" variant {first.variant}" if first.variant else "")
                     + f":\n      {first.path} (finished {first.data.get('finished_at')})"
                     f"\n      {second.path} (finished {second.data.get('finished_at')})")
    lines.append("Keep one of each pair: move the other out of the runs folders given to the aggregator "
                 "(or delete it), then rebuild the tables.")
    return "\n".join(lines)
