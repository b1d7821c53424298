"""Run one table's manifest through Hydra multirun, resumably: ``python -m experiments.reproduce <table>``.

For every cell (experiment x attention x seed) of ``experiments/manifests/<table>.yaml`` it looks at the
deterministic run directory ``$RUNS_DIR/<experiment>/<attention>/<selection>/seed<seed>/``:

- ``done``: metrics.json is complete and its config is the manifest's recipe -> skipped;
- ``resume``: ``checkpoints/last.ckpt`` exists but the run did not finish -> rerun with ``resume=true``;
- ``todo``: nothing usable there -> run;
- ``mismatch``: complete, but another recipe (config differs from the manifest) -> reported, not rerun.

An experiment whose config file ``conf/experiment/<experiment>.yaml`` does not exist is reported as
"not implemented"; one whose datamodule reports its data missing (``data_status()``, the datamodule contract
in ``tasks/common/datamodule.py``) as "data absent", with the command that fetches it; one whose config does
not compose as "config error". All are listed, never silently dropped. The remaining cells run as one multirun per experiment (split only where
the pending attention x seed cells are not a full grid)::

    python -m experiments.train -m experiment=<exp> model/attention=a,b seed=0,1,2 \
        selection=<sel> resume=true [pinned overrides] [launcher]

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

from experiments import resolvers
from results.manifest import MANIFEST_DIR, ExperimentEntry, Manifest, ManifestError, load_manifest
from results.naming import TABLES
from results.records import check_config, read_metrics_file
from results.run_record import METRICS_FILE, last_checkpoint, run_dir_of

REPO_ROOT = Path(__file__).resolve().parents[1]
resolvers.register()

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
    state: str  # done | resume | todo | mismatch | skipped
    note: str = ""


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

    def cells(self, state: str | None = None) -> list[CellPlan]:
        return [c for e in self.experiments for c in e.cells if state is None or c.state == state]


def cell_state(run_dir: Path, entry: ExperimentEntry, attention: str, seed: int, selection: str) -> tuple[str, str]:
    """(state, note) of one cell from what its run directory holds."""
    metrics = run_dir / METRICS_FILE
    has_ckpt = last_checkpoint(run_dir).is_file()
    if metrics.is_file():
        record, problem = read_metrics_file(metrics)
        if record is not None:
            identity = (record.experiment, record.attention, record.seed, record.selection)
            if identity != (entry.experiment, attention, seed, selection):
                return "mismatch", (f"{metrics} describes {identity}, not this cell; delete {run_dir} to rerun")
            diffs = check_config(record, entry)
            if diffs:
                return "mismatch", "; ".join(diffs) + f"; delete {run_dir} to rerun with the manifest's recipe"
            return "done", ""
        if has_ckpt:
            return "resume", f"{problem.kind} metrics.json; resuming from {last_checkpoint(run_dir)}"
        return "todo", f"{problem.kind} metrics.json and no checkpoint; starting over"
    if has_ckpt:
        return "resume", f"resuming from {last_checkpoint(run_dir)}"
    return "todo", ""


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

    def attentions_of(self, entry: ExperimentEntry) -> list[str]:
        return [a for a in entry.attentions if not self.attentions or a in self.attentions]


def make_plan(manifest: Manifest, *, runs_dir: Path, conf_dir: Path, data_dir: Path,
              cells: CellFilter = CellFilter(), extra: Sequence[str] = ()) -> Plan:
    """Inspect configs, data and run directories; decide the state of every cell of ``manifest``."""
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
        for attention in cells.attentions_of(entry):
            for seed in (cells.seeds or entry.seeds):
                rdir = run_dir_of(runs_dir, entry.experiment, attention, selection, seed)
                if state == "ready":
                    cstate, note = cell_state(rdir, entry, attention, seed, selection)
                else:
                    cstate, note = "skipped", state
                plan.cells.append(CellPlan(entry.experiment, attention, seed, selection, rdir, cstate, note))
        plans.append(plan)
    return Plan(manifest, runs_dir, conf_dir, data_dir, plans)


def launcher_overrides(launcher: str) -> list[str]:
    """Hydra overrides selecting the launcher: basic (Hydra's default), joblib, submitit, or any conf name."""
    return list(LAUNCHERS.get(launcher, [f"hydra/launcher={launcher}"]))


def build_commands(plan: Plan, *, launcher: str = "basic", extra: Sequence[str] = (),
                   python: str = sys.executable, train_module: str = "experiments.train") -> list[list[str]]:
    """Multirun commands for the cells still to run (todo or resume).

    One command per experiment sweeps ``model/attention`` x ``seed``; attentions whose pending seeds differ
    get separate commands so that no finished cell is run again.
    """
    commands = []
    for exp in plan.experiments:
        pending: dict[str, list[int]] = {}
        for c in exp.cells:
            if c.state in ("todo", "resume"):
                pending.setdefault(c.attention, []).append(c.seed)
        by_seeds: dict[tuple[int, ...], list[str]] = {}
        for attention, seeds in pending.items():
            by_seeds.setdefault(tuple(sorted(seeds)), []).append(attention)
        for seeds, attentions in by_seeds.items():
            selection = _selection_from(extra, exp.entry.selection)
            cmd = [python, "-m", train_module, "-m",
                   f"experiment={exp.entry.experiment}",
                   f"model/attention={','.join(attentions)}",
                   f"seed={','.join(str(s) for s in seeds)}",
                   f"selection={selection}",
                   "resume=true",
                   *exp.entry.overrides,
                   *launcher_overrides(launcher),
                   *_without_selection(extra)]
            commands.append(cmd)
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
    lines = [
        f"Plan for table {m.table} ({m.path})",
        f"  runs: {plan.runs_dir}   data: {plan.data_dir}   configs: {plan.conf_dir}   launcher: {launcher}",
        f"  runs (cell x seed): {len(cells)} = {count('done')} done, {count('resume')} to resume, "
        f"{count('todo')} to start, "
        f"{count('mismatch')} config mismatch, {count('skipped')} skipped "
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
    mism = plan.cells("mismatch")
    if mism:
        lines.append(f"Done with another recipe, not rerun ({len(mism)}):")
        lines += [f"  - {c.experiment} {c.attention} seed{c.seed}: {c.note}" for c in mism]
    notes = [c for c in cells if c.state in ("resume", "todo") and c.note]
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
    p.add_argument("table", choices=sorted(TABLES))
    p.add_argument("--launcher", default="basic",
                   help="basic (default), joblib, submitit (SLURM), or the name of a conf/hydra/launcher/*.yaml")
    p.add_argument("--dry-run", action="store_true", help="print the plan and the commands; run nothing")
    p.add_argument("--seeds", type=int, nargs="+", help="override the manifest's seeds")
    p.add_argument("--only", nargs="+", metavar="PATTERN", help="only experiments matching these globs")
    p.add_argument("--attentions", nargs="+", metavar="NAME", help="only these attentions of the manifest")
    p.add_argument("--extra", nargs="+", default=[], metavar="OVERRIDE",
                   help="extra Hydra overrides for every run (e.g. trainer=gpu, selection=holdout_val)")
    p.add_argument("--manifests", default=str(MANIFEST_DIR))
    p.add_argument("--runs-dir", default=os.environ.get("RUNS_DIR") or "experiments/runs")
    p.add_argument("--data-dir", default=os.environ.get("DATA_DIR") or "data")
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
                         data_dir=Path(args.data_dir), extra=args.extra,
                         cells=CellFilter(experiments=args.only, attentions=args.attentions, seeds=args.seeds))
    except ManifestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    commands = build_commands(plan, launcher=args.launcher, extra=args.extra)
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
