"""The nvJPEG binding (``shim.backends.nvjpeg``) without a GPU: where it finds the library, that
every call it makes is in the nvidia-nvjpeg wheel's library, how it fails, and how a batch is split
into calls under the pixel budget. Its decoding runs in
``tests/test_cuda_jpeg.py`` on the GPU machine."""
from __future__ import annotations

import ctypes
import ctypes.util
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from shim.backends import nvjpeg
from shim.backends.nvjpeg import CALL_PIXELS, Nvjpeg, NvjpegError, decode_in_calls, split_calls


def _has_driver() -> bool:
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def test_the_wheels_library_is_found_on_the_path(tmp_path, monkeypatch):
    lib = tmp_path / "site" / "nvidia" / "cu13" / "lib"
    lib.mkdir(parents=True)
    (lib / "libnvjpeg.so.13").write_bytes(b"")
    monkeypatch.setattr(sys, "path", [str(tmp_path / "elsewhere"), str(tmp_path / "site")])
    assert nvjpeg.library_path() == str(lib / "libnvjpeg.so.13")
    monkeypatch.setattr(sys, "path", [str(tmp_path / "elsewhere")])
    assert nvjpeg.library_path() is None


@pytest.mark.skipif(sys.platform != "linux", reason="the wheel is a test requirement on Linux only")
def test_the_test_environment_has_the_wheels_library():
    path = nvjpeg.library_path()
    assert path is not None and path.endswith("nvidia/cu13/lib/libnvjpeg.so.13")


@pytest.mark.skipif(_has_driver(), reason="a CUDA driver here: the handle may be made")
def test_every_call_is_bound_and_without_a_gpu_the_handle_fails_with_its_status():
    """Loading binds every call the shim makes (an unknown name would be an ``OSError``); making the
    handle on the engines then fails with nvJPEG's status named."""
    with pytest.raises(NvjpegError) as caught:
        Nvjpeg()
    assert caught.value.status != 0 and "nvjpegCreateEx failed: NVJPEG_STATUS_" in str(caught.value)


def test_a_file_that_is_not_the_library_is_an_os_error_that_names_the_wheel(tmp_path, monkeypatch):
    bad = tmp_path / "libnvjpeg.so.13"
    bad.write_bytes(b"not a shared library")
    monkeypatch.setattr(nvjpeg, "_NAMES", ("libnvjpeg-absent.so.99",))  # nor one from the loader
    with pytest.raises(OSError, match="install the nvidia-nvjpeg wheel"):
        Nvjpeg(str(bad))


def test_a_library_without_a_call_is_an_os_error_that_names_it(monkeypatch):
    """A libnvjpeg too old for a call the shim makes: refused when loaded, naming the call."""
    libc = ctypes.util.find_library("c")
    monkeypatch.setattr(nvjpeg, "_NAMES", ())
    with pytest.raises(OSError, match="has no nvjpegCreateEx"):
        Nvjpeg(libc)


@pytest.mark.parametrize(("status", "name"), [(3, "NVJPEG_STATUS_BAD_JPEG (3)"),
                                               (9, "NVJPEG_STATUS_IMPLEMENTATION_NOT_SUPPORTED (9)"),
                                               (42, "NVJPEG_STATUS_unknown (42)")])
def test_an_error_names_the_call_and_the_status(status, name):
    error = NvjpegError("nvjpegDecodeBatched", status)
    assert str(error) == f"nvjpegDecodeBatched failed: {name}" and error.status == status


_POINTER_TYPES = ("nvjpegHandle_t", "nvjpegJpegState_t", "cudaStream_t")


def _header() -> str:
    header = Path(nvjpeg.library_path()).parents[1] / "include" / "nvjpeg.h"  # type: ignore[arg-type]
    return header.read_text()


def _kind(ctype: object) -> str:
    if ctype is ctypes.c_void_p or hasattr(ctype, "contents"):
        return "pointer"
    return {ctypes.c_int: "int", ctypes.c_uint: "unsigned int", ctypes.c_size_t: "size_t"}[ctype]  # type: ignore[index]


def _declared_kind(parameter: str) -> str:
    if "*" in parameter or parameter.split()[0] in _POINTER_TYPES:
        return "pointer"
    if parameter.startswith("unsigned int"):
        return "unsigned int"
    return "size_t" if parameter.startswith("size_t") else "int"  # int, or an enum


@pytest.mark.skipif(sys.platform != "linux", reason="the wheel is a test requirement on Linux only")
def test_every_call_is_bound_as_the_wheels_header_declares_it():
    """Each call the binding makes has the header's number of parameters, each of its kind (a
    pointer or handle, an int or enum, an unsigned int, a size_t), and the constants are the
    header's: a binding that disagrees passes garbage to the library, which nothing else here sees."""
    text = _header()
    for _, name, args in nvjpeg.SIGNATURES:
        declared = re.search(rf"nvjpegStatus_t NVJPEGAPI {name}\s*\(([^;]*?)\)\s*;", text)
        assert declared is not None, name
        parameters = [" ".join(p.split()) for p in declared.group(1).split(",")]
        assert [_declared_kind(p) for p in parameters] == [_kind(a) for a in args], (name, parameters)
    values = {m.group(1): int(m.group(2)) for m in re.finditer(r"\b(NVJPEG_\w+)\s*=\s*(-?\d+)", text)}
    assert values["NVJPEG_BACKEND_HARDWARE"] == nvjpeg.BACKEND_HARDWARE
    assert values["NVJPEG_OUTPUT_RGBI"] == nvjpeg.OUTPUT_RGBI and values["NVJPEG_CSS_444"] == nvjpeg.CSS_444
    assert [values[f"NVJPEG_STATUS_{s}"] for s in nvjpeg._STATUS] == list(range(len(nvjpeg._STATUS)))  # noqa: SLF001
    assert re.search(r"#define NVJPEG_FLAGS_UPSAMPLING_WITH_INTERPOLATION 1<<5\b", text) and nvjpeg.FLAGS == 1 << 5
    assert ctypes.sizeof(nvjpeg.Image) == 4 * 8 + 4 * 8  # unsigned char *channel[4]; size_t pitch[4]


def test_a_batch_is_split_into_calls_of_at_most_the_budget_in_order():
    assert split_calls([], 10) == []
    assert split_calls([4, 4, 2, 1], 10) == [range(0, 3), range(3, 4)]
    assert split_calls([11, 3, 12, 10, 10], 10) == [range(0, 1), range(1, 2), range(2, 3), range(3, 4), range(4, 5)]
    assert split_calls([5, 5, 5], 10) == [range(0, 2), range(2, 3)]
    photo = 451 * 300
    assert split_calls([photo] * 32) == [range(0, 32)], "a batch of the sample photos is one call"
    assert [len(call) for call in split_calls([3024 * 4032] * 32)] == [5] * 6 + [2], "12-megapixel photos: five a call"
    assert CALL_PIXELS >= 32 * 1920 * 1080, "a full batch of 1080p frames is one call"


@given(st.lists(st.integers(1, 200), max_size=40), st.integers(1, 300))
def test_every_image_is_in_one_call_and_no_call_of_several_goes_over_the_budget(pixels, budget):
    calls = split_calls(pixels, budget)
    assert [i for call in calls for i in call] == list(range(len(pixels)))
    for call in calls:
        assert len(call) >= 1
        assert len(call) == 1 or sum(pixels[i] for i in call) <= budget
    for before, after in zip(calls, calls[1:]):  # a call ends only where the next image would not fit
        assert sum(pixels[i] for i in before) + pixels[after[0]] > budget


@given(st.lists(st.integers(1, 200), max_size=40), st.integers(1, 300), st.sets(st.integers(0, 39)))
def test_each_call_is_made_in_order_and_only_a_failed_calls_images_go_again_one_by_one(pixels, budget, bad):
    """As nvJPEG does, a call fails when any of its JPEGs is bad: exactly the bad ones come back, in
    order; every good one is decoded once, in its budgeted call or alone after that call failed."""
    bad = {i for i in bad if i < len(pixels)}
    calls: list[list[int]] = []

    def run(indices: list[int]) -> bool:
        calls.append(indices)
        return not bad & set(indices)

    assert decode_in_calls(pixels, budget, run) == sorted(bad)
    expected: list[list[int]] = []
    for call in split_calls(pixels, budget):
        expected.append(list(call))
        if bad & set(call) and len(call) > 1:
            expected += [[i] for i in call]
    assert calls == expected
    decoded = [i for call in calls if not bad & set(call) for i in call]
    assert sorted(decoded) == [i for i in range(len(pixels)) if i not in bad]


def test_a_jpegs_address_is_where_its_bytes_lie_and_nothing_is_copied():
    data = b"\xff\xd8 secret pixels \xff\xd9"
    assert nvjpeg.address(data) is data  # ctypes passes bytes' own buffer
    held = bytearray(data)
    for view in (memoryview(held), memoryview(held).toreadonly(), memoryview(held)[2:9]):
        at = nvjpeg.address(view)
        assert ctypes.string_at(at, view.nbytes) == view.tobytes()
        held[2] ^= 0xFF  # the same memory, not a copy
        assert ctypes.string_at(at, view.nbytes) == view.tobytes()
    wide = memoryview(held)[:16].cast("H")  # contiguous, but its len is not its size
    for bad in (bytearray(data), memoryview(held)[::2], memoryview(held)[:0], wide, wide.cast("B", (4, 4)), "text"):
        with pytest.raises(TypeError, match="bytes or a memoryview of flat bytes") as raised:
            nvjpeg.address(bad)
        assert "secret" not in str(raised.value)  # what it is, not what it holds


def test_the_library_is_handed_each_jpegs_own_bytes_and_size():
    """``shape`` and ``decode_batch`` as the library sees them (C stand-ins for its calls, built from the
    same signatures): each JPEG's bytes where they lie, bytes and an unpickled memoryview alike, its
    whole size, each target and pitch."""
    import pickle

    from shim.backends.base import PlainJpeg

    signatures = {name: args for _keeps, name, args in nvjpeg.SIGNATURES}
    seen: dict[str, object] = {}

    def c_call(name, fn):
        return ctypes.CFUNCTYPE(ctypes.c_int, *signatures[name])(fn)

    def info(_handle, data, size, components, _subsampling, widths, heights):
        seen["info"] = (data, ctypes.string_at(data, size))
        components[0], widths[0], heights[0] = 3, 7, 5
        return 0

    def decode(_handle, _state, datas, sizes, images, _stream):
        n = seen["n"]
        pointers = ctypes.cast(datas, ctypes.POINTER(ctypes.c_void_p))
        lengths = ctypes.cast(sizes, ctypes.POINTER(ctypes.c_size_t))
        targets = ctypes.cast(images, ctypes.POINTER(nvjpeg.Image))
        seen["decode"] = [(pointers[i], ctypes.string_at(pointers[i], lengths[i]), targets[i].channel[0],
                           targets[i].pitch[0]) for i in range(n)]
        return 0

    def initialize(_handle, _state, n, _threads, _format):
        seen["n"] = n
        return 0

    nv = Nvjpeg.__new__(Nvjpeg)
    nv.handle = 1
    nv._calls = {"nvjpegGetImageInfo": c_call("nvjpegGetImageInfo", info),  # noqa: SLF001
                 "nvjpegDecodeBatchedInitialize": c_call("nvjpegDecodeBatchedInitialize", initialize),
                 "nvjpegDecodeBatched": c_call("nvjpegDecodeBatched", decode)}
    first = b"\xff\xd8" + bytes(range(256)) * 3 + b"\x00 after a NUL\xff\xd9"
    second = b"\xff\xd8 another \x00\x00 jpeg \xff\xd9"
    buffers: list[pickle.PickleBuffer] = []
    pickled = pickle.dumps(PlainJpeg(second, (5, 7, 3)), protocol=5, buffer_callback=buffers.append)
    unpickled = pickle.loads(pickled, buffers=[bytearray(buffers[0].raw())]).data
    assert type(unpickled) is memoryview
    # where each lies: the library must read them there, not a copy gone once the call returns
    at = {first: ctypes.cast(ctypes.c_char_p(first), ctypes.c_void_p).value,
          second: np.frombuffer(unpickled, np.uint8).ctypes.data}
    for data in (first, unpickled):
        assert nv.shape(data) == (5, 7, 3) and seen["info"] == (at[bytes(data)], bytes(data))
    nv.decode_batch(9, [first, unpickled], [1000, 2000], [4, 7], 0)
    assert seen["decode"] == [(at[first], first, 1000, 12), (at[second], second, 2000, 21)]
