"""The turnstile (``--gpu-jpeg-first``): threads that wait at it stand by while a call runs first,
and a link's reader waits there before taking a message in."""
from __future__ import annotations

import os
import socket
import threading
import time
from multiprocessing.connection import Connection

import pytest

from shim.cli import _parser, serve_settings
from shim.turnstile import Turnstile
from shim.workers.channel import Channel


def _waiter(turnstile: Turnstile) -> tuple[threading.Thread, threading.Event]:
    passed = threading.Event()
    thread = threading.Thread(target=lambda: (turnstile.wait(), passed.set()), daemon=True)
    thread.start()
    return thread, passed


def test_a_thread_waits_while_a_call_runs_first_and_passes_once_it_ends() -> None:
    turnstile = Turnstile(max_wait_s=30)
    _, passed = _waiter(turnstile)
    assert passed.wait(5)  # open: at once
    with turnstile.first():
        thread, passed = _waiter(turnstile)
        assert not passed.wait(0.3)
    assert passed.wait(5)
    thread.join(5)
    with turnstile.first():  # open again after each call
        pass
    assert _waiter(turnstile)[1].wait(5)


def test_calls_run_first_side_by_side_and_the_turnstile_opens_when_the_last_ends() -> None:
    turnstile = Turnstile(max_wait_s=30)
    inside, leave = threading.Barrier(3), threading.Event()

    def call() -> None:
        with turnstile.first():
            inside.wait(5)  # both inside at once: the calls do not exclude each other
            leave.wait(5)

    calls = [threading.Thread(target=call, daemon=True) for _ in range(2)]
    for thread in calls:
        thread.start()
    inside.wait(5)
    _, passed = _waiter(turnstile)
    assert not passed.wait(0.3)
    leave.set()
    for thread in calls:
        thread.join(5)
    assert passed.wait(5)


def test_a_waiter_is_not_held_by_calls_that_start_after_it_came() -> None:
    """Two batcher threads' decodes may overlap in a chain: a waiter goes on once those running
    when it came have ended, though another runs first by then."""
    turnstile = Turnstile(max_wait_s=30)
    leave_a, leave_b, b_inside = threading.Event(), threading.Event(), threading.Event()

    def call(leave: threading.Event, inside: threading.Event | None = None) -> None:
        with turnstile.first():
            if inside is not None:
                inside.set()
            leave.wait(10)

    a = threading.Thread(target=call, args=(leave_a,), daemon=True)
    a.start()
    time.sleep(0.05)
    _, passed = _waiter(turnstile)  # came while A runs
    b = threading.Thread(target=call, args=(leave_b, b_inside), daemon=True)
    b.start()
    assert b_inside.wait(5)
    assert not passed.wait(0.3)
    leave_a.set()  # A ends, B still runs: the waiter goes on
    assert passed.wait(5)
    _, later = _waiter(turnstile)  # one that came while B runs waits for B
    assert not later.wait(0.3)
    leave_b.set()
    assert later.wait(5)
    a.join(5)
    b.join(5)


def test_a_waiter_goes_on_after_its_longest_wait_if_the_call_does_not_end() -> None:
    turnstile = Turnstile(max_wait_s=0.05)
    with turnstile.first():
        began = time.monotonic()
        _, passed = _waiter(turnstile)
        assert passed.wait(5)
        assert time.monotonic() - began >= 0.04


def test_a_readers_message_waits_at_the_turnstile_after_it_arrives() -> None:
    turnstile = Turnstile(max_wait_s=30)
    a, b = socket.socketpair()
    sender, receiver = Channel(Connection(os.dup(a.fileno()))), Channel(Connection(os.dup(b.fileno())), turnstile)
    a.close()
    b.close()
    try:
        got: list[object] = []
        with turnstile.first():
            reader = threading.Thread(target=lambda: got.append(receiver.recv()), daemon=True)
            reader.start()
            sender.send((1, "logits", ("efficientnet-lite0", [b"jpeg"])))
            reader.join(0.3)
            assert reader.is_alive() and not got  # arrived, held at the turnstile
        reader.join(5)
        assert got == [(1, "logits", ("efficientnet-lite0", [b"jpeg"]))]
    finally:
        sender.close()
        receiver.close()


def test_gpu_jpeg_first_is_a_setting_that_needs_gpu_jpeg() -> None:
    settings = serve_settings(_parser().parse_args(["serve", "--gpu-jpeg", "--gpu-jpeg-first"]))
    assert settings.gpu_jpeg and settings.gpu_jpeg_first
    with pytest.raises(ValueError, match="needs --gpu-jpeg"):
        serve_settings(_parser().parse_args(["serve", "--gpu-jpeg-first"]))


def test_the_link_servers_readers_wait_at_its_turnstile(tmp_path) -> None:
    from shim.workers.link import LinkClient, LinkServer

    key, turnstile = os.urandom(16), Turnstile(max_wait_s=30)
    server = LinkServer(str(tmp_path / "link.sock"), key, {"echo": lambda x: x}, threads=4, turnstile=turnstile)
    client = LinkClient(server.address, key)
    try:
        assert client.call("echo", 1) == 1
        with turnstile.first():
            later = client.call_later("echo", 2)
            with pytest.raises(TimeoutError):
                later.result(0.3)
        assert later.result(5) == 2
    finally:
        client.close()
        server.close()


def test_the_device_link_of_a_backend_with_a_turnstile_reads_at_it(service, tmp_path) -> None:
    """``device_link`` (what ``serve_with_workers`` serves the workers with) hands the backend's
    turnstile to the link's readers: a worker's call waits while a decode runs first."""
    from shim.workers import device_link
    from shim.workers.device import DeviceEndpoint
    from shim.workers.link import LinkClient

    key = os.urandom(16)
    service.backend.turnstile = Turnstile(max_wait_s=30)  # as the CUDA backend's with --gpu-jpeg-first
    try:
        # workers=0: no readiness gate left on the shared service's registry
        link = device_link(service, DeviceEndpoint(service, workers=0), str(tmp_path / "link.sock"), key)
        client = LinkClient(link.address, key)
        try:
            assert client.call("worker_ready", 1) is None
            with service.backend.turnstile.first():
                later = client.call_later("worker_ready", 2)
                with pytest.raises(TimeoutError):
                    later.result(0.3)
            assert later.result(5) is None
        finally:
            client.close()
            link.close()
    finally:
        del service.backend.turnstile
