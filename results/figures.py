"""Figures: our numbers against the paper's per table, and learning curves per cell from each record's history.

matplotlib is imported lazily (Agg backend) so that building tables does not pay for it when figures are
switched off. Every figure is written atomically. The aggregator owns `<table>_*_vs_paper.png` and
`curves/<table>_*.png` of the tables it draws: it redraws them from the records it used and removes the others, so
no figure outlives the records behind it.
"""
from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path

from results.atomic_io import atomic_path
from results.cells import Observation
from results.records import Record
from results.tables import Line, TableResult

_AXIS_KEYS = ("epoch", "step")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", text).strip("_")


def draw_figures(results: Iterable[TableResult], records: Iterable[Record], observations: Iterable[Observation],
                 out_dir: str | Path) -> list[Path]:
    """Every figure of `results` (ours against the paper) and the learning curves of the `records` behind their
    `observations`; stale figures of those tables are removed. Returns the written paths."""
    results, out_dir = list(results), Path(out_dir)
    names = {r.name for r in results}
    used = {o.path: o for o in observations if o.table in names}
    variants = {path: o.variant for path, o in used.items()}
    written = [path for result in results for path in plot_table_vs_paper(result, out_dir)]
    written += plot_learning_curves([r for r in records if r.path in used], out_dir, variants)
    owned = [p for name in names for p in (*out_dir.glob(f"{name}_*_vs_paper.png"),
                                           *(out_dir / "curves").glob(f"{name}_*.png"))]
    for stale in set(owned) - set(written):
        stale.unlink()
    return written


def plot_table_vs_paper(result: TableResult, out_dir: str | Path) -> list[Path]:
    """Scatter of ours (mean ± std) against the paper's value, one figure per section (the paper's protocol, then
    each other protocol); variants are left out.

    Returns the written paths (none when no cell has both our value and the paper's).
    """
    written: list[Path] = []
    for section in result.sections:
        points = [(c.paper, c.mean, c.std or 0.0, c.model) for c in
                  (result.cells[(section.key, Line(r), m)] for r in result.scored_rows(section) for m in result.models)
                  if c.mean is not None and c.paper is not None]
        if not points:
            continue
        plt = _pyplot()
        fig, ax = plt.subplots(figsize=(5, 5))
        for model in dict.fromkeys(p[3] for p in points):
            xs, ys, es = zip(*[(p[0], p[1], p[2]) for p in points if p[3] == model])
            ax.errorbar(xs, ys, yerr=es, fmt="o", capsize=3, label=model)
        lo = min(min(p[0], p[1] - p[2]) for p in points)
        hi = max(max(p[0], p[1] + p[2]) for p in points)
        pad = max(1.0, 0.05 * (hi - lo))
        ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], "k--", lw=1, label="ours = paper")
        ax.fill_between([lo - pad, hi + pad], [lo - pad - 1, hi + pad - 1], [lo - pad + 1, hi + pad + 1],
                        color="grey", alpha=0.15, label="±1 point")
        ax.set_xlabel(f"paper ({result.spec.metric_label})")
        ax.set_ylabel(f"ours ({result.spec.metric_label})")
        ax.set_title(f"{result.spec.title}\n{section.title.replace('`', '')}")
        ax.legend(fontsize="small")
        fig.tight_layout()
        path = Path(out_dir) / f"{result.name}_{section.slug}_vs_paper.png"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def evaluation_series(record: Record) -> dict[str, list[tuple[float, float]]]:
    """A record's evaluation history as {metric: [(step, value), ...]}, non-finite values left out.

    The curves come from the history kept in metrics.json, not from the run's logs, so that `make tables` draws
    the same figures in a fresh clone from the committed records alone (the full logs, training loss and learning
    rate included, stay in each run's csv/ and W&B).
    """
    series: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for entry in record.data.get("history") or []:
        x = entry.get("step", entry.get("epoch"))
        if x is None:
            continue
        for key, value in entry.items():
            if key in _AXIS_KEYS or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if math.isfinite(value):
                series[key].append((float(x), float(value)))
    return dict(series)


def _pick_metrics(names: Iterable[str], limit: int = 4) -> list[str]:
    """The first ``limit`` metric names in order (an evaluation history holds only ``val/*`` metrics)."""
    return sorted(set(names))[:limit]


def plot_learning_curves(records: Iterable[Record], out_dir: str | Path,
                         variants: Mapping[str, str] | None = None) -> list[Path]:
    """One figure per (experiment, attention, selection, variant): every seed's evaluation curves
    (`evaluation_series`). `variants` gives each record's variant by path (default: the name it gave itself)."""
    groups: dict[tuple[str, str, str, str], list[tuple[int, dict]]] = defaultdict(list)
    for rec in records:
        variant = (variants or {}).get(rec.path, rec.variant or "")
        groups[(rec.experiment, rec.attention, rec.selection, variant)].append((rec.seed, evaluation_series(rec)))
    written: list[Path] = []
    for (exp, att, sel, variant), curves in sorted(groups.items()):
        curves.sort(key=lambda pair: pair[0])
        metrics = _pick_metrics(k for _, s in curves for k in s)
        if not metrics:
            continue
        plt = _pyplot()
        fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.2), squeeze=False)
        for ax, metric in zip(axes[0], metrics):
            for seed, series in curves:
                pts = series.get(metric)
                if pts:
                    # markers keep sparse series (a validation score every few epochs) visible
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o" if len(pts) < 20 else None,
                            label=f"seed {seed}")
            ax.set_title(metric)
            ax.set_xlabel("step")
        axes[0][0].legend(fontsize="small")
        fig.suptitle(f"{exp} · {att} · {sel}" + (f" · {variant}" if variant else ""))
        fig.tight_layout()
        name = "__".join(_slug(part) for part in (exp, att, sel, variant) if part)
        path = Path(out_dir) / "curves" / f"{name}.png"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
