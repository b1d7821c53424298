"""Transformer blocks and embeddings shared by the domain models."""

from flowformer.nn.blocks import CausalDecoderBlock, Encoder, EncoderBlock
from flowformer.nn.embeddings import LearnedPositionalEncoding, SinusoidalPositionalEncoding

__all__ = ["CausalDecoderBlock", "Encoder", "EncoderBlock", "LearnedPositionalEncoding", "SinusoidalPositionalEncoding"]
