"""A raw model of the repository served by name: the generic ``infer``."""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from accel.datatypes import FIXED
from accel.errors import InvalidInput

from ..backends.base import Backend, ModelRunner
from ..modelrepo import ModelConfig
from .base import Op


class ModelOp(Op):
    """Any ONNX model of the repository; inputs and outputs are the model's own."""

    platform = "onnxruntime_onnx"

    def __init__(self, backend: Backend, config: ModelConfig, max_batch: int) -> None:
        self._backend = backend
        self.backend = backend.name
        self.config = config
        self.name = config.name
        self._max_batch = max_batch
        self._runner: ModelRunner | None = None
        self.inputs, self.outputs = [], []

    def load(self) -> None:
        self._runner = self._backend.load_model(self.config.onnx)
        self.inputs, self.outputs = self._runner.inputs, self._runner.outputs

    def run(self, inputs: dict[str, np.ndarray], parameters: Mapping[str, Any]) -> dict[str, np.ndarray]:
        assert self._runner is not None, f"model {self.name} used before load()"
        for spec in self.inputs:
            array = inputs[spec.name]
            if spec.shape and spec.shape[0] == -1 and array.ndim and array.shape[0] > self._max_batch:
                raise InvalidInput(f"input {spec.name!r}: batch of {array.shape[0]} is over the limit of {self._max_batch}")
        return self._runner.run(inputs)

    def warmup(self) -> None:
        feeds = {}
        for spec in self.inputs:
            if spec.datatype is None or spec.datatype == "BYTES" or spec.shape is None:
                return  # nothing sensible to make up; the first request warms it
            shape = tuple(1 if d < 0 else d for d in spec.shape)
            feeds[spec.name] = np.zeros(shape, dtype=FIXED[spec.datatype][2])
        self.run(feeds, {})
