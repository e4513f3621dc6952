"""``accelshim serve`` with three test-only ops, for tests that need a request to be slow or to fail.

    python tests/shim_test_ops.py serve [accelshim serve flags]

- ``sleep``: echoes its inputs after ``parameters.seconds`` (at most 10): a request in flight.
- ``fail``: raises an unexpected error, as a kernel that fails would (500, this request alone).
- ``lose_device``: raises DeviceLost, as the CUDA backend does on a sticky error (the shim exits 3).

The ops go through the real registry, dispatcher, app and server; only their ``run`` is made up.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Mapping

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from accel.tensor import Tensor  # noqa: E402
from shim.faults import DeviceLost  # noqa: E402
from shim.ops import Op  # noqa: E402
from shim.ops.base import float_param  # noqa: E402

ENTRY = (str(Path(__file__).resolve()),)  # LiveShim(..., entry=ENTRY)


class SleepOp(Op):
    name = "sleep"
    inputs: list = []
    outputs: list = []

    def run(self, inputs: dict, parameters: Mapping[str, Any]) -> dict:
        time.sleep(min(max(float_param(parameters, "seconds", 0.5), 0.0), 10.0))
        return dict(inputs)

    def run_tensors(self, inputs: list[Tensor], parameters: Mapping[str, Any]) -> list[Tensor]:
        self.run({}, parameters)
        return [Tensor(t.name, t.datatype, t.shape, t.raw) for t in inputs]


class FailOp(Op):
    name = "fail"
    inputs: list = []
    outputs: list = []

    def run(self, inputs: dict, parameters: Mapping[str, Any]) -> dict:
        raise RuntimeError("injected kernel failure (test op)")


class LoseDeviceOp(Op):
    name = "lose_device"
    inputs: list = []
    outputs: list = []

    def run(self, inputs: dict, parameters: Mapping[str, Any]) -> dict:
        raise DeviceLost("injected: the CUDA context is lost (test op)")


def test_ops() -> list[Op]:
    return [SleepOp(), FailOp(), LoseDeviceOp()]


test_ops.__test__ = False  # not a pytest test

if __name__ == "__main__":
    from shim.cli import main

    sys.exit(main(sys.argv[1:], extra_ops=test_ops()))
