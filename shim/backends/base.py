"""What an op may ask of a backend. Backends are the only modules that import cupy or onnxruntime."""
from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, Sequence

import numpy as np

if TYPE_CHECKING:
    from ..kernels.resample import Picture
    from ..modelrepo import ModelConfig


@dataclass(frozen=True)
class TensorSpec:
    """A declared input or output: name, protocol datatype (None: any), shape (-1: any size;
    None: any rank), and whether it may be left out."""

    name: str
    datatype: str | None
    shape: tuple[int, ...] | None
    optional: bool = False

    def as_json(self) -> dict[str, object]:
        return {"name": self.name, "datatype": self.datatype or "ANY",
                "shape": list(self.shape) if self.shape is not None else [-1],
                **({"optional": True} if self.optional else {})}


class ModelRunner(Protocol):
    """A loaded model that runs on numpy arrays; ``device`` names where it really runs."""

    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    device: str

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


@dataclass(frozen=True)
class PlainJpeg:
    """An image left encoded for a pipeline that ``decodes_jpeg``: a plain baseline JPEG (the op
    checked its markers), the shape of its pixels (height, width, 3) and what the request calls it.

    Pickled (protocol 5), its bytes go out of band: over the link, through the worker's arena where
    they fit, and the device builds it on them where they lie (``data`` is then a memoryview)."""

    data: bytes | memoryview
    shape: tuple[int, int, int]
    what: str = "image"

    def __reduce_ex__(self, protocol: Any) -> Any:
        # out of band from protocol 5; before it as bytes (a memoryview cannot be pickled in band)
        data = pickle.PickleBuffer(self.data) if protocol >= 5 else bytes(self.data)
        return _plain_jpeg, (data, self.shape, self.what)


def _plain_jpeg(data: Any, shape: tuple[int, int, int], what: str) -> PlainJpeg:
    """A ``PlainJpeg`` unpickled: on its bytes as they came (an out-of-band buffer is whatever the
    receiver built it on: an arena's array, a bytearray, a view of what it read), as flat bytes."""
    return PlainJpeg(data if isinstance(data, bytes) else memoryview(data).cast("B"), shape, what)


class UndecodedImages(Exception):
    """A pipeline could not decode these ``rows`` of the batch it was given (``PlainJpeg``s): the
    caller decodes them on the CPU and runs the batch again."""

    def __init__(self, rows: list[int]) -> None:
        super().__init__(f"rows {rows} not decoded on the device")
        self.rows = rows


class ImagePipeline(Protocol):
    """classify's device half: ``prepare`` runs in the request's thread on one decoded RGB image;
    ``logits`` runs a batch of prepared images (from any number of requests) through the model, and
    of plain JPEGs left encoded (``PlainJpeg``) where ``decodes_jpeg``."""

    device: str
    decodes_jpeg: bool  # ``logits`` takes ``PlainJpeg`` items too, decoding them on the device

    def prepare(self, image: Picture) -> Any: ...

    def logits(self, items: Sequence[Any]) -> np.ndarray: ...

    def bind_thread(self) -> None:
        """Give the calling thread (a batcher's, once at its start) device state of its own (a CUDA
        stream and buffers) for the batches it runs; a no-op where there is none."""
        ...


class Backend(Protocol):
    """A device: GEMM, model execution and classify's image pipeline."""

    name: str

    def gemm(self, a: np.ndarray, b: np.ndarray, c: np.ndarray | None, alpha: float, beta: float,
             precision: str = "default", *, out: np.ndarray | None = None) -> np.ndarray:
        """``alpha * a @ b + beta * c`` in the dtype of ``a`` (FP16 accumulates in FP32);
        ``precision="tf32"`` lets FP32 products use TF32 (10-bit mantissa) inputs.

        Args:
            out: a C-contiguous host array of the result's shape and dtype to write the result into
                (e.g. a client's shared-memory region; it may overlap the operands); returned. The
                CUDA backend copies the result into it by DMA when it is registered memory.

        Raises:
            InsufficientStorage: the operands cannot fit the device's memory limit.
        """
        ...

    def load_model(self, path: Path, instances: int = 1) -> ModelRunner:
        """The model at ``path``, ready to run ``instances`` batches at once (a model.json's
        ``instance_count``: the CUDA backend gives each its own copy of the sessions)."""
        ...

    def register_host(self, address: int, nbytes: int, now: bool = False) -> None:
        """Host memory that operands will often come from (a client's shared-memory region, a
        request worker's link arena): the CUDA backend pins it (after its first use, or at once
        with ``now``) so that those operands go up by DMA; the CPU backend ignores it."""
        ...

    def unregister_host(self, address: int) -> None: ...

    def image_pipeline(self, config: ModelConfig) -> ImagePipeline: ...

    def warmed(self) -> None:
        """Every op has warmed up: the CUDA backend captures no more CUDA graphs from now on (a batch
        size first seen later runs node by node: a capture beside live work would break)."""
        ...

    def describe(self) -> dict[str, object]:
        """Device name and library versions, for metadata and benchmarks."""
        ...
