"""Each tenant's buffers are its own: another tenant can neither read, overwrite, delete nor list
them (a bare key names the caller's own buffer; an explicit ``?tenant=other`` is 403), and each
tenant's bytes are bounded (507), with the usage in /metrics per tenant."""
from __future__ import annotations

import pytest

from tests.conftest import tenant_service

TOKENS = {"alice": "alice-token-0123456789", "bob": "bob-token-9876543210xx"}


def auth(tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[tenant]}"}


@pytest.fixture(scope="module")
def shim(tmp_path_factory):
    return tenant_service(tmp_path_factory.mktemp("tenants"), TOKENS, {"alice": "max_buffer_bytes=1000"},
                          tenant_max_buffer_bytes=300, state_dir=tmp_path_factory.mktemp("state"))


def test_another_tenants_buffer_is_out_of_reach(shim):
    http = shim.app.test_client()
    assert http.put("/v1/buffers/secret", data=b"alice's bytes", headers=auth("alice")).status_code == 200
    # an explicit address of alice's buffer: 403, whatever the method
    for method in ("GET", "PUT", "DELETE"):
        reply = http.open("/v1/buffers/secret?tenant=alice", method=method, data=b"x" if method == "PUT" else None,
                          headers=auth("bob"))
        assert reply.status_code == 403 and "alice" in reply.get_json()["error"], (method, reply.data)
    assert http.get("/v1/buffers?tenant=alice", headers=auth("bob")).status_code == 403
    # a bare key is bob's own namespace: alice's buffer is simply not there for him
    assert http.get("/v1/buffers/secret", headers=auth("bob")).status_code == 404
    assert http.delete("/v1/buffers/secret", headers=auth("bob")).status_code == 404
    assert http.put("/v1/buffers/secret", data=b"bob's", headers=auth("bob")).status_code == 200
    assert http.get("/v1/buffers", headers=auth("bob")).get_json()["buffers"][0]["key"] == "secret"
    # alice still reads her own bytes, also with her own name given explicitly
    assert http.get("/v1/buffers/secret", headers=auth("alice")).data == b"alice's bytes"
    assert http.get("/v1/buffers/secret?tenant=alice", headers=auth("alice")).data == b"alice's bytes"
    assert http.get("/v1/buffers/secret").status_code == 401
    text = http.get("/metrics").get_data(as_text=True)
    assert 'accelshim_tenant_rejected_total{reason="forbidden",tenant="bob"} 4.0' in text


@pytest.mark.parametrize("key", ["..", ".hidden", "a/b", "a..b", "x" * 200, "sp ace", "nul\x00"])
def test_buffer_keys_are_names_not_paths(shim, key):
    from urllib.parse import quote

    reply = shim.app.test_client().put(f"/v1/buffers/{quote(key, safe='')}", data=b"x", headers=auth("bob"))
    assert reply.status_code in (400, 404), (key, reply.status_code)  # 404: a '/' the router would not match
    assert not any(p.name == key for p in (shim.settings.state_dir).rglob("*"))


def test_buffer_bytes_per_tenant_507(shim):
    http = shim.app.test_client()
    assert http.put("/v1/buffers/big", data=b"a" * 900, headers=auth("alice")).status_code == 200  # her own 1000
    reply = http.put("/v1/buffers/more", data=b"a" * 200, headers=auth("alice"))
    assert reply.status_code == 507 and "quota of 1000" in reply.get_json()["error"]
    reply = http.put("/v1/buffers/big", data=b"b" * 400, headers=auth("bob"))  # bob has the default 300
    assert reply.status_code == 507 and "quota of 300" in reply.get_json()["error"]
    assert http.put("/v1/buffers/small", data=b"b" * 100, headers=auth("bob")).status_code == 200
    text = http.get("/metrics").get_data(as_text=True)
    assert 'accelshim_tenant_rejected_total{reason="buffer_quota",tenant="alice"} 1.0' in text
    assert 'accelshim_tenant_buffer_bytes{tenant="alice"}' in text
    assert http.delete("/v1/buffers/big", headers=auth("alice")).status_code == 200
    assert http.put("/v1/buffers/more", data=b"a" * 200, headers=auth("alice")).status_code == 200
