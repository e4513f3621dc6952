"""ONNX models through onnxruntime (CPU provider here; the CUDA backend passes its provider)."""
from __future__ import annotations

import functools
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence, TypeVar

import numpy as np
try:
    import onnxruntime as ort
except ModuleNotFoundError as exc:  # an install with neither extra (a dependency of it missing: as it is)
    if exc.name != "onnxruntime":
        raise
    raise ModuleNotFoundError("onnxruntime is not installed: install accelshim[cpu], or accelshim[cuda] "
                              "on a GPU host (onnxruntime-gpu)", name="onnxruntime") from exc

from accel.datatypes import FIXED

from ..padding import padded_batch
from .base import TensorSpec

__all__ = ["BoundInput", "ComputeStream", "FixedSession", "OnnxRunner", "QueuedDownload", "first_line", "padded_batch",
           "version", "has_cuda_provider"]

T = TypeVar("T")
log = logging.getLogger(__name__)
#: copies ``nbytes`` from one device address to another, on the calling thread, done when it returns
DeviceCopy = Callable[[int, int, int], None]
#: queues a copy of ``nbytes`` from a device address to a (pinned) host address on a stream:
#: (host, device, nbytes, stream)
QueuedDownload = Callable[[int, int, int, int], None]
GRAPH_ID_KEY = "gpu_graph_id"  # the run option naming the CUDA graph a run replays
GRAPH_WARMUP_RUNS = 3  # onnxruntime captures the CUDA graph in the first runs: before any request

_ORT_TYPES = {
    "tensor(float)": "FP32", "tensor(double)": "FP64", "tensor(float16)": "FP16",
    "tensor(int8)": "INT8", "tensor(int16)": "INT16", "tensor(int32)": "INT32", "tensor(int64)": "INT64",
    "tensor(uint8)": "UINT8", "tensor(uint16)": "UINT16", "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64", "tensor(bool)": "BOOL", "tensor(string)": "BYTES",
}


class ComputeStream(NamedTuple):
    """A CUDA stream that a thread queues its work on, for its sessions to run on too (the model then
    follows that work with no wait on the host between): its address, and how to wait for it."""

    pointer: int
    synchronize: Callable[[], None]


class BoundInput(NamedTuple):
    """A bound thread's session input (``OnnxRunner.input_buffer``): its device address and shape,
    and the stream (address) the session runs on, as onnxruntime reports it, None for a stream of
    its own."""

    pointer: int
    shape: tuple[int, ...]
    stream: int | None


def _spec(arg: Any) -> TensorSpec:
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in arg.shape)
    return TensorSpec(arg.name, _ORT_TYPES.get(arg.type), shape)


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
            value = ort.OrtValue.ortvalue_from_shape_and_type(arg.shape, _NUMPY[arg.type], device, device_id)
            self.binding.bind_ortvalue_input(arg.name, value)
            self.inputs[arg.name] = value
        for arg in session.get_outputs():
            value = ort.OrtValue.ortvalue_from_shape_and_type(arg.shape, _NUMPY[arg.type], device, device_id)
            self.binding.bind_ortvalue_output(arg.name, value)
            self.outputs.append(value)

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Host arrays (exactly the session's shapes) in, host arrays out."""
        for name, array in feeds.items():
            value = self.inputs[name]
            value.update_inplace(np.ascontiguousarray(array, dtype=_dtype(value)))
        return self._run()

    def run_device(self, name: str, pointer: int, shape: tuple[int, ...], copy: DeviceCopy) -> np.ndarray:
        """The first output, of the FP32 input ``name`` of ``shape`` at the device address ``pointer``
        (copied in first, unless it is this session's own input)."""
        value = self.inputs[name]
        if tuple(value.shape()) != tuple(shape) or _dtype(value) != np.float32:
            raise ValueError(f"input {name!r} is {_dtype(value)} {tuple(value.shape())} here, not float32 {shape}")
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
                or tuple(value.shape()) != tuple(shape) or _dtype(value) != np.float32
                or host.shape != tuple(out.shape()) or host.dtype != _dtype(out)):
            return False
        self.session.run_with_iobinding(self.binding, _queued_run())
        download(host.ctypes.data, out.data_ptr(), host.nbytes, self.stream.pointer)
        return True

    def warm_up(self, runs: int) -> None:
        for name, value in self.inputs.items():
            value.update_inplace(np.zeros(value.shape(), _dtype(value)))
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


#: onnxruntime element type -> numpy scalar type, for the fixed-size ones (what a fixed buffer can hold)
_NUMPY = {ort_type: np.dtype(FIXED[datatype][2]).type for ort_type, datatype in _ORT_TYPES.items()
          if datatype in FIXED}


@functools.cache
def _queued_run() -> Any:
    """Run options under which a run returns once its work is queued: onnxruntime leaves the stream
    unsynchronized at the run's end (the caller waits for an event queued after it). The graph's id
    is onnxruntime's default (0, the one captured at warm-up), set so that its Python wrapper finds
    it: it looks the entry up before every run, and a missing one raises (and is caught) inside (28 us
    a run on the CPU machine; roughly 50-85 us of the batcher thread's time per batch in py-spy's
    profile on the H200). onnxruntime's run option keys say 0 is reserved for its own use: it means
    the default graph today (the GPU tests would catch a release that refuses it)."""
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


def _dtype(value: Any) -> np.dtype:
    return np.dtype(_NUMPY[value.data_type()])


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message, at most 200 characters (onnxruntime's run on)."""
    return (str(exc).splitlines() or [""])[0][:200]


class _Copy:
    """One copy of a batch size's session: its own buffers, CUDA graph and thread (onnxruntime keeps a
    captured graph with the thread's CUDA state); ``busy`` counts the runs handed to it."""

    __slots__ = ("session", "thread", "busy")

    def __init__(self, session: Any, thread: ThreadPoolExecutor) -> None:
        self.session, self.thread, self.busy = session, thread, 0


class OnnxRunner:
    """An onnxruntime session, thread-safe, with its inputs and outputs as protocol specs.

    On the CUDA provider a session re-plans every convolution (cuDNN) whenever its input shape
    changes, which costs most of a second, so each batch size gets a session of its own, run by a
    thread of its own (cuDNN state is per thread too): batches are padded to one of a few sizes
    (``padded_batch``), so a model has a handful of sessions, each warmed up at start and never
    seeing another shape.

    With ``fixed`` (and a model whose only free dimension is a named batch axis), each batch size's
    session is built for exactly that size and bound to fixed buffers (``FixedSession``), ``copies``
    times (a model's instance_count: as many batches of one size run side by side, each on a copy
    of its own with its own thread; a copy that cannot be built leaves the others serving); with
    ``graphs`` too, onnxruntime's CUDA provider captures the whole model as one CUDA graph and
    replays it: one launch instead of one per node, which is most of a small batch's time. A model
    that cannot be captured (a node off the GPU, say) runs without graphs, logged. A capture holds
    ``capture_lock`` (the backend's, which pinning host memory takes too: see ``PinnedRanges``).

    A thread that runs batches all the time (a batcher's) can instead ``bind_thread``: it gets fixed
    sessions of its own, built and captured on it, and runs them itself, with no hand-over to a
    session's thread and back; ``input_buffer`` lets it write a batch straight into their inputs.
    """

    def __init__(self, path: Path, providers: Sequence[Any], threads: int = 0, device_id: int = 0, *,
                 fixed: bool = False, graphs: bool = False, device_copy: DeviceCopy | None = None,
                 copies: int = 1, capture_lock: threading.Lock | None = None) -> None:
        self._path, self._providers, self.device_id = Path(path), list(providers), device_id
        self._threads = threads
        self.session = self._new_session()
        self.inputs = [_spec(i) for i in self.session.get_inputs()]
        self.outputs = [_spec(o) for o in self.session.get_outputs()]
        self.providers = self.session.get_providers()
        self.device = "cuda" if "CUDAExecutionProvider" in self.providers else "cpu"
        self._names = [o.name for o in self.outputs]
        self._batched = bool(self.inputs) and all(s.shape and s.shape[0] == -1 for s in self.inputs)
        self._batch_axis = _batch_axis_name(self.session) if fixed and self._batched else None
        self.graphs = graphs and self.device == "cuda" and self._batch_axis is not None
        self._device_copy = device_copy
        self.copies = max(1, copies) if self.fixed else 1
        self._by_batch: dict[int, list[_Copy]] = {}
        self._lock = threading.Lock()
        self._building = threading.Lock()
        self._capture_lock = capture_lock or threading.Lock()
        self._local = threading.local()  # ``sessions``: a bound thread's own, by batch size

    @property
    def fixed(self) -> bool:
        """Whether each batch size runs on a session of fixed shapes and buffers."""
        return self._batch_axis is not None

    def _new_session(self, batch: int | None = None, graph: bool = False, stream: int | None = None) -> Any:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self._threads:
            options.intra_op_num_threads = self._threads
        options.log_severity_level = 3
        providers = self._providers
        if batch is not None:
            options.add_free_dimension_override_by_name(self._batch_axis, batch)
        extra = {**({"enable_cuda_graph": "1"} if graph else {}),
                 **({"user_compute_stream": str(stream)} if stream is not None else {})}
        if extra:
            providers = [(p[0], {**p[1], **extra}) if isinstance(p, tuple) and p[0] == "CUDAExecutionProvider"
                         else p for p in providers]
        return ort.InferenceSession(str(self._path), sess_options=options, providers=providers)

    def _session_for(self, batch: int) -> list[_Copy]:
        """The copies of the session of ``batch`` rows (built, with their threads, on first use)."""
        with self._lock:
            entry = self._by_batch.get(batch)
            if entry is None and (batch == 0 or not (self._by_batch or self.fixed)):  # the session made at load
                entry = self._by_batch[batch] = [_Copy(self.session, self._new_thread(batch))]
        if entry is not None:
            return entry
        with self._building:  # seconds, outside the lock: requests of other sizes go on; one build at a time
            with self._lock:
                entry = self._by_batch.get(batch)
            if entry is not None:  # built meanwhile by another request
                return entry
            built: list[_Copy] = []
            for i in range(self.copies):
                thread = self._new_thread(batch, i)
                try:
                    # a later copy that cannot be captured is not built at all: graphs stay on for
                    # the model (its first copies have theirs)
                    session = (self._new_fixed(batch, thread, fall_back=not built) if self.fixed
                               else self._new_session())
                except BaseException as exc:
                    thread.shutdown(wait=False)
                    if built and isinstance(exc, Exception):
                        # the copies that were built serve (out of GPU memory for another, say): no
                        # request of this size pays for a failed build again
                        log.warning("%s: %d of %d copies of the session of %d rows (%s: %s)", self._path.parent.name,
                                    len(built), self.copies, batch, type(exc).__name__, first_line(exc))
                        break
                    for copy in built:
                        copy.thread.shutdown(wait=False)
                    raise
                built.append(_Copy(session, thread))
            with self._lock:
                return self._by_batch.setdefault(batch, built)

    def _new_fixed(self, batch: int, thread: ThreadPoolExecutor | None, fall_back: bool = True,
                   stream: ComputeStream | None = None) -> FixedSession:
        """The fixed session of ``batch`` rows (on ``stream`` when given), its graph captured (on
        ``thread``, which will run it; None: the calling thread) where it can be; where it cannot,
        with ``fall_back`` and no ``stream`` the model runs node by node from now on (logged), else
        the capture's error is raised (a caller's stream that a failed capture may have left
        capturing is the caller's to drop)."""
        pointer = None if stream is None else stream.pointer

        def on_its_thread(job: Callable[[], None]) -> None:
            if thread is None:
                job()
            else:
                thread.submit(job).result()

        if self.graphs:
            try:
                fixed = FixedSession(self._new_session(batch, graph=True, stream=pointer), self.device,
                                     self.device_id, stream)
                with self._capture_lock:  # no pin on another thread may break the capture
                    on_its_thread(lambda: fixed.warm_up(GRAPH_WARMUP_RUNS))
                return fixed
            except Exception as exc:  # noqa: BLE001 - onnxruntime's own error types; the model still runs
                if not fall_back or stream is not None:
                    raise
                self.graphs = False
                log.warning("%s: no CUDA graph (%s: %s); it runs node by node", self._path.parent.name,
                            type(exc).__name__, first_line(exc))
        fixed = FixedSession(self._new_session(batch, stream=pointer), self.device, self.device_id, stream)
        on_its_thread(lambda: fixed.warm_up(1))
        return fixed

    def bind_thread(self, sizes: Sequence[int] = (), stream: ComputeStream | None = None) -> None:
        """The calling thread (a batcher's, at its start) runs this model's batches itself from now
        on, on fixed sessions of its own (onnxruntime keeps a captured graph with the thread that
        captured it), on the thread's ``stream`` when given (CUDA): those of ``sizes`` built and
        captured here and now, any other size on first use. A runner without fixed sessions has none
        to bind.

        Raises:
            Exception: what building or capturing a session raised; the thread is then not bound.
        """
        if not self.fixed:
            return
        sessions: dict[int, FixedSession] = {}
        with self._building:  # one build, and so one capture, at a time
            for size in sizes:
                sessions[size] = self._new_fixed(size, None, stream=stream)
        self._local.sessions, self._local.stream = sessions, stream

    def _bound(self, batch: int) -> FixedSession | None:
        """The calling thread's own session of ``batch`` rows (built now if need be), or None when
        the thread is not bound."""
        sessions: dict[int, FixedSession] | None = getattr(self._local, "sessions", None)
        if sessions is None or batch < 1:  # 0: an unbatched run, on the session made at load
            return None
        session = sessions.get(batch)
        if session is None:
            with self._building:  # one build, and so one capture, at a time
                session = sessions[batch] = self._new_fixed(batch, None, stream=self._local.stream)
        return session

    def input_buffer(self, name: str, batch: int) -> BoundInput | None:
        """Where the calling thread's own session of ``batch`` rows takes its FP32 input ``name`` on
        the device, or None (a thread not bound, another type): a batch written there runs with
        ``run_device`` given that address, copied nowhere; on the stream it names, the batch's
        writes need no wait before the run."""
        session = self._bound(batch)
        value = None if session is None else session.inputs.get(name)
        if value is None or _dtype(value) != np.float32:
            return None
        return BoundInput(value.data_ptr(), tuple(value.shape()), session.stream.pointer if session.follows else None)

    def launch_device(self, name: str, pointer: int, shape: tuple[int, ...], host: np.ndarray,
                      download: QueuedDownload) -> bool:
        """``FixedSession.launch_device`` on the calling thread's own session of ``shape[0]`` rows (the
        batch written at ``input_buffer``'s address): the run and the first output's download into
        ``host`` queued on the thread's stream; False, nothing queued, where that cannot be."""
        session = self._bound(shape[0])
        return session is not None and session.launch_device(name, pointer, shape, host, download)

    def _new_thread(self, batch: int, copy: int = 0) -> ThreadPoolExecutor:
        suffix = f"c{copy}" if copy else ""
        return ThreadPoolExecutor(1, thread_name_prefix=f"ort-{self._path.parent.name}-{batch}{suffix}")

    def _on_gpu(self, batch: int, job: Callable[[Any], T]) -> T:
        """``job(session)`` with the calling thread's own session of ``batch`` rows, on it (a bound
        thread), else with a copy of the session (the least busy), on that copy's thread."""
        bound = self._bound(batch)
        if bound is not None:
            return job(bound)
        copies = self._session_for(batch)
        if len(copies) == 1:
            return copies[0].thread.submit(job, copies[0].session).result()
        with self._lock:
            copy = min(copies, key=lambda c: c.busy)
            copy.busy += 1
        try:
            return copy.thread.submit(job, copy.session).result()
        finally:
            with self._lock:
                copy.busy -= 1

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Host arrays in and out; on the CUDA provider through I/O binding (one copy each way), the
        batch padded (``padded_batch``; with ``fixed``, on the CPU too)."""
        rows = {a.shape[0] for a in feeds.values() if a.ndim}
        batched = self._batched and len(rows) == 1
        if self.device != "cuda" and not (self.fixed and batched):
            return dict(zip(self._names, self.session.run(self._names, feeds)))
        batch = rows.pop() if batched else 0
        # the session to use: 0 rows, that of 1; unbatched, that of 1 or, when fixed, the one made at load
        size = padded_batch(batch) if batched else (0 if self.fixed else 1)
        pad = size - batch if batched else 0
        if pad:
            feeds = {name: np.concatenate([a, np.zeros((pad, *a.shape[1:]), a.dtype)]) for name, a in feeds.items()}

        def run(session: Any) -> list[np.ndarray]:
            if isinstance(session, FixedSession):
                return session.run(feeds)
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
        """Run on an FP32 input already on the GPU (no host round trip; its batch a padded size, its
        producer synchronized, or queued on the stream the session follows: ``input_buffer``); the
        first output, on the host."""
        def run(session: Any) -> np.ndarray:
            if isinstance(session, FixedSession):
                assert self._device_copy is not None, "a fixed CUDA runner needs its device_copy"
                return session.run_device(name, pointer, shape, self._device_copy)
            binding = session.io_binding()
            binding.bind_input(name, "cuda", device_id, np.float32, list(shape), pointer)
            binding.bind_output(self._names[0], "cuda", device_id)
            session.run_with_iobinding(binding)
            return binding.copy_outputs_to_cpu()[0]

        return self._on_gpu(shape[0], run)


def _batch_axis_name(session: Any) -> str | None:
    """The name of the batch axis when it is every input's only free dimension (and the outputs'
    other dimensions are fixed, and every tensor has a fixed-size element type), else None: what a
    session of fixed shapes needs."""
    names = set()
    for arg in [*session.get_inputs(), *session.get_outputs()]:
        first, rest = arg.shape[0] if arg.shape else None, arg.shape[1:]
        if not isinstance(first, str) or not all(isinstance(d, int) and d >= 0 for d in rest):
            return None
        if getattr(arg, "type", None) not in _NUMPY:  # strings, maps, sequences: no fixed buffer for them
            return None
        names.add(first)
    return names.pop() if len(names) == 1 else None


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
