"""The op interface: protocol metadata, validation, warm-up, and the computation on arrays."""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, Mapping

import numpy as np

from accel.errors import InvalidInput
from accel.tensor import Tensor

from ..backends.base import TensorSpec

#: output name -> writable memory to compute that output into (e.g. its shared-memory region)
Destinations = Mapping[str, memoryview]


class Op(ABC):
    """One "model" of the Open Inference Protocol.

    Subclasses declare ``inputs``/``outputs`` (TensorSpecs) and implement ``run`` on numpy arrays;
    the dispatcher has already checked names, datatypes and ranks against the specs.

    An op that can compute outputs straight into memory the caller holds (a client's shared-memory
    region) names them in ``direct_outputs`` and takes ``destinations`` in ``run``; the dispatcher
    gives destinations to such ops only, for those outputs only, and other ops never see the keyword.
    """

    name: str
    platform: str = "accelshim"
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    #: names of the request parameters the op reads, with a one-line description each
    parameters: dict[str, str] = {}
    backend: str = "cpu"
    #: outputs that ``run(..., destinations=...)`` writes into the memory given for them
    direct_outputs: frozenset[str] = frozenset()

    def load(self) -> None:
        """Acquire what the op needs (models, kernels). Called once, before ``warmup``."""

    def warmup(self) -> None:
        """Run once on representative inputs, so the first real request finds everything hot."""

    def close(self) -> None:
        """Release threads and device memory (the shim is stopping)."""

    @abstractmethod
    def run(self, inputs: dict[str, np.ndarray], parameters: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Compute the outputs. Raises InvalidInput for inputs the specs cannot express.

        An op with ``direct_outputs`` also takes ``destinations`` (a keyword, given only when not empty).
        """

    def run_tensors(self, inputs: list[Tensor], parameters: Mapping[str, Any],
                    destinations: Destinations | None = None) -> list[Tensor]:
        """Protocol tensors in and out; converts through numpy by default.

        Args:
            destinations: for ``direct_outputs`` only (see the class docstring); passed on to ``run``.
        """
        arrays = {t.name: t.numpy() for t in inputs}
        if destinations:
            outputs = self.run(arrays, parameters, destinations=destinations)  # type: ignore[call-arg]
        else:
            outputs = self.run(arrays, parameters)
        types = {s.name: s.datatype for s in self.outputs}
        return [Tensor.from_numpy(name, value, types.get(name)) for name, value in outputs.items()]

    def metadata(self) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "name": self.name, "versions": ["1"], "platform": self.platform,
            "inputs": [s.as_json() for s in self.inputs],
            "outputs": [s.as_json() for s in self.outputs],
            "backend": self.backend,
        }
        if self.parameters:
            meta["parameters"] = dict(self.parameters)
        return meta


def destination_array(destinations: Destinations | None, name: str, shape: tuple[int, ...],
                      dtype: np.dtype) -> np.ndarray | None:
    """Output ``name``'s destination as a C-contiguous array of ``shape`` and ``dtype`` over its
    first bytes (None when it has none), for an op to compute into; check it before the work.

    Raises:
        InvalidInput: the destination is smaller than the output.
    """
    memory = destinations.get(name) if destinations else None
    if memory is None:
        return None
    count = math.prod(shape)
    nbytes = count * dtype.itemsize
    if nbytes > memory.nbytes:
        raise InvalidInput(f"output {name!r} is {nbytes} bytes but its shared_memory_byte_size is "
                           f"{memory.nbytes}: register or ask for a larger region")
    return np.frombuffer(memory, dtype, count).reshape(shape)


# --- parameter readers shared by the ops --------------------------------------------------------
def float_param(params: Mapping[str, Any], name: str, default: float) -> float:
    value = params.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidInput(f"parameter {name!r} must be a finite number, got {value!r}")
    return float(value)


def int_param(params: Mapping[str, Any], name: str, default: int, low: int, high: int) -> int:
    value = params.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(f"parameter {name!r} must be an integer, got {value!r}")
    if not low <= value <= high:
        raise InvalidInput(f"parameter {name!r} must be between {low} and {high}, got {value}")
    return value
