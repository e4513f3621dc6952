"""Result types of the semantic calls."""
from __future__ import annotations

from ._record import Record


class Prediction(Record):
    """One class of a classification: its label, softmax probability and ImageNet index."""

    __slots__ = ("label", "score", "index")

    def __init__(self, label: str, score: float, index: int) -> None:
        self.label, self.score, self.index = label, score, index
