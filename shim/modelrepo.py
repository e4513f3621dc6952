"""The model repository: one folder per model with ``model.onnx``, optional labels and ``model.json``."""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from accel.errors import OpNotFound

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the model's input tensor."""

    size: int = 224
    crop: float = 0.875
    resize: str = "bicubic"
    mean: float = 127.0
    std: float = 128.0
    layout: str = "NCHW"
    color: str = "RGB"


@dataclass
class ModelConfig:
    """One model of the repository (its ``model.json``)."""

    name: str
    path: Path
    onnx: Path
    labels: list[str] | None = None
    preprocessing: Preprocessing | None = None
    sha256: str | None = None
    max_batch_size: int = 32
    max_queue_delay_us: int = 2000
    instance_count: int | None = None  # batches in flight at once, each on its own copy of the model (None: 1)
    raw: dict[str, Any] = field(default_factory=dict)

    def instances(self) -> int:
        """How many batches of this model may run at once, each on a copy of the model's sessions of
        its own on a GPU: one unless model.json says more (on the H200, one carried the most images
        per second, with shared sessions and with copies alike: bench/results/NOTES.md)."""
        return self.instance_count or 1


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class ModelRepository:
    """Reads the models under ``root`` (a folder per model; the folder name is the model name)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir()
                      if NAME.match(p.name) and (p / "model.onnx").is_file())

    def load(self, name: str, verify: bool = False) -> ModelConfig:
        """The config of model ``name``; with ``verify`` its ONNX file must match the checksum."""
        if not NAME.match(name) or not (self.root / name / "model.onnx").is_file():
            raise OpNotFound(f"no model {name!r} in {self.root}")
        folder = self.root / name
        meta: dict[str, Any] = {}
        if (folder / "model.json").is_file():
            meta = json.loads((folder / "model.json").read_text(encoding="utf-8"))
        labels = None
        label_file = meta.get("labels")
        if label_file:
            labels = (folder / label_file).read_text(encoding="utf-8").splitlines()
        pre = meta.get("preprocessing")
        config = ModelConfig(
            name=name, path=folder, onnx=folder / "model.onnx", labels=labels,
            preprocessing=Preprocessing(**pre) if pre else None, sha256=meta.get("sha256"),
            max_batch_size=int(meta.get("max_batch_size", 32)),
            max_queue_delay_us=int(meta.get("max_queue_delay_us", 2000)),
            instance_count=int(meta["instance_count"]) if meta.get("instance_count") is not None else None, raw=meta,
        )
        if verify and config.sha256 and file_sha256(config.onnx) != config.sha256:
            raise ValueError(f"model {name}: {config.onnx} does not match the sha256 in model.json")
        return config
