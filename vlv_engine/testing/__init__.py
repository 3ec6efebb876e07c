"""Test support shipped with the package: tiny random components and plain references.

Other packages' and our own fast paths are checked against these.
"""

from vlv_engine.testing.reference import reference_caption_embedding, reference_greedy_tokens
from vlv_engine.testing.tiny import TINY_WORDS, tiny_engine, tiny_model, tiny_tokenizers

__all__ = ["TINY_WORDS", "reference_caption_embedding", "reference_greedy_tokens", "tiny_engine", "tiny_model",
           "tiny_tokenizers"]
