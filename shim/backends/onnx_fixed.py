"""Sessions of one batch size bound to fixed buffers on the runner's device: what onnxruntime's CUDA
provider captures as a CUDA graph and replays (``OnnxRunner`` builds and runs them)."""
from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import numpy as np

from .onnx_runtime import NUMPY_TYPES, dtype_of, ort

__all__ = ["GRAPH_ID_KEY", "ComputeStream", "DeviceCopy", "FixedSession", "QueuedDownload"]

#: copies ``nbytes`` from one device address to another, on the calling thread, done when it returns
DeviceCopy = Callable[[int, int, int], None]
#: queues a copy of ``nbytes`` from a device address to a (pinned) host address on a stream:
#: (host, device, nbytes, stream)
QueuedDownload = Callable[[int, int, int, int], None]
GRAPH_ID_KEY = "gpu_graph_id"  # the run option naming the CUDA graph a run replays


class ComputeStream(NamedTuple):
    """A CUDA stream that a thread queues its work on, for its sessions to run on too (the model then
    follows that work with no wait on the host between): its address, and how to wait for it."""

    pointer: int
    synchronize: Callable[[], None]


class FixedSession:
    """A session for one batch size whose inputs and outputs stay at fixed addresses on the runner's
    device: what a CUDA graph replays (onnxruntime captures one when the provider is asked to).

    Every call runs on the session's own thread (``OnnxRunner._on_gpu``), so the buffers are never
    shared between two runs. A session given a ``stream`` of its caller's waits for it after each
    run (onnxruntime does not synchronize a stream it was given, and the outputs are read on the host
    next); ``follows`` says whether onnxruntime reports running on that stream, so that the caller's
    work queued there before a run needs no wait.
    """

    def __init__(self, session: Any, device: str, device_id: int, stream: ComputeStream | None = None) -> None:
        self.session, self.device, self.stream = session, device, stream
        self.follows = stream is not None and _runs_on(session, stream.pointer)
        self.binding = session.io_binding()
        self.inputs: dict[str, Any] = {}
        self.outputs: list[Any] = []
        for arg in session.get_inputs():
            value = ort.OrtValue.ortvalue_from_shape_and_type(arg.shape, NUMPY_TYPES[arg.type], device, device_id)
            self.binding.bind_ortvalue_input(arg.name, value)
            self.inputs[arg.name] = value
        for arg in session.get_outputs():
            value = ort.OrtValue.ortvalue_from_shape_and_type(arg.shape, NUMPY_TYPES[arg.type], device, device_id)
            self.binding.bind_ortvalue_output(arg.name, value)
            self.outputs.append(value)

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Host arrays (exactly the session's shapes) in, host arrays out."""
        for name, array in feeds.items():
            value = self.inputs[name]
            value.update_inplace(np.ascontiguousarray(array, dtype=dtype_of(value)))
        return self._run()

    def run_device(self, name: str, pointer: int, shape: tuple[int, ...], copy: DeviceCopy) -> np.ndarray:
        """The first output, of the FP32 input ``name`` of ``shape`` at the device address ``pointer``
        (copied in first, unless it is this session's own input)."""
        value = self.inputs[name]
        if tuple(value.shape()) != tuple(shape) or dtype_of(value) != np.float32:
            raise ValueError(f"input {name!r} is {dtype_of(value)} {tuple(value.shape())} here, not float32 {shape}")
        if pointer != value.data_ptr():  # else written in place (``OnnxRunner.input_buffer``)
            copy(value.data_ptr(), pointer, int(np.prod(shape)) * 4)
        self._replay()
        return self._host(self.outputs[0])

    def launch_device(self, name: str, pointer: int, shape: tuple[int, ...], host: np.ndarray,
                      download: QueuedDownload) -> bool:
        """Queue a run on the FP32 batch at ``pointer`` (this session's own input ``name``, written on
        the stream it follows) and its first output's copy into ``host`` (pinned, of that output's
        shape and type), and return at once: done when the stream gets past them. False, with nothing
        queued, where the session does not follow a caller's stream or ``pointer`` is not its input."""
        value, out = self.inputs.get(name), self.outputs[0]
        if (not self.follows or self.stream is None or value is None or pointer != value.data_ptr()
                or tuple(value.shape()) != tuple(shape) or dtype_of(value) != np.float32
                or host.shape != tuple(out.shape()) or host.dtype != dtype_of(out)):
            return False
        self.session.run_with_iobinding(self.binding, _queued_run())
        download(host.ctypes.data, out.data_ptr(), host.nbytes, self.stream.pointer)
        return True

    def warm_up(self, runs: int) -> None:
        for name, value in self.inputs.items():
            value.update_inplace(np.zeros(value.shape(), dtype_of(value)))
        for _ in range(runs):
            self._run()

    def _run(self) -> list[np.ndarray]:
        self._replay()
        return [self._host(value) for value in self.outputs]

    def _replay(self) -> None:
        self.session.run_with_iobinding(self.binding)
        if self.stream is not None:
            self.stream.synchronize()

    def _host(self, value: Any) -> np.ndarray:
        """A host array of its own (the buffers are reused): ``numpy()`` copies a device buffer and
        views a host one."""
        array = value.numpy()
        return array.copy() if self.device == "cpu" else array


@functools.cache
def _queued_run() -> Any:
    """Run options under which a run returns once its work is queued: onnxruntime leaves the stream
    unsynchronized at the run's end (the caller waits for an event queued after it). The graph's id
    is onnxruntime's default (0, the one captured at warm-up), set so that its Python wrapper finds
    it: it looks the entry up before every run, and a missing one raises (and is caught) inside (28 us
    a run on the CPU machine; roughly 50-85 us of the batcher thread's time per batch in py-spy's
    profile on the H200). 0 is onnxruntime's own default annotation (``kCudaGraphAnnotationDefault``
    in its CUDA graph code; -1 skips the graph)."""
    options = ort.RunOptions()
    options.add_run_config_entry("disable_synchronize_execution_providers", "1")
    options.add_run_config_entry(GRAPH_ID_KEY, "0")
    return options


def _runs_on(session: Any, stream: int) -> bool:
    """Whether onnxruntime reports ``session``'s CUDA provider running on ``stream`` (a session of
    another provider: taken at its word, there is no stream to check)."""
    if "CUDAExecutionProvider" not in session.get_providers():
        return True
    options = session.get_provider_options().get("CUDAExecutionProvider", {})
    try:
        return int(options.get("user_compute_stream", "0")) == stream
    except ValueError:
        return False
