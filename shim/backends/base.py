"""What an op may ask of a backend. Backends are the only modules that import cupy or onnxruntime."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class TensorSpec:
    """A declared input or output: name, protocol datatype (None: any), shape (-1: any size;
    None: any rank), and whether it may be left out."""

    name: str
    datatype: str | None
    shape: tuple[int, ...] | None
    optional: bool = False

    def as_json(self) -> dict[str, object]:
        return {"name": self.name, "datatype": self.datatype or "ANY",
                "shape": list(self.shape) if self.shape is not None else [-1],
                **({"optional": True} if self.optional else {})}


class ModelRunner(Protocol):
    """A loaded model that runs on numpy arrays."""

    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


class Backend(Protocol):
    """A device: GEMM and model execution."""

    name: str

    def gemm(self, a: np.ndarray, b: np.ndarray, c: np.ndarray | None, alpha: float, beta: float) -> np.ndarray:
        """``alpha * a @ b + beta * c`` in the dtype of ``a`` (FP16 accumulates in FP32)."""
        ...

    def load_model(self, path: Path) -> ModelRunner: ...

    def describe(self) -> dict[str, object]:
        """Device name and library versions, for metadata and benchmarks."""
        ...
