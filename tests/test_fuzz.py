"""Fuzz the HTTP API against its own OpenAPI document (``GET /openapi.json``) with schemathesis:
valid and invalid requests to every operation, in-process; none may get a 5xx, crash or hang.

Bounded: a fixed number of examples per operation, derandomized (the same cases every run, so a
failure reproduces), and a watchdog that fails the run instead of letting a hang block the suite.
"""
from __future__ import annotations

import faulthandler
from collections import Counter

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.generation.modes import GenerationMode

from accel.codec import DEADLINE_HEADER
from shim.auth import hash_token
from shim.server.openapi import openapi_document, served_paths

TOKEN = "fuzz-token-0123456789abcdef"
EXAMPLES = 100
SEEN: Counter = Counter()
OPEN = ("/v2/health/live", "/v2/health/ready", "/metrics", "/openapi.json")


@pytest.fixture(scope="module")
def fuzz_service(models_dir, tmp_path_factory):
    from shim.config import Settings
    from shim.service import build_service

    tokens = tmp_path_factory.mktemp("fuzz") / "tokens"
    tokens.write_text(f"fuzzer: {hash_token(TOKEN)}\n")
    svc = build_service(Settings(device="cpu", models_dir=models_dir, tokens_file=tokens, max_body_bytes=1 << 20,
                                 max_image_pixels=4_000_000, max_batch=8, max_gemm_elements=1 << 16))
    svc.load()
    return svc


@pytest.fixture(scope="module")
def api_schema(fuzz_service):
    faulthandler.dump_traceback_later(900, exit=True)  # a hang ends the run with the stacks, not silently
    yield schemathesis.openapi.from_wsgi("/openapi.json", fuzz_service.app)
    faulthandler.cancel_dump_traceback_later()


def test_every_route_is_described(fuzz_service):
    document = openapi_document(fuzz_service.app)
    assert served_paths(fuzz_service.app) == set(document["paths"])
    assert document["openapi"].startswith("3.")


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_request_gets_a_5xx(api_schema, mode):
    """Every operation, ``EXAMPLES`` cases each that fit the document (or, negative, that do not)."""
    for result in api_schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                  phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
        def check(case) -> None:
            authorized = SEEN[operation.label] % 4 != 3  # a quarter of them without the token
            if authorized:
                case.headers = {**(case.headers or {}), "Authorization": f"Bearer {TOKEN}"}
            response = case.call()
            SEEN[operation.label] += 1
            status = response.status_code
            if status == 504 and DEADLINE_HEADER in (case.headers or {}):
                status = "504-deadline"  # the fuzzer sent a deadline of 0 ms: dropped before any work, as documented
            SEEN[f"status {status}"] += 1
            assert status == "504-deadline" or status < 500, (operation.label, status, response.text[:300])
            if not authorized and operation.path not in OPEN:
                assert response.status_code in (400, 401, 404, 405), (operation.label, response.status_code)
            if response.status_code >= 400:
                assert "error" in response.json(), response.text[:300]

        try:
            check()
        except Unsatisfiable:  # nothing of this operation can be made invalid (no parameters, no body)
            assert mode is GenerationMode.NEGATIVE, operation.label


def test_the_fuzzer_reached_every_operation_and_the_shim_still_serves(fuzz_service):
    """Runs after the fuzz cases (file order): they covered the API and broke nothing."""
    operations = {k for k in SEEN if not k.startswith("status ")}
    described = {f"{method.upper()} {path}" for path, item in openapi_document(fuzz_service.app)["paths"].items()
                 for method in item}
    assert operations == described - {"GET /openapi.json"}  # schemathesis leaves out the document itself
    assert sum(SEEN[k] for k in operations) >= 10 * len(operations)
    assert not any(k.startswith("status 5") and k != "status 504-deadline" for k in SEEN)
    print(f"\nfuzz: {sum(SEEN[k] for k in operations)} cases over {len(operations)} operations; statuses "
          + ", ".join(f"{k[7:]}: {v}" for k, v in sorted(SEEN.items()) if k.startswith("status ")))
    http = fuzz_service.app.test_client()
    reply = http.post("/v2/models/gemm/infer", headers={"Authorization": f"Bearer {TOKEN}"},
                      json={"inputs": [{"name": n, "datatype": "FP32", "shape": [1, 1], "data": [2.0]} for n in "AB"]})
    assert reply.status_code == 200 and reply.get_json()["outputs"][0]["data"] == [4.0]
    assert fuzz_service.guard.monitor.fault is None
