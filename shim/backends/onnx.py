"""ONNX models through onnxruntime (CPU provider here; the CUDA backend passes its provider)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnxruntime as ort

from .base import TensorSpec

_ORT_TYPES = {
    "tensor(float)": "FP32", "tensor(double)": "FP64", "tensor(float16)": "FP16",
    "tensor(int8)": "INT8", "tensor(int16)": "INT16", "tensor(int32)": "INT32", "tensor(int64)": "INT64",
    "tensor(uint8)": "UINT8", "tensor(uint16)": "UINT16", "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64", "tensor(bool)": "BOOL", "tensor(string)": "BYTES",
}


def _spec(arg: Any) -> TensorSpec:
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in arg.shape)
    return TensorSpec(arg.name, _ORT_TYPES.get(arg.type), shape)


class OnnxRunner:
    """An onnxruntime session, thread-safe, with its inputs and outputs as protocol specs."""

    def __init__(self, path: Path, providers: Sequence[Any], threads: int = 0) -> None:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), sess_options=options, providers=list(providers))
        self.inputs = [_spec(i) for i in self.session.get_inputs()]
        self.outputs = [_spec(o) for o in self.session.get_outputs()]
        self.providers = self.session.get_providers()

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = [o.name for o in self.outputs]
        return dict(zip(names, self.session.run(names, feeds)))


def version() -> str:
    return ort.__version__
