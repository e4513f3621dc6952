"""The ops the shim serves: each a "model" of the Open Inference Protocol."""
from .base import Op
from .classify import ClassifyOp
from .gemm import GemmOp
from .model import ModelOp
from .noop import NoopOp

__all__ = ["Op", "NoopOp", "GemmOp", "ClassifyOp", "ModelOp"]
