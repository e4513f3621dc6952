"""Build contexts laid out as ``faas-cli build --shrinkwrap`` does; importing and testing the
handlers from them, the way the image runs them."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from shim.up.build import shrinkwrap
from shim.up.stack import load_stack
from tests.conftest import ROOT

TEMPLATE = ROOT / "template" / "python3-accel"


@pytest.fixture(scope="module")
def repo_stack():
    return load_stack(ROOT / "stack.yml")


def test_layout_is_the_template_with_the_handler_overlaid(repo_stack, tmp_path: Path):
    context = shrinkwrap(repo_stack.functions["classify"], tmp_path / "build")
    assert context == tmp_path / "build" / "classify"
    for name in ("Dockerfile", "index.py", "requirements.txt", "template.yml", "accel/__init__.py",
                 "accel/client.py", "function/__init__.py"):
        assert (context / name).is_file(), name
    for name in ("handler.py", "handler_test.py", "requirements.txt"):  # the function's, not the example's
        assert (context / "function" / name).read_bytes() == (ROOT / "functions" / "classify" / name).read_bytes()
    assert (context / "index.py").read_bytes() == (TEMPLATE / "index.py").read_bytes()
    assert not list(context.rglob("__pycache__"))


def test_rebuild_clears_the_old_context(repo_stack, tmp_path: Path):
    context = shrinkwrap(repo_stack.functions["gemm"], tmp_path)
    (context / "function" / "stale.py").write_text("")
    shrinkwrap(repo_stack.functions["gemm"], tmp_path)
    assert not (context / "function" / "stale.py").exists()


def test_function_handler_imports_from_the_context_with_its_own_accel(repo_stack, tmp_path: Path):
    context = shrinkwrap(repo_stack.functions["classify"], tmp_path)
    code = ("import accel, index; from function import handler; "
            "print(handler.handle.__module__, accel.__file__, index.create_app.__name__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=context, capture_output=True, text=True, check=True)
    module, accel_file, factory = out.stdout.split()
    assert module == "function.handler" and factory == "create_app"
    assert Path(accel_file).resolve().is_relative_to(context.resolve())


def _run_handler_tests(context: Path, shim_url: str) -> str:
    env = {**os.environ, "ACCEL_SHIM_URL": shim_url}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", "function"],
                            cwd=context, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.mark.parametrize("name", ["classify", "gemm", "jacobi"])
def test_example_functions_handler_tests_pass_against_the_shim(repo_stack, tmp_path: Path, live_shim, name):
    out = _run_handler_tests(shrinkwrap(repo_stack.functions[name], tmp_path), live_shim.unix_url)
    assert "passed" in out and "skipped" not in out, out


def test_the_templates_own_handler_test_passes(tmp_path: Path, make_project, live_shim):
    """The example handler and handler_test.py that ``faas-cli new`` gives, unchanged."""
    stack = load_stack(make_project(tmp_path / "p", {"echo": (TEMPLATE / "function" / "handler.py").read_text()}))
    out = _run_handler_tests(shrinkwrap(stack.functions["echo"], tmp_path / "build"), live_shim.unix_url)
    assert "3 passed" in out and "skipped" not in out, out
