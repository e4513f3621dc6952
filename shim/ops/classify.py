"""``classify``: encoded images in, top-k ImageNet labels, softmax scores and class indices out."""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from accel.errors import InvalidInput

from ..backends.base import Backend, ModelRunner, TensorSpec
from ..modelrepo import ModelConfig
from .base import Op, int_param
from .imaging import decode_image, preprocess, sample_png


class ClassifyOp(Op):
    """Image classification with a model of the repository that has labels and preprocessing."""

    name = "classify"
    inputs = [TensorSpec("image", "BYTES", (-1,))]
    outputs = [TensorSpec("labels", "BYTES", (-1, -1)), TensorSpec("scores", "FP32", (-1, -1)),
               TensorSpec("classes", "INT64", (-1, -1))]
    parameters = {"top_k": "how many classes per image, 1..number of labels (default 5)"}

    def __init__(self, backend: Backend, config: ModelConfig, max_pixels: int, max_batch: int) -> None:
        if not config.labels or config.preprocessing is None:
            raise ValueError(f"model {config.name} has no labels or preprocessing in model.json")
        self._backend = backend
        self.backend = backend.name
        self.config = config
        self._labels = np.array([s.encode("utf-8") for s in config.labels], dtype=object)
        self._max_pixels = max_pixels
        self._max_batch = max_batch
        self._runner: ModelRunner | None = None
        self._input = self._output = ""

    def load(self) -> None:
        self._runner = self._backend.load_model(self.config.onnx)
        self._input, self._output = self._runner.inputs[0].name, self._runner.outputs[0].name

    def metadata(self) -> dict[str, Any]:
        meta = super().metadata()
        meta["model"] = self.config.name
        return meta

    def run(self, inputs: dict[str, np.ndarray], parameters: Mapping[str, Any]) -> dict[str, np.ndarray]:
        images = inputs["image"]
        top_k = int_param(parameters, "top_k", 5, 1, len(self._labels))
        if not 1 <= len(images) <= self._max_batch:
            raise InvalidInput(f"classify takes 1 to {self._max_batch} images per request, got {len(images)}")
        batch = np.stack([
            preprocess(decode_image(data, f"image[{i}]", self._max_pixels), self.config.preprocessing)
            for i, data in enumerate(images)
        ])
        logits = self.logits(batch)
        return top_k_softmax(logits, top_k, self._labels)

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """The model's logits for preprocessed images, run in chunks of the model's batch size."""
        assert self._runner is not None, "classify used before load()"
        step = max(1, self.config.max_batch_size)
        parts = [self._runner.run({self._input: batch[i:i + step]})[self._output]
                 for i in range(0, len(batch), step)]
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def warmup(self) -> None:
        png = sample_png()
        for n in (1, 2):
            self.run({"image": np.array([png] * n, dtype=object)}, {})


def top_k_softmax(logits: np.ndarray, k: int, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Softmax probabilities of the ``k`` best classes per row, best first (ties: lower index)."""
    z = logits.astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    order = np.argsort(-p, axis=1, kind="stable")[:, :k]
    return {"labels": labels[order], "scores": np.take_along_axis(p, order, 1).astype(np.float32),
            "classes": order.astype(np.int64)}
