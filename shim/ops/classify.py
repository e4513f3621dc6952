"""``classify``: encoded images in, top-k ImageNet labels, softmax scores and class indices out."""
from __future__ import annotations

from concurrent.futures import Future
from typing import Any, Callable, Mapping, Sequence, TypeVar

import numpy as np

from accel.errors import InvalidInput

from ..backends.base import Backend, ImagePipeline, PlainJpeg, TensorSpec, UndecodedImages
from ..batching import Batcher, BatchingFactory
from ..futures import then
from ..padding import padded_sizes
from ..modelrepo import ModelConfig
from .base import Op, int_param
from .imaging import decode_image, sample_png
from .jpeg import plain_jpeg_shape

T = TypeVar("T")


class ClassifyOp(Op):
    """Image classification with a model of the repository that has labels and preprocessing.

    Images are decoded in the request's thread; the device work (preprocessing on the GPU, the
    model) runs on dynamic batches that mix the images of concurrent requests.
    """

    name = "classify"
    inputs = [TensorSpec("image", "BYTES", (-1,))]
    outputs = [TensorSpec("labels", "BYTES", (-1, -1)), TensorSpec("scores", "FP32", (-1, -1)),
               TensorSpec("classes", "INT64", (-1, -1))]
    parameters = {"top_k": "how many classes per image, 1..number of labels (default 5)"}

    def __init__(self, backend: Backend, config: ModelConfig, max_pixels: int, max_batch: int,
                 batching: BatchingFactory | None = None) -> None:
        if not config.labels or config.preprocessing is None:
            raise ValueError(f"model {config.name} has no labels or preprocessing in model.json")
        self._backend = backend
        self.backend = backend.name
        self.config = config
        self._labels = np.array([s.encode("utf-8") for s in config.labels], dtype=object)
        self._max_pixels = max_pixels
        self._max_batch = max_batch
        self._batching = batching
        self._pipeline: ImagePipeline | None = None
        self._batcher: Batcher[list[Any], np.ndarray] | None = None

    def load(self) -> None:
        self._pipeline = self._backend.image_pipeline(self.config)
        self.backend = self._pipeline.device
        if self._batching is not None:
            # a pipeline that answers in a Future starts its batches and goes on: a request worker's
            # (over the link: started on the thread of the last request expected, or the batcher's,
            # answered on the link's reader; it binds no thread, so it needs no thread_start), or the
            # GPU's (queued on a batcher thread's bound stream, ``in_flight`` at once on each of
            # instance_count threads, answered as the GPU finishes each)
            later = self._run_batch_later if hasattr(self._pipeline, "logits_later") else None
            in_flight = getattr(self._pipeline, "in_flight", 0)
            instances = self.config.instances()
            queued = bool(later and in_flight)
            self._batcher = self._batching.make(self.name, self._run_batch, self.config.max_batch_size,
                                                self.config.max_queue_delay_us,
                                                instances * in_flight if queued else instances,
                                                thread_start=self._pipeline.bind_thread if queued or not later else None,
                                                run_batch_later=later,
                                                busy_until=getattr(self._pipeline, "busy_until", None),
                                                land_answers=getattr(self._pipeline, "lands_apart", False),
                                                launchers=instances if queued else 1)

    def metadata(self) -> dict[str, Any]:
        meta = super().metadata()
        meta["model"] = self.config.name
        meta["max_batch_size"] = self.config.max_batch_size
        meta["dynamic_batching"] = {"enabled": self._batcher is not None,
                                    "max_queue_delay_us": self.config.max_queue_delay_us,
                                    "instance_count": self.config.instances()}
        return meta

    def run(self, inputs: dict[str, np.ndarray], parameters: Mapping[str, Any]) -> dict[str, np.ndarray]:
        images = inputs["image"]
        top_k = int_param(parameters, "top_k", 5, 1, len(self._labels))
        if not 1 <= len(images) <= self._max_batch:
            raise InvalidInput(f"classify takes 1 to {self._max_batch} images per request, got {len(images)}")
        assert self._pipeline is not None, "classify used before load()"
        if self._batcher is None:
            logits = self.logits(self._prepare(images))
        else:
            with self._batcher.incoming() as submit:
                items = self._prepare(images)
                logits = submit(items, len(items))
        return top_k_softmax(logits, top_k, self._labels)

    def logits(self, items: list[Any]) -> np.ndarray:
        """Prepared images (``pipeline.prepare``, maybe done by a request worker) through the model,
        in a dynamic batch with other requests' images when batching."""
        assert self._pipeline is not None, "classify used before load()"
        if self._batcher is None:
            return self._pipeline_logits(items)
        return self._batcher.submit(items, len(items))

    def _pipeline_logits(self, items: Sequence[Any]) -> np.ndarray:
        """The pipeline's logits of ``items``; JPEGs the device did not decode are decoded here, as
        the CPU twin decodes them (an error is that image's request's: a failed batch of several is
        run again request by request), and the batch runs again."""
        assert self._pipeline is not None
        return self._decoding_missed(self._pipeline.logits, items)

    def _decoding_missed(self, run: Callable[[Sequence[Any]], T], items: Sequence[Any]) -> T:
        """``run(items)``, again with the JPEGs it did not decode (``UndecodedImages``) decoded here."""
        assert self._pipeline is not None
        while True:  # each round decodes at least one more image here: it ends
            try:
                return run(items)
            except UndecodedImages as exc:
                items = list(items)
                for row in exc.rows:
                    jpeg = items[row]
                    items[row] = self._pipeline.prepare(decode_image(jpeg.data, jpeg.what, self._max_pixels))

    @property
    def decodes_jpeg(self) -> bool:
        """Whether the device decodes plain JPEGs (then they go to it as they came)."""
        return self._pipeline is not None and self._pipeline.decodes_jpeg

    @property
    def batches(self) -> bool:
        """Whether the op batches (then ``logits_later`` may be used once it is loaded)."""
        return self._batching is not None

    def logits_later(self, items: list[Any]) -> Future[np.ndarray]:
        """``logits`` without waiting: the Future is set on the batcher's thread as the batch ends.

        Raises:
            RuntimeError: the op does not batch.
            NotReady: it is closed (a 503 to retry).
        """
        if self._batcher is None:
            raise RuntimeError(f"classify with {self.config.name} has no batcher to queue on")
        return self._batcher.submit_later(items, len(items))

    def _prepare(self, images: np.ndarray) -> list[Any]:
        """Each image decoded and prepared here, or a plain JPEG left for the device to decode."""
        pipeline = self._pipeline
        assert pipeline is not None
        items = []
        for i, data in enumerate(images):
            shape = plain_jpeg_shape(data, self._max_pixels) if pipeline.decodes_jpeg else None
            what = f"image[{i}]"
            items.append(PlainJpeg(bytes(data), shape, what) if shape is not None
                         else pipeline.prepare(decode_image(data, what, self._max_pixels)))
        return items

    def _run_batch(self, groups: Sequence[list[Any]]) -> list[np.ndarray]:
        """The images of several requests as one batch; each request gets its own rows back."""
        assert self._pipeline is not None
        return _rows_by_request(self._pipeline_logits([item for group in groups for item in group]), groups)

    def _run_batch_later(self, groups: Sequence[list[Any]]) -> Future[list[np.ndarray]]:
        """``_run_batch`` through a pipeline that answers in a Future (``logits_later``)."""
        logits = self._decoding_missed(self._pipeline.logits_later,  # type: ignore[union-attr]
                                       [item for group in groups for item in group])
        return then(logits, lambda batch: _rows_by_request(batch, groups))

    def warmup(self) -> None:
        """The whole path once (the model must give one score per label), then every batch size the
        batcher makes on a GPU: each size a batch pads to (``padded_sizes``) up to the padded model
        batch size there (through ``logits``, which merged requests take: a batch may hold more images
        than one request may send), 1 and 2 on the CPU.

        Raises:
            ValueError: the model's classes and the labels differ in number.
        """
        png = sample_png()
        classes = self.logits(self._prepare(np.array([png], dtype=object))).shape[-1]
        if classes != len(self._labels):
            raise ValueError(f"model {self.config.name}: {classes} classes out of the model, {len(self._labels)} labels")
        self.run({"image": np.array([png], dtype=object)}, {})
        if self.decodes_jpeg:  # and the device's decode, once
            self.run({"image": np.array([sample_png(image_format="JPEG")], dtype=object)}, {})
        top = self.config.max_batch_size if self.backend == "cuda" else 2
        for n in padded_sizes(top)[1:]:  # a batch of max_batch_size rows pads to the last: warm it too
            self.logits(self._prepare(np.array([png] * n, dtype=object)))

    def close(self) -> None:
        if self._batcher is not None:
            self._batcher.close()


def _rows_by_request(logits: np.ndarray, groups: Sequence[list[Any]]) -> list[np.ndarray]:
    """A batch's rows split back out, one view per request of ``groups`` (slices: ``np.split`` took
    4-9 us of a busy thread's interpreter lock for what these take 0.2-1)."""
    rows, at = [], 0
    for group in groups:
        rows.append(logits[at:at + len(group)])
        at += len(group)
    return rows


def top_k_softmax(logits: np.ndarray, k: int, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Softmax probabilities of the ``k`` best classes per row, best first (ties: lower index)."""
    z = logits.astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    order = top_k_order(p, k)
    return {"labels": labels[order], "scores": _along_rows(p, order).astype(np.float32),
            "classes": order.astype(np.int64)}


def _along_rows(a: np.ndarray, index: np.ndarray) -> np.ndarray:
    """``a``'s values at ``index`` (one row of indices per row of ``a``): ``np.take_along_axis(a,
    index, 1)`` without its index building in Python (3 us a call against 1)."""
    return a[np.arange(a.shape[0])[:, None], index]


PARTITION_ROWS = 3  # from this many rows on, top-k partitions rather than sorts whole rows


def top_k_order(p: np.ndarray, k: int) -> np.ndarray:
    """The first ``k`` of each row's indices sorted by value, largest first, ties to the lower index
    (a stable descending sort's).

    From ``PARTITION_ROWS`` rows on, without sorting whole rows: a stable sort of 1000 classes costs
    about 45 us a row, the partition and the checks on the k + 1 values it picks a few plus a dozen
    small numpy calls. With fewer rows the sort is cheaper where it counts: in a busy request worker
    the small calls' turns at the interpreter lock cost more than the one sort, which lets go of it
    (four threads: 51 against 72 us of CPU for one row, even at two, ahead from three: 141 / 120).
    """
    rows, n = p.shape
    if k <= 0 or k >= n or rows < PARTITION_ROWS:
        return np.argsort(-p, axis=1, kind="stable")[:, :max(k, 0)]
    part = np.argpartition(p, (n - k - 1, n - k), axis=1)[:, n - k - 1:]  # the (k+1)-th largest, then the k largest
    edge = _along_rows(p, part)
    best, values = part[:, 1:], edge[:, 1:]
    order = _along_rows(best, np.lexsort((best, -values), axis=1))
    # rows whose k-th value ties the next (which of them is in depends on the index), or with NaN
    # among them (the partition takes NaN for the largest, the stable sort for the last): as the
    # stable sort has them
    redo = (edge[:, 0] == values.min(axis=1)) | np.isnan(edge).any(axis=1)
    if redo.any():
        order[redo] = np.argsort(-p[redo], axis=1, kind="stable")[:, :k]
    return order
