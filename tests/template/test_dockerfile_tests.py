"""The build-time test step of the template's Dockerfile, the python3-http convention: a ``test`` stage
with ``ARG TEST_ENABLED=true`` and ``ARG TEST_COMMAND``, that ``--build-arg TEST_ENABLED=false`` skips.
No Docker here: the stages are read from the file, and the step's shell runs as the build would run it."""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from tests.template.conftest import TEMPLATE

DOCKERFILE = TEMPLATE / "Dockerfile"


def stages() -> dict[str, list[str]]:
    """Each stage's instructions by its name (continuation lines joined, comments dropped)."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    found: dict[str, list[str]] = {}
    current: list[str] = []
    for line in (l.strip() for l in text.splitlines()):
        if not line or line.startswith("#"):
            continue
        if line.startswith("FROM "):
            current = found.setdefault(line.split()[-1], [])
        current.append(line)
    return found


def arg_default(lines: list[str], name: str) -> str:
    line = next(l for l in lines if l.startswith(f"ARG {name}="))
    return shlex.split(line.split("=", 1)[1])[0]


def test_a_test_stage_with_the_python3_http_build_args_that_the_image_depends_on():
    found = stages()
    assert list(found) == ["watchdog", "build", "test", "ship"]
    test, ship = found["test"], found["ship"]
    assert test[0] == "FROM build AS test" and ship[0] == "FROM build AS ship"
    assert arg_default(test, "TEST_ENABLED") == "true"
    assert "pytest" in arg_default(test, "TEST_COMMAND")
    run = next(l for l in test if l.startswith("RUN "))
    assert '[ "$TEST_ENABLED" = "false" ]' in run and 'eval "$TEST_COMMAND"' in run
    # BuildKit builds only the stages the target needs: the image must need the test stage, through
    # the file that its step writes in the build's working directory
    workdir = next(l for l in found["build"] if l.startswith("WORKDIR ")).split()[1]
    assert "function-tests.txt" in run
    assert any(l.startswith(f"COPY --from=test {workdir}/function-tests.txt ") for l in ship)


def test_test_dependencies_stay_out_of_the_image():
    found = stages()
    image = found["build"] + found["ship"]
    assert not any("pytest" in l for l in image)
    for path in (TEMPLATE / "requirements.txt", TEMPLATE / "function" / "requirements.txt"):
        assert "pytest" not in path.read_text()
    # the shim's address is the image's, not the build's: the tests that need a shim skip themselves
    assert not any("ACCEL_SHIM_URL" in l for l in found["build"] + found["test"])
    assert any("ACCEL_SHIM_URL" in l for l in found["ship"] if l.startswith("ENV "))


def _build_context(tmp_path: Path) -> tuple[Path, dict[str, str], Path]:
    """The template as the build copies it to /home/app, its build stage's RUNs done, and an
    environment whose ``pip`` records its arguments (nothing is installed) and whose ``python`` is
    this interpreter (it has pytest). Returns the folder, the environment and pip's record."""
    app, bin_dir = tmp_path / "app", tmp_path / "bin"
    shutil.copytree(TEMPLATE, app, ignore=shutil.ignore_patterns("__pycache__"))
    bin_dir.mkdir()
    pip_log = tmp_path / "pip.log"
    (bin_dir / "pip").write_text(f'#!/bin/sh\necho "$@" >> {shlex.quote(str(pip_log))}\n')
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
    for script in bin_dir.iterdir():
        script.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCEL_", "PYTEST_"))}
    env.update(PATH=f"{bin_dir}{os.pathsep}/usr/bin:/bin", PYTHONDONTWRITEBYTECODE="1")
    for line in stages()["build"]:
        if line.startswith("RUN ") and "compileall" in line:
            subprocess.run(["sh", "-c", line.removeprefix("RUN ")], cwd=app, env=env, check=True)
    return app, env, pip_log


def _run_test_step(app: Path, env: dict[str, str], **build_args: str) -> subprocess.CompletedProcess:
    test = stages()["test"]
    args = {name: arg_default(test, name) for name in ("TEST_ENABLED", "TEST_COMMAND")}
    run = next(l for l in test if l.startswith("RUN ")).removeprefix("RUN ")
    return subprocess.run(["sh", "-c", run], cwd=app, env={**env, **args, **build_args},
                          capture_output=True, text=True, timeout=120)


def test_the_test_step_runs_the_functions_tests_without_a_shim(tmp_path):
    app, env, pip_log = _build_context(tmp_path)
    result = _run_test_step(app, env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed, 2 skipped" in result.stdout  # handler_test.py: the shim's round trips skip
    assert re.search(r"install .*pytest", pip_log.read_text())
    assert (app / "function-tests.txt").read_text().startswith("passed: python -m pytest")


def test_a_failing_function_test_fails_the_build(tmp_path):
    app, env, _ = _build_context(tmp_path)
    (app / "function" / "broken_test.py").write_text("def test_broken():\n    assert 1 == 2\n")
    result = _run_test_step(app, env)
    assert result.returncode != 0 and "1 failed" in result.stdout
    assert not (app / "function-tests.txt").exists()


def test_test_enabled_false_skips_the_tests(tmp_path):
    """``faas-cli build --build-arg TEST_ENABLED=false``."""
    app, env, pip_log = _build_context(tmp_path)
    (app / "function" / "broken_test.py").write_text("def test_broken():\n    assert 1 == 2\n")
    result = _run_test_step(app, env, TEST_ENABLED="false")
    assert result.returncode == 0 and "skipping tests" in result.stdout and "passed" not in result.stdout
    assert not pip_log.exists()
    assert (app / "function-tests.txt").read_text().startswith("skipped")
