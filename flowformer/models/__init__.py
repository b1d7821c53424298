"""The paper's per-domain networks, built from `flowformer.nn` blocks and any registered attention."""

from flowformer.models.decision_transformer import DecisionTransformer
from flowformer.models.lra import LRADualEncoder, LRASequenceClassifier
from flowformer.models.transformer_lm import TransformerLM
from flowformer.models.ts_classifier import TimeSeriesClassifier

__all__ = ["DecisionTransformer", "LRADualEncoder", "LRASequenceClassifier", "TimeSeriesClassifier", "TransformerLM"]
