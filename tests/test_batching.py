"""Dynamic batching: requests coalesce, each caller gets its own rows, one failure stays its own."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Histogram

from shim.batching import BATCH_BUCKETS, Batcher


def _doubler(calls: list[list[int]]):
    def run(items):
        calls.append([len(i) for i in items])
        return [np.asarray(i) * 2 for i in items]
    return run


def test_concurrent_requests_share_runs_and_get_their_own_rows():
    calls: list[list[int]] = []
    sizes = Histogram("b", "b", ["op"], buckets=BATCH_BUCKETS, registry=CollectorRegistry())
    batcher = Batcher("m", _doubler(calls), max_batch_size=32, max_queue_delay_us=200_000, batch_sizes=sizes)
    gate = threading.Barrier(24)

    def call(i: int) -> np.ndarray:
        with batcher.incoming() as submit:
            gate.wait()          # all 24 are "decoding" at once
            rows = list(range(i, i + 1 + i % 3))
            return submit(rows, len(rows))

    try:
        with ThreadPoolExecutor(24) as pool:
            results = list(pool.map(call, range(24)))
    finally:
        batcher.close()
    for i, out in enumerate(results):
        assert out.tolist() == [2 * r for r in range(i, i + 1 + i % 3)]
    assert len(calls) < 24 and all(sum(c) <= 32 for c in calls)  # coalesced, never over the size
    assert sum(len(c) for c in calls) == 24
    count = sizes.labels("m")._sum.get()  # rows observed == rows submitted
    assert count == sum(1 + i % 3 for i in range(24))


def test_a_lone_request_does_not_wait_for_the_delay():
    batcher = Batcher("m", _doubler([]), max_batch_size=32, max_queue_delay_us=30_000_000)
    try:
        start = time.monotonic()
        with batcher.incoming() as submit:
            assert submit([1, 2], 2).tolist() == [2, 4]
        assert time.monotonic() - start < 10  # nobody else was coming: no 30 s wait
    finally:
        batcher.close()


def test_a_request_larger_than_the_batch_runs_alone():
    calls: list[list[int]] = []
    batcher = Batcher("m", _doubler(calls), max_batch_size=4, max_queue_delay_us=0)
    try:
        assert batcher.submit(list(range(10)), 10).tolist() == [2 * r for r in range(10)]
    finally:
        batcher.close()
    assert calls == [[10]]


def test_a_failing_item_fails_only_its_own_request():
    def run(items):
        if any(i == "poison" for i in items):
            raise ValueError("poisoned")
        return [i.upper() for i in items]

    batcher = Batcher("m", run, max_batch_size=8, max_queue_delay_us=100_000)
    gate = threading.Barrier(6)

    def call(item: str):
        with batcher.incoming() as submit:
            gate.wait()
            try:
                return submit(item, 1)
            except ValueError as exc:
                return exc

    try:
        with ThreadPoolExecutor(6) as pool:
            results = list(pool.map(call, ["a", "b", "poison", "c", "d", "e"]))
    finally:
        batcher.close()
    assert results[:2] == ["A", "B"] and results[3:] == ["C", "D", "E"]
    assert isinstance(results[2], ValueError)


def test_bad_configuration_is_refused():
    with pytest.raises(ValueError, match="max_batch_size"):
        Batcher("m", _doubler([]), max_batch_size=0, max_queue_delay_us=10)
    with pytest.raises(ValueError, match="instance_count"):
        Batcher("m", _doubler([]), max_batch_size=4, max_queue_delay_us=10, concurrency=0)


@pytest.mark.parametrize("concurrency", [1, 2])
def test_instances_run_batches_at_once(concurrency):
    """With two instances a second batch runs while the first is still on the device; with one
    it waits for it."""
    both = threading.Barrier(2, timeout=2)
    overlapped: list[bool] = []

    def run(items):
        try:
            both.wait()
            overlapped.append(True)
        except threading.BrokenBarrierError:
            overlapped.append(False)
        return [[2 * x for x in item] for item in items]

    batcher = Batcher("m", run, max_batch_size=1, max_queue_delay_us=0, concurrency=concurrency)
    try:
        with ThreadPoolExecutor(2) as pool:
            results = list(pool.map(lambda i: batcher.submit([i], 1), [3, 4]))
    finally:
        batcher.close()
    assert results == [[6], [8]]
    assert overlapped == ([True, True] if concurrency == 2 else [False, False])


def test_instance_count_comes_from_model_json(tmp_path, models_dir):
    import json
    import shutil

    from shim.modelrepo import ModelRepository

    folder = tmp_path / "efficientnet-lite0"
    shutil.copytree(models_dir / "efficientnet-lite0", folder)
    config = ModelRepository(tmp_path).load("efficientnet-lite0")
    assert config.instances() == 1  # the default, on any device
    meta = json.loads((folder / "model.json").read_text())
    meta["instance_count"] = 3
    (folder / "model.json").write_text(json.dumps(meta))
    config = ModelRepository(tmp_path).load("efficientnet-lite0")
    assert config.instances() == 3


def test_instances_do_not_split_a_batch_that_is_gathering():
    calls: list[list[int]] = []
    batcher = Batcher("m", _doubler(calls), max_batch_size=32, max_queue_delay_us=5_000_000, concurrency=3)
    gate = threading.Barrier(8)

    def call(i: int) -> np.ndarray:
        with batcher.incoming() as submit:
            gate.wait()  # all 8 announced before the first submits: one gatherer takes them all
            return submit([i], 1)

    try:
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(call, range(8)))
    finally:
        batcher.close()
    assert [r.tolist() for r in results] == [[2 * i] for i in range(8)]
    assert calls == [[1] * 8]  # one run of all eight requests


def test_classify_under_64_concurrent_callers_with_mixed_batch_sizes(service, chelsea, coffee):
    """The CPU twin of the GPU batching test: through the service's batcher, every caller gets the
    classes of its own images, in its own order."""
    from accel.tensor import Tensor
    from shim.ops.classify import ClassifyOp
    from tests.conftest import encode

    op = service.registry.get("classify")
    assert isinstance(op, ClassifyOp) and op.metadata()["dynamic_batching"]["enabled"]
    cat, cup = encode(chelsea, "JPEG"), encode(coffee, "PNG")
    alone = {name: op.run({"image": np.array([img], dtype=object)}, {"top_k": 3})
             for name, img in (("cat", cat), ("cup", cup))}
    rng = np.random.default_rng(3)
    plans = [[("cat", "cup")[j] for j in rng.integers(0, 2, rng.integers(1, 5))] for _ in range(64)]

    def call(plan):
        images = [cat if n == "cat" else cup for n in plan]
        out = service.dispatcher.infer("classify", _request(Tensor, images))
        return {t.name: t for t in out.outputs}

    before = _batch_runs(service)
    with ThreadPoolExecutor(64) as pool:
        results = list(pool.map(call, plans))
    for plan, out in zip(plans, results):
        classes = out["classes"].numpy()
        scores = out["scores"].numpy()
        assert classes.shape == (len(plan), 3)
        for row, name in enumerate(plan):
            assert classes[row].tolist() == alone[name]["classes"][0].tolist()
            np.testing.assert_allclose(scores[row], alone[name]["scores"][0], rtol=1e-4, atol=1e-5)
    runs, rows = (a - b for a, b in zip(_batch_runs(service), before))
    assert rows == sum(len(p) for p in plans) and runs < 64  # requests shared device runs


def _request(Tensor, images):
    from accel.codec import InferRequest

    return InferRequest([Tensor.from_bytes_list("image", images)], parameters={"top_k": 3})


def _batch_runs(service) -> tuple[float, float]:
    child = service.metrics.batch_size.labels("classify")
    return sum(b.get() for b in child._buckets), child._sum.get()


def test_a_raw_model_request_larger_than_the_batch_size_runs_in_chunks(service):
    """70 rows through efficientnet-lite0 (max_batch_size 32) give the rows of three smaller runs."""
    from accel.codec import InferRequest
    from accel.tensor import Tensor

    x = np.random.default_rng(8).standard_normal((70, 3, 224, 224)).astype(np.float32)
    op = service.registry.get("efficientnet-lite0")
    assert op.config.max_batch_size == 32
    whole = service.dispatcher.infer("efficientnet-lite0", InferRequest([Tensor.from_numpy("input", x)]))
    logits = whole.outputs[0].numpy()
    assert logits.shape == (70, 1000)
    alone = op._runner.run({"input": x[65:]})["logits"]
    np.testing.assert_allclose(logits[65:], alone, rtol=1e-4, atol=1e-4)


def test_submit_later_answers_on_the_reply_thread_and_keeps_failures_apart():
    """``submit_later`` returns at once; each Future gets its own rows (or its own error). Results and
    errors are set on the batcher's reply thread, where their callbacks run: no thread of the
    caller's waits, and no callback holds up the batcher."""
    release = threading.Event()

    def run(items):
        release.wait(5)  # nothing is answered before every callback is in place
        if any(item == [-1] for item in items):
            raise ValueError("negative")
        return [[2 * x for x in item] for item in items]

    batcher = Batcher("m", run, max_batch_size=8, max_queue_delay_us=50_000)
    callback_threads: list[str] = []
    try:
        futures = [batcher.submit_later([i], 1) for i in (1, -1, 3)]
        for future in futures:
            future.add_done_callback(lambda _f: callback_threads.append(threading.current_thread().name))
        release.set()
        assert futures[0].result(5) == [2] and futures[2].result(5) == [6]
        with pytest.raises(ValueError, match="negative"):
            futures[1].result(5)
    finally:
        batcher.close()
    assert callback_threads == ["replies-m"] * 3


def test_the_batcher_runs_the_next_batch_while_the_replies_of_the_last_go_out():
    """A slow reply (a callback of ``submit_later``'s Future: a link send) holds up neither the next
    batch nor a ``submit`` waiting for it; the replies still come in order, and close delivers those
    queued before it returns."""
    attached, second_ran, order = threading.Event(), threading.Event(), []

    def run(items):
        attached.wait(5)  # the first's callback is in place before its result is set
        return [x * 10 for x in items]

    batcher = Batcher("m", run, max_batch_size=1, max_queue_delay_us=0)
    try:
        first = batcher.submit_later(1, 1)
        first.add_done_callback(lambda f: (second_ran.wait(5), order.append(f.result())))
        attached.set()
        # ran and answered while the first's reply still waits (with the reply on the batcher's
        # thread, the second batch would wait for it: 5 s)
        with ThreadPoolExecutor(1) as caller:
            assert caller.submit(batcher.submit, 2, 1).result(timeout=2) == 20
        second_ran.set()
        last = batcher.submit_later(3, 1)
        last.add_done_callback(lambda f: order.append(f.result()))
    finally:
        batcher.close()
    assert order == [10, 30]


def test_each_batcher_thread_starts_before_the_batcher_is_returned_and_runs_where_it_started(caplog):
    """``thread_start`` runs once on each thread before the constructor returns (a device pipeline
    binds the thread's CUDA stream there); a thread whose start fails is logged and still serves:
    three batches run at once, one on each thread."""
    started: list[str] = []

    def start() -> None:
        time.sleep(0.2)  # slower than the constructor would be without waiting for it
        started.append(threading.current_thread().name)
        if started[-1].endswith("-1"):
            raise RuntimeError("no stream for this one")

    together = threading.Barrier(3, timeout=5)
    ran_on: list[str] = []

    def run(items):
        together.wait()  # only passes with all three threads running a batch
        ran_on.append(threading.current_thread().name)
        return [[2 * x for x in item] for item in items]

    batcher = Batcher("m", run, max_batch_size=1, max_queue_delay_us=0, concurrency=3, thread_start=start)
    try:
        assert sorted(started) == [f"batcher-m-{i}" for i in range(3)]  # all of them, already
        with ThreadPoolExecutor(3) as pool:
            assert list(pool.map(lambda i: batcher.submit([i], 1), range(3))) == [[0], [2], [4]]
    finally:
        batcher.close()
    assert sorted(ran_on) == sorted(started)
    assert "could not start as asked" in caplog.text and "no stream for this one" in caplog.text


def test_a_cancelled_request_is_skipped_and_the_others_are_answered():
    release = threading.Event()

    def run(items):
        release.wait(5)
        return [[2 * x for x in item] for item in items]

    batcher = Batcher("m", run, max_batch_size=8, max_queue_delay_us=0)
    try:
        first = batcher.submit_later([1], 1)  # running: holds the thread until released
        queued = [batcher.submit_later([i], 1) for i in (2, 3, 4)]
        assert queued[1].cancel()
        release.set()
        assert first.result(5) == [2] and queued[0].result(5) == [4] and queued[2].result(5) == [8]
        assert batcher.submit([5], 1) == [10]  # the thread lives on
    finally:
        batcher.close()


def test_batcher_threads_that_do_not_start_in_time_fail_the_load(monkeypatch):
    """A ``thread_start`` that hangs (a CUDA stream that never comes) fails the constructor after
    START_TIMEOUT_S instead of hanging the shim's load; the threads end once they get past it."""
    from shim import batching

    monkeypatch.setattr(batching, "START_TIMEOUT_S", 0.2)
    with pytest.raises(RuntimeError, match="did not start within"):
        Batcher("m", _doubler([]), max_batch_size=1, max_queue_delay_us=0, concurrency=2,
                thread_start=lambda: time.sleep(1))


def test_the_start_timeout_is_each_threads_when_their_starts_take_turns(monkeypatch):
    """Batcher threads whose starts take turns (each captures the model's CUDA graphs, one capture at a
    time) get START_TIMEOUT_S each: three starts of 0.5 s one after another fit 3 x 1 s, not 1 s."""
    import threading

    from shim import batching

    monkeypatch.setattr(batching, "START_TIMEOUT_S", 1.0)
    turns = threading.Lock()

    def start() -> None:
        with turns:
            time.sleep(0.5)

    batcher = Batcher("m", _doubler([]), max_batch_size=1, max_queue_delay_us=0, concurrency=3, thread_start=start)
    try:
        assert batcher.submit([21], 1).tolist() == [42]
    finally:
        batcher.close()


def test_a_batchs_items_go_once_it_is_answered_even_while_the_thread_waits():
    """What a batch held (a gone worker's arena pages, pinned) is let go as the batch is answered,
    also when it failed, not when the batcher's thread gathers its next batch."""
    import gc
    import weakref

    class Item:
        def __init__(self, poison: bool) -> None:
            self.poison = poison

    def run(items):
        if any(i.poison for i in items):
            raise ValueError("poisoned")
        return [1 for _ in items]

    batcher = Batcher("m", run, max_batch_size=8, max_queue_delay_us=0)
    try:
        for poison in (False, True):
            item = Item(poison)
            gone = weakref.ref(item)
            future = batcher.submit_later(item, 1)
            if poison:
                with pytest.raises(ValueError):
                    future.result(5)
            else:
                assert future.result(5) == 1
            del item
            deadline = time.monotonic() + 5
            while gone() is not None and time.monotonic() < deadline:
                time.sleep(0.01)
            gc.collect()  # not what releases it: the future's error would keep a cycle's frames alive
            assert gone() is None, f"poison={poison}: the idle batcher thread still holds its item"
            del future
    finally:
        batcher.close()


def test_batches_pad_by_under_a_half_to_a_few_warmed_sizes():
    """A batch pads to the next power of two or three quarters of it (from 6 on): it runs as fewer
    than 1.5 times its rows (a power of two alone: nearly twice), and a warm-up of ``padded_sizes(top)`` covers every size a batch of at most
    ``top`` rows runs as."""
    from shim.padding import padded_batch, padded_sizes

    assert padded_sizes(32) == [1, 2, 4, 6, 8, 12, 16, 24, 32]
    for top in (1, 5, 8, 9, 32, 33, 100):
        sizes = padded_sizes(top)
        assert sizes == sorted(set(sizes)) and sizes[-1] == padded_batch(top)
        for rows in range(1, top + 1):
            size = padded_batch(rows)
            assert rows <= size and (size == 1 or 2 * size < 3 * rows) and size in sizes, (rows, size)


def test_a_batch_waits_for_requests_announced_before_its_oldest_not_after():
    """One announced earlier is part way through its decode: the batch waits for it. One announced
    after the oldest was queued has all of its decode ahead: the batch goes without it."""
    calls: list[list[int]] = []
    batcher = Batcher("m", _doubler(calls), max_batch_size=32, max_queue_delay_us=5_000_000)
    earlier_decoded, later_decoded, later_announced = threading.Event(), threading.Event(), threading.Event()

    def earlier() -> np.ndarray:
        with batcher.incoming() as submit:
            earlier_decoded.wait(10)
            return submit([2], 1)

    def later() -> np.ndarray:
        with batcher.incoming() as submit:
            later_announced.set()
            later_decoded.wait(10)
            return submit([3], 1)

    try:
        with ThreadPoolExecutor(3) as pool:
            first = pool.submit(earlier)
            while batcher._queue.incoming != 1:  # noqa: SLF001 - announced, decoding
                time.sleep(0.001)
            oldest = pool.submit(batcher.submit, [1], 1)
            while not (batcher._queue.forming or calls):  # noqa: SLF001 - queued, gathered: it waits
                time.sleep(0.001)
            last = pool.submit(later)
            later_announced.wait(10)
            time.sleep(0.2)
            assert not oldest.done()  # held for the earlier one
            began = time.monotonic()
            earlier_decoded.set()
            assert oldest.result(10).tolist() == [2] and first.result(10).tolist() == [4]
            assert time.monotonic() - began < 2.0  # not held for the later one (5 s)
            later_decoded.set()
            assert last.result(10).tolist() == [6]
    finally:
        batcher.close()
    assert calls == [[1, 1], [1]]


def test_a_request_to_a_closed_batcher_is_told_to_retry():
    """A request that comes in as the shim stops (its batchers closed) gets a 503 to retry, not a
    500: a client retries it (on another replica, or once this one is back)."""
    from accel.errors import NotReady

    batcher = Batcher("m", _doubler([]), max_batch_size=4, max_queue_delay_us=0)
    assert batcher.submit([1], 1).tolist() == [2]
    batcher.close()
    for submit in (lambda: batcher.submit([1], 1), lambda: batcher.submit_later([1], 1)):
        with pytest.raises(NotReady, match="closed") as caught:
            submit()
        assert caught.value.status == 503 and caught.value.retry_after
