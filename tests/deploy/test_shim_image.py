"""shim/Dockerfile: hadolint, and the properties the Kubernetes manifests rely on. Docker cannot build
here (no engine), so the image is checked as a file; its HEALTHCHECK command is run for real against a
live shim."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib

import pytest

from tests.conftest import ROOT, free_port, hadolint_findings

DOCKERFILE = ROOT / "shim" / "Dockerfile"


def _instructions() -> list[str]:
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _healthcheck_argv() -> list[str]:
    line = next(l for l in _instructions() if l.startswith("HEALTHCHECK "))
    return json.loads(line[line.index("CMD ") + 4:])


def test_hadolint_passes():
    assert hadolint_findings(DOCKERFILE) == ""


def test_cuda_base_pinned_by_arg_and_multi_stage():
    lines = _instructions()
    assert re.fullmatch(r"ARG CUDA_VERSION=\d+\.\d+\.\d+", next(l for l in lines if l.startswith("ARG CUDA_VERSION")))
    assert any(re.fullmatch(r"FROM nvidia/cuda:\$\{CUDA_VERSION\}-\S*runtime\S* AS base", l) for l in lines)
    stages = [l.split(" AS ")[1] for l in lines if l.startswith("FROM ")]
    assert stages == ["base", "build", "runtime"]
    build = "\n".join(lines[lines.index("FROM base AS build"):lines.index("FROM base AS runtime")])
    assert "accelshim models build" in build and "BUILD_VENV=" in build  # the project's own build, own torch env
    assert '"/src[cuda,gpu-jpeg]"' in build
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert {re.split(r"[<>=]", r)[0] for r in extras["cuda"]} == {"cupy-cuda13x", "onnxruntime-gpu"}
    assert {re.split(r"[<>=]", r)[0] for r in extras["gpu-jpeg"]} == {"nvidia-nvjpeg"}
    runtime = lines[lines.index("FROM base AS runtime"):]
    assert "COPY --from=build /opt/accelshim /opt/accelshim" in runtime
    assert not any("torch" in l for l in runtime)


def _requirements(extras: str) -> set[str]:
    """The distributions ``pip install '.[extras]'`` asks for (names only)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [*project["dependencies"], *(r for e in filter(None, extras.split(","))
                                            for r in project["optional-dependencies"][e])]
    return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower() for r in wanted}


def test_onnxruntime_comes_from_one_distribution_in_the_image_and_in_make():
    """onnxruntime and onnxruntime-gpu install the same package and the last one wins: the image
    must ask for the GPU one alone (with both, pip put the CPU build last: no CUDA provider), the
    Makefile's environment for the CPU one alone and its GPU environment for the GPU one."""
    image = re.search(r'pip install [^\n]*"/src\[([^\]]*)\]"', DOCKERFILE.read_text()).group(1)
    make, make_gpu = re.findall(r"pip install -q -e '\.\[([^\]]*)\]'", (ROOT / "Makefile").read_text())
    runtimes = {"onnxruntime", "onnxruntime-gpu"}
    assert _requirements(image) & runtimes == {"onnxruntime-gpu"}
    assert _requirements(make) & runtimes == {"onnxruntime"}
    assert _requirements(make_gpu) & runtimes == {"onnxruntime-gpu"}  # .venv-gpu: make test-gpu, bench-gpu
    assert not _requirements("") & runtimes  # a plain install picks neither: the extras choose


def test_non_root_read_only_friendly_and_exposed():
    lines = _instructions()
    users = [l.split()[1] for l in lines if l.startswith("USER ")]
    uid, gid = users[-1].split(":")
    assert int(uid) > 0 and int(gid) > 0  # numeric: Kubernetes can verify runAsNonRoot
    env = " ".join(l for l in lines if l.startswith("ENV "))
    assert "PYTHONDONTWRITEBYTECODE=1" in env and "CUPY_CACHE_DIR=/tmp/" in env
    volumes = json.loads(next(l for l in lines if l.startswith("VOLUME "))[len("VOLUME "):])
    assert set(volumes) == {"/var/run/accelshim", "/var/lib/accelshim", "/tmp"}
    assert "EXPOSE 8000" in lines
    assert lines[-2:] == ['ENTRYPOINT ["accelshim"]', 'CMD ["serve"]']


def test_the_image_serves_as_it_is_run_with_no_flags():
    """``docker run`` with the image's own settings (its ENV, ``CMD ["serve"]``) must start: they
    validate, TCP where the HEALTHCHECK looks, the socket in its volume. (0.0.0.0 without tokens was
    refused, so the image as shipped never became healthy.)"""
    from shim.config import ENV_PREFIX, Settings

    env = dict(re.findall(r"(ACCELSHIM_\w+)=(\S+)", " ".join(l for l in _instructions() if l.startswith("ENV "))))
    assert env and set(env) <= {ENV_PREFIX + name.upper() for name in Settings.__dataclass_fields__}
    settings = Settings.from_env(env)
    assert settings.host in ("127.0.0.1", "localhost") and settings.port == 8000
    assert settings.unix_socket.startswith("/var/run/accelshim/") and str(settings.models_dir) == "/opt/accelshim/models"


def test_dockerignore_keeps_out_environments_and_models_but_not_what_the_build_copies():
    ignored = {l.strip() for l in (ROOT / ".dockerignore").read_text().splitlines()
               if l.strip() and not l.startswith("#")}
    assert {".venv", ".venv-build", "models", ".git"} <= ignored
    copied = [l.split()[1] for l in _instructions() if l.startswith("COPY ") and "--from" not in l]
    for src in copied:
        assert src.rstrip("/").split("/")[0] not in ignored, src


def test_healthcheck_is_stdlib_and_probes_readiness(live_shim):
    argv = _healthcheck_argv()
    assert argv[0] == "python3" and "/v2/health/ready" in argv[-1] and "curl" not in " ".join(_instructions())
    code = argv[-1]
    ok = subprocess.run([sys.executable, "-c", code], env={"ACCELSHIM_PORT": str(live_shim.port)}, timeout=30)
    assert ok.returncode == 0
    down = subprocess.run([sys.executable, "-c", code], env={"ACCELSHIM_PORT": str(free_port())},
                          capture_output=True, timeout=30)
    assert down.returncode != 0


@pytest.mark.parametrize("path", ["/v2/health/ready"])
def test_healthcheck_fails_on_not_ready(tmp_path, path):
    """A server that answers 503 (not warmed up yet) makes the HEALTHCHECK fail, not pass."""
    import http.server
    import threading

    class NotReady(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(503 if self.path == path else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), NotReady)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        result = subprocess.run([sys.executable, "-c", _healthcheck_argv()[-1]],
                                env={"ACCELSHIM_PORT": str(server.server_port)}, capture_output=True, timeout=30)
        assert result.returncode != 0 and b"503" in result.stderr
    finally:
        server.shutdown()
