"""The official caption post-processing, kept as an option.

The released model was trained never to stop (its EOS was masked out of the loss),
so its captions run to the token limit and end mid-sentence; the official script
cuts after the last full stop and drops repeated sentences.
"""

from __future__ import annotations

import re

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def official_postprocess(caption: str) -> str:
    if not caption.endswith("."):
        last = caption.rfind(".")
        if last != -1:
            caption = caption[: last + 1]
    unique: list[str] = []
    for sentence in _SENTENCE_END.split(caption):
        if sentence and sentence not in unique:
            unique.append(sentence)
    return " ".join(unique)
