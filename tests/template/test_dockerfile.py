"""The template's Dockerfile, template.yml and requirements: hadolint, the python3-http conventions,
and no GPU library anywhere in a function image."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, hadolint_findings

TEMPLATE = ROOT / "template" / "python3-accel"
DOCKERFILE = TEMPLATE / "Dockerfile"
GPU_WORDS = re.compile(r"cuda|nvidia|cupy|onnxruntime|tensorrt|torch|cudnn|libcu", re.IGNORECASE)


def _instructions() -> list[str]:
    """The Dockerfile's instructions, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_hadolint_passes():
    assert hadolint_findings(DOCKERFILE) == ""


def test_watchdog_pinned_by_arg_in_http_mode_before_index_py():
    lines = _instructions()
    version = next(re.fullmatch(r"ARG WATCHDOG_VERSION=(\S+)", l) for l in lines if l.startswith("ARG WATCHDOG_VERSION"))
    assert re.fullmatch(r"\d+\.\d+\.\d+", version.group(1))
    assert "FROM ghcr.io/openfaas/of-watchdog:${WATCHDOG_VERSION} AS watchdog" in lines
    assert "COPY --from=watchdog /fwatchdog /usr/bin/fwatchdog" in lines
    env = " ".join(l for l in lines if l.startswith("ENV "))
    for setting in ('fprocess="python index.py"', 'mode="http"', 'upstream_url="http://127.0.0.1:5000"'):
        assert setting in env
    assert lines[-1] == 'CMD ["fwatchdog"]'


def test_slim_python_312_non_root_app_user_healthcheck():
    lines = _instructions()
    assert "ARG PYTHON_VERSION=3.12" in lines
    assert any(re.fullmatch(r"FROM python:\$\{PYTHON_VERSION\}-slim( AS \w+)?", l) for l in lines)
    user_add = next(l for l in lines if "useradd" in l)
    uid = re.search(r"--uid (\d+)", user_add).group(1)
    assert user_add.endswith(" app") and int(uid) > 0
    users = [l.split()[1] for l in lines if l.startswith("USER ")]
    assert users and users[-1].split(":")[0] in ("app", uid)
    assert any(l.startswith("HEALTHCHECK ") for l in lines)


def test_template_requirements_before_function_requirements_before_function_code():
    lines = _instructions()

    def where(text: str) -> int:
        return next(i for i, l in enumerate(lines) if l.startswith(text))

    assert (where("COPY requirements.txt") < where("RUN pip install --no-cache-dir -r requirements.txt")
            < where("COPY function/requirements.txt") < where("RUN pip install --no-cache-dir -r function/requirements.txt")
            < where("COPY function/ function/"))
    assert where("COPY accel/ accel/") < where("USER ")


@pytest.mark.parametrize("path", [DOCKERFILE, TEMPLATE / "requirements.txt", TEMPLATE / "function" / "requirements.txt",
                                  ROOT / "functions" / "classify" / "requirements.txt",
                                  ROOT / "functions" / "gemm" / "requirements.txt"], ids=lambda p: str(p.relative_to(ROOT)))
def test_no_gpu_library_in_a_function_image(path: Path):
    content = [l for l in path.read_text().splitlines() if not l.lstrip().startswith("#")]  # comments may say "no CUDA"
    assert not GPU_WORDS.search("\n".join(content))


def test_template_requirements_are_flask_and_waitress_only():
    names = [re.split(r"[<>=!~\[; ]", l.strip(), maxsplit=1)[0].lower()
             for l in (TEMPLATE / "requirements.txt").read_text().splitlines() if l.strip() and not l.startswith("#")]
    assert names == ["flask", "waitress"]


def test_template_yml():
    doc = yaml.safe_load((TEMPLATE / "template.yml").read_text())
    assert doc["language"] == "python3-accel" and doc["fprocess"] == "python index.py"
    assert "context.accel" in doc["welcome_message"]
    assert [o["name"] for o in doc["build_options"]] == ["dev"] and doc["build_options"][0]["packages"]
    assert "ADDITIONAL_PACKAGE" in DOCKERFILE.read_text()  # what faas-cli passes build_options packages as


def test_template_is_self_contained():
    """``faas-cli template pull`` copies this folder alone: nothing in it may import the shim."""
    for path in TEMPLATE.rglob("*.py"):
        assert not re.search(r"^\s*(from|import)\s+shim\b", path.read_text(), re.MULTILINE), path


def test_the_code_is_byte_compiled_in_the_image(tmp_path):
    """A function instance starts with PYTHONDONTWRITEBYTECODE and code it cannot write: the image
    must hold the bytecode of accel and the handler, or each cold start compiles them again; and
    that bytecode must hold whatever timestamps the image's layers end up with."""
    lines = _instructions()
    run = next(l for l in lines if "compileall" in l)
    assert lines.index(run) > next(i for i, l in enumerate(lines) if l.startswith("COPY function/ function/"))
    assert lines.index(run) < next(i for i, l in enumerate(lines) if l.startswith("USER "))
    app, bin_dir = tmp_path / "app", tmp_path / "bin"
    shutil.copytree(TEMPLATE, app, ignore=shutil.ignore_patterns("__pycache__"))
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(sys.executable)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    subprocess.run(["sh", "-c", run.removeprefix("RUN ")], cwd=app, env=env, check=True)  # as built, in /home/app
    for source in app.rglob("*.py"):
        os.utime(source, (0, 0))  # a builder that clamps timestamps
    env.update(PYTHONDONTWRITEBYTECODE="1", PYTHONPATH=str(app))
    out = subprocess.run([sys.executable, "-v", "-c", "import accel, function.handler"], cwd=app, env=env,
                         capture_output=True, text=True, check=True).stderr
    loaded = re.findall(rf"# code object from '?{re.escape(str(app))}/(\S+?)'?$", out, re.MULTILINE)
    assert {"accel/__pycache__/client", "function/__pycache__/handler"} <= {p.split(".cpython")[0] for p in loaded}
    compiled_at_start = [p for p in loaded if p.endswith(".py")]
    assert not compiled_at_start
