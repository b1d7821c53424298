"""Flowformer: a pure-PyTorch library of Flow-Attention, its baselines, blocks and the paper's models."""
