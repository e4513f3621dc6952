"""OnnxRunner's sessions of fixed shapes (what the CUDA backend replays as CUDA graphs), on the CPU."""
from __future__ import annotations

import numpy as np
import pytest

from shim.backends.onnx import OnnxRunner
from shim.backends.onnx_fixed import GRAPH_ID_KEY, FixedSession, _queued_run

CPU = ["CPUExecutionProvider"]


@pytest.fixture(scope="module")
def model(models_dir):
    return models_dir / "efficientnet-lite0" / "model.onnx"


@pytest.fixture(scope="module")
def fixed(model):
    return OnnxRunner(model, CPU, fixed=True, graphs=True)  # graphs: asked for, but not on the CPU


@pytest.fixture(scope="module")
def plain(model):
    return OnnxRunner(model, CPU)


def test_a_batch_axis_makes_fixed_sessions_and_the_cpu_never_graphs(fixed):
    assert fixed.fixed and not fixed.graphs
    assert fixed.inputs[0].shape == (-1, 3, 224, 224)  # the specs keep the free batch axis


@pytest.mark.parametrize("rows", [1, 3, 5, 8])
def test_fixed_sessions_compute_what_the_plain_session_does(fixed, plain, rows):
    x = np.random.default_rng(rows).standard_normal((rows, 3, 224, 224)).astype(np.float32)
    got = fixed.run({"input": x})["logits"]
    want = plain.run({"input": x})["logits"]
    assert got.shape == (rows, 1000)
    assert np.abs(got - want).max() <= 1e-4 * max(1.0, float(np.abs(want).max()))


def test_each_padded_size_has_one_session_of_exactly_that_shape(fixed):
    for rows in (2, 3, 4):  # 3 pads to 4: the session of 4 serves it
        fixed.run({"input": np.zeros((rows, 3, 224, 224), np.float32)})
    sessions = {size: entry[0].session for size, entry in fixed._by_batch.items()}  # noqa: SLF001 - what was built
    assert isinstance(sessions[4], FixedSession) and isinstance(sessions[2], FixedSession)
    assert sessions[4].session.get_inputs()[0].shape == [4, 3, 224, 224]
    assert sessions[4].outputs[0].shape() == [4, 1000]


def test_results_are_copies_the_next_run_does_not_overwrite(fixed, plain):
    rng = np.random.default_rng(9)
    a, b = (rng.standard_normal((2, 3, 224, 224)).astype(np.float32) for _ in range(2))
    first = fixed.run({"input": a})["logits"]
    kept = first.copy()
    second = fixed.run({"input": b})["logits"]
    assert np.array_equal(first, kept)
    assert not np.allclose(first, second)
    assert np.abs(second - plain.run({"input": b})["logits"]).max() <= 1e-4 * float(np.abs(second).max())


def test_inputs_of_another_dtype_are_converted_not_refused(fixed, plain):
    x = np.random.default_rng(3).standard_normal((1, 3, 224, 224))  # float64
    got = fixed.run({"input": x})["logits"]
    want = plain.run({"input": x.astype(np.float32)})["logits"]
    assert np.abs(got - want).max() <= 1e-4 * float(np.abs(want).max())


def _args(*shapes, kind="tensor(float)"):
    from types import SimpleNamespace

    return [SimpleNamespace(shape=list(shape), type=kind) for shape in shapes]


@pytest.mark.parametrize("inputs,outputs,axis", [
    ((["batch", 3, 224, 224],), (["batch", 1000],), "batch"),
    ((["n", 8], ["n", 2]), (["n"],), "n"),
    ((["batch", 3, "height", "width"],), (["batch", 1000],), None),  # another free dimension
    ((["batch", 8],), (["rows", 4],), None),                        # the outputs' axis has another name
    (([1, 8],), ([1, 4],), None),                                   # no free batch axis at all
    (([None, 8],), ([None, 4],), None),                             # a free axis without a name
])
def test_fixed_shapes_need_one_named_batch_axis_and_nothing_else_free(inputs, outputs, axis):
    from types import SimpleNamespace

    from shim.backends.onnx import _batch_axis_name

    session = SimpleNamespace(get_inputs=lambda: _args(*inputs), get_outputs=lambda: _args(*outputs))
    assert _batch_axis_name(session) == axis
    strings = SimpleNamespace(get_inputs=lambda: _args(*inputs, kind="tensor(string)"),
                              get_outputs=lambda: _args(*outputs))
    assert _batch_axis_name(strings) is None  # no fixed buffer for strings: such a model runs as it is


def test_copies_of_each_size_run_side_by_side_and_compute_alike(model, plain):
    """With ``copies`` (a model's instance_count), each padded size has that many sessions of its own,
    each on a thread of its own; concurrent runs go to the least busy copy and every caller gets its
    own rows, the plain session's."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    runner = OnnxRunner(model, CPU, fixed=True, copies=2)
    rng = np.random.default_rng(5)
    xs = [rng.standard_normal((rows, 3, 224, 224)).astype(np.float32) for rows in (1, 2, 2, 1, 2, 1)]
    wants = [plain.run({"input": x})["logits"] for x in xs]
    threads: set[str] = set()
    original = runner._on_gpu  # noqa: SLF001

    def on_gpu(batch, job):
        return original(batch, lambda session: threads.add(threading.current_thread().name) or job(session))

    runner._on_gpu = on_gpu  # noqa: SLF001 - records which copy's thread ran each call
    with ThreadPoolExecutor(6) as pool:
        gots = list(pool.map(lambda x: runner.run({"input": x})["logits"], xs * 4))
    for got, want in zip(gots, wants * 4):
        assert np.abs(got - want).max() <= 1e-4 * max(1.0, float(np.abs(want).max()))
    built = runner._by_batch  # noqa: SLF001
    assert sorted(built) == [1, 2] and all(len(copies) == 2 for copies in built.values())
    assert all(c.busy == 0 for copies in built.values() for c in copies)
    sessions = [c.session.session for copies in built.values() for c in copies]
    assert len({id(s) for s in sessions}) == 4  # a session of its own per copy
    assert any("c1" in name for name in threads) and any("c1" not in name for name in threads), threads


def test_a_copy_that_cannot_be_built_leaves_the_others_serving_and_is_not_tried_again(model, plain, caplog):
    """A second copy of a size's session that fails to build (out of GPU memory, say) is logged; the
    first serves every run of that size, and no later run builds again."""
    runner = OnnxRunner(model, CPU, fixed=True, copies=2)
    original, builds = runner._new_fixed, []  # noqa: SLF001

    def new_fixed(batch, thread, fall_back=True):
        builds.append(batch)
        if len(builds) == 2:
            raise RuntimeError("out of memory for a second copy")
        return original(batch, thread, fall_back)

    runner._new_fixed = new_fixed  # noqa: SLF001
    x = np.random.default_rng(2).standard_normal((1, 3, 224, 224)).astype(np.float32)
    want = plain.run({"input": x})["logits"]
    for _ in range(3):
        got = runner.run({"input": x})["logits"]
        assert np.abs(got - want).max() <= 1e-4 * max(1.0, float(np.abs(want).max()))
    assert builds == [1, 1] and len(runner._by_batch[1]) == 1  # noqa: SLF001
    assert "1 of 2 copies of the session of 1 rows" in caplog.text


def test_a_later_copy_that_cannot_be_captured_is_dropped_and_the_model_keeps_its_graphs(model, caplog):
    """Capturing a second copy's CUDA graph fails (out of memory, say): that copy is not built, and the
    model goes on capturing its other sizes (only a first copy that cannot be captured turns graphs
    off). On the CPU the capture is asked for and its failure faked."""
    runner = OnnxRunner(model, CPU, fixed=True, copies=2)
    runner.graphs = True  # as on the GPU
    original, captures = runner._new_session, []  # noqa: SLF001

    def new_session(batch=None, graph=False, stream=None):
        if graph:
            captures.append(batch)
            if len(captures) == 2:
                raise RuntimeError("CUDA failure 2: out of memory capturing")
        return original(batch, graph, stream)

    runner._new_session = new_session  # noqa: SLF001
    x = np.zeros((1, 3, 224, 224), np.float32)
    runner.run({"input": x})
    assert runner.graphs and len(runner._by_batch[1]) == 1  # noqa: SLF001
    runner.run({"input": np.zeros((2, 3, 224, 224), np.float32)})
    assert captures == [1, 1, 2, 2] and len(runner._by_batch[2]) == 2  # noqa: SLF001
    assert "1 of 2 copies of the session of 1 rows" in caplog.text


def test_a_bound_thread_runs_sessions_of_its_own_itself_and_gets_the_same_rows(model, plain):
    """A batcher's thread binds (``bind_thread``): the sizes it names are built on it at once, later
    sizes on first use, and it runs them itself (no session thread is made); a thread that is not
    bound still runs on the shared sessions, each on its own thread. Both give the plain session's
    rows."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    runner = OnnxRunner(model, CPU, fixed=True)
    rng = np.random.default_rng(12)
    xs = {rows: rng.standard_normal((rows, 3, 224, 224)).astype(np.float32) for rows in (1, 2, 3)}
    wants = {rows: plain.run({"input": x})["logits"] for rows, x in xs.items()}

    def bound_runs() -> tuple[list[int], dict[int, np.ndarray]]:
        runner.bind_thread([1, 2])
        built_at_bind = sorted(runner._local.sessions)  # noqa: SLF001 - what binding built
        return built_at_bind, {rows: runner.run({"input": x})["logits"] for rows, x in xs.items()}

    before = set(threading.enumerate())
    with ThreadPoolExecutor(1, thread_name_prefix="batcher-test") as pool:
        built_at_bind, gots = pool.submit(bound_runs).result()
    assert built_at_bind == [1, 2]
    assert not runner._by_batch  # noqa: SLF001 - no shared session was built
    assert not [t.name for t in set(threading.enumerate()) - before if t.name.startswith("ort-")]
    for rows, got in gots.items():
        assert np.abs(got - wants[rows]).max() <= 1e-4 * max(1.0, float(np.abs(wants[rows]).max()))
    unbound = runner.run({"input": xs[3]})["logits"]  # this thread is not bound: a session thread runs it
    assert sorted(runner._by_batch) == [4]  # noqa: SLF001
    assert np.abs(unbound - wants[3]).max() <= 1e-4 * max(1.0, float(np.abs(wants[3]).max()))
    assert runner.input_buffer("input", 4) is None  # only a bound thread has inputs of its own


def test_a_batch_written_into_the_bound_input_runs_without_a_copy(model, plain):
    """``input_buffer`` gives the bound session's own input: a batch written there runs through
    ``run_device`` with no copy at all; one from anywhere else is copied in first."""
    import ctypes
    from concurrent.futures import ThreadPoolExecutor

    copies: list[int] = []

    def host_copy(dst: int, src: int, nbytes: int) -> None:  # the CPU stand-in for a device copy
        copies.append(nbytes)
        ctypes.memmove(dst, src, nbytes)

    runner = OnnxRunner(model, CPU, fixed=True, device_copy=host_copy)
    x = np.random.default_rng(13).standard_normal((2, 3, 224, 224)).astype(np.float32)
    want = plain.run({"input": x})["logits"]

    def in_place() -> tuple[np.ndarray, np.ndarray]:
        runner.bind_thread([2])
        pointer, shape, stream = runner.input_buffer("input", 2)
        assert shape == (2, 3, 224, 224) and stream is None  # on no stream of the caller's
        ctypes.memmove(pointer, x.ctypes.data, x.nbytes)  # as the GPU resize writes it
        first = runner.run_device("input", pointer, shape)
        assert not copies
        copied = runner.run_device("input", x.ctypes.data, x.shape)  # from elsewhere: copied in
        assert copies == [x.nbytes]
        return first, copied

    with ThreadPoolExecutor(1) as pool:
        first, copied = pool.submit(in_place).result()
    for got in (first, copied):
        assert np.abs(got - want).max() <= 1e-4 * max(1.0, float(np.abs(want).max()))


def test_a_bound_thread_s_sessions_run_on_its_stream_and_wait_for_it_and_a_failed_capture_binds_nothing(model, plain):
    """Bound with a ``ComputeStream`` (a batcher's CUDA stream), a thread's sessions run on it and
    wait for it after each run, the warm-up's runs too (onnxruntime leaves a stream it was given
    unsynchronized), and ``input_buffer`` names it. A capture that fails on the stream fails the
    binding: the thread is not bound at all (the caller drops the stream, which the failed capture
    may have left capturing) and runs the shared sessions. On the CPU the stream is a stand-in and
    the capture's failure is faked."""
    from concurrent.futures import ThreadPoolExecutor

    from shim.backends.onnx import GRAPH_WARMUP_RUNS, ComputeStream

    runner = OnnxRunner(model, CPU, fixed=True)
    runner.graphs = True  # as on the GPU
    original, asked, fail = runner._new_session, [], [False]  # noqa: SLF001

    def new_session(batch=None, graph=False, stream=None):
        asked.append((batch, graph, stream))
        if fail[0] and graph and stream is not None and batch == 2:
            raise RuntimeError("CUDA failure 900: operation not permitted when stream is capturing")
        return original(batch, graph)

    runner._new_session = new_session  # noqa: SLF001
    waits: list[int] = []
    x = np.random.default_rng(14).standard_normal((1, 3, 224, 224)).astype(np.float32)
    want = plain.run({"input": x})["logits"]

    def bound() -> tuple:
        runner.bind_thread([1, 2], ComputeStream(77, lambda: waits.append(1)))
        at_bind = len(waits)
        got = runner.run({"input": x})["logits"]
        return at_bind, len(waits) - at_bind, got, runner.input_buffer("input", 1), runner.input_buffer("input", 2)

    with ThreadPoolExecutor(1) as pool:
        at_bind, per_run, got, one, two = pool.submit(bound).result()
    assert asked == [(1, True, 77), (2, True, 77)]
    assert at_bind == 2 * GRAPH_WARMUP_RUNS and per_run == 1
    assert one.stream == 77 and two.stream == 77 and two.shape == (2, 3, 224, 224)
    assert np.abs(got - want).max() <= 1e-4 * max(1.0, float(np.abs(want).max()))

    fail[0], asked[:] = True, []

    def failing() -> tuple:
        with pytest.raises(RuntimeError, match="capturing"):
            runner.bind_thread([1, 2], ComputeStream(78, lambda: waits.append(2)))
        return runner.input_buffer("input", 1), runner.run({"input": x})["logits"]

    with ThreadPoolExecutor(1) as pool:
        unbound, shared = pool.submit(failing).result()
    assert asked[:2] == [(1, True, 78), (2, True, 78)] and unbound is None
    assert sorted(runner._by_batch) == [1]  # noqa: SLF001 - the run went to a shared session
    assert np.abs(shared - want).max() <= 1e-4 * max(1.0, float(np.abs(want).max()))


@pytest.mark.parametrize("providers,options,follows", [
    (["CUDAExecutionProvider", "CPUExecutionProvider"], {"user_compute_stream": "140737"}, True),
    (["CUDAExecutionProvider", "CPUExecutionProvider"], {"user_compute_stream": "0"}, False),   # ignored
    (["CUDAExecutionProvider", "CPUExecutionProvider"], {}, False),                            # not reported
    (["CUDAExecutionProvider", "CPUExecutionProvider"], {"user_compute_stream": "0x22611"}, False),  # unreadable
    (["CPUExecutionProvider"], {}, True),                                                      # no stream to check
])
def test_a_session_follows_its_callers_stream_only_where_onnxruntime_reports_it(providers, options, follows):
    """``FixedSession.follows`` (a bound thread's work before a run then needs no wait) comes from what
    onnxruntime reports of its CUDA provider, the decimal address of the stream it was given: anything
    else (not reported, another stream, unreadable) is not following, and the caller waits."""
    from types import SimpleNamespace

    from shim.backends.onnx import ComputeStream

    reported = {"CUDAExecutionProvider": options, "CPUExecutionProvider": {}}
    session = SimpleNamespace(get_providers=lambda: providers, get_provider_options=lambda: reported,
                              io_binding=lambda: SimpleNamespace(), get_inputs=lambda: [], get_outputs=lambda: [])
    fixed = FixedSession(session, "cuda", 0, ComputeStream(140737, lambda: None))
    assert fixed.follows is follows
    assert FixedSession(session, "cuda", 0).follows is False  # no stream given: nothing to follow


def test_queued_runs_name_the_default_graph_and_compute_what_plain_runs_do(fixed, plain):
    """A queued run names graph 0 (the default, captured at warm-up): onnxruntime's wrapper looks the
    entry up before each run, and looking up a missing one raises inside it (tens of us a run)."""
    assert _queued_run().get_run_config_entry(GRAPH_ID_KEY) == "0"
    fixed.run({"input": np.zeros((2, 3, 224, 224), np.float32)})  # its session of 2 rows built
    session = fixed._by_batch[2][0].session  # noqa: SLF001 - that session
    x = np.random.default_rng(5).standard_normal((2, 3, 224, 224)).astype(np.float32)
    session.inputs["input"].update_inplace(x)
    session.session.run_with_iobinding(session.binding, _queued_run())
    got = session.outputs[0].numpy()
    want = plain.run({"input": x})["logits"]
    assert np.abs(got - want).max() <= 1e-4 * max(1.0, float(np.abs(want).max()))
