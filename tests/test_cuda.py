"""The CUDA backend against its CPU twin (run on the GPU machine: ``pytest -m gpu``)."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from accel.errors import InsufficientStorage

from tests.conftest import encode

pytestmark = pytest.mark.gpu
cp = pytest.importorskip("cupy")

CAT_LABELS = {"tiger cat", "tabby, tabby cat", "Egyptian cat"}


def rel_error(got: np.ndarray, want: np.ndarray) -> float:
    want64 = want.astype(np.float64)
    return float(np.linalg.norm(got.astype(np.float64) - want64) / max(np.linalg.norm(want64), 1e-300))


@pytest.fixture(scope="module")
def cuda():
    from shim.backends.cuda import CudaBackend

    return CudaBackend()


@pytest.fixture(scope="module")
def cuda_service(models_dir):
    from shim.config import Settings
    from shim.service import build_service

    svc = build_service(Settings(device="cuda", models_dir=models_dir))
    svc.load()
    yield svc
    svc.registry.close()


SHAPES = [(1, 1, 1), (1, 7, 1), (513, 3, 1), (1, 3, 777), (64, 64, 64), (300, 200, 100), (1024, 1024, 1024),
          (4096, 4096, 4096)]


@pytest.mark.parametrize("dtype,tolerance", [("float32", 1e-5), ("float16", 1e-2), ("float64", 1e-12)])
@pytest.mark.parametrize("m,k,n", SHAPES, ids=lambda s: str(s))
def test_gemm_matches_the_cpu_twin(cuda, dtype, tolerance, m, k, n):
    from shim.backends.cpu import gemm_reference

    rng = np.random.default_rng(m * 131 + k * 7 + n)
    a = rng.standard_normal((m, k)).astype(dtype)
    b = rng.standard_normal((k, n)).astype(dtype)
    c = rng.standard_normal((m, n)).astype(dtype)
    got = cuda.gemm(a, b, c, 0.5, -1.5)
    want = gemm_reference(a, b, c, 0.5, -1.5)
    assert got.dtype == np.dtype(dtype) and got.shape == (m, n)
    assert rel_error(got, want) <= tolerance
    assert rel_error(cuda.gemm(a, b, None, 1.0, 0.0), gemm_reference(a, b, None, 1.0, 0.0)) <= tolerance


def test_tf32_is_used_and_matches_its_emulation(cuda):
    from shim.backends.cpu import gemm_reference

    rng = np.random.default_rng(1)
    a, b = (rng.standard_normal((2048, 2048)).astype(np.float32) for _ in range(2))
    exact = a.astype(np.float64) @ b.astype(np.float64)
    tf32 = cuda.gemm(a, b, None, 1.0, 0.0, "tf32")
    fp32 = cuda.gemm(a, b, None, 1.0, 0.0)
    assert rel_error(fp32, exact) < 1e-6 < rel_error(tf32, exact)  # TF32 really ran (10-bit mantissa)
    assert rel_error(tf32, gemm_reference(a, b, None, 1.0, 0.0, "tf32")) <= 1e-3


def test_memory_limit_refuses_what_cannot_fit_and_keeps_serving():
    from shim.backends.cuda import CudaBackend

    small = CudaBackend(memory_limit=64 << 20)
    try:
        big = np.ones((4096, 4096), np.float32)  # 3 x 64 MiB
        with pytest.raises(InsufficientStorage, match="--gpu-memory-limit"):
            small.gemm(big, big, None, 1.0, 0.0)
        x = np.eye(256, dtype=np.float32)
        assert np.array_equal(small.gemm(x, x, None, 1.0, 0.0), x)
    finally:  # the limit is on cupy's process-wide pool: the tests after this one get the GPU back
        cp.get_default_memory_pool().set_limit(size=0)


def test_gpu_preprocessing_is_pillow_exactly(cuda_service, chelsea, coffee):
    from PIL import Image

    from shim.kernels.resample import normalize, pillow_preprocess, resize_reference

    op = cuda_service.registry.get("classify")
    pipeline = op._pipeline
    assert pipeline.device == "cuda"
    rng = np.random.default_rng(5)
    images = [chelsea, coffee] + [rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                                  for h, w in ((1000, 37), (37, 1000), (224, 224), (3, 5), (641, 481))]
    for pixels in images:
        pre = op.config.preprocessing
        got = pipeline.preprocess(pixels)
        assert np.array_equal(got, normalize(resize_reference(pixels, pre), pre)), pixels.shape
        assert np.array_equal(got, pillow_preprocess(Image.fromarray(pixels), pre)), pixels.shape


def test_runs_of_same_size_images_are_resized_together_exactly(cuda_service, chelsea, coffee):
    """One launch per pass for each run of same-size images (as a batch lays them out), every slot
    still Pillow's bytes; runs of one, of several, and sizes that come back later."""
    from shim.backends.cuda_resize import same_shape_runs
    from shim.kernels.resample import normalize, resize_reference

    op = cuda_service.registry.get("classify")
    pipeline, pre = op._pipeline, op.config.preprocessing
    rng = np.random.default_rng(6)
    odd = [rng.integers(0, 256, (641, 481, 3), dtype=np.uint8) for _ in range(3)]
    items = [chelsea, chelsea[::-1].copy(), *odd, coffee, chelsea[:, ::-1].copy(), rng.integers(0, 256, (3, 5, 3),
                                                                                               dtype=np.uint8)]
    shapes = [p.shape for p in items]
    assert [count for _, count in same_shape_runs(shapes)] == [2, 3, 1, 1, 1]
    flat = cp.asarray(np.concatenate([p.reshape(-1) for p in items]))
    out = cp.full((len(items) + 1, 3, pre.size, pre.size), 7.0, dtype=cp.float32)
    plans: list = []  # held until the copy back has waited for the resize
    pipeline.resizer.preprocess_batch(flat, shapes, out, plans)
    got = cp.asnumpy(out)
    for i, pixels in enumerate(items):
        assert np.array_equal(got[i], normalize(resize_reference(pixels, pre), pre)), (i, pixels.shape)
    assert (got[len(items)] == 7.0).all()  # nothing past the images is written


def test_classify_and_raw_model_match_the_cpu_twin(cuda_service, service, chelsea, coffee):
    from accel.codec import InferRequest
    from accel.tensor import Tensor

    images = [encode(chelsea, "JPEG"), encode(coffee, "PNG")]
    request = InferRequest([Tensor.from_bytes_list("image", images)], parameters={"top_k": 5})
    gpu = {t.name: t.numpy() for t in cuda_service.dispatcher.infer("classify", request).outputs}
    cpu = {t.name: t.numpy() for t in service.dispatcher.infer("classify", request).outputs}
    assert gpu["classes"][:, 0].tolist() == cpu["classes"][:, 0].tolist()
    assert gpu["labels"][0, 0].decode() in CAT_LABELS and gpu["labels"][1, 0].decode() == "espresso"
    x = np.random.default_rng(2).standard_normal((4, 3, 224, 224)).astype(np.float32)
    raw = InferRequest([Tensor.from_numpy("input", x)])
    got = cuda_service.dispatcher.infer("efficientnet-lite0", raw).outputs[0].numpy()
    want = service.dispatcher.infer("efficientnet-lite0", raw).outputs[0].numpy()
    assert np.abs(got - want).max() <= 1e-3


def test_models_replay_cuda_graphs_that_match_node_by_node_and_the_cpu(cuda, models_dir):
    from shim.backends.cpu import CpuBackend
    from shim.backends.onnx import OnnxRunner

    path = models_dir / "efficientnet-lite0" / "model.onnx"
    graphed = cuda.runner(path)
    node_by_node = OnnxRunner(path, [("CUDAExecutionProvider", {"use_tf32": 0})])
    cpu = CpuBackend().load_model(path)
    rng = np.random.default_rng(11)
    results = []
    for rows in (1, 3, 8, 5):
        x = rng.standard_normal((rows, 3, 224, 224)).astype(np.float32)
        got = graphed.run({"input": x})["logits"]
        assert got.shape == (rows, 1000)
        assert np.abs(got - node_by_node.run({"input": x})["logits"]).max() <= 1e-4
        assert np.abs(got - cpu.run({"input": x})["logits"]).max() <= 1e-3
        results.append((x, got))
    assert graphed.fixed and graphed.graphs  # captured for every size, none fell back
    x, got = results[0]
    assert np.array_equal(got, graphed.run({"input": x})["logits"])  # replays are deterministic


def test_a_raw_models_failures_are_mapped_as_every_cuda_calls(cuda, models_dir, monkeypatch):
    """A raw model's runs (``ModelOp``'s runner) answer onnxruntime running out of GPU memory with
    503 and a retry, and a lost context with DeviceLost, as classify and gemm do, not 500."""
    from accel.errors import NotReady
    from shim.faults import DeviceLost

    ort_state = pytest.importorskip("onnxruntime.capi.onnxruntime_pybind11_state")
    runner = cuda.load_model(models_dir / "efficientnet-lite0" / "model.onnx")
    x = np.random.default_rng(8).standard_normal((2, 3, 224, 224)).astype(np.float32)
    assert runner.device == "cuda" and [spec.name for spec in runner.inputs] == ["input"]
    assert runner.run({"input": x})["logits"].shape == (2, 1000)
    failures = [(ort_state.RuntimeException("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Non-zero status "
                                            "code returned while running Conv node. Failed to allocate memory "
                                            "for requested buffer of size 1073741824"), NotReady),
                (ort_state.Fail("CUDA failure 700: an illegal memory access was encountered"), DeviceLost)]
    for exc, answer in failures:
        def fail(feeds, exc=exc):
            raise exc

        monkeypatch.setattr(runner._runner, "run", fail)  # onnxruntime's run, as if it had failed so
        with pytest.raises(answer) as got:
            runner.run({"input": x})
        assert type(got.value) is answer  # DeviceLost is a NotReady too: exactly this one


def test_pinning_beside_a_graph_capture_neither_fails_nor_breaks_it(cuda, models_dir):
    """Request workers connect while the device process warms up, and their arenas get pinned then:
    onnxruntime captures in CUDA's global mode, where a pin on another thread fails and breaks the
    capture (the model then ran node by node for good). Pins wait for the capture instead."""
    import threading

    path = models_dir / "efficientnet-lite0" / "model.onnx"
    host = np.zeros(16 << 20, np.uint8)
    address = host.ctypes.data
    stop, pinned, failed = threading.Event(), [0], []

    def pin_and_unpin() -> None:
        while not stop.is_set():
            cuda.register_host(address, host.nbytes, now=True)
            if cuda.pinned.contains(host):
                pinned[0] += 1
            else:
                failed.append(pinned[0])
            cuda.unregister_host(address)

    pinner = threading.Thread(target=pin_and_unpin)
    pinner.start()
    try:
        runner = cuda.runner(path)
        x = np.random.default_rng(5).standard_normal((4, 3, 224, 224)).astype(np.float32)
        for rows in (1, 2, 4):  # three sizes captured while the pins go on
            runner.run({"input": x[:rows]})
    finally:
        stop.set()
        pinner.join()
    assert runner.graphs, "a capture failed"
    assert not failed and pinned[0] >= 3


def test_metadata_says_cuda(cuda_service):
    for op in ("gemm", "classify", "efficientnet-lite0"):
        assert cuda_service.registry.get(op).metadata()["backend"] == "cuda", op


def test_batching_returns_each_of_64_callers_its_own_result(cuda_service, chelsea, coffee):
    from accel.codec import InferRequest
    from accel.tensor import Tensor

    cat, cup = encode(chelsea, "JPEG"), encode(coffee, "PNG")
    rng = np.random.default_rng(4)
    plans = [[("cat", "cup")[j] for j in rng.integers(0, 2, rng.integers(1, 9))] for _ in range(64)]

    def call(plan):
        images = [cat if n == "cat" else cup for n in plan]
        out = cuda_service.dispatcher.infer("classify", InferRequest([Tensor.from_bytes_list("image", images)]))
        return [s.decode() for s in {t.name: t for t in out.outputs}["labels"].numpy()[:, 0]]

    with ThreadPoolExecutor(64) as pool:
        results = list(pool.map(call, plans))
    for plan, labels in zip(plans, results):
        assert len(labels) == len(plan)
        for name, label in zip(plan, labels):
            assert (label in CAT_LABELS) if name == "cat" else (label == "espresso")
    text = cuda_service.metrics.render()[0].decode()
    assert 'accelshim_batch_size_count{op="classify"}' in text
    batcher = cuda_service.registry.get("classify")._batcher
    # one bound thread, two batches queued on its stream at once (``CudaImagePipeline.in_flight``)
    assert batcher._queue.cap == 2 and [t.name for t in batcher._threads] == ["batcher-classify-0"]


def test_device_work_runs_on_the_calling_thread_a_batchers_bound_stream_or_a_borrowed_worker(cuda_service, chelsea,
                                                                                             coffee):
    """The batcher's threads are bound to streams of their own (``bind_thread``) and to sessions of
    their own: a batch runs where it was gathered, resized straight into the model's input (no copy
    on the device). A thread of no batcher runs its device work itself too, on a worker it borrows
    and gives back (a device call inside that job runs on the same worker), its batch copied into a
    shared session's input: no hand-over either way, and the logits agree."""
    import threading

    op = cuda_service.registry.get("classify")
    pipeline, backend = op._pipeline, cuda_service.backend
    items = [pipeline.prepare(img) for img in (_image(chelsea), _image(coffee), _image(chelsea))]
    ran_on: list[tuple[str, object]] = []
    original = backend.on_device
    runner, copies = pipeline.runner, []
    device_copy = runner._device_copy
    runner._device_copy = lambda dst, src, nbytes: copies.append(nbytes) or device_copy(dst, src, nbytes)

    def spy(job):
        def where(worker):
            ran_on.append((threading.current_thread().name, worker))  # the thread the device work runs on
            nested = original(lambda inner: inner)  # a device call inside one: the same worker and stream
            assert nested is worker
            return job(worker)
        return original(where)

    backend.on_device = spy
    try:
        batched = op.logits(items)  # through the batcher
        assert ran_on and all(name.startswith("batcher-classify") for name, _ in ran_on), ran_on
        assert not copies  # resized into the bound session's own input
        ran_on.clear()
        lent = backend.workers.idle()
        with ThreadPoolExecutor(1, thread_name_prefix="no-batcher") as pool:
            alone = pool.submit(pipeline.logits, items).result()
    finally:
        del backend.on_device
        runner._device_copy = device_copy
    assert [name for name, _ in ran_on] == ["no-batcher_0"]
    assert ran_on[0][1] in backend.workers._idle and backend.workers.idle() == lent  # borrowed, given back
    assert copies == [4 * 3 * 224 * 224 * 4]  # 3 images padded to 4, copied into the shared session
    # two sessions of 4 rows (the batcher's, captured; the shared one, built after the warm-up, node by
    # node): cuDNN may pick other algorithms for each, so they agree to rounding, not bit for bit
    assert np.abs(batched - alone).max() <= 1e-4


def test_a_threads_cublas_handle_is_made_by_its_first_gemm_and_destroyed_when_the_thread_ends(cuda):
    """A bound thread (a batcher's) holds no cuBLAS handle until it multiplies; when the thread ends
    its handle is destroyed and its device workspace freed, so closing and remaking batchers (a model
    reloaded) leaks nothing."""
    import gc
    import threading
    import time
    import weakref

    from shim.backends.cpu import gemm_reference

    rng = np.random.default_rng(7)
    a, b = (rng.standard_normal((256, 256)).astype(np.float32) for _ in range(2))
    go, workers, results = threading.Event(), [], []

    def bound(multiply: bool) -> None:
        cuda.bind_thread()
        worker = cuda._local.worker
        workers.append((weakref.ref(worker), worker._release, bool(worker._handle)))
        if multiply:
            results.append((bool(worker._handle), cuda.gemm(a, b, None, 1.0, 0.0), bool(worker._handle)))
        go.wait(60)

    gc.collect()
    free_before = cp.cuda.runtime.memGetInfo()[0]
    threads = [threading.Thread(target=bound, args=(i > 0,)) for i in range(9)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while (len(results) < 8 or len(workers) < 9) and time.monotonic() < deadline:
        time.sleep(0.01)
    free_during = cp.cuda.runtime.memGetInfo()[0]
    go.set()
    for t in threads:
        t.join(60)
    gc.collect()
    free_after = cp.cuda.runtime.memGetInfo()[0]
    assert not any(had for _, _, had in workers)  # bound, no handle yet
    for before, product, after in results:
        assert not before and after
        assert rel_error(product, gemm_reference(a, b, None, 1.0, 0.0)) <= 1e-5
    assert all(ref() is None and not release.alive for ref, release, _ in workers)  # collected, destroyed
    held = free_before - free_during  # 8 handles' workspaces (and pinned staging, host side: not counted)
    print(f"device memory: {held / 2**20:.1f} MiB held by 8 handles, {(free_before - free_after) / 2**20:.1f} "
          "MiB still held after their threads ended")
    assert free_before - free_after <= max(held // 4, 8 << 20)


def test_pixels_in_pinned_memory_go_up_by_dma_and_give_the_same_logits(cuda_service, chelsea, coffee, monkeypatch):
    """Decoded images that lie in pinned host memory (a request worker's link arena, pinned as it
    connects) go to the GPU straight from there, with no staging copy, alone or beside staged ones;
    the logits are those of the same images staged."""
    import mmap

    from shim.backends.cuda_host import DeviceWorker

    op = cuda_service.registry.get("classify")
    pipeline, backend = op._pipeline, cuda_service.backend
    staged = [pipeline.prepare(_image(chelsea)), pipeline.prepare(_image(coffee))]
    arena = mmap.mmap(-1, 4 << 20)
    whole = np.frombuffer(arena, np.uint8)
    lying, offset = [], 0
    for pixels in staged:
        lying.append(whole[offset:offset + pixels.size].reshape(pixels.shape))
        lying[-1][:] = pixels
        offset += -(-pixels.size // 64) * 64
    address = whole.ctypes.data
    backend.register_host(address, whole.nbytes, now=True)
    try:
        assert all(backend.pinned.contains(x) for x in lying)
        want = pipeline.logits(staged + staged[::-1])
        stagings = []
        original = DeviceWorker._pinned_view
        monkeypatch.setattr(DeviceWorker, "_pinned_view",
                            lambda self, *a: stagings.append(a) or original(self, *a))
        got = pipeline.logits(lying + lying[::-1])  # all pinned: no staging copy
        assert stagings == []
        np.testing.assert_array_equal(got, want)
        mixed = pipeline.logits([lying[0], staged[1], lying[1], staged[0]])  # staged beside pinned
        assert len(stagings) == 1
        np.testing.assert_array_equal(mixed, want)
    finally:
        backend.unregister_host(address)
    assert not backend.pinned.contains(lying[0])
    del lying, whole


def test_parts_lying_end_to_end_go_up_in_one_transfer_and_arrive_whole(cuda, monkeypatch):
    """``upload_concatenated``: parts that lie end to end in pinned memory go up as one transfer,
    the staged ones (copied end to end into the pinned buffer) as another; the bytes arrive in order."""
    import mmap

    from shim.backends.cuda import IMAGE_SLOT
    from shim.backends.cuda_host import DeviceWorker

    rng = np.random.default_rng(3)
    arena = mmap.mmap(-1, 1 << 20)
    whole = np.frombuffer(arena, np.uint8)
    sizes = [1000, 4096, 77, 50000]
    lying, offset = [], 0
    for size in sizes:  # end to end, as a worker's images are lent one after another
        lying.append(whole[offset:offset + size])
        lying[-1][:] = rng.integers(0, 256, size, np.uint8)
        offset += size
    loose = [rng.integers(0, 256, size, np.uint8) for size in (333, 9000)]  # pageable: staged
    address = whole.ctypes.data
    cuda.register_host(address, whole.nbytes, now=True)
    from shim.backends import cuda_driver

    transfers = []
    original = cuda_driver.copy_to_device
    monkeypatch.setattr(cuda_driver, "copy_to_device", lambda *a: transfers.append(a[2]) or original(*a))
    try:
        worker = DeviceWorker(cuda.pinned)
        with worker.stream:
            empty = whole[:0]
            # a pinned run (an empty part inside splits nothing), a staged run, a pinned run
            parts = lying[:2] + [empty] + lying[2:] + loose + lying[1:3]
            device = worker.upload_concatenated(parts, IMAGE_SLOT)
            got = device.get(stream=worker.stream)
            worker.stream.synchronize()
            with pytest.raises(ValueError, match="one dtype"):
                worker.upload_concatenated([lying[0], lying[1].view(np.int8)], IMAGE_SLOT)
    finally:
        cuda.unregister_host(address)
    np.testing.assert_array_equal(got, np.concatenate(parts))
    assert transfers == [sum(sizes), 333 + 9000, 4096 + 77]
    del lying, parts, whole, empty


def test_more_threads_than_device_workers_each_get_their_own_product(cuda):
    """Threads without a worker of their own borrow one per job; with more of them than workers they
    wait their turn, each gets its own product, and every worker is given back."""
    from shim.backends.cpu import gemm_reference
    from shim.backends.cuda import DEVICE_WORKERS

    rng = np.random.default_rng(11)
    pairs = [(rng.standard_normal((96, 80)).astype(np.float32), rng.standard_normal((80, 64)).astype(np.float32))
             for _ in range(3 * DEVICE_WORKERS)]
    with ThreadPoolExecutor(2 * DEVICE_WORKERS) as pool:
        products = list(pool.map(lambda ab: [cuda.gemm(*ab, None, 1.0, 0.0) for _ in range(5)], pairs))
    for (a, b), got in zip(pairs, products):
        want = gemm_reference(a, b, None, 1.0, 0.0)
        assert all(rel_error(g, want) <= 1e-5 for g in got)
    assert cuda.workers.idle() == DEVICE_WORKERS


def _image(pixels: np.ndarray):
    from PIL import Image

    return Image.fromarray(pixels)


def test_sticky_cuda_errors_are_device_lost():
    from accel.errors import InternalError
    from shim.backends.cuda_errors import device_errors
    from shim.faults import DeviceLost

    with pytest.raises(DeviceLost):
        with device_errors():
            raise cp.cuda.runtime.CUDARuntimeError(700)  # illegal address: the context is gone
    with pytest.raises(InternalError):
        with device_errors():
            raise cp.cuda.runtime.CUDARuntimeError(1)  # invalid value: this request only


def test_out_of_memory_from_any_cuda_call_is_a_503_to_retry_and_frees_the_pool():
    """cupy's pool, a runtime call, a driver call (a batch's copies and launches), cuBLAS and
    onnxruntime's arena running out of GPU memory all answer 503 with a retry, not 500."""
    from accel.errors import InternalError, NotReady
    from shim.backends.cuda_errors import device_errors

    class Pool:
        freed = 0

        def free_all_blocks(self) -> None:
            Pool.freed += 1

    ort_state = pytest.importorskip("onnxruntime.capi.onnxruntime_pybind11_state")
    raised = [cp.cuda.memory.OutOfMemoryError(1 << 40, 0),
              cp.cuda.runtime.CUDARuntimeError(2),  # cudaErrorMemoryAllocation
              cp.cuda.driver.CUDADriverError(2),  # CUDA_ERROR_OUT_OF_MEMORY
              ort_state.RuntimeException("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Non-zero status code "
                                         "returned while running Conv node. Failed to allocate memory for "
                                         "requested buffer of size 1073741824"),
              ort_state.Fail("CUDA failure 2: out of memory ; GPU=0")]
    for exc in raised:
        with pytest.raises(NotReady, match="retry") as got, device_errors(Pool()):
            raise exc
        assert got.value.status == 503 and got.value.retry_after
    assert Pool.freed == len(raised)
    with pytest.raises(InternalError), device_errors():
        raise ort_state.RuntimeException("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : shape mismatch")


def test_registered_host_memory_goes_up_by_dma_and_computes_the_same(cuda):
    """Operands inside memory registered with register_host (a client's shared-memory region)
    skip the staging copy; the product is the CPU twin's."""
    import mmap

    from shim.backends.cpu import gemm_reference

    n = 512
    region = mmap.mmap(-1, 2 * n * n * 4)
    view = np.frombuffer(region, np.float32)
    a, b = view[:n * n].reshape(n, n), view[n * n:].reshape(n, n)
    rng = np.random.default_rng(9)
    a[:] = rng.standard_normal((n, n))
    b[:] = rng.standard_normal((n, n))
    address = view.__array_interface__["data"][0]
    cuda.register_host(address, view.nbytes)  # noted; pinned after the first gemm through it
    try:
        assert not cuda.pinned.contains(a)
        early = cuda.gemm(a, b, None, 1.0, 0.0)  # staged copies; its pin starts as it ends
        cuda.pinned.wait(address)
        assert cuda.pinned.contains(a) and cuda.pinned.contains(b)
        assert rel_error(cuda.gemm(a, b, None, 1.0, 0.0), gemm_reference(a, b, None, 1.0, 0.0)) <= 1e-5
        assert rel_error(early, gemm_reference(a, b, None, 1.0, 0.0)) <= 1e-5
    finally:
        cuda.unregister_host(address)
    assert not cuda.pinned.contains(a) and len(cuda.pinned) == 0
    cuda.register_host(address, view.nbytes)
    assert len(cuda.pinned) == 1
    cuda.unregister_host(address)  # never used: never pinned
    assert len(cuda.pinned) == 0
    cuda.register_host(address, view.nbytes)
    cuda.gemm(a, b, None, 1.0, 0.0)
    cuda.unregister_host(address)  # at once: waits for the pin in flight (or drops it), then unpins
    assert len(cuda.pinned) == 0 and not cuda.pinned.contains(a)
    del a, b, view


@pytest.mark.parametrize("dtype,tolerance", [("float32", 1e-5), ("float16", 1e-2)])
@pytest.mark.parametrize("m,k,n", [(300, 200, 100), (3072, 1024, 3072)], ids=["small", "over-16MiB"])
def test_gemm_writes_its_result_by_dma_straight_into_registered_memory(cuda, dtype, tolerance, m, k, n):
    """``out`` inside memory registered with register_host (a client's region): the result comes down by
    DMA straight into it and is the CPU twin's; also over the input C itself, and into memory that is
    not registered (the staged or pageable path, then into ``out``)."""
    import mmap

    from shim.backends.cpu import gemm_reference

    shapes = {"a": (m, k), "b": (k, n), "c": (m, n), "out": (m, n)}
    sizes = {name: int(np.prod(shape)) for name, shape in shapes.items()}
    region = mmap.mmap(-1, sum(sizes.values()) * np.dtype(dtype).itemsize)
    view = np.frombuffer(region, dtype)
    arrays, start = {}, 0
    for name, shape in shapes.items():
        arrays[name] = view[start:start + sizes[name]].reshape(shape)
        start += sizes[name]
    a, b, c, out = arrays["a"], arrays["b"], arrays["c"], arrays["out"]
    rng = np.random.default_rng(m + n)
    for x in (a, b, c):
        x[:] = rng.standard_normal(x.shape)
    want = gemm_reference(a, b, c, 0.5, -1.5)
    address = view.__array_interface__["data"][0]
    cuda.register_host(address, view.nbytes)
    cuda.pinned.wait(address)
    try:
        assert cuda.pinned.contains(out)
        assert cuda.gemm(a, b, c, 0.5, -1.5, out=out) is out
        assert rel_error(out, want) <= tolerance
        assert cuda.gemm(a, b, c, 0.5, -1.5, out=c) is c  # C = alpha A @ B + beta C in place
        assert rel_error(c, want) <= tolerance
    finally:
        cuda.unregister_host(address)
    elsewhere = np.full((m, n), np.nan, dtype)
    assert not cuda.pinned.contains(elsewhere)
    assert cuda.gemm(a, b, None, 1.0, 0.0, out=elsewhere) is elsewhere
    assert rel_error(elsewhere, gemm_reference(a, b, None, 1.0, 0.0)) <= tolerance
    del a, b, c, out, view, arrays


def test_gemm_through_a_shared_memory_region_is_pinned_and_correct(cuda_service):
    """A region registered with the shim is pinned by the CUDA backend (cudaHostRegister) and the
    product computed from it equals the CPU twin's."""
    import os

    import accel
    from shim.backends.cpu import gemm_reference
    from tests.conftest import WSGITransport

    client = accel.Client("http://shim", transport=WSGITransport(cuda_service.app))
    n = 1024
    with accel.SharedMemory(f"cuda-test-{os.getpid()}", 3 * n * n * 4 + (1 << 20)) as region:
        a, b = region.array((n, n), "float32"), region.array((n, n), "float32")
        rng = np.random.default_rng(11)
        a[:], b[:] = rng.standard_normal((n, n)), rng.standard_normal((n, n))
        c = client.gemm(a, b, shm=region)  # registers the region on the way; staged copies
        assert rel_error(c, gemm_reference(a, b, None, 1.0, 0.0)) <= 1e-5
        assert len(cuda_service.backend.pinned) == 1  # the shim's own mapping of the region
        mapping = next(cuda_service.shm.regions())
        cuda_service.backend.pinned.wait(mapping.address)  # begun after the first gemm
        c = client.gemm(a, b, shm=region)  # by DMA both ways
        assert rel_error(c, gemm_reference(a, b, None, 1.0, 0.0)) <= 1e-5
        shims_bytes = np.frombuffer(cuda_service.shm.view(mapping, 0, 4096, "x"), np.uint8)
        assert cuda_service.backend.pinned.contains(shims_bytes)
        del shims_bytes
        client.unregister_shm()
        assert len(cuda_service.backend.pinned) == 0
        del a, b, c


def test_driver_calls_that_keep_the_interpreter_lock_copy_zero_and_launch_as_cupy_does(cuda):
    """``cuda_driver`` (a batch's copies, padding and resize launches, made without letting go of the
    interpreter lock): bytes arrive where they are sent, only the range asked is zeroed, a kernel
    computes what cupy's own launch of it does, and a failure is a CUDA error of the shim's."""
    from accel.errors import InternalError
    from shim.backends import cuda_driver
    from shim.backends.cuda_errors import device_errors

    rng = np.random.default_rng(21)
    host = cp.cuda.alloc_pinned_memory(4096)
    pinned = np.frombuffer(host, np.uint8, 4096)
    pinned[:] = rng.integers(1, 256, 4096, np.uint8)
    stream = cp.cuda.Stream(non_blocking=True)
    device = cp.full(8192, 7, dtype=cp.uint8)
    cuda_driver.copy_to_device(device.data.ptr + 100, pinned.ctypes.data, 4096, stream.ptr)
    cuda_driver.fill_zeros(device.data.ptr + 1000, 50, stream.ptr)
    stream.synchronize()
    want = np.full(8192, 7, np.uint8)
    want[100:4196] = pinned
    want[1000:1050] = 0
    np.testing.assert_array_equal(device.get(), want)

    kernel = cp.RawKernel(r"""extern "C" __global__ void axpb(const float* x, float* y, int n, float a, long long b,
                                                             unsigned long long flag) {
        int i = blockDim.x * blockIdx.x + threadIdx.x;
        if (i < n) y[i] = a * x[i] + (float)b + (flag ? 1.0f : 0.0f);
    }""", "axpb")
    x = cp.asarray(rng.standard_normal(1000).astype(np.float32))
    ours, theirs = cp.zeros_like(x), cp.zeros_like(x)
    args = (x, ours, np.int32(1000), np.float32(2.5), np.int64(-3), np.uint64(1))
    cuda_driver.launch(cuda_driver.kernel_handle(kernel), (4, 1), 256, args, stream.ptr)
    with stream:
        kernel((4,), (256,), (x, theirs) + args[2:])
    stream.synchronize()
    np.testing.assert_array_equal(ours.get(), theirs.get())
    np.testing.assert_allclose(ours.get(), 2.5 * x.get() - 3 + 1, rtol=1e-6, atol=1e-6)  # the GPU fuses a*x+b

    with pytest.raises(InternalError, match="CUDA error"), device_errors():
        cuda_driver.launch(cuda_driver.kernel_handle(kernel), (1, 1), 4096, args, stream.ptr)  # too many threads


def test_a_bound_thread_captures_on_its_own_stream_and_its_model_follows_its_resize(cuda_service, chelsea, coffee):
    """A thread bound as a batcher's is (``CudaImagePipeline.bind_thread``) gets sessions of its own,
    captured on its device worker's stream: the upload, the resize and the model follow one another
    there with no wait on the host. Its logits are a thread's that is not bound (a shared session,
    the batch copied in after a wait), replay for replay the same, and the right labels."""
    op = cuda_service.registry.get("classify")
    pipeline, backend, runner = op._pipeline, cuda_service.backend, op._pipeline.runner
    items = [pipeline.prepare(_image(p)) for p in (chelsea, coffee, chelsea, coffee, coffee)]  # pads to 6

    def bound():
        pipeline.bind_thread()
        assert hasattr(runner._local, "sessions"), "the batcher thread's sessions could not be built on its stream"
        target = runner.input_buffer(pipeline._input, 6)
        told = {size: (session.follows, session.session.get_provider_options()["CUDAExecutionProvider"]
                       .get("user_compute_stream")) for size, session in runner._local.sessions.items()}
        return target, backend._local.worker.stream.ptr, told, [pipeline.logits(items) for _ in range(3)]

    runner.graphs = True  # sealed by the service's warm-up; nothing else runs beside this capture
    try:
        with ThreadPoolExecutor(1) as pool:
            target, stream, told, runs = pool.submit(bound).result()
        assert runner.graphs, "a capture failed"
    finally:
        runner.graphs = False
    alone = pipeline.logits(items)
    # every size's session runs on the worker's stream, as onnxruntime itself reports it
    assert sorted(told) == [1, 2, 4, 6, 8, 12, 16, 24, 32]
    assert all(follows and option == str(stream) for follows, option in told.values()), told
    assert target is not None and target.stream == stream
    assert np.array_equal(runs[0], runs[1]) and np.array_equal(runs[1], runs[2])
    assert np.abs(runs[0] - alone).max() <= 1e-4
    labels = [op._labels[i].decode() for i in runs[0].argmax(axis=1)]
    assert labels[0] in CAT_LABELS and labels[2] in CAT_LABELS
    assert labels[1] == labels[3] == labels[4] == "espresso"


def _on_a_batcher_thread(pipeline, fn):
    """``fn()`` on a thread of its own, as a batcher's (named so), with the model's sessions captured
    as CUDA graphs there (the service's warm-up sealed the runner: switched on for the test)."""
    runner = pipeline.runner
    runner.graphs = True
    try:
        with ThreadPoolExecutor(1, thread_name_prefix="batcher-test") as pool:
            return pool.submit(fn).result(timeout=300)  # a slot never given back hangs there: fail instead
    finally:
        runner.graphs = False


def _random_photos(pipeline, rng, n, height, width):
    """``n`` prepared images of random pixels, ``height`` x ``width``."""
    return [pipeline.prepare(_image(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))) for _ in range(n)]


def test_batches_queued_back_to_back_on_a_bound_stream_each_land_with_their_own_logits(cuda_service, chelsea, coffee):
    """A batcher's thread queues its batches (``logits_later``) without waiting for the GPU: upload,
    resize, model and the logits' download of the next go onto its stream behind the one before,
    and each Future is set on the landing thread once its batch is done. Batches of one size share
    the session's input and output buffers, and every batch's pixels go through the one pinned
    staging buffer (they lie in no pinned memory): each must still get exactly its own logits, those
    the same thread computes batch by batch, waiting (``logits``)."""
    op = cuda_service.registry.get("classify")
    pipeline = op._pipeline
    cat, cup = pipeline.prepare(_image(chelsea)), pipeline.prepare(_image(coffee))
    rng = np.random.default_rng(7)
    # sizes that pad alike, one after another (4, 3, 4: the session of 4 rows), and others between
    plans = [[(cat, cup)[j] for j in rng.integers(0, 2, n)] for n in (4, 3, 4, 1, 8, 8, 5, 2, 4, 4)]

    def bound():
        pipeline.bind_thread()
        assert getattr(pipeline._local, "landing", None) is not None, "the bound thread has no landing"
        landing = pipeline._local.landing
        futures = [pipeline.logits_later(items) for items in plans]  # queued back to back, none waited for
        queued = [future.result(timeout=30) for future in futures]
        return queued, [pipeline.logits(items) for items in plans], landing._thread.name

    runner = pipeline.runner
    runner.graphs = True  # sealed by the service's warm-up: captured as a batcher's would be
    try:
        with ThreadPoolExecutor(1, thread_name_prefix="batcher-test") as pool:
            queued, waited, landing_thread = pool.submit(bound).result()
        assert runner.graphs, "a capture failed"
    finally:
        runner.graphs = False

    for plan, got, want in zip(plans, queued, waited):
        assert got.shape == (len(plan), 1000)
        assert np.array_equal(got, want)
        labels = [op._labels[i].decode() for i in got.argmax(axis=1)]
        assert all((label in CAT_LABELS) if image is cat else (label == "espresso") for image, label in zip(plan, labels))
    assert landing_thread == "landing-efficientnet-lite0"



def test_a_new_image_size_does_not_wait_for_the_batches_queued_before_it(cuda_service):
    """A size not seen before gets its resize plan uploaded on a stream of its own: the batcher's
    thread goes on while the GPU still runs the batches queued before (a wait for its whole stream
    stalled them once per new size), and the new size's images still get their own logits. Behind
    the batches, the stream gets about 100 ms of matrix products: the plan's own host work (its
    weights, computed in numpy) must not outlast what is queued, or the test could not tell."""
    op = cuda_service.registry.get("classify")
    pipeline = op._pipeline
    rng = np.random.default_rng(13)

    def photos(n, height, width):
        return _random_photos(pipeline, rng, n, height, width)

    busy = [photos(32, 600, 800), photos(32, 600, 800)]  # two model runs of 32 rows: milliseconds on the GPU
    new = photos(3, 517, 389)  # a size nothing before used

    def bound():
        pipeline.bind_thread()
        queued = [pipeline.logits_later(items) for items in busy]
        stream = pipeline._backend._local.worker.stream  # the batcher's: its batches are queued there
        with stream:
            square = cp.ones((4096, 4096), cp.float32)
            for _ in range(40):  # 2.5 ms or more each on an H100/H200 (FP32, no tensor cores)
                square @ square
        behind = cp.cuda.Event(disable_timing=True)
        behind.record(stream)
        with stream:  # as a batch's run calls it: on the batcher's stream
            pipeline.resizer._plan(389, 517)  # what a batch of the new size does first
        still_running = not behind.done  # the GPU has not reached the end of what was queued
        fresh = pipeline.logits_later(new)
        got = [f.result(timeout=30) for f in [*queued, fresh]]
        return still_running, got, [pipeline.logits(items) for items in [*busy, new]]

    still_running, got, want = _on_a_batcher_thread(pipeline, bound)
    assert still_running, "the new size's plan waited for the batches queued before it"
    for g, w in zip(got, want):
        assert np.array_equal(g, w)


def test_a_plan_the_cache_drops_while_its_batch_is_queued_is_not_overwritten_before_it_lands(cuda_service):
    """A queued batch of a new size, then 300 other new sizes: the cache (256) drops the batch's plan
    while the GPU has not yet run its resize. Its memory goes back to the plan stream's part of the
    pool, where the next plans' uploads would take it: the batch holds its plans until it lands, so
    its logits are still those of its images."""
    op = cuda_service.registry.get("classify")
    pipeline = op._pipeline
    rng = np.random.default_rng(17)

    def photos(n, height, width):
        return _random_photos(pipeline, rng, n, height, width)

    busy = [photos(32, 600, 800), photos(32, 600, 800)]
    target = photos(4, 333, 251)

    def bound():
        pipeline.bind_thread()
        queued = [pipeline.logits_later(items) for items in [*busy, target]]
        for width in range(300):  # new sizes: the target's plan leaves the cache, its memory is reused
            pipeline.resizer._plan(1000 + width, 701)
        got = [f.result(timeout=30) for f in queued]
        return got, [pipeline.logits(items) for items in [*busy, target]]

    got, want = _on_a_batcher_thread(pipeline, bound)
    for g, w in zip(got, want):
        assert np.array_equal(g, w)


def test_a_batch_run_waiting_does_not_overwrite_the_staging_buffer_that_queued_batches_still_read(cuda_service):
    """A batch too big to queue (more images than a session takes) runs at once on the bound thread,
    staging its pixels through the same pinned buffer as the queued batches before it, whose uploads
    may still wait on the stream behind a model run: it waits for them first (``staging_free``), so
    that every batch still gets its own logits."""
    op = cuda_service.registry.get("classify")
    pipeline = op._pipeline
    rng = np.random.default_rng(11)

    def photos(n):  # distinct, and small: staged in far less time than the model of 32 rows runs
        return [pipeline.prepare(_image(rng.integers(0, 256, (240, 240, 3), dtype=np.uint8))) for _ in range(n)]

    first, second, big = photos(32), photos(32), photos(40)

    def bound():
        pipeline.bind_thread()
        queued = [pipeline.logits_later(first), pipeline.logits_later(second)]  # the second's upload waits
        at_once = pipeline.logits_later(big)  # more than 32: run here, through the same staging buffer
        got = [f.result(timeout=30) for f in queued] + [at_once.result(timeout=30)]
        return got, [pipeline.logits(items) for items in (first, second, big)]

    got, want = _on_a_batcher_thread(pipeline, bound)
    for g, w in zip(got, want):
        assert np.array_equal(g, w)
