"""``--gpu-jpeg``: classify's plain JPEGs decoded on the GPU's JPEG engines, against the CPU twin
that decodes them with libjpeg-turbo (run on the GPU machine with the nvidia-nvjpeg wheel installed:
``pytest -m gpu``; ``ci/gpu-run.sh`` installs it from ``.whl-gpu``)."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor, wait
from types import SimpleNamespace

import numpy as np
import pytest

from accel.codec import InferRequest
from accel.errors import InvalidInput
from accel.tensor import Tensor
from tests.conftest import LiveShim, encode
from tests.test_jpeg import plain_variants, without_segment

pytestmark = pytest.mark.gpu
cp = pytest.importorskip("cupy")
if __import__("shim.backends.nvjpeg", fromlist=["library_path"]).library_path() is None:
    pytest.skip("the nvidia-nvjpeg wheel is not installed", allow_module_level=True)

CAT_LABELS = {"tiger cat", "tabby, tabby cat", "Egyptian cat"}
# the engines' pixels are at most 1 off libjpeg-turbo's in a few values: logits 0.0009 apart on the
# probe's coffee; a decode that is wrong (nvJPEG's CUDA decoder, 3 off in 4% of pixels) was 0.03 apart
DECODE_TOLERANCE = 5e-3


def _concurrent_top1(svc, pictures: list[bytes], plans: list[list[int]], timeout: float = 120) -> list[list[int]]:
    """Each plan's pictures classified in one request (top 1), all the plans' requests at once (a
    fresh pool of threads each time); fails if they have not all ended within ``timeout``."""
    def call(plan: list[int]) -> list[int]:
        request = InferRequest([Tensor.from_bytes_list("image", [pictures[i] for i in plan])], parameters={"top_k": 1})
        out = svc.dispatcher.infer("classify", request)
        return {t.name: t.numpy() for t in out.outputs}["classes"][:, 0].tolist()

    pool = ThreadPoolExecutor(len(plans))
    try:
        futures = [pool.submit(call, plan) for plan in plans]
        _, pending = wait(futures, timeout)
        assert not pending, f"{len(pending)} of {len(plans)} requests not answered in {timeout} s"
        return [f.result() for f in futures]
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def _same_classes(got: np.ndarray, want: np.ndarray, k: int = 5) -> bool:
    return np.argsort(-got, axis=1)[:, :k].tolist() == np.argsort(-want, axis=1)[:, :k].tolist()


@pytest.fixture(scope="module")
def jpeg_service(models_dir):
    from shim.config import Settings
    from shim.service import build_service

    svc = build_service(Settings(device="cuda", models_dir=models_dir, gpu_jpeg=True))
    svc.load()
    yield svc
    svc.registry.close()


@pytest.fixture()
def stream():
    return cp.cuda.Stream(non_blocking=True)


@pytest.fixture(scope="module")
def engines():
    """GPU 0's JPEG engines alone (no service, no model: these tests need neither onnxruntime-gpu)."""
    from shim.backends.cuda_jpeg import JpegEngines

    return JpegEngines(0)


_SPIN = r"""
extern "C" __global__ void spin(long long cycles) {
    long long start = clock64();
    while (clock64() - start < cycles) { }
}"""


def _hold_up(stream, ms: float = 50) -> None:
    """Queue a kernel that keeps ``stream`` busy about ``ms`` (at 2 GHz): what is queued behind it waits."""
    spin = cp.RawKernel(_SPIN, "spin")
    with stream:
        spin((1,), (1,), (np.int64(ms * 2e6),))


def _engines(jpeg_service):
    op = jpeg_service.registry.lookup("classify")
    assert op.decodes_jpeg, "the JPEG engines are not in use (see the log)"
    return op, op._pipeline._jpeg  # noqa: SLF001


def _pixel_items(op, images: np.ndarray) -> list:
    """``images`` decoded on the CPU (the twin's decode) for ``op``'s pipeline: no PlainJpeg."""
    from shim.ops.imaging import decode_image

    return [op._pipeline.prepare(decode_image(data, "image", 10**8)) for data in images]  # noqa: SLF001


def _decode(engines, jpegs: list, stream, owner=None) -> tuple[list[int], list]:
    """``jpegs`` (PlainJpeg) decoded by ``engines`` into an array of their own each: the indices not
    decoded, and the arrays (on the host, the stream waited for)."""
    targets = [cp.full(jpeg.shape, 7, cp.uint8) for jpeg in jpegs]
    cp.cuda.Device().synchronize()  # the fills, before the decode on the other stream
    missed = engines.decode_into(jpegs, [t.data.ptr for t in targets], stream.ptr, owner or SimpleNamespace())
    stream.synchronize()
    return missed, [cp.asnumpy(t) for t in targets]


def _plain(data: bytes):
    from shim.backends.base import PlainJpeg
    from shim.ops.jpeg import plain_jpeg_shape

    return PlainJpeg(data, plain_jpeg_shape(data, 10**8))


class _Through:
    """nvJPEG's library (``real``) as it is, but for what a test's subclass overrides."""

    def __init__(self, real) -> None:
        self._real = real

    def __getattr__(self, name):
        return getattr(self._real, name)


def _near_libjpeg_turbo(got: np.ndarray, data: bytes) -> str | None:
    """Why ``got`` is not ``data``'s libjpeg-turbo decode (within 1 per value), or None."""
    from shim.ops.jpeg import decode_plain_jpeg

    want = decode_plain_jpeg(data, 10**8)
    if got.shape != want.shape:
        return f"shape {got.shape}, not {want.shape}"
    off = np.abs(got.astype(np.int16) - want)
    return None if off.max() <= 1 and off.mean() < 0.01 else f"{off.max()} off, {off.mean():.4f} on average"


def test_the_engines_decode_plain_jpegs_as_libjpeg_turbo_does(engines, stream, chelsea, coffee):
    from shim.ops.jpeg import plain_jpeg_shape

    before = engines.fallbacks
    plain = {name: data for name, data in plain_variants(chelsea, coffee).items()
             if plain_jpeg_shape(data, 10**8) and name != "one pixel"}  # (the engines may want more than 1x1)
    assert len(plain) >= 10
    missed, decoded = _decode(engines, [_plain(data) for data in plain.values()], stream)
    assert missed == []
    for (name, data), got in zip(plain.items(), decoded):
        assert _near_libjpeg_turbo(got, data) is None, name
    assert engines.fallbacks == before


def test_a_batch_with_jpegs_the_engines_refuse_decodes_the_others_and_hands_those_back(engines, stream, chelsea,
                                                                                       coffee):
    """A progressive JPEG passed off as a plain one fails the engines' batch: each JPEG is then decoded
    alone, and only it comes back undecoded. A PNG (no JPEG header for nvJPEG) and a JPEG whose
    shape the op read otherwise than nvJPEG does are handed back without being decoded (the engines
    never write past the room made for an image)."""
    from shim.backends.base import PlainJpeg

    cat, cup = encode(chelsea, "JPEG", quality=90), encode(coffee, "JPEG", quality=85)
    png = PlainJpeg(encode(chelsea, "PNG"), chelsea.shape)
    short = PlainJpeg(cup, (coffee.shape[0] - 8, coffee.shape[1], 3))  # a lie about its height
    progressive = PlainJpeg(encode(coffee, "JPEG", quality=90, progressive=True), coffee.shape)
    before = engines.fallbacks
    missed, decoded = _decode(engines, [_plain(cat), png, _plain(cup), short, progressive, _plain(cat)], stream)
    assert missed == [1, 3, 4] and engines.fallbacks == before + 3
    for index, data in ((0, cat), (2, cup), (5, cat)):
        assert _near_libjpeg_turbo(decoded[index], data) is None, index
    assert (decoded[3] == 7).all(), "a JPEG whose shape was not nvJPEG's was decoded"


def test_batches_queued_back_to_back_on_one_stream_each_get_their_own_pixels(engines, stream, chelsea, coffee):
    """More batches than a decoder has states, queued on one stream held up by a kernel (as a
    batcher queues them behind the batches before), each decode into its own arrays: every one as
    libjpeg-turbo's (a state reused before its decode was done would mix them up). Closing the
    decoder waits for its decodes."""
    from shim.backends import cuda_driver
    from shim.backends.cuda_jpeg import STATES

    owner = SimpleNamespace()
    photos = [encode(chelsea, "JPEG", quality=q) for q in (70, 80, 90)] + [encode(coffee, "JPEG", quality=q)
                                                                            for q in (75, 85, 95)]
    batches = [[_plain(photos[(b + i) % len(photos)]) for i in range(1 + b % 4)] for b in range(3 * STATES + 1)]
    targets = [[cp.zeros(jpeg.shape, cp.uint8) for jpeg in batch] for batch in batches]
    cp.cuda.Device().synchronize()
    _hold_up(stream)
    for batch, arrays in zip(batches, targets):
        assert engines.decode_into(batch, [a.data.ptr for a in arrays], stream.ptr, owner) == []
    stream.synchronize()
    for batch, arrays in zip(batches, targets):
        for jpeg, array in zip(batch, arrays):
            assert _near_libjpeg_turbo(cp.asnumpy(array), jpeg.data) is None
    _hold_up(stream)
    engines.decode_into(batches[0], [a.data.ptr for a in targets[0]], stream.ptr, owner)
    decoder = owner._jpeg_decoder  # noqa: SLF001
    decoder.close()
    assert all(cuda_driver.done(event.ptr) for event in decoder._events)  # noqa: SLF001


def test_jpegs_unpickled_where_a_link_put_them_are_decoded_there(engines, stream, chelsea, coffee):
    """``PlainJpeg``s as the device process gets them from a request worker: unpickled on read-only
    views of the worker's arena (and one on a bytearray, as read off the socket), their bytes not
    copied, decoded behind a busy stream: each as libjpeg-turbo's."""
    import os
    import pickle

    from shim.workers.arena import Arena, PeerArena

    photos = [encode(chelsea, "JPEG", quality=q) for q in (70, 90)] + [encode(coffee, "JPEG", quality=q)
                                                                       for q in (75, 95)]
    arena = Arena(8 << 20)
    peer = PeerArena(os.dup(arena.fd))
    try:
        jpegs = []
        for data in photos:
            buffers: list[pickle.PickleBuffer] = []
            pickled = pickle.dumps(_plain(data), protocol=5, buffer_callback=buffers.append)
            offset = arena.lend(buffers[0].raw())
            jpegs.append(pickle.loads(pickled, buffers=[peer.view(offset, len(data))]))
        jpegs.append(pickle.loads(pickled, buffers=[bytearray(photos[-1])]))
        assert all(type(jpeg.data) is memoryview and jpeg.data.readonly for jpeg in jpegs)
        targets = [cp.zeros(jpeg.shape, cp.uint8) for jpeg in jpegs]
        cp.cuda.Device().synchronize()
        _hold_up(stream)
        assert engines.decode_into(jpegs, [t.data.ptr for t in targets], stream.ptr, SimpleNamespace()) == []
        stream.synchronize()
        for jpeg, target, data in zip(jpegs, targets, photos + photos[-1:]):
            assert _near_libjpeg_turbo(cp.asnumpy(target), data) is None
    finally:
        jpegs.clear()
        peer.close()
        arena.close()


def test_a_landed_batch_lets_go_of_a_request_workers_arena_without_waiting_for_its_slot(jpeg_service, chelsea):
    """A batch of JPEGs on views of a request worker's arena, queued on a bound thread: once it has
    landed, nothing of the pipeline holds those views (its slot still holds what it read on the
    device), so the arena of a worker that has gone since is unmapped with no further batch."""
    import os
    import pickle
    import time

    from shim.workers.arena import Arena, PeerArena
    from tests.test_cuda import _on_a_batcher_thread

    op, _ = _engines(jpeg_service)
    pipeline = op._pipeline  # noqa: SLF001
    data = encode(chelsea, "JPEG", quality=90)
    arena = Arena(8 << 20)
    peer = PeerArena(os.dup(arena.fd))

    def bound():
        pipeline.bind_thread()
        landing = pipeline._local.landing  # noqa: SLF001
        items = []
        for _ in range(3):
            buffers: list[pickle.PickleBuffer] = []
            pickled = pickle.dumps(_plain(data), protocol=5, buffer_callback=buffers.append)
            items.append(pickle.loads(pickled, buffers=[peer.view(arena.lend(buffers[0].raw()), len(data))]))
        logits = pipeline.logits_later(items).result(timeout=30)
        del items
        held = [slot.keep is not None for slot in landing._slots]  # noqa: SLF001
        # the worker goes: no view left, so unmapped (on a thread of its own if one was), while this
        # thread lives on (its end would free its landing's slots anyway)
        peer.close()
        deadline = time.monotonic() + 3
        while peer._mapping is not None and time.monotonic() < deadline:  # noqa: SLF001
            time.sleep(0.01)
        return logits, held, peer._mapping is None  # noqa: SLF001

    try:
        logits, held, unmapped = _on_a_batcher_thread(pipeline, bound)
        assert logits.shape == (3, 1000) and any(held), "the landed batch's device memory was let go already"
        assert unmapped, "a landed batch still holds the worker's arena"
    finally:
        peer.close()
        arena.close()


def test_a_batch_over_the_call_budget_goes_in_several_calls_more_than_the_states_each_as_libjpeg_turbo_does(
        engines, stream, chelsea, coffee, monkeypatch):
    """A batch whose pixels exceed the budget of one call (made small here: two photos' worth) is
    decoded in the calls ``split_calls`` gives, more of them than a decoder has states, queued behind
    a busy stream (a state's reuse waits for its decode): every JPEG as libjpeg-turbo's."""
    from shim.backends.cuda_jpeg import STATES
    from shim.backends.nvjpeg import split_calls

    photos = [encode(chelsea, "JPEG", quality=q) for q in (70, 90)] + [encode(coffee, "JPEG", quality=q)
                                                                       for q in (75, 95)]
    jpegs = [_plain(photos[i % len(photos)]) for i in range(3 * STATES + 2)]
    pixels = [jpeg.shape[0] * jpeg.shape[1] for jpeg in jpegs]
    monkeypatch.setattr(engines, "call_pixels", 2 * max(pixels))
    owner = SimpleNamespace()
    decoder = engines.decoder(owner)  # warmed up before its calls are counted
    real, batches = decoder._nv, []  # noqa: SLF001

    class Counting(_Through):
        def decode_batch(self, state, datas, targets, widths, stream_ptr):
            batches.append(len(datas))
            real.decode_batch(state, datas, targets, widths, stream_ptr)

    monkeypatch.setattr(decoder, "_nv", Counting(real))
    targets = [cp.zeros(jpeg.shape, cp.uint8) for jpeg in jpegs]
    cp.cuda.Device().synchronize()
    _hold_up(stream)
    assert engines.decode_into(jpegs, [t.data.ptr for t in targets], stream.ptr, owner) == []
    stream.synchronize()
    assert batches == [len(call) for call in split_calls(pixels, 2 * max(pixels))]
    assert len(batches) > STATES and max(batches) <= 2
    for jpeg, target in zip(jpegs, targets):
        assert _near_libjpeg_turbo(cp.asnumpy(target), jpeg.data) is None


def test_a_decoder_refused_at_its_warm_up_says_why_and_destroys_every_state(engines, monkeypatch):
    """A decoder whose warm-up pixels are wrong is refused with that reason, even when destroying its
    states fails, and every state is destroyed all the same (helper-68: the first failure had hidden
    the reason and left the other states)."""
    from shim.backends import cuda_driver
    from shim.backends.cuda_jpeg import STATES
    from shim.backends.nvjpeg import NvjpegError

    real, destroyed = engines._nv, []  # noqa: SLF001

    class Failing(_Through):
        def decode_batch(self, state, jpegs, targets, widths, stream):  # zeros: not the sample's pixels
            for data, target in zip(jpegs, targets):
                cuda_driver.fill_zeros(target, int(np.prod(real.shape(data))), stream)

        def destroy_state(self, state):
            destroyed.append(state)
            real.destroy_state(state)
            raise NvjpegError("nvjpegJpegStateDestroy", 8)

    monkeypatch.setattr(engines, "_nv", Failing(real))
    with pytest.raises(RuntimeError, match="pixels differ"):
        engines._new_decoder()  # noqa: SLF001
    assert len(destroyed) == STATES


def test_jpegs_of_odd_sizes_decoded_end_to_end_into_one_array_stay_within_their_rows(engines, stream, chelsea):
    """A batch's JPEGs go straight into one array, end to end at odd offsets (as a batch's rows lie
    there): each gets libjpeg-turbo's pixels and not a byte beyond its own, the guard bytes around
    and between them untouched."""
    sizes = [(9, 17), (47, 63), (300, 451), (1, 2), (297, 443), (8, 8)]
    jpegs = [_plain(encode(np.ascontiguousarray(chelsea[:h, :w]), "JPEG", quality=90)) for h, w in sizes]
    guard = 13
    starts, at = [], guard
    for jpeg in jpegs:
        starts.append(at)
        at += int(np.prod(jpeg.shape)) + guard
    flat = cp.full(at, 0xA5, cp.uint8)
    cp.cuda.Device().synchronize()
    missed = engines.decode_into(jpegs, [flat.data.ptr + start for start in starts], stream.ptr, SimpleNamespace())
    stream.synchronize()
    got = cp.asnumpy(flat)
    assert missed == [] or missed == [3], missed  # (1 x 2: the engines may refuse it; the CPU then decodes it)
    ends = [start + int(np.prod(jpeg.shape)) for start, jpeg in zip(starts, jpegs)]
    for index, (jpeg, start, end) in enumerate(zip(jpegs, starts, ends)):
        if index not in missed:
            assert _near_libjpeg_turbo(got[start:end].reshape(jpeg.shape), jpeg.data) is None, sizes[index]
    for before, after in zip([0, *ends], [*starts, len(got)]):
        assert (got[before:after] == 0xA5).all(), f"bytes {before}-{after} written"


def test_plain_jpegs_go_to_the_engines_and_give_the_logits_of_their_cpu_decode(jpeg_service, service, chelsea,
                                                                              coffee):
    from shim.backends.base import PlainJpeg

    op, engines = _engines(jpeg_service)
    before = engines.fallbacks
    images = np.array([encode(chelsea, "JPEG", quality=90), encode(coffee, "JPEG", quality=85),
                       encode(chelsea, "JPEG", quality=95, subsampling=0),
                       encode(chelsea, "JPEG", quality=75, subsampling=1),
                       encode(np.ascontiguousarray(chelsea[:297, :443]), "JPEG", quality=90)], dtype=object)
    items = op._prepare(images)  # noqa: SLF001
    assert all(isinstance(item, PlainJpeg) for item in items)  # left encoded: the device decodes them
    got = op.logits(items)
    same_pipeline = op.logits(_pixel_items(op, images))  # the CPU's decode, then the same GPU pipeline
    assert np.abs(got - same_pipeline).max() <= DECODE_TOLERANCE and _same_classes(got, same_pipeline)
    twin = service.registry.lookup("classify")
    assert got.argmax(axis=1).tolist() == twin.logits(twin._prepare(images)).argmax(axis=1).tolist()  # noqa: SLF001
    assert engines.fallbacks == before  # every one decoded by the engines


def test_a_batch_mixing_jpegs_pixels_and_what_the_engines_do_not_take_matches_row_by_row(jpeg_service, chelsea,
                                                                                          coffee):
    from shim.backends.base import PlainJpeg

    op, _ = _engines(jpeg_service)
    images = np.array([encode(chelsea, "JPEG", quality=90), encode(coffee, "PNG"),
                       encode(chelsea, "JPEG", quality=90, progressive=True), encode(coffee, "JPEG", quality=90),
                       encode(np.ascontiguousarray(chelsea[..., 1]), "JPEG", quality=90)] * 8, dtype=object)
    items = op._prepare(images)  # noqa: SLF001
    assert [isinstance(item, PlainJpeg) for item in items[:5]] == [True, False, False, True, False]
    got = op.logits(items)  # 40 rows: more than one batch of the model's
    want = op.logits(_pixel_items(op, images))
    assert np.abs(got - want).max() <= DECODE_TOLERANCE and _same_classes(got, want)


def test_what_the_engines_give_back_undecoded_the_cpu_decodes(jpeg_service, chelsea, coffee):
    """A PNG passed off as a plain JPEG: the engines cannot decode it; the op decodes it on the CPU
    and runs the batch again, every row as its CPU decode gives it."""
    from shim.backends.base import PlainJpeg

    op, engines = _engines(jpeg_service)
    before = engines.fallbacks
    png = encode(chelsea, "PNG")
    plain = encode(coffee, "JPEG", quality=90)
    items = [PlainJpeg(png, chelsea.shape, "image[0]"), *op._prepare(np.array([plain], dtype=object))]  # noqa: SLF001
    assert isinstance(items[1], PlainJpeg)
    got = op.logits(items)
    want = op.logits(_pixel_items(op, np.array([png, plain], dtype=object)))
    assert np.abs(got - want).max() <= DECODE_TOLERANCE and _same_classes(got, want)
    assert engines.fallbacks > before


def test_a_jpeg_that_cannot_be_decoded_fails_its_own_request_alone(jpeg_service, service, chelsea, coffee):
    """A JPEG whose quantization tables were cut out is refused (the CPU's, as the twin refuses it),
    one whose scan is garbage is answered or refused as the twin does; 32 requests beside them get
    their own answers."""
    good = encode(coffee, "JPEG", quality=90)
    untabled = without_segment(good, b"\xff\xdb")
    scan = good.index(b"\xff\xda")
    start = scan + 2 + int.from_bytes(good[scan + 2:scan + 4], "big")
    garbage = good[:start] + bytes(np.random.default_rng(5).integers(0, 0xFF, len(good) - start - 2,
                                                                      dtype=np.uint8)) + b"\xff\xd9"

    def call(op_service, data: bytes):
        request = InferRequest([Tensor.from_bytes_list("image", [data])], parameters={"top_k": 1})
        try:
            out = op_service.dispatcher.infer("classify", request)
        except InvalidInput as exc:
            return "InvalidInput", type(exc).__name__
        return "ok", {t.name: t.numpy() for t in out.outputs}["classes"].tolist()

    cat = encode(chelsea, "JPEG", quality=90)
    with ThreadPoolExecutor(34) as pool:
        results = list(pool.map(lambda data: call(jpeg_service, data), [untabled, garbage] + [cat, good] * 16))
    assert results[0][0] == call(service, untabled)[0] == "InvalidInput"
    assert results[1][0] == call(service, garbage)[0]
    want_cat, want_cup = call(service, cat), call(service, good)
    assert results[2::2] == [want_cat] * 16 and results[3::2] == [want_cup] * 16


def test_request_workers_send_plain_jpegs_as_they_came(models_dir, tmp_path, chelsea, coffee):
    import accel

    live = LiveShim(models_dir, tmp_path, "--device", "cuda", "--workers", "2", "--gpu-jpeg")
    try:
        live.wait_ready(180)
        client = accel.Client(live.unix_url, timeout=60)
        for _ in range(3):
            assert client.classify(encode(chelsea, "JPEG", quality=90))[0].label in CAT_LABELS
            assert client.classify(encode(coffee, "JPEG", quality=90))[0].label == "espresso"
    finally:
        assert live.stop() == 0
    log = live.log.read_text()
    assert "decoded on GPU 0's JPEG engines" in log
    assert "WARNING" not in "".join(line for line in log.splitlines() if "--gpu-jpeg" in line or "JPEG decoder" in line)


def test_jpeg_batches_queued_on_a_bound_stream_land_with_the_logits_of_batches_run_at_once(jpeg_service, chelsea,
                                                                                           coffee):
    """A batcher's thread queues its JPEG batches like its pixel batches (``logits_later``): the
    engines' decode, the resize, the model and the logits' download go onto its stream behind the
    batch before. Each batch (one size, several sizes, JPEGs among decoded pixels) gets the logits
    the same thread computes waiting (``logits``), and the CPU decode's within the decode tolerance.
    What a batch's queued work read (its pixels' device array) is let go on the batcher's thread
    (when its slot is next taken), never on the landing's: a landed batch's slot still holds it."""
    from shim.backends.base import PlainJpeg
    from tests.test_cuda import _on_a_batcher_thread

    op, engines = _engines(jpeg_service)
    pipeline = op._pipeline  # noqa: SLF001
    before = engines.fallbacks
    cat, cup = encode(chelsea, "JPEG", quality=90), encode(coffee, "JPEG", quality=85)
    small = encode(np.ascontiguousarray(chelsea[:201, :333]), "JPEG", quality=90)
    batches = [np.array(images, dtype=object) for images in
               ([cat] * 8, [cup, cat, cat, small, small, cup], [cat, encode(coffee, "PNG"), cat], [small] * 32, [cup])]
    prepared = [op._prepare(images) for images in batches]  # noqa: SLF001
    assert all(isinstance(item, PlainJpeg) for item in prepared[0])
    assert not isinstance(prepared[2][1], PlainJpeg)  # a PNG: decoded here, pixels beside JPEGs

    def bound():
        pipeline.bind_thread()
        landing = pipeline._local.landing  # noqa: SLF001
        futures = [pipeline.logits_later(items) for items in prepared]  # queued back to back
        queued = [future.result(timeout=30) for future in futures]
        held = [slot.keep is not None for slot in landing._slots]  # noqa: SLF001
        kinds = {jpegs for jpegs, _ in landing._gpu_s}  # noqa: SLF001 - the estimates, by kind and rows
        return queued, [pipeline.logits(items) for items in prepared], held, kinds

    queued, waited, held, kinds = _on_a_batcher_thread(pipeline, bound)
    assert all(held), "what a landed batch read was let go before its slot was taken again"
    assert True in kinds, "no JPEG batch's time on the GPU was estimated as a JPEG batch's"
    for images, got, want in zip(batches, queued, waited):
        assert got.shape == (len(images), 1000)
        assert np.array_equal(got, want)
        cpu = op.logits(_pixel_items(op, images))
        assert np.abs(got - cpu).max() <= DECODE_TOLERANCE and _same_classes(got, cpu)
    assert engines.fallbacks == before


def test_a_queued_batch_with_a_jpeg_the_engines_cannot_decode_queues_nothing_and_runs_again(jpeg_service, chelsea,
                                                                                            coffee):
    """A batch holding a JPEG the engines give back undecoded raises ``UndecodedImages`` from
    ``logits_later`` with nothing queued for it (its slot free again); the op decodes that image on
    the CPU and queues the batch again, and the batches behind it land with their own logits."""
    from shim.backends.base import PlainJpeg, UndecodedImages
    from tests.test_cuda import _on_a_batcher_thread

    op, engines = _engines(jpeg_service)
    pipeline = op._pipeline  # noqa: SLF001
    png, cup = encode(chelsea, "PNG"), encode(coffee, "JPEG", quality=90)
    plain = op._prepare(np.array([cup] * 3, dtype=object))  # noqa: SLF001
    pixels = _pixel_items(op, np.array([png], dtype=object))
    broken = [PlainJpeg(png, chelsea.shape, "image[0]"), *pixels, *plain]  # pixels beside: staged or not
    before = engines.fallbacks

    def bound():
        pipeline.bind_thread()
        landing = pipeline._local.landing  # noqa: SLF001
        first = pipeline.logits_later(plain)
        ring = landing._next  # noqa: SLF001
        try:
            pipeline.logits_later(broken)
        except UndecodedImages as exc:
            rows = exc.rows
        else:
            rows = None
        slot_back = landing._next == ring  # noqa: SLF001 - the failed batch's slot is the next one again
        again = op._run_batch_later([broken[:2], broken[2:]])  # noqa: SLF001 - as the batcher runs a batch
        after = pipeline.logits_later(plain)
        return rows, slot_back, first.result(timeout=30), again.result(timeout=30), after.result(timeout=30)

    rows, slot_back, first, again, after = _on_a_batcher_thread(pipeline, bound)
    assert rows == [0] and slot_back
    want = op.logits(_pixel_items(op, np.array([png, png] + [cup] * 3, dtype=object)))
    got = np.concatenate(again)
    assert np.abs(got - want).max() <= DECODE_TOLERANCE and _same_classes(got, want)
    assert np.array_equal(first, after) and np.abs(first - want[2:]).max() <= DECODE_TOLERANCE
    assert engines.fallbacks > before


@pytest.fixture(scope="module")
def two_launchers(models_dir, tmp_path_factory):
    """A --gpu-jpeg shim whose classifier has instance_count 2 in its model.json."""
    import json
    import shutil

    from shim.config import Settings
    from shim.service import build_service

    folder = tmp_path_factory.mktemp("models") / "efficientnet-lite0"
    shutil.copytree(models_dir / "efficientnet-lite0", folder)
    meta = json.loads((folder / "model.json").read_text())
    meta["instance_count"] = 2
    (folder / "model.json").write_text(json.dumps(meta))
    svc = build_service(Settings(device="cuda", models_dir=folder.parent, gpu_jpeg=True))
    svc.load()
    yield svc
    svc.registry.close()


def test_two_launcher_threads_queue_batches_on_streams_and_decoders_of_their_own(two_launchers, service, chelsea,
                                                                                  coffee):
    """instance_count 2 on the GPU: two batcher threads, each bound to its own stream, JPEG decoder
    and sessions, take turns to start batches (up to two queued on each); 64 concurrent callers of
    1-8 images (JPEGs, and PNGs decoded on the CPU beside them) each get their own classes, those
    of the CPU twin, and both threads started batches."""
    import threading

    op, engines = _engines(two_launchers)
    pipeline, backend, batcher = op._pipeline, two_launchers.backend, op._batcher  # noqa: SLF001
    assert [t.name for t in batcher._threads] == ["batcher-classify-0", "batcher-classify-1"]  # noqa: SLF001
    assert batcher._queue.cap == 4  # noqa: SLF001
    before = engines.fallbacks
    pictures = [encode(chelsea, "JPEG", quality=90), encode(coffee, "JPEG", quality=85), encode(coffee, "PNG"),
                encode(np.ascontiguousarray(chelsea[:201, :333]), "JPEG", quality=90)]
    twin = service.registry.lookup("classify")
    want = twin.logits(twin._prepare(np.array(pictures, dtype=object))).argmax(axis=1)  # noqa: SLF001
    started: list[tuple[str, int, int]] = []  # thread, its stream, its decoder
    original = pipeline.logits_later

    def spy(items):
        worker = backend._local.worker  # noqa: SLF001 - the thread's own (bind_thread)
        started.append((threading.current_thread().name, worker.stream.ptr, id(worker._jpeg_decoder)))  # noqa: SLF001
        return original(items)

    rng = np.random.default_rng(11)
    plans = [rng.integers(0, len(pictures), rng.integers(1, 9)).tolist() for _ in range(64)]

    pipeline.logits_later = spy
    try:
        for _ in range(3):
            assert _concurrent_top1(two_launchers, pictures, plans) == [[int(want[i]) for i in plan] for plan in plans]
    finally:
        del pipeline.logits_later
    threads = {name: (stream, decoder) for name, stream, decoder in started}
    assert set(threads) == {"batcher-classify-0", "batcher-classify-1"}, started
    assert len({stream for stream, _ in threads.values()}) == 2 and len({d for _, d in threads.values()}) == 2
    assert all(len({(s, d) for n, s, d in started if n == name}) == 1 for name in threads)  # each its own, always
    assert engines.fallbacks == before
