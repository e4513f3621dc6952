"""A request worker's backend: the device process's, over the link.

The worker runs the CPU half of each op (HTTP, decoding, validation, image decode and the
pipeline's ``prepare``, top-k) in its own interpreter; what needs the device (a GEMM, a model run,
a batch of prepared images) is one call to the device process, where the dynamic batchers mix
the requests of every worker.
"""
from __future__ import annotations

from concurrent.futures import Future
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..kernels.resample import Picture, pillow_preprocess, rgb_pixels
from ..modelrepo import ModelConfig
from .link import LinkClient


class RemoteRunner:
    """A model of the device process (``run`` goes through its batcher there)."""

    def __init__(self, link: LinkClient, name: str) -> None:
        self._link = link
        self.name = name
        self.inputs, self.outputs, self.device = link.call("model_specs", name)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self._link.call("run_model", self.name, feeds)

    def run_later(self, feeds: dict[str, np.ndarray]) -> Future[dict[str, np.ndarray]]:
        """``run`` without waiting: set on the link's reader thread as the reply comes in (the device
        process chunks and batches the request itself, holding no thread for it where it batches)."""
        return self._link.call_later("run_model_later", self.name, feeds)


class RemotePipeline:
    """classify's image pipeline: ``prepare`` here, as the device's pipeline would (pixels for the
    GPU's resize, or Pillow's preprocessing for a CPU pipeline); ``logits`` there, where plain JPEGs
    go as they came when the device decodes them (``decodes_jpeg``)."""

    def __init__(self, link: LinkClient, config: ModelConfig) -> None:
        assert config.preprocessing is not None
        self._link = link
        self._model = config.name
        self._pre = config.preprocessing
        self.device: str = link.call("pipeline_device", config.name)
        self.decodes_jpeg: bool = link.call("pipeline_decodes_jpeg", config.name)

    def prepare(self, image: Picture) -> np.ndarray:
        return rgb_pixels(image) if self.device == "cuda" else pillow_preprocess(image, self._pre)

    def logits(self, items: Sequence[Any]) -> np.ndarray:
        return self.logits_later(items).result()

    def logits_later(self, items: Sequence[Any]) -> Future[np.ndarray]:
        """``logits`` without waiting: set on the link's reader thread as the reply comes in."""
        return self._link.call_later("logits", self._model, list(items))

    def bind_thread(self) -> None:
        """Nothing to bind: the device process runs the batch."""


class RemoteBackend:
    """The device process's backend, as the worker's ops see it."""

    def __init__(self, link: LinkClient, name: str, description: dict[str, object]) -> None:
        self._link = link
        self.name = name
        self._described = description

    def gemm(self, a: np.ndarray, b: np.ndarray, c: np.ndarray | None, alpha: float, beta: float,
             precision: str = "default", out: np.ndarray | None = None) -> np.ndarray:
        result = self._link.call("gemm", a, b, c, alpha, beta, precision)
        if out is None:
            return result
        np.copyto(out, result)
        return out

    def load_model(self, path: Path, instances: int = 1) -> RemoteRunner:
        """The device process's model (it loaded its own instances)."""
        return RemoteRunner(self._link, path.parent.name)

    def register_host(self, address: int, nbytes: int, now: bool = False) -> None:
        """Workers do not map shared memory: requests that use it go to the device process."""

    def unregister_host(self, address: int) -> None:
        """Nothing was registered here."""

    def warmed(self) -> None:
        """The device process seals its own runners."""

    def image_pipeline(self, config: ModelConfig) -> RemotePipeline:
        return RemotePipeline(self._link, config)

    def describe(self) -> dict[str, object]:
        return dict(self._described)

