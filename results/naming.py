"""The paper's names for our registered attentions (`conf/model/attention/<name>.yaml`).

A table's manifest maps attentions to its own column labels where they differ (D4RL calls softmax "DT"); this is
the shared default. The paper's numbers are not here (`results/paper/<table>.csv`), nor is any table's shape (its
manifest, `experiments/manifests/<table>.yaml`).
"""
from __future__ import annotations

ATTENTION_COLUMNS: dict[str, str] = {
    "flow": "Flowformer",
    "softmax": "Transformer",
    "linear": "Linear Trans.",
    "performer": "Performer",
    "reformer": "Reformer",
    "cosformer": "cosFormer",
    "flow_no_competition": "Flowformer w/o Competition",
    "flow_no_allocation": "Flowformer w/o Allocation",
    # The official LRA code computes the competition softmax over heads (results/paper/official_code.md §10.1): our
    # own model column, never merged into "Flowformer" (the LRA manifest says which paper column it is compared with)
    "flow_lra_official": "Flowformer (official LRA code)",
}


def domain_of(experiment: str) -> str:
    """``"uea/JapaneseVowels"`` -> ``"uea"``."""
    return experiment.split("/", 1)[0]
