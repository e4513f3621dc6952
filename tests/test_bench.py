"""The GPU benchmark's moving parts on the CPU: client processes in one window, the cold-start
function children (shared-memory gemm included), against a live shim."""
from __future__ import annotations

import os
import subprocess
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
    out = process_closed_loop(("accel", live_shim.unix_url), encode(chelsea, "JPEG"), clients=3, duration=0.5,
                              processes=2)
    assert out["client_processes"] == 2 and out["threads_per_process"] == [2, 1]
    assert out["errors"] == 0, out["first_errors"]
    assert out["completed"] == out["n"] > 0
    assert out["images_per_s"] == pytest.approx(out["completed"] / 0.5)


def test_process_closed_loop_spreads_its_processes_over_a_list_of_callers(live_shim, chelsea) -> None:
    """Process p takes the list's item p modulo its length: one process uses the first caller only;
    with two, the second process gets the second caller (here one that cannot be made)."""
    callers = [("accel", live_shim.unix_url), ("no such caller",)]
    out = process_closed_loop(callers, encode(chelsea, "JPEG"), clients=2, duration=0.3, processes=1)
    assert out["errors"] == 0 and out["completed"] > 0, out["first_errors"]
    with pytest.raises(RuntimeError, match="unknown caller"):
        process_closed_loop(callers, encode(chelsea, "JPEG"), clients=2, duration=0.3, processes=2)


def test_naive_function_processes_classify_with_their_own_sessions(models_dir, chelsea) -> None:
    out = process_closed_loop(("naive", "cpu", str(models_dir / "efficientnet-lite0")), encode(chelsea, "JPEG"),
                              clients=2, duration=0.5, processes=2)
    assert out["threads_per_process"] == [1, 1] and out["errors"] == 0, out["first_errors"]
    assert out["completed"] > 0


def test_closed_loop_threads() -> None:
    out = closed_loop(lambda _i: (lambda: None), clients=2, duration=0.1)
    assert out["completed"] > 0 and out["errors"] == 0 and out["threads_still_running"] == 0


@pytest.mark.parametrize("op", ["gemm", "gemm-shm"])
def test_cold_gemm_child(live_shim, op: str) -> None:
    _, timings = run_child([sys.executable, "-c", ACCEL_CHILD, op, live_shim.unix_url, "64"], child_env())
    assert timings["first_result_s"] == timings["first_call_s"] > 0
    assert ("region_s" in timings) == (op == "gemm-shm")
    assert timings["first_call_s"] >= timings.get("region_s", 0.0)


def test_cold_gemm_child_without_numpy_matches_the_naive_product(live_shim, tmp_path) -> None:
    """The no-numpy function and the naive one read the same operands and get the same product."""
    from bench.procs import NAIVE, function_python, without_accel, write_gemm_inputs

    inputs = write_gemm_inputs(tmp_path / "ab.f32", 64)
    python, what, has_accel = function_python(tmp_path)
    assert "venv" in what and has_accel
    env = without_accel({**child_env(), "PYTHONDONTWRITEBYTECODE": "1"})  # a .pyc found is the venv's own
    # the function's own accel, byte-compiled beside its sources, as in the template's image
    probe = "import accel, os; print(accel.__file__); print(os.path.exists(accel.__cached__))"
    where = subprocess.run([python, "-c", probe], env=env, capture_output=True, text=True, check=True).stdout.split()
    assert Path(where[0]).is_relative_to(tmp_path) and where[1] == "True"
    _, timings = run_child([python, "-c", ACCEL_CHILD, "gemm-raw", live_shim.unix_url, str(inputs)], env)
    assert Path(timings["accel_file"]).is_relative_to(tmp_path)
    assert timings["numpy_imported"] is False and timings["first_call_s"] >= timings["region_s"] > 0
    _, naive = run_child([sys.executable, str(NAIVE), "gemm", "--device", "cpu", "--n", "64", "--inputs", str(inputs)],
                         child_env())
    assert timings["c00"] == pytest.approx(naive["c00"], rel=1e-5)


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


def test_device_batching_reads_the_batchers_histograms(live_shim, chelsea) -> None:
    from bench.load import batch_histogram, metrics_text
    from bench.sections import device_batching

    client = accel.Client(live_shim.unix_url)
    before = batch_histogram(metrics_text(live_shim.tcp_url))
    for _ in range(3):
        client.classify(encode(chelsea, "JPEG"))
    client.classify([encode(chelsea, "JPEG")] * 2)
    out = device_batching(before, batch_histogram(metrics_text(live_shim.tcp_url)))
    assert out["batches"] == 4 and out["mean_batch_size"] == pytest.approx(5 / 4)
    assert out["mean_batch_run_ms"] is not None and 0 < out["mean_batch_run_ms"] < 10_000
    assert out["mean_batch_wait_ms"] is not None and 0 <= out["mean_batch_wait_ms"] < out["mean_batch_run_ms"] * 100
    assert device_batching(before, before)["mean_batch_size"] is None


def test_git_commit_says_when_the_files_are_not_the_commit(tmp_path):
    from bench.gpu import git_commit

    def git(*args: str) -> str:
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path,
                              check=True, capture_output=True, text=True).stdout.strip()

    assert git_commit(tmp_path) is None  # not a repository
    git("init", "-q")
    (tmp_path / "f.py").write_text("a = 1\n")
    git("add", "f.py")
    git("commit", "-q", "-m", "one")
    head = git("rev-parse", "--short", "HEAD")
    (tmp_path / "new.txt").write_text("untracked files do not count\n")
    assert git_commit(tmp_path) == head
    (tmp_path / "f.py").write_text("a = 2\n")
    assert git_commit(tmp_path) == f"{head} with uncommitted changes"


def test_a_shim_that_cannot_start_fails_the_benchmark_at_once(models_dir):
    import time

    from bench.common import ShimProcess

    started = time.monotonic()
    with pytest.raises(RuntimeError, match="exited with 2 before it was ready"):
        with ShimProcess("cpu", models_dir, "--no-such-flag"):
            pass
    assert time.monotonic() - started < 60  # not the 300 s wait for a shim that will never answer


def test_a_run_records_the_shims_settings_from_its_environment(monkeypatch):
    from bench.common import environment

    monkeypatch.delenv("ACCELSHIM_CONNECTION_THREADS", raising=False)
    assert "ACCELSHIM_CONNECTION_THREADS" not in environment().get("shim_environment", {})
    monkeypatch.setenv("ACCELSHIM_CONNECTION_THREADS", "0")
    assert environment()["shim_environment"]["ACCELSHIM_CONNECTION_THREADS"] == "0"


def test_the_probes_command_line_takes_each_modes_arguments_and_refuses_what_does_not_fit() -> None:
    from bench import closed_loop_probe, latency_probe
    from bench.worker_ab import parse

    assert parse(["replicas", "2", "4", "32", "--gpu-jpeg"]) == (closed_loop_probe.replicas, [2, 4, 32, ["--gpu-jpeg"]])
    assert parse(["cpu", "8", "32"]) == (closed_loop_probe.cpu, [8, 32, []])
    assert parse(["latency", "L", "1"]) == (latency_probe.latency, ["L", 1])
    for argv, says in ((["cpu", "8"], "1 argument(s) given, 2 taken (then FLAGs); usage: python bench/worker_ab.py "
                                      "cpu N C [FLAG...]"),
                       (["cpu", "eight", "32"], "usage: python bench/worker_ab.py cpu N C"),
                       (["region", "extra"], "1 argument(s) given, 0 taken; usage: python bench/worker_ab.py region"),
                       (["nope"], "no probe 'nope'")):
        with pytest.raises(SystemExit) as exited:
            parse(argv)
        assert says in str(exited.value.code), (argv, exited.value.code)
