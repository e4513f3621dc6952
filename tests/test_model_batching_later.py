"""A request worker's raw model: its runner goes over the link and answers in Futures (``run_later``),
so the worker's batcher starts each batch and goes on, answering it as the device process replies;
and ``gathered``, which waits for a batch's groups."""
from __future__ import annotations

import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Callable, Iterator

import numpy as np
import pytest

from shim.backends.cpu import CpuBackend
from shim.batching import BatchingFactory
from shim.futures import gathered
from shim.modelrepo import ModelRepository
from shim.ops.model import ModelOp
from shim.workers.link import LinkClient, LinkServer
from shim.workers.remote import RemoteBackend

MODEL = "efficientnet-lite0"


def test_gathered_gives_the_results_in_order_once_the_last_is_set_whichever_thread_sets_it():
    futures: list[Future] = [Future() for _ in range(3)]
    out = gathered(futures)
    futures[2].set_result("c")
    futures[0].set_result("a")
    assert not out.done()
    setter = threading.Thread(target=futures[1].set_result, args=("b",))
    setter.start()
    setter.join()
    assert out.result(1) == ["a", "b", "c"]
    assert gathered([]).result(0) == []


def test_gathered_fails_with_the_first_error_in_order_only_once_all_are_done():
    futures: list[Future] = [Future() for _ in range(3)]
    out = gathered(futures)
    futures[2].set_exception(KeyError("late"))
    futures[1].set_exception(ValueError("first in order"))
    assert not out.done()  # the first still runs: its caller's memory is still in use
    futures[0].set_result(1)
    with pytest.raises(ValueError, match="first in order"):
        out.result(1)


def test_gathered_fails_with_a_cancelled_one_rather_than_never_ending():
    from concurrent.futures import CancelledError

    futures: list[Future] = [Future(), Future()]
    out = gathered(futures)
    futures[0].cancel()
    futures[1].set_result(2)
    with pytest.raises(CancelledError):
        out.result(1)


@contextmanager
def worker_model(models_dir, tmp_path, device_call: Callable[[dict], None],
                 in_flight: int) -> Iterator[tuple[ModelOp, object, str]]:
    """A request worker's ModelOp of the real model, over a real link to a device side that runs the
    model on the CPU (``device_call(feeds)`` first, on the device's thread: it may wait or refuse),
    with ``in_flight`` batches on their way at most. Yields the op, the device's runner and the
    input's name."""
    config = ModelRepository(models_dir).load(MODEL)
    runner = CpuBackend().load_model(config.onnx)

    def run_model(model: str, feeds: dict) -> dict:
        device_call(feeds)
        return runner.run(feeds)

    handlers = {"model_specs": lambda model: (runner.inputs, runner.outputs, "cpu"), "run_model_later": run_model}
    key = os.urandom(16)
    server = LinkServer(str(tmp_path / "link.sock"), key, handlers, threads=8)
    link = LinkClient(server.address, key)
    op = ModelOp(RemoteBackend(link, "cpu", {}), config, max_batch=32,
                 batching=BatchingFactory(concurrency=in_flight))
    try:
        op.load()
        yield op, runner, runner.inputs[0].name
    finally:
        op.close()
        link.close()
        server.close()


def _alone(runner, name: str, x: np.ndarray, got: dict) -> None:
    """``got`` is what the model gives ``x`` run alone."""
    want = runner.run({name: x})
    assert set(got) == set(want)
    for output, value in want.items():
        assert got[output].shape == value.shape
        np.testing.assert_allclose(got[output], value, rtol=1e-4, atol=1e-4)


def test_a_workers_raw_model_starts_its_batches_and_answers_them_as_the_device_replies(models_dir, tmp_path):
    """The worker's op has one batcher thread, yet several batches on their way to the device at
    once while it holds the replies; once it answers, each of 10 requests of 1-3 rows gets the rows
    the model gives its own inputs alone."""
    release, started = threading.Event(), []

    def hold(feeds: dict) -> None:
        started.append(len(next(iter(feeds.values()))))
        release.wait(30)

    before = set(threading.enumerate())  # (other tests' services may have batchers of this model running)
    rng = np.random.default_rng(5)
    sizes = [1, 2, 1, 3, 1, 2, 1, 1, 3, 1]
    inputs = [rng.standard_normal((n, 3, 224, 224), dtype=np.float32) for n in sizes]
    try:
        with worker_model(models_dir, tmp_path, hold, in_flight=4) as (op, runner, name), \
                ThreadPoolExecutor(len(sizes)) as pool:
            calls = []
            for x in inputs:  # one after another, so that batches start while others wait for replies
                calls.append(pool.submit(op.run, {name: x}, {}))
                time.sleep(0.01)
            deadline = time.monotonic() + 10
            while len(started) < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            batchers = [t for t in set(threading.enumerate()) - before if t.name.startswith(f"batcher-{MODEL}")]
            on_their_way = len(started)
            release.set()
            results = [call.result(60) for call in calls]
            assert on_their_way >= 2, "the batcher waited for a reply before it started the next batch"
            assert len(batchers) == 1, [t.name for t in batchers]
            assert sum(started) >= sum(sizes)
            for x, got in zip(inputs, results):
                _alone(runner, name, x, got)
    finally:
        release.set()


def test_a_workers_batch_of_requests_that_do_not_agree_and_one_the_device_refuses(models_dir, tmp_path):
    """Requests of two dtypes in one of the worker's batches make two device calls, started together;
    the device refuses the float64 one (as its op checks a model's input types): the batch fails as
    a whole once both are back, and each request runs again alone, so that the refused request gets
    its error and the others their own rows."""
    from accel.errors import InvalidInput

    release, calls = threading.Event(), []

    def hold_and_check(feeds: dict) -> None:
        x = next(iter(feeds.values()))
        calls.append((x.dtype.str, len(x)))
        release.wait(30)
        if x.dtype != np.float32:
            raise InvalidInput(f"FP32 expected, got {x.dtype}")

    rng = np.random.default_rng(9)
    blocker = rng.standard_normal((1, 3, 224, 224), dtype=np.float32)
    inputs = [rng.standard_normal((n, 3, 224, 224), dtype=np.float32) for n in (2, 1)]
    bad = rng.standard_normal((1, 3, 224, 224))  # float64
    try:
        with worker_model(models_dir, tmp_path, hold_and_check, in_flight=1) as (op, runner, name), \
                ThreadPoolExecutor(4) as pool:
            first = pool.submit(op.run, {name: blocker}, {})  # the one call allowed on its way: the rest gather
            deadline = time.monotonic() + 10
            while not calls and time.monotonic() < deadline:
                time.sleep(0.01)
            queued = [pool.submit(op.run, {name: x}, {}) for x in (inputs[0], bad, inputs[1])]
            time.sleep(0.5)  # all three queued behind the call on its way: one batch once it is back
            release.set()
            first.result(60)
            good = [queued[0].result(60), queued[2].result(60)]
            with pytest.raises(InvalidInput, match="FP32 expected"):
                queued[1].result(60)
            assert ("<f4", 3) in calls and ("<f8", 1) in calls, calls  # the batch: two calls, one per dtype
            for x, got in zip(inputs, good):
                _alone(runner, name, x, got)
    finally:
        release.set()


def test_the_device_process_queues_a_workers_raw_model_call_holding_no_thread(service):
    """The device side of ``run_model_later`` (a Deferred, run on the link's reader thread): a call
    goes into the model's batcher and its Future comes back at once, no thread started for it,
    while its batch is held; once it runs, each gets the rows the model gives its input alone and
    no call is counted in flight any more; an input over the request limit is refused at once."""
    from accel.errors import InvalidInput
    from shim.workers.device import DeviceEndpoint
    from shim.workers.link import Deferred

    endpoint = DeviceEndpoint(service, workers=0)
    handler = endpoint.handlers()["run_model_later"]
    assert isinstance(handler, Deferred)
    op = service.registry.get(MODEL)
    batcher = op._batcher  # noqa: SLF001
    run_batch, release = batcher._run_batch, threading.Event()  # noqa: SLF001

    def held(items):
        release.wait(30)
        return run_batch(items)

    inflight = service.metrics.inflight._value.get()  # noqa: SLF001
    rng = np.random.default_rng(13)
    inputs = [rng.standard_normal((n, 3, 224, 224), dtype=np.float32) for n in (1, 2, 1, 3, 1, 1, 2, 1)]
    batcher._run_batch = held  # noqa: SLF001 - the batches wait until the calls have all come back
    try:
        futures = [handler.fn(MODEL, {"input": x}) for x in inputs]
        assert not any(f.done() for f in futures), "a call ran before its Future came back"
        assert not endpoint._early._threads, "a call was handed to a thread"  # noqa: SLF001
        with pytest.raises(InvalidInput, match="over the limit"):
            handler.fn(MODEL, {"input": np.zeros((10_000, 3, 1, 1), np.float32)})
    finally:
        release.set()
        batcher._run_batch = run_batch  # noqa: SLF001
    for x, future in zip(inputs, futures):
        got = future.result(60)
        for output, value in op._runner.run({"input": x}).items():  # noqa: SLF001 - the model alone
            np.testing.assert_allclose(got[output], value, rtol=1e-4, atol=1e-4)
    deadline = time.monotonic() + 10  # (counted down in a callback after each result is set)
    while service.metrics.inflight._value.get() != inflight and time.monotonic() < deadline:  # noqa: SLF001
        time.sleep(0.01)
    assert service.metrics.inflight._value.get() == inflight  # noqa: SLF001
