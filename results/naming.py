"""Names: which paper table an experiment belongs to, its row there, and the paper column of an attention.

The paper's numbers are not here (they live in ``results/paper/*.csv``); only the vocabulary that links our
registered names (``conf/model/attention/<name>.yaml``, ``conf/experiment/<domain>/<Name>.yaml``) to the
paper's row and column labels.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TableSpec:
    """Static description of one paper table.

    ``key_columns`` are the CSV columns that name a row; a row's label is their values joined by ``/``
    (D4RL: ``medium-expert/HalfCheetah``). ``average_row`` is the label of the paper's printed average row
    (or None when the table has none). ``lower_is_better`` flips the meaning of "better" (perplexity).
    ``descriptive_rows`` describe the models rather than score them (ImageNet's parameters and MACs): shown
    beside the paper's value, never counted as within, better or worse.
    """

    name: str
    title: str
    metric_label: str
    key_columns: tuple[str, ...]
    average_row: str | None
    lower_is_better: bool = False
    row_header: str = "Row"
    descriptive_rows: tuple[str, ...] = ()


TABLES: dict[str, TableSpec] = {
    "lra": TableSpec(
        name="lra",
        title="Long Range Arena",
        metric_label="accuracy (%)",
        key_columns=("task",),
        average_row="Avg",
        row_header="Task",
    ),
    "uea": TableSpec(
        name="uea",
        title="UEA multivariate time-series classification",
        metric_label="accuracy (%)",
        key_columns=("dataset",),
        average_row="Average Accuracy",
        row_header="Dataset",
    ),
    "imagenet": TableSpec(
        name="imagenet",
        title="ImageNet-1K classification",
        metric_label="accuracy (%)",
        key_columns=("metric",),
        average_row=None,
        row_header="Metric",
        # the paper's "params_M" and "flops_G" rows (its GFLOPs are GMACs), filled from each run's test metrics
        descriptive_rows=("params_M (table header says MB)", "flops_G"),
    ),
    "wikitext103": TableSpec(
        name="wikitext103",
        title="WikiText-103 language modelling",
        metric_label="test perplexity",
        key_columns=("metric",),
        average_row=None,
        lower_is_better=True,
        row_header="Metric",
    ),
    "d4rl": TableSpec(
        name="d4rl",
        title="D4RL offline RL (Decision Transformer)",
        metric_label="normalised score (x100)",
        key_columns=("setting", "environment"),
        average_row="average/Avg Reward",
        row_header="Setting / Environment",
    ),
}

# Experiment folders under conf/experiment/ and the table each one fills.
DOMAIN_TABLES: dict[str, str] = {name: name for name in TABLES}

# Registered attention name -> the paper's column label (shared by every table unless overridden below).
ATTENTION_COLUMNS: dict[str, str] = {
    "flow": "Flowformer",
    "softmax": "Transformer",
    "linear": "Linear Trans.",
    "performer": "Performer",
    "reformer": "Reformer",
    "cosformer": "cosFormer",
    "flow_no_competition": "Flowformer w/o Competition",
    "flow_no_allocation": "Flowformer w/o Allocation",
    # The official LRA code computes the competition softmax over heads (results/paper/official_code.md §10.1). It is our
    # own model column, never merged into "Flowformer"; see PAPER_REFERENCE for what it is compared with.
    "flow_lra_official": "Flowformer (official LRA code)",
}

# Per-table exceptions: D4RL calls the softmax model DT; the ImageNet table calls the softmax version of the
# same hierarchical network "Full Attn.".
TABLE_ATTENTION_COLUMNS: dict[str, dict[str, str]] = {
    "d4rl": {"softmax": "DT"},
    "imagenet": {"softmax": "Full Attn."},
}

# A model column of ours that has no column of its own in the paper but whose paper number is another
# column's: the paper's LRA Flowformer numbers were produced by the official LRA code.
PAPER_REFERENCE: dict[str, dict[str, str]] = {
    "lra": {"Flowformer (official LRA code)": "Flowformer"},
}

LRA_ROWS: dict[str, str] = {
    "listops": "ListOps",
    "text": "Text",
    "retrieval": "Retrieval",
    "image": "Image",
    "pathfinder": "Pathfinder",
}

D4RL_ENVIRONMENTS: dict[str, str] = {
    "halfcheetah": "HalfCheetah",
    "hopper": "Hopper",
    "walker2d": "Walker",
    "walker": "Walker",
}
D4RL_SETTINGS: tuple[str, ...] = ("medium-expert", "medium-replay", "medium")

# Tables whose rows are metrics rather than datasets: an experiment fills this row unless its manifest says
# otherwise (ImageNet's manifest adds top5_acc).
DEFAULT_METRIC_ROWS: dict[str, str] = {"imagenet": "top1_acc", "wikitext103": "perplexity"}


def domain_of(experiment: str) -> str:
    """``"uea/JapaneseVowels"`` -> ``"uea"``."""
    return experiment.split("/", 1)[0]


def table_of(experiment: str) -> str | None:
    """The paper table an experiment belongs to, or None for a domain outside the paper's tables."""
    return DOMAIN_TABLES.get(domain_of(experiment))


def experiment_row(experiment: str) -> str | None:
    """The paper's row label for an experiment name, or None when the name has no row in the paper.

    ``lra/listops`` -> ``ListOps``; ``uea/JapaneseVowels`` -> ``JapaneseVowels``;
    ``d4rl/halfcheetah-medium-expert`` -> ``medium-expert/HalfCheetah`` (a Minari id such as
    ``d4rl/mujoco/hopper/medium-v0`` has none); ``imagenet/<any>`` -> ``top1_acc``;
    ``wikitext103/<any>`` -> ``perplexity``. A UEA dataset outside the paper (e.g. BasicMotions) still gets its
    own name as a row; it is shown as an extra row without a paper value.
    """
    domain, _, name = experiment.partition("/")
    if not name:
        return None
    if domain == "lra":
        return LRA_ROWS.get(name.lower())
    if domain == "uea":
        return name
    if domain == "d4rl":
        if "/" in name:
            return None  # a Minari id (mujoco/hopper/medium-v0): other environments and policies, never a paper cell
        env, _, setting = name.partition("-")
        setting = setting.removesuffix("-v2")
        if env.lower() in D4RL_ENVIRONMENTS and setting in D4RL_SETTINGS:
            return f"{setting}/{D4RL_ENVIRONMENTS[env.lower()]}"
        return None
    return DEFAULT_METRIC_ROWS.get(domain)


def attention_column(table: str, attention: str, overrides: dict[str, str] | None = None) -> str:
    """Our model column label for ``attention`` in ``table``.

    ``overrides`` (from a manifest entry, e.g. DeiT-S in ImageNet) win over the table exceptions, which win
    over :data:`ATTENTION_COLUMNS`. An unknown attention keeps its registered name, so it is visible rather
    than dropped.
    """
    if overrides and attention in overrides:
        return overrides[attention]
    return TABLE_ATTENTION_COLUMNS.get(table, {}).get(attention) or ATTENTION_COLUMNS.get(attention, attention)


def paper_column(table: str, model: str, paper_models: list[str] | tuple[str, ...]) -> str | None:
    """The paper column whose numbers ``model`` is compared with, or None when the paper has none."""
    if model in paper_models:
        return model
    ref = PAPER_REFERENCE.get(table, {}).get(model)
    return ref if ref in paper_models else None
