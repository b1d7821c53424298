"""Run one table's manifest through Hydra multirun, resumably: ``python -m experiments.reproduce <table>``.

For every cell (experiment x attention x seed) of ``experiments/manifests/<table>.yaml`` it composes the cell's
recipe (the overrides it would run, `results.recipe.recipe_overrides`) and looks at the deterministic run directory
``$RUNS_DIR/<experiment>/<attention>/<selection>[/<variant>]/seed<seed>/``:

- ``done``: metrics.json is complete and its science part is the cell's recipe (the aggregator's very check) ->
  skipped;
- ``off-recipe``: complete (or started, by its recipe.json) with another recipe -> reported with the keys that
  differ, never counted and never rerun over (move it aside with ``overwrite=true`` or delete it);
- ``partial``: ``checkpoints/last.ckpt`` exists but the run did not finish -> resumed (``resume=true``);
- ``missing``: nothing usable there -> run.

An experiment whose config file ``conf/experiment/<experiment>.yaml`` does not exist is reported as
"not implemented"; one whose datamodule reports its data missing (``data_status()``, the datamodule contract
in ``tasks/common/datamodule.py``) as "data absent", with the command that fetches it; one whose config does
not compose as "config error". All are listed, never silently dropped.

Variants: ``--variant <name>`` runs a variant the manifest declares (its overrides, ``variant=<name>``); ``--extra``
overrides that change the science make an unnamed variant, named by the keys they change. Either way the runs get
their own directory (a ``<variant>/`` folder) and are tabulated beside the paper's row, never pooled with it.

The remaining cells run as one multirun per experiment (split only where the pending attention x seed cells are not a
full grid)::

    python -m experiments.train -m experiment=<exp> model/attention=a,b seed=0,1,2 \
        selection=<sel> [pinned overrides] [extra] resume=true [variant=<name>] [launcher]

``--dry-run`` (``make reproduce-<table> DRY=1``) prints the plan and the commands and runs nothing.
"""
from __future__ import annotations

import argparse
import fnmatch
import os
import shlex
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from results.manifest import MANIFEST_DIR, ExperimentEntry, Manifest, ManifestError, VariantSpec, load_manifest
from results.recipe import CellRecipe, cell_recipe, diff_science, recipe_overrides, register_resolvers, variant_label
from results.records import read_metrics_file
from results.roots import data_root, runs_root
from results.run_record import METRICS_FILE, RECIPE_FILE, last_checkpoint, run_dir_of, started_science

REPO_ROOT = Path(__file__).resolve().parents[1]
register_resolvers()

# Launcher names accepted by --launcher; any other name is passed through as hydra/launcher=<name>
# (e.g. the repo's own conf/hydra/launcher/slurm.yaml or local_parallel.yaml).
LAUNCHERS: dict[str, list[str]] = {
    "basic": [],
    "joblib": ["hydra/launcher=joblib"],
    "submitit": ["hydra/launcher=submitit_slurm"],
}

# ------------------------------------------------------------------------------------ asking the domains

def data_status(conf_dir: Path, entry: ExperimentEntry, data_dir: Path) -> tuple[str, str]:
    """(state, detail) of an experiment whose config exists: "ready" when its datamodule says its data is on disk,
    "data absent" with what is missing and the command that fetches it, or "config error" with Hydra's message.

    The experiment's config is composed as the training run would compose it (with the manifest's pinned
    overrides and `paths.data_dir`), its datamodule constructed (constructors read no data) and asked.
    """
    overrides = [f"experiment={entry.experiment}", f"paths.data_dir={data_dir}", *entry.overrides]
    try:
        with initialize_config_dir(config_dir=str(Path(conf_dir).resolve()), version_base="1.3"):
            cfg = compose(config_name="train", overrides=overrides)
        status = instantiate(cfg.data).data_status()
    except Exception as error:  # a config that does not compose or a datamodule that rejects its arguments
        return "config error", f"{type(error).__name__}: {error}".splitlines()[0]
    return ("ready" if status.available else "data absent"), status.detail


# ---------------------------------------------------------------------------------------------- planning

@dataclass
class CellPlan:
    """One (experiment, attention, seed) cell and what to do with it."""

    experiment: str
    attention: str
    seed: int
    selection: str
    run_dir: Path
    state: str  # done | off-recipe | partial | missing | skipped
    note: str = ""
    variant: str | None = None


@dataclass
class ExperimentPlan:
    """One manifest experiment: whether it can run at all, and its cells."""

    entry: ExperimentEntry
    state: str  # ready | not implemented | data absent | config error
    detail: str
    cells: list[CellPlan] = field(default_factory=list)


@dataclass
class Plan:
    manifest: Manifest
    runs_dir: Path
    conf_dir: Path
    data_dir: Path
    experiments: list[ExperimentPlan]
    extra: tuple[str, ...] = ()
    variant: VariantSpec | None = None

    def cells(self, state: str | None = None) -> list[CellPlan]:
        return [c for e in self.experiments for c in e.cells if state is None or c.state == state]


def cell_state(run_dir: Path, recipe: CellRecipe, identity: tuple) -> tuple[str, str]:
    """(state, note) of one cell from what its run directory holds, checked against the cell's `recipe`.
    `identity` is (experiment, attention, seed, selection, variant) as the cell expects them."""
    metrics = run_dir / METRICS_FILE
    has_ckpt = last_checkpoint(run_dir).is_file()
    if metrics.is_file():
        record, problem = read_metrics_file(metrics)
        if record is not None:
            found = (record.experiment, record.attention, record.seed, record.selection, record.variant)
            if found != identity:
                return "off-recipe", f"{metrics} describes {found}, not this cell"
            result = recipe.check(record.data.get("config") or {}, world_size=record.data.get("world_size"))
            if result.kind != "recipe":
                return "off-recipe", "; ".join(str(d) for d in result.diffs)
            return "done", ""
        if has_ckpt:
            return _partial(run_dir, recipe, f"{problem.kind} metrics.json")
        return "missing", f"{problem.kind} metrics.json and no checkpoint; starting over"
    if has_ckpt:
        return _partial(run_dir, recipe, "not finished")
    return "missing", ""


def _partial(run_dir: Path, recipe: CellRecipe, why: str) -> tuple[str, str]:
    """A started run: resumable when it started with the cell's recipe (its recipe.json), else off-recipe."""
    started = started_science(run_dir)
    if started is not None:
        diffs = diff_science(started, recipe.recipe)
        if diffs:
            return "off-recipe", f"started with another recipe ({RECIPE_FILE}): " + "; ".join(str(d) for d in diffs)
    return "partial", f"{why}; resuming from {last_checkpoint(run_dir)}"


def _selection_from(extra: Sequence[str], default: str) -> str:
    for ov in extra:
        key, sep, value = ov.lstrip("+").partition("=")
        if sep and key == "selection":
            return value
    return default


def _without_selection(extra: Sequence[str]) -> list[str]:
    """``extra`` minus any ``selection=`` override (the command sets the selection itself)."""
    return [ov for ov in extra if _selection_from([ov], "") == ""]


@dataclass(frozen=True)
class CellFilter:
    """Which of a manifest's cells to plan: experiments matching `experiments` (globs), these `attentions`, and
    `seeds` instead of the manifest's; None keeps the manifest's."""

    experiments: Sequence[str] | None = None
    attentions: Sequence[str] | None = None
    seeds: Sequence[int] | None = None

    def keeps(self, experiment: str) -> bool:
        return not self.experiments or any(fnmatch.fnmatch(experiment, pat) for pat in self.experiments)

    def attentions_of(self, entry: ExperimentEntry, variant: VariantSpec | None = None) -> list[str]:
        return [a for a in entry.attentions if (not self.attentions or a in self.attentions)
                and (variant is None or variant.attentions is None or a in variant.attentions)]


def variant_of(recipe: CellRecipe, cell: CellRecipe, variant: VariantSpec | None) -> str | None:
    """The variant a cell runs as: the declared one, or the name of what `--extra` changes (None: the recipe)."""
    if variant is not None:
        return variant.name
    diffs = diff_science(cell.recipe, recipe.recipe)
    return variant_label(diffs) if diffs else None


def make_plan(manifest: Manifest, *, runs_dir: Path, conf_dir: Path, data_dir: Path,
              cells: CellFilter = CellFilter(), extra: Sequence[str] = (), variant: str | None = None) -> Plan:
    """Inspect configs, data and run directories; decide the state of every cell of ``manifest``.

    `variant` names a variant the manifest declares; `extra` are overrides added to every run."""
    spec = _variant_spec(manifest, variant)
    added = [*(spec.overrides if spec else ()), *_without_selection(extra)]
    plans: list[ExperimentPlan] = []
    for entry in manifest.entries:
        if not cells.keeps(entry.experiment):
            continue
        selection = _selection_from(extra, entry.selection)
        cfg_file = conf_dir / "experiment" / f"{entry.experiment}.yaml"
        if not cfg_file.is_file():
            state, detail = "not implemented", f"{cfg_file} does not exist"
        else:
            state, detail = data_status(conf_dir, entry, data_dir)
        plan = ExperimentPlan(entry, state, detail)
        for attention in cells.attentions_of(entry, spec):
            for seed in (cells.seeds or entry.seeds):
                if state != "ready":
                    rdir = run_dir_of(runs_dir, entry.experiment, attention, selection, seed)
                    plan.cells.append(CellPlan(entry.experiment, attention, seed, selection, rdir, "skipped", state))
                    continue
                paper = cell_recipe(entry.experiment, attention, seed, selection, pinned=entry.overrides,
                                    conf_dir=conf_dir)
                cell = cell_recipe(entry.experiment, attention, seed, selection, pinned=entry.overrides,
                                   conf_dir=conf_dir, extra=added)
                name = variant_of(paper, cell, spec)
                rdir = run_dir_of(runs_dir, entry.experiment, attention, selection, seed, name)
                cstate, note = cell_state(rdir, cell, (entry.experiment, attention, seed, selection, name))
                plan.cells.append(CellPlan(entry.experiment, attention, seed, selection, rdir, cstate, note, name))
        plans.append(plan)
    return Plan(manifest, runs_dir, conf_dir, data_dir, plans, tuple(extra), spec)


def _variant_spec(manifest: Manifest, variant: str | None) -> VariantSpec | None:
    if variant is None:
        return None
    if variant not in manifest.variants:
        known = ", ".join(sorted(manifest.variants)) or "none"
        raise ManifestError(f"{manifest.path}: no variant {variant!r} (declared: {known}); declare it under "
                            "`variants:` or run the recipe without --variant")
    return manifest.variants[variant]


def launcher_overrides(launcher: str) -> list[str]:
    """Hydra overrides selecting the launcher: basic (Hydra's default), joblib, submitit, or any conf name."""
    return list(LAUNCHERS.get(launcher, [f"hydra/launcher={launcher}"]))


def build_commands(plan: Plan, *, launcher: str = "basic", python: str = sys.executable,
                   train_module: str = "experiments.train") -> list[list[str]]:
    """Multirun commands for the cells still to run (missing or partial).

    One command per experiment and variant sweeps ``model/attention`` x ``seed``; attentions whose pending seeds
    differ get separate commands so that no finished cell is run again.
    """
    added = [*(plan.variant.overrides if plan.variant else ()), *_without_selection(plan.extra)]
    commands = []
    for exp in plan.experiments:
        pending: dict[tuple[str | None, str], list[int]] = {}
        for c in exp.cells:
            if c.state in ("missing", "partial"):
                pending.setdefault((c.variant, c.attention), []).append(c.seed)
        groups: dict[tuple[str | None, tuple[int, ...]], list[str]] = {}
        for (variant, attention), seeds in pending.items():
            groups.setdefault((variant, tuple(sorted(seeds))), []).append(attention)
        for (variant, seeds), attentions in groups.items():
            selection = _selection_from(plan.extra, exp.entry.selection)
            overrides = recipe_overrides(exp.entry.experiment, ",".join(attentions), ",".join(map(str, seeds)),
                                         selection, exp.entry.overrides, added)
            named = [f'variant="{variant}"'] if variant else []
            commands.append([python, "-m", train_module, "-m", *overrides, "resume=true", *named,
                             *launcher_overrides(launcher)])
    return commands


def format_command(cmd: Sequence[str]) -> str:
    """Shell form with ``python`` for the interpreter, for display."""
    return shlex.join(["python", *cmd[1:]])


def format_plan(plan: Plan, commands: Sequence[Sequence[str]], launcher: str) -> str:
    """Human-readable plan: per experiment, per attention, the state of each seed; then skips and commands."""
    m = plan.manifest
    cells = plan.cells()
    count = lambda s: sum(c.state == s for c in cells)
    absent = [e for e in plan.experiments if e.state == "data absent"]
    missing = [e for e in plan.experiments if e.state == "not implemented"]
    broken = [e for e in plan.experiments if e.state == "config error"]
    running = (f"variant {plan.variant.name!r} ({' '.join(plan.variant.overrides)})" if plan.variant
               else "the paper recipe")
    lines = [
        f"Plan for table {m.table} ({m.path}): {running}" + (f" with {' '.join(plan.extra)}" if plan.extra else ""),
        f"  runs: {plan.runs_dir}   data: {plan.data_dir}   configs: {plan.conf_dir}   launcher: {launcher}",
        f"  runs (cell x seed): {len(cells)} = {count('done')} done, {count('partial')} partial (resumed), "
        f"{count('missing')} missing (started), "
        f"{count('off-recipe')} off-recipe (not counted, not rerun), {count('skipped')} skipped "
        f"({sum(len(e.cells) for e in missing)} not implemented, {sum(len(e.cells) for e in absent)} data absent"
        + (f", {sum(len(e.cells) for e in broken)} config error)" if broken else ")"),
        "",
    ]
    width = max((len(e.entry.experiment) for e in plan.experiments), default=10)
    for exp in plan.experiments:
        if exp.state != "ready":
            lines.append(f"{exp.entry.experiment:<{width}}  {exp.state.upper()} (see below)")
            continue
        lines.append(f"{exp.entry.experiment:<{width}}  ready: {exp.detail}")
        by_att: dict[str, list[CellPlan]] = {}
        for c in exp.cells:
            by_att.setdefault(c.attention, []).append(c)
        for att, cs in by_att.items():
            lines.append(f"    {att:<20s} " + "  ".join(f"seed{c.seed}:{c.state}" for c in cs))
    lines.append("")
    if missing:
        lines.append(f"Not implemented ({len(missing)}): no experiment config")
        lines += [f"  - {e.entry.experiment}: {e.detail}" for e in missing]
    if absent:
        lines.append(f"Skipped because the dataset is absent ({len(absent)}):")
        lines += [f"  - {e.entry.experiment}: {e.detail}" for e in absent]
    if broken:
        lines.append(f"Config errors ({len(broken)}): the experiment's config does not compose or instantiate")
        lines += [f"  - {e.entry.experiment}: {e.detail}" for e in broken]
    variants = sorted({c.variant for c in cells if c.variant})
    if variants:
        lines.append("Runs go to the variant folder(s) " + ", ".join(f"{v!r}" for v in variants)
                     + ": tabulated beside the paper's rows, never in them.")
    off = plan.cells("off-recipe")
    if off:
        lines.append(f"Off-recipe runs in the cells' folders, not counted and not rerun ({len(off)}); move one aside "
                     "with overwrite=true, or delete it, to run the recipe there:")
        lines += [f"  - {c.experiment} {c.attention} seed{c.seed} ({c.run_dir}): {c.note}" for c in off]
    notes = [c for c in cells if c.state in ("partial", "missing") and c.note]
    if notes:
        lines.append("Notes:")
        lines += [f"  - {c.experiment} {c.attention} seed{c.seed}: {c.note}" for c in notes]
    if commands:
        lines.append(f"Commands ({len(commands)}):")
        lines += [f"  {format_command(cmd)}" for cmd in commands]
    elif any(e.state == "ready" for e in plan.experiments):
        lines.append("Nothing to run: every runnable cell is done.")
    else:
        lines.append("Nothing to run: no experiment of this manifest is both implemented and has its data.")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------------- CLI

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.reproduce", description=__doc__.split("\n\n")[0])
    p.add_argument("table", help="a table with a manifest: experiments/manifests/<table>.yaml")
    p.add_argument("--launcher", default="basic",
                   help="basic (default), joblib, submitit (SLURM), or the name of a conf/hydra/launcher/*.yaml")
    p.add_argument("--dry-run", action="store_true", help="print the plan and the commands; run nothing")
    p.add_argument("--seeds", type=int, nargs="+", help="override the manifest's seeds")
    p.add_argument("--only", nargs="+", metavar="PATTERN", help="only experiments matching these globs")
    p.add_argument("--attentions", nargs="+", metavar="NAME", help="only these attentions of the manifest")
    p.add_argument("--extra", nargs="+", default=[], metavar="OVERRIDE",
                   help="extra Hydra overrides for every run (e.g. trainer=gpu, selection=holdout_val); those that "
                        "change the recipe make a variant, run in its own folder")
    p.add_argument("--variant", help="run a variant the manifest declares (`variants:`)")
    p.add_argument("--manifests", default=str(MANIFEST_DIR))
    p.add_argument("--runs-dir", default=str(runs_root()))
    p.add_argument("--data-dir", default=str(data_root()))
    p.add_argument("--conf-dir", default=str(REPO_ROOT / "conf"))
    return p


def main(argv: Sequence[str] | None = None, *,
         runner: Callable[..., subprocess.CompletedProcess] = subprocess.run) -> int:
    """CLI entry point; ``runner`` (default ``subprocess.run``) is injectable for tests."""
    args = _parser().parse_args(argv)
    manifest_path = Path(args.manifests) / f"{args.table}.yaml"
    if not manifest_path.is_file():
        print(f"error: {manifest_path} not found; every table needs a manifest in {args.manifests}/ "
              f"(schema: results/manifest.py)", file=sys.stderr)
        return 2
    if any(ov.lstrip("+").startswith("seed=") for ov in args.extra):
        print("error: pass seeds with --seeds (make reproduce-<table> SEEDS='0 1'), not --extra seed=...",
              file=sys.stderr)
        return 2
    try:
        manifest = load_manifest(manifest_path)
        plan = make_plan(manifest, runs_dir=Path(args.runs_dir), conf_dir=Path(args.conf_dir),
                         data_dir=Path(args.data_dir), extra=args.extra, variant=args.variant,
                         cells=CellFilter(experiments=args.only, attentions=args.attentions, seeds=args.seeds))
    except ManifestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    commands = build_commands(plan, launcher=args.launcher)
    print(format_plan(plan, commands, args.launcher), flush=True)
    if args.dry_run or not commands:
        return 0

    # The training runs read RUNS_DIR/DATA_DIR themselves (conf/paths); keep them pointing where we looked.
    env = {**os.environ, "RUNS_DIR": str(args.runs_dir), "DATA_DIR": str(args.data_dir)}
    failed = []
    for i, cmd in enumerate(commands, 1):
        print(f"\n[{i}/{len(commands)}] {format_command(cmd)}", flush=True)
        rc = runner(cmd, env=env).returncode
        if rc != 0:
            failed.append((cmd, rc))
            print(f"[{i}/{len(commands)}] exited with status {rc}; continuing with the next experiment", flush=True)
    if failed:
        print(f"\n{len(failed)} of {len(commands)} command(s) failed:", file=sys.stderr)
        for cmd, rc in failed:
            print(f"  status {rc}: {format_command(cmd)}", file=sys.stderr)
        print(f"Rerun `make reproduce-{args.table}`: finished cells are skipped and interrupted ones resume.",
              file=sys.stderr)
        return 1
    print(f"\nAll {len(commands)} command(s) finished. Build the tables with `make tables`.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
