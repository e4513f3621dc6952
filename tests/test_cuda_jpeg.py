"""``--gpu-jpeg``: classify's plain JPEGs decoded on the GPU's JPEG engines, against the CPU twin
that decodes them with libjpeg-turbo (run on the GPU machine with nvImageCodec installed:
``pytest -m gpu``; ``ci/gpu-run.sh`` installs it from ``.whl-gpu``)."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from accel.errors import InvalidInput
from tests.conftest import LiveShim, encode

pytestmark = pytest.mark.gpu
pytest.importorskip("cupy")
pytest.importorskip("nvidia.nvimgcodec")

CAT_LABELS = {"tiger cat", "tabby, tabby cat", "Egyptian cat"}


@pytest.fixture(scope="module")
def jpeg_service(models_dir):
    from shim.config import Settings
    from shim.service import build_service

    svc = build_service(Settings(device="cuda", models_dir=models_dir, gpu_jpeg=True))
    svc.load()
    yield svc
    svc.registry.close()


def _photos(chelsea: np.ndarray, coffee: np.ndarray) -> dict[str, bytes]:
    return {"chelsea 4:2:0": encode(chelsea, "JPEG", quality=90), "coffee 4:2:0": encode(coffee, "JPEG", quality=85),
            "chelsea 4:4:4": encode(chelsea, "JPEG", quality=95, subsampling=0),
            "chelsea 4:2:2": encode(chelsea, "JPEG", quality=75, subsampling=1),
            "odd size": encode(np.ascontiguousarray(chelsea[:297, :443]), "JPEG", quality=90)}


def test_plain_jpegs_go_to_the_engines_and_give_the_cpu_twins_logits(jpeg_service, service, chelsea, coffee):
    from shim.ops.jpeg import PlainJpeg

    gpu_op, cpu_op = jpeg_service.registry.lookup("classify"), service.registry.lookup("classify")
    assert gpu_op.decodes_jpeg and not cpu_op.decodes_jpeg
    photos = _photos(chelsea, coffee)
    images = np.array(list(photos.values()), dtype=object)
    items = gpu_op._prepare(images)  # noqa: SLF001
    assert all(isinstance(item, PlainJpeg) for item in items)  # left encoded: the device decodes them
    got, want = gpu_op.logits(items), cpu_op.logits(cpu_op._prepare(images))  # noqa: SLF001
    for row, name in enumerate(photos):
        assert np.abs(got[row] - want[row]).max() <= 1e-3, name
        assert got[row].argmax() == want[row].argmax(), name


def test_a_batch_mixing_jpegs_pixels_and_what_the_engines_do_not_take_matches_row_by_row(
        jpeg_service, service, chelsea, coffee):
    from shim.ops.jpeg import PlainJpeg

    gpu_op, cpu_op = jpeg_service.registry.lookup("classify"), service.registry.lookup("classify")
    images = np.array([encode(chelsea, "JPEG", quality=90), encode(coffee, "PNG"),
                       encode(chelsea, "JPEG", quality=90, progressive=True), encode(coffee, "JPEG", quality=90),
                       encode(np.ascontiguousarray(chelsea[..., 1]), "JPEG", quality=90)], dtype=object)
    items = gpu_op._prepare(images)  # noqa: SLF001
    assert [isinstance(item, PlainJpeg) for item in items] == [True, False, False, True, False]
    got, want = gpu_op.logits(items), cpu_op.logits(cpu_op._prepare(images))  # noqa: SLF001
    assert np.abs(got - want).max() <= 1e-3
    assert got.argmax(axis=1).tolist() == want.argmax(axis=1).tolist()


def test_a_jpeg_the_engines_cannot_decode_fails_its_own_request_alone(jpeg_service, service, chelsea, coffee):
    """A baseline JPEG whose scan is garbage (its markers whole) reaches the engines; whatever they
    make of it, the request gets what the CPU twin gives it, and 32 requests beside it their own."""
    from accel.codec import InferRequest
    from accel.tensor import Tensor

    good = encode(coffee, "JPEG", quality=90)
    scan = good.index(b"\xff\xda")
    start = scan + 2 + int.from_bytes(good[scan + 2:scan + 4], "big")
    bad = good[:start] + bytes(np.random.default_rng(5).integers(0, 0xFF, len(good) - start - 2, dtype=np.uint8)) \
        + b"\xff\xd9"

    def call(op_service, data: bytes):
        request = InferRequest([Tensor.from_bytes_list("image", [data])], parameters={"top_k": 1})
        try:
            out = op_service.dispatcher.infer("classify", request)
        except InvalidInput as exc:
            return "InvalidInput", str(exc)
        return "ok", {t.name: t.numpy() for t in out.outputs}["classes"].tolist()

    want_bad = call(service, bad)
    cat = encode(chelsea, "JPEG", quality=90)
    with ThreadPoolExecutor(33) as pool:
        results = list(pool.map(lambda data: call(jpeg_service, data), [bad] + [cat, good] * 16))
    assert results[0][0] == want_bad[0]  # refused where the twin refuses it, answered where it answers
    want_cat, want_cup = call(service, cat), call(service, good)
    assert results[1::2] == [want_cat] * 16 and results[2::2] == [want_cup] * 16


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
    assert "decoded on GPU 0's JPEG engines" in live.log.read_text()
