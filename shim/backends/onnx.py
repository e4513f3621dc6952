"""ONNX models through onnxruntime (CPU provider here; the CUDA backend passes its provider)."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

import numpy as np
import onnxruntime as ort

from .base import TensorSpec

T = TypeVar("T")

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
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), sess_options=options, providers=list(providers))
        self.inputs = [_spec(i) for i in self.session.get_inputs()]
        self.outputs = [_spec(o) for o in self.session.get_outputs()]
        self.providers = self.session.get_providers()
        self.device = "cuda" if "CUDAExecutionProvider" in self.providers else "cpu"
        self._names = [o.name for o in self.outputs]
        # On the GPU every run goes through one thread of the session's own: the CUDA provider keeps
        # cuDNN handles and plans per thread and shape, and a cold (thread, shape) costs a slow run.
        self._thread = (ThreadPoolExecutor(1, thread_name_prefix=f"ort-{Path(path).parent.name}")
                        if self.device == "cuda" else None)

    def call(self, job: Callable[[], T]) -> T:
        """``job()`` on the session's thread (GPU) or here (CPU)."""
        if self._thread is None:
            return job()
        return self._thread.submit(job).result()

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Host arrays in and out; on the CUDA provider through I/O binding (one copy each way), with
        the batch padded to a power of two (see ``padded_batch``)."""
        if self.device != "cuda":
            return dict(zip(self._names, self.session.run(self._names, feeds)))
        return self.call(lambda: self._run_bound(feeds))

    def _run_bound(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = {a.shape[0] for a in feeds.values() if a.ndim}
        batch = rows.pop() if len(rows) == 1 and all(s.shape and s.shape[0] == -1 for s in self.inputs) else 0
        size = padded_batch(batch) if batch else 0
        binding = self.session.io_binding()
        for name, array in feeds.items():
            if size > batch:
                array = np.concatenate([array, np.zeros((size - batch, *array.shape[1:]), array.dtype)])
            binding.bind_cpu_input(name, array)
        for name in self._names:
            binding.bind_output(name, "cuda", 0)
        self.session.run_with_iobinding(binding)
        outputs = binding.copy_outputs_to_cpu()
        if size > batch:
            outputs = [o[:batch] if o.ndim and o.shape[0] == size else o for o in outputs]
        return dict(zip(self._names, outputs))

    def run_device(self, name: str, pointer: int, shape: tuple[int, ...], device_id: int = 0) -> np.ndarray:
        """Run on an FP32 input already on the GPU (no host round trip); the first output, on the host.
        Call it inside ``call``."""
        binding = self.session.io_binding()
        binding.bind_input(name, "cuda", device_id, np.float32, list(shape), pointer)
        binding.bind_output(self._names[0], "cuda", device_id)
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]


def padded_batch(rows: int) -> int:
    """The batch size a GPU run of ``rows`` rows uses: the next power of two. Every new input shape
    costs the CUDA provider a slow first run (cuDNN plans for each convolution), so batches of any
    size run as one of a few shapes, all warmed up at start; the padding rows are zeros, dropped."""
    return 1 << max(0, rows - 1).bit_length()


def version() -> str:
    return ort.__version__


def has_cuda_provider() -> bool:
    """Whether this onnxruntime build has the CUDA execution provider (onnxruntime-gpu); if so, its
    CUDA and cuDNN libraries are loaded from the nvidia-* wheels where those are installed."""
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    if hasattr(ort, "preload_dlls"):
        try:
            ort.preload_dlls()
        except Exception:  # noqa: BLE001 - the system's libraries may serve; the session will tell
            pass
    return True
