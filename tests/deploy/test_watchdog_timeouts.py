"""The of-watchdog timeouts of every function in every stack file and Knative manifest, read from the
YAML as the platforms read it.

Each function image runs of-watchdog (``mode=http``) in front of index.py. The watchdog reads its
timeouts from the environment (of-watchdog ``config/config.go``), 10 s each when unset, and a
value it cannot parse silently becomes that default. The layers must give up from the inside
out, so that the caller always gets the innermost, most telling answer:

    handler (accel client: 30 s)  <  exec_timeout  <  write_timeout  <=  Knative timeoutSeconds
                                                                     <   OpenFaaS gateway upstream

- ``exec_timeout`` bounds the call to index.py; past it the watchdog answers a bare 504. It must
  exceed what a handler may spend on the shim (the accel client's timeout), so that the client's
  JSON error (``ShimUnavailable``, ``DeadlineExceeded``) reaches the caller first; 0 disables it.
  (The client's default is 30 s; where index.py derives it from exec_timeout, it stays below anyway.)
- ``write_timeout`` is the Go server's WriteTimeout, counted from the request's headers: a response
  not written by then is lost with its connection. The watchdog's own 504 must fit in it, so
  exec_timeout < write_timeout, strictly.
- ``healthcheck_interval`` (default: write_timeout) is how long the watchdog keeps accepting after
  SIGTERM before it drains; left at the default it alone would outlast Kubernetes' default 30 s
  grace period. It is set short, and the same everywhere.
- Knative's ``timeoutSeconds`` (the queue-proxy's per-request limit, and the pod's grace period)
  must let the watchdog write whatever it answers, and stay within the default
  ``max-revision-timeout-seconds`` (600).
"""
from __future__ import annotations

import argparse
import copy
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from shim.up import configure as configure_up
from tests.conftest import ROOT

DEPLOY = ROOT / "deploy"
KEYS = ("read_timeout", "write_timeout", "exec_timeout", "healthcheck_interval")
#: what a handler may spend waiting on the shim: the accel client's default timeout
HANDLER_BUDGET_S = 30.0
#: the longest a function pod may wait after SIGTERM before draining (well inside the 30 s grace)
MAX_HEALTHCHECK_INTERVAL_S = 10.0
#: config-defaults max-revision-timeout-seconds: a larger timeoutSeconds is refused by Knative
KNATIVE_MAX_TIMEOUT_S = 600
#: the OpenFaaS gateway's upstream timeout (faas-netes chart default gateway.upstreamTimeout: 60s)
OPENFAAS_GATEWAY_TIMEOUT_S = 60.0


@dataclass
class Function:
    where: str                 # "path:name"
    environment: dict[str, str | None]
    knative_timeout: Any = None  # spec.template.spec.timeoutSeconds; None for OpenFaaS functions
    knative: bool = False


_NUMBER_UNIT = re.compile(r"(\d+\.?\d*|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def watchdog_seconds(value: str | None) -> float | None:
    """Seconds, read as of-watchdog reads a timeout (``parseIntOrDurationValue``): an integer >= 0 is
    seconds, anything else a Go duration (``time.ParseDuration``). None where the watchdog could not
    parse it and would silently fall back to its default."""
    if value is None:
        return None
    if re.fullmatch(r"[+-]?\d+", value) and int(value) >= 0:  # strconv.Atoi, then the >= 0 check
        return float(int(value))
    sign = -1.0 if value[:1] == "-" else 1.0
    body = value[1:] if value[:1] in "+-" else value
    if body == "0":
        return 0.0
    if not body or _NUMBER_UNIT.sub("", body):  # a sequence of number+unit and nothing else
        return None
    return sign * sum(float(number) * _UNITS[unit] for number, unit in _NUMBER_UNIT.findall(body))


def _stack_environment(path: Path, fn: dict[str, Any]) -> dict[str, str | None]:
    """A stack function's environment as faas-cli sends it: environment_file entries, then inline."""
    env: dict[str, str | None] = {}
    for env_file in fn.get("environment_file") or []:
        doc = yaml.safe_load((path.parent / str(env_file)).read_text()) or {}
        env.update({str(k): str(v) for k, v in (doc.get("environment") or {}).items()})
    env.update({str(k): str(v) for k, v in (fn.get("environment") or {}).items()})
    return env


def _functions() -> list[Function]:
    """Every watchdog function: each function of each OpenFaaS stack file (the root stack.yml and
    any under deploy/), each container of each Knative Service under deploy/."""
    out: list[Function] = []
    paths = [ROOT / "stack.yml", *sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yml", ".yaml"))]
    for path in paths:
        where = path.relative_to(ROOT)
        for doc in yaml.safe_load_all(path.read_text()):
            if not isinstance(doc, dict):
                continue
            if (doc.get("provider") or {}).get("name") == "openfaas":
                for name, fn in (doc.get("functions") or {}).items():
                    out.append(Function(f"{where}:{name}", _stack_environment(path, fn)))
            elif doc.get("apiVersion", "").startswith("serving.knative.dev/") and doc.get("kind") == "Service":
                spec = doc["spec"]["template"]["spec"]
                for container in spec["containers"]:
                    env = {e["name"]: e.get("value") for e in container.get("env") or []}
                    out.append(Function(f"{where}:{doc['metadata']['name']}", env, spec.get("timeoutSeconds"),
                                        knative=True))
    return out


FUNCTIONS = _functions()


def timeout_errors(fn: Function) -> list[str]:
    """Why ``fn``'s timeouts would cut calls short or let an outer layer answer first; [] if none."""
    errors = []
    s: dict[str, float] = {}
    for key in KEYS:
        value = fn.environment.get(key)
        parsed = watchdog_seconds(value)
        default = "write_timeout" if key == "healthcheck_interval" else "10 s"
        if value is None:
            errors.append(f"{key} is not set (the watchdog's default is {default})")
        elif parsed is None:
            errors.append(f"{key}={value!r} does not parse: the watchdog would silently use its default")
        elif parsed <= 0:
            errors.append(f"{key}={value!r} must be positive (exec_timeout 0 disables it)")
        else:
            s[key] = parsed
    if "exec_timeout" in s and not s["exec_timeout"] > HANDLER_BUDGET_S:
        errors.append(f"exec_timeout {s['exec_timeout']:g}s must exceed the handlers' {HANDLER_BUDGET_S:g}s (the "
                      "accel client's timeout), or the watchdog's bare 504 beats the client's JSON error")
    if {"exec_timeout", "write_timeout"} <= s.keys() and not s["exec_timeout"] < s["write_timeout"]:
        errors.append(f"exec_timeout {s['exec_timeout']:g}s must be shorter than write_timeout "
                      f"{s['write_timeout']:g}s, or the watchdog's own 504 is lost with the connection")
    if {"read_timeout", "write_timeout"} <= s.keys() and not s["read_timeout"] <= s["write_timeout"]:
        errors.append(f"read_timeout {s['read_timeout']:g}s should not exceed write_timeout {s['write_timeout']:g}s")
    if "healthcheck_interval" in s and not s["healthcheck_interval"] <= MAX_HEALTHCHECK_INTERVAL_S:
        errors.append(f"healthcheck_interval {s['healthcheck_interval']:g}s: a stopping pod would wait that long "
                      f"before draining (keep it <= {MAX_HEALTHCHECK_INTERVAL_S:g}s)")
    write = s.get("write_timeout")
    if fn.knative:
        timeout = fn.knative_timeout
        if not isinstance(timeout, int) or isinstance(timeout, bool):
            errors.append(f"spec.template.spec.timeoutSeconds must be set (an integer), not {timeout!r}")
        elif not timeout <= KNATIVE_MAX_TIMEOUT_S or (write is not None and not write <= timeout):
            errors.append(f"timeoutSeconds {timeout} must be >= write_timeout ({write}s: so that the queue-proxy "
                          f"never cuts what the watchdog may still write) and <= {KNATIVE_MAX_TIMEOUT_S}")
    elif write is not None and not write < OPENFAAS_GATEWAY_TIMEOUT_S:
        errors.append(f"write_timeout {write:g}s must be shorter than the gateway's upstream timeout "
                      f"{OPENFAAS_GATEWAY_TIMEOUT_S:g}s")
    return errors


def test_every_stack_and_manifest_is_found():
    files = {fn.where.split(":")[0] for fn in FUNCTIONS}
    assert {"stack.yml", "deploy/openfaas/stack.ce.yml", "deploy/openfaas/stack.profiles.yml",
            "deploy/knative/classify.yaml"} <= files, files
    assert any(fn.knative for fn in FUNCTIONS)
    assert "deploy/openfaas/stack.profiles.yml:classify-kata" in {fn.where for fn in FUNCTIONS}


@pytest.mark.parametrize("fn", FUNCTIONS, ids=[fn.where for fn in FUNCTIONS])
def test_function_sets_the_watchdog_timeouts_in_order(fn: Function):
    assert timeout_errors(fn) == []


def test_every_function_uses_the_same_timeouts():
    """One set of values: a function deployed from another stack must not be cut sooner."""
    values = {fn.where: tuple(fn.environment.get(k) for k in KEYS) for fn in FUNCTIONS}
    assert len(set(values.values())) == 1, values
    knative = {fn.where: fn.knative_timeout for fn in FUNCTIONS if fn.knative}
    assert len(set(knative.values())) == 1, knative


def test_the_local_gateway_waits_longer_than_the_watchdog():
    """`accelshim up` stands in for the OpenFaaS gateway: its per-call timeout must be the outer one."""
    local = configure_up(argparse.ArgumentParser()).parse_args([]).timeout
    for fn in FUNCTIONS:
        write = watchdog_seconds(fn.environment.get("write_timeout"))
        assert write is not None and write < local, (fn.where, write, local)


@pytest.mark.parametrize("value, seconds", [
    ("35", 35.0), ("0", 0.0), ("35s", 35.0), ("1m5s", 65.0), ("500ms", 0.5), ("1.5h", 5400.0),
    ("+40s", 40.0), ("-3s", -3.0), ("2h0m0.5s", 7200.5),
])
def test_durations_read_as_the_watchdog_reads_them(value: str, seconds: float):
    assert watchdog_seconds(value) == pytest.approx(seconds)


@pytest.mark.parametrize("value", ["", "30 s", "30sec", "1.5", "-5", "s", "1m 5s", "35S", "thirty"])
def test_what_the_watchdog_cannot_parse_is_refused(value: str):
    assert watchdog_seconds(value) is None


def test_the_checks_fail_on_each_broken_function():
    """Each rule can fail: a missing key, an unparseable value, exec_timeout at the handlers' budget,
    exec_timeout equal to write_timeout, a long healthcheck_interval, a short or missing Knative
    timeoutSeconds, a write_timeout past the gateway's."""
    ok_stack = next(fn for fn in FUNCTIONS if not fn.knative)
    ok_knative = next(fn for fn in FUNCTIONS if fn.knative)
    assert timeout_errors(ok_stack) == [] and timeout_errors(ok_knative) == []

    def broken(fn: Function, **changes: Any) -> list[str]:
        bad = copy.deepcopy(fn)
        for key, value in changes.items():
            if key == "knative_timeout":
                bad.knative_timeout = value
            elif value is None:
                bad.environment.pop(key, None)
            else:
                bad.environment[key] = value
        return timeout_errors(bad)

    assert any("exec_timeout is not set" in e for e in broken(ok_stack, exec_timeout=None))
    assert any("does not parse" in e for e in broken(ok_stack, write_timeout="40 s"))
    assert any("must be positive" in e for e in broken(ok_stack, exec_timeout="0"))
    assert any("must exceed the handlers'" in e for e in broken(ok_stack, exec_timeout="30s"))
    write = ok_stack.environment["write_timeout"]
    assert any("shorter than write_timeout" in e for e in broken(ok_stack, exec_timeout=write))
    assert any("read_timeout" in e for e in broken(ok_stack, read_timeout="2m"))
    assert any("healthcheck_interval" in e for e in broken(ok_stack, healthcheck_interval="40s"))
    assert any("gateway's upstream" in e for e in broken(ok_stack, write_timeout="90s", read_timeout="90s"))
    assert any("timeoutSeconds must be set" in e for e in broken(ok_knative, knative_timeout=None))
    assert any("must be >= write_timeout" in e for e in broken(ok_knative, knative_timeout=30))
    assert any("<= 600" in e for e in broken(ok_knative, knative_timeout=601))
