"""The GPU benchmark's moving parts on the CPU: client processes in one window, the cold-start
function children (shared-memory gemm included), against a live shim."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

import accel
from bench.loop import closed_loop, process_closed_loop, shares
from bench.procs import ACCEL_CHILD, child_env, hold_children, release, run_child
from tests.conftest import encode


def test_shares_spread_clients_evenly() -> None:
    assert shares(8, 3) == [3, 3, 2]
    assert shares(128, 16) == [8] * 16
    assert shares(1, 1) == [1]


def test_process_closed_loop_counts_every_process(live_shim, chelsea) -> None:
    out = process_closed_loop(live_shim.unix_url, encode(chelsea, "JPEG"), clients=3, duration=0.5, processes=2)
    assert out["client_processes"] == 2 and out["threads_per_process"] == [2, 1]
    assert out["errors"] == 0, out["first_errors"]
    assert out["completed"] == out["n"] > 0
    assert out["images_per_s"] == pytest.approx(out["completed"] / 0.5)


def test_closed_loop_threads() -> None:
    out = closed_loop(lambda _i: (lambda: None), clients=2, duration=0.1)
    assert out["completed"] > 0 and out["errors"] == 0 and out["threads_still_running"] == 0


@pytest.mark.parametrize("op", ["gemm", "gemm-shm"])
def test_cold_gemm_child(live_shim, op: str) -> None:
    _, timings = run_child([sys.executable, "-c", ACCEL_CHILD, op, live_shim.unix_url, "64"], child_env())
    assert timings["first_result_s"] == timings["first_call_s"] > 0
    assert ("region_s" in timings) == (op == "gemm-shm")
    assert timings["first_call_s"] >= timings.get("region_s", 0.0)


def test_cold_shm_child_cleans_up_after_holding(live_shim) -> None:
    cmd = [sys.executable, "-c", ACCEL_CHILD, "gemm-shm", live_shim.unix_url, "64", "hold"]
    procs, results = hold_children([cmd], child_env(), 60)
    name = f"cold-{procs[0].pid}"
    try:
        assert results[0]["op"] == "gemm-shm"
        with accel.Client(live_shim.unix_url) as client:
            assert [r["name"] for r in client.shm_status() if r["name"] == name] == [name]
    finally:
        release(procs)
    assert procs[0].returncode == 0
    with accel.Client(live_shim.unix_url) as client:
        assert name not in [r["name"] for r in client.shm_status()]
    assert not [k for k in os.listdir("/dev/shm") if k.startswith(f"accel_{name}_")]
