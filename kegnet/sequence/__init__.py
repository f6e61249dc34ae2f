"""Sequence models (autoregressive decoders, ``tokens (B, T) -> logits (B, T, V)``): data-free compression.

Each module holds one part: ``compress`` (SVD of the blocks' Linear layers, factorized token embedding),
``objectives`` (word- and sequence-level distillation losses), and the generation and distillation modules.
Nothing is imported here, so importing one part does not load the others.
"""
