"""ONNX models through onnxruntime (CPU provider here; the CUDA backend passes its provider)."""
from __future__ import annotations

import threading
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
    """An onnxruntime session, thread-safe, with its inputs and outputs as protocol specs.

    On the CUDA provider a session re-plans every convolution (cuDNN) whenever its input shape
    changes, which costs most of a second, so each batch size gets a session of its own, run by a
    thread of its own (cuDNN state is per thread too): batches are padded to a power of two
    (``padded_batch``), so a model has a handful of sessions, each warmed up at start and never
    seeing another shape.
    """

    def __init__(self, path: Path, providers: Sequence[Any], threads: int = 0, device_id: int = 0) -> None:
        self._path, self._providers, self.device_id = Path(path), list(providers), device_id
        self._options = ort.SessionOptions()
        self._options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            self._options.intra_op_num_threads = threads
        self._options.log_severity_level = 3
        self.session = self._new_session()
        self.inputs = [_spec(i) for i in self.session.get_inputs()]
        self.outputs = [_spec(o) for o in self.session.get_outputs()]
        self.providers = self.session.get_providers()
        self.device = "cuda" if "CUDAExecutionProvider" in self.providers else "cpu"
        self._names = [o.name for o in self.outputs]
        self._batched = bool(self.inputs) and all(s.shape and s.shape[0] == -1 for s in self.inputs)
        self._by_batch: dict[int, tuple[Any, ThreadPoolExecutor]] = {}
        self._lock = threading.Lock()

    def _new_session(self) -> Any:
        return ort.InferenceSession(str(self._path), sess_options=self._options, providers=self._providers)

    def _session_for(self, batch: int) -> tuple[Any, ThreadPoolExecutor]:
        with self._lock:
            entry = self._by_batch.get(batch)
            if entry is None and not self._by_batch:  # the first batch size takes the session made at load
                entry = self._by_batch[batch] = (self.session, self._new_thread(batch))
        if entry is not None:
            return entry
        session = self._new_session()  # seconds: outside the lock, so other batch sizes go on
        with self._lock:
            return self._by_batch.setdefault(batch, (session, self._new_thread(batch)))

    def _new_thread(self, batch: int) -> ThreadPoolExecutor:
        return ThreadPoolExecutor(1, thread_name_prefix=f"ort-{self._path.parent.name}-{batch}")

    def _on_gpu(self, batch: int, job: Callable[[Any], T]) -> T:
        """``job(session)`` with the session of ``batch`` rows, on its thread."""
        session, thread = self._session_for(batch)
        return thread.submit(job, session).result()

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Host arrays in and out; on the CUDA provider through I/O binding (one copy each way), the
        batch padded to a power of two."""
        if self.device != "cuda":
            return dict(zip(self._names, self.session.run(self._names, feeds)))
        rows = {a.shape[0] for a in feeds.values() if a.ndim}
        batched = self._batched and len(rows) == 1
        batch = rows.pop() if batched else 0
        size = padded_batch(batch) if batched else 1  # the session to use (0 rows: that of 1)
        pad = size - batch if batched else 0
        if pad:
            feeds = {name: np.concatenate([a, np.zeros((pad, *a.shape[1:]), a.dtype)]) for name, a in feeds.items()}

        def run(session: Any) -> list[np.ndarray]:
            binding = session.io_binding()
            for name, array in feeds.items():
                binding.bind_cpu_input(name, array)
            for name in self._names:
                binding.bind_output(name, "cuda", self.device_id)
            session.run_with_iobinding(binding)
            return binding.copy_outputs_to_cpu()

        outputs = self._on_gpu(size, run)
        if pad:
            outputs = [o[:batch] if o.ndim and o.shape[0] == size else o for o in outputs]
        return dict(zip(self._names, outputs))

    def run_device(self, name: str, pointer: int, shape: tuple[int, ...], device_id: int = 0) -> np.ndarray:
        """Run on an FP32 input already on the GPU (no host round trip; its batch a power of two,
        its producer synchronized); the first output, on the host."""
        def run(session: Any) -> np.ndarray:
            binding = session.io_binding()
            binding.bind_input(name, "cuda", device_id, np.float32, list(shape), pointer)
            binding.bind_output(self._names[0], "cuda", device_id)
            session.run_with_iobinding(binding)
            return binding.copy_outputs_to_cpu()[0]

        return self._on_gpu(shape[0], run)


def padded_batch(rows: int) -> int:
    """The batch size a GPU run of ``rows`` rows uses: the next power of two, so that batches of any
    size run as one of a few shapes, each with a warmed session; the padding rows are zeros, dropped."""
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
