"""Limits, global and per tenant: body bytes (413), slots and queue depth (429 + Retry-After),
deadlines (504 before any work), each visible per tenant in /metrics; and the admission queue's
own rules (FIFO, a tenant at its limit does not hold the others back)."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

import accel
from accel.codec import DEADLINE_HEADER
from shim.admission import Admission, Limits
from shim.faults import DeviceLost, FaultMonitor
from tests.conftest import WSGITransport, tenant_service
from tests.shim_test_ops import test_ops

TOKENS = {"alice": "alice-token-0123456789", "bob": "bob-token-9876543210xx", "carol": "carol-token-555555555x"}


def auth(tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[tenant]}"}


@pytest.fixture(scope="module")
def limited(tmp_path_factory):
    """2 slots, a queue of 3, each tenant 1 slot and 2 queued; carol's body limit 1000 bytes."""
    return tenant_service(tmp_path_factory.mktemp("limits"), TOKENS,
                          {"carol": "max_body_bytes=1000 max_inflight=2"}, extra_ops=test_ops(),
                          threads=2, max_queue=3, tenant_max_inflight=1, tenant_max_queue=2,
                          tenant_max_body_bytes=50_000, max_body_bytes=100_000)


def sleep_body(seconds: float) -> dict:
    return {"inputs": [], "parameters": {"seconds": seconds}}


def post(app, tenant: str, op: str, body: dict, headers: dict | None = None, out: list | None = None):
    reply = app.test_client().post(f"/v2/models/{op}/infer", json=body, headers={**auth(tenant), **(headers or {})})
    if out is not None:
        out.append(reply)
    return reply


def wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


def background(*calls) -> tuple[list[threading.Thread], list]:
    out: list = []
    threads = [threading.Thread(target=post, args=(*c, None, out)) for c in calls]
    for t in threads:
        t.start()
    return threads, out


def test_body_limit_per_tenant_and_global(limited):
    app = limited.app
    small = {"inputs": [{"name": "x", "datatype": "UINT8", "shape": [400], "data": [1] * 400}]}
    assert post(app, "carol", "noop", small).status_code == 413  # ~1.6 kB of JSON > carol's 1000
    reply = post(app, "carol", "noop", small)
    assert "carol" in reply.get_json()["error"] and "1000" in reply.get_json()["error"]
    assert post(app, "alice", "noop", small).status_code == 200
    big = {"inputs": [{"name": "x", "datatype": "UINT8", "shape": [20000], "data": [1] * 20000}]}  # ~60 kB
    reply = post(app, "alice", "noop", big)
    assert reply.status_code == 413 and "50000" in reply.get_json()["error"]  # the tenants' default
    metrics = app.test_client().get("/metrics").get_data(as_text=True)
    assert 'accelshim_tenant_rejected_total{reason="body_too_large",tenant="carol"} 2.0' in metrics


def test_a_compressed_body_is_held_to_the_tenants_limit_once_inflated(limited):
    """carol's 1000-byte limit applies to what a gzip body inflates to, not only to what it declares."""
    import gzip
    import json

    body = json.dumps({"inputs": [{"name": "x", "datatype": "UINT8", "shape": [400], "data": [1] * 400}]}).encode()
    packed = gzip.compress(body)
    assert len(packed) < 1000 < len(body)
    headers = {**auth("carol"), "Content-Encoding": "gzip", "Content-Type": "application/json"}
    reply = limited.app.test_client().post("/v2/models/noop/infer", data=packed, headers=headers)
    assert reply.status_code == 413 and "1000" in reply.get_json()["error"]
    headers["Authorization"] = auth("alice")["Authorization"]
    assert limited.app.test_client().post("/v2/models/noop/infer", data=packed, headers=headers).status_code == 200


def test_slots_then_queue_then_429_with_retry_after(limited):
    app, adm = limited.app, limited.guard.admission
    # alice and bob take the 2 slots; carol (2 slots of her own, but none left) and alice queue
    threads, out = background((app, "alice", "sleep", sleep_body(1.5)), (app, "bob", "sleep", sleep_body(1.5)))
    wait_for(lambda: adm.inflight() == 2)
    more, out2 = background((app, "carol", "sleep", sleep_body(0.1)), (app, "alice", "sleep", sleep_body(0.1)),
                            (app, "alice", "noop", {"inputs": []}))
    wait_for(lambda: adm.queued() == 3)
    reply = post(app, "bob", "noop", {"inputs": []})  # the shim's queue (3) is full
    assert reply.status_code == 429 and "queue is full" in reply.get_json()["error"]
    assert reply.headers["Retry-After"] == "1"
    text = app.test_client().get("/metrics").get_data(as_text=True)
    assert 'accelshim_tenant_inflight_requests{tenant="alice"} 1.0' in text
    assert 'accelshim_tenant_queued_requests{tenant="alice"} 2.0' in text
    for t in threads + more:
        t.join(20)
    assert sorted(r.status_code for r in out + out2) == [200] * 5
    assert adm.inflight() == 0 and adm.queued() == 0
    text = app.test_client().get("/metrics").get_data(as_text=True)
    assert 'accelshim_tenant_rejected_total{reason="queue_full",tenant="bob"} 1.0' in text


def test_tenant_queue_limit(limited):
    app, adm = limited.app, limited.guard.admission
    threads, out = background((app, "alice", "sleep", sleep_body(1.0)))
    wait_for(lambda: adm.inflight("alice") == 1)
    more, out2 = background((app, "alice", "noop", {"inputs": []}), (app, "alice", "noop", {"inputs": []}))
    wait_for(lambda: adm.queued("alice") == 2)
    reply = post(app, "alice", "noop", {"inputs": []})
    assert reply.status_code == 429 and "tenant 'alice'" in reply.get_json()["error"] and reply.headers["Retry-After"]
    assert post(app, "bob", "noop", {"inputs": []}).status_code == 200  # bob is not held back by alice
    for t in threads + more:
        t.join(20)
    assert [r.status_code for r in out + out2] == [200] * 3


def test_deadline_passed_on_arrival_is_504_before_any_work(limited):
    app = limited.app
    before = limited.dispatcher.stats.as_json(["sleep"])["model_stats"][0]["inference_stats"]
    for value in ("0", "-5"):
        reply = post(app, "alice", "sleep", sleep_body(5), {DEADLINE_HEADER: value})
        assert reply.status_code == 504 and "deadline" in reply.get_json()["error"]
    after = limited.dispatcher.stats.as_json(["sleep"])["model_stats"][0]["inference_stats"]
    assert after == before  # the op never ran
    reply = post(app, "alice", "noop", {"inputs": []}, {DEADLINE_HEADER: "soon"})
    assert reply.status_code == 400 and DEADLINE_HEADER in reply.get_json()["error"]
    assert post(app, "alice", "noop", {"inputs": []}, {DEADLINE_HEADER: "5000"}).status_code == 200


def test_deadline_passing_in_the_queue_is_504(limited):
    app, adm = limited.app, limited.guard.admission
    threads, out = background((app, "alice", "sleep", sleep_body(1.0)))
    wait_for(lambda: adm.inflight("alice") == 1)
    start = time.monotonic()
    reply = post(app, "alice", "sleep", sleep_body(5), {DEADLINE_HEADER: "200"})
    took = time.monotonic() - start
    assert reply.status_code == 504 and "in the queue" in reply.get_json()["error"], reply.data
    assert 0.15 < took < 0.9
    for t in threads:
        t.join(20)
    text = app.test_client().get("/metrics").get_data(as_text=True)
    assert 'accelshim_tenant_rejected_total{reason="deadline",tenant="alice"}' in text
    assert 'accelshim_tenant_requests_total{status="504",tenant="alice"}' in text


def test_client_maps_504_and_retries_429(limited):
    app, adm = limited.app, limited.guard.admission
    client = accel.Client("http://x", transport=WSGITransport(app), token=TOKENS["bob"], timeout=0.3)
    threads, out = background((app, "bob", "sleep", sleep_body(1.0)))
    wait_for(lambda: adm.inflight("bob") == 1)
    with pytest.raises(accel.DeadlineExceeded):  # waits in the queue past its 0.3 s
        client.noop(x=np.arange(2))
    for t in threads:
        t.join(20)
    # 429 with Retry-After is retried within the timeout: the call succeeds once the slot frees
    patient = accel.Client("http://x", transport=WSGITransport(app), token=TOKENS["bob"], timeout=10)
    threads, out = background((app, "bob", "sleep", sleep_body(0.5)), (app, "bob", "sleep", sleep_body(0.5)),
                              (app, "bob", "sleep", sleep_body(0.5)))
    wait_for(lambda: adm.inflight("bob") == 1 and adm.queued("bob") == 2)
    np.testing.assert_array_equal(patient.noop(x=np.arange(2))["x"], np.arange(2))
    for t in threads:
        t.join(20)


# --- the admission queue on its own ---------------------------------------------------------------
def test_admission_fifo_and_tenant_skip():
    adm = Admission(Limits(max_inflight=2, max_queue=10, tenant_max_inflight=1))
    a1, b1 = adm.admit("a"), adm.admit("b")
    order: list[str] = []

    def take(tenant: str, tag: str) -> None:
        with adm.admit(tenant, time.monotonic() + 5):
            order.append(tag)
            time.sleep(0.05)

    threads = [threading.Thread(target=take, args=("a", "a2")), threading.Thread(target=take, args=("c", "c1"))]
    threads[0].start()
    wait_for(lambda: adm.queued() == 1)
    threads[1].start()
    wait_for(lambda: adm.queued() == 2)
    b1.release()  # a2 is first in line but alice is at her 1 slot: c1 goes ahead
    wait_for(lambda: order == ["c1"])
    a1.release()
    for t in threads:
        t.join(5)
    assert order == ["c1", "a2"] and adm.inflight() == 0 and adm.queued() == 0
    a1.release()  # releasing twice is harmless
    assert adm.inflight() == 0


def test_admission_waiters_fail_when_the_device_is_lost():
    monitor = FaultMonitor()
    adm = Admission(Limits(max_inflight=1, max_queue=4), monitor)
    slot = adm.admit("a")
    errors: list[BaseException] = []

    def wait() -> None:
        try:
            adm.admit("b", time.monotonic() + 10)
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    t = threading.Thread(target=wait)
    t.start()
    wait_for(lambda: adm.queued() == 1)
    monitor.trip(DeviceLost("test"))
    t.join(5)
    assert len(errors) == 1 and isinstance(errors[0], DeviceLost) and errors[0].status == 503
    slot.release()
    with pytest.raises(DeviceLost):
        adm.admit("c")


def test_a_tenant_at_its_limit_does_not_hold_back_others_while_slots_are_free():
    """4 slots, 1 per tenant: alice holds one and queues another; bob must get a free slot at once."""
    adm = Admission(Limits(max_inflight=4, max_queue=8, tenant_max_inflight=1, max_wait_s=5.0))
    first = adm.admit("alice")
    held: list = []
    waiting = threading.Thread(target=lambda: held.append(adm.admit("alice")))
    waiting.start()
    wait_for(lambda: adm.queued() == 1)
    start = time.monotonic()
    bob = adm.admit("bob")  # 3 slots are free: no waiting behind alice's queued request
    assert time.monotonic() - start < 1.0 and adm.inflight() == 2
    bob.release()
    first.release()
    waiting.join(5)
    assert held and adm.inflight() == 1
    held[0].release()
