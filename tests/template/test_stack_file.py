"""stack.yml as faas-cli checks it: the repository's, and every rule on broken ones."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from shim.up.stack import DEFAULT_NAMESPACE, StackError, is_dns_label, load_stack, substitute_env
from tests.conftest import ROOT


def test_repository_stack():
    stack = load_stack(ROOT / "stack.yml")
    assert (stack.version, stack.provider, stack.gateway) == ("1.0", "openfaas", "http://127.0.0.1:8080")
    assert set(stack.functions) == {"classify", "gemm", "jacobi"}
    for name, fn in stack.functions.items():
        assert fn.lang == "python3-accel" and fn.template.path == ROOT / "template" / "python3-accel"
        assert fn.handler == ROOT / "functions" / name and (fn.handler / "handler.py").is_file()
        assert fn.image == f"accelshim/{name}:latest"
        assert fn.environment["ACCEL_SHIM_URL"] == "unix:///var/run/accelshim/accel.sock"
        assert fn.labels and fn.annotations and fn.namespace == DEFAULT_NAMESPACE
        assert fn.limits.memory and fn.limits.cpu and fn.requests.memory and fn.requests.cpu
        assert fn.env_process == "python index.py"
        assert fn.secrets == ["accel-token"]  # the function's token for the shim (accel.Client reads it)


def test_the_stack_parses_as_plain_yaml_with_faas_cli_field_names():
    doc = yaml.safe_load((ROOT / "stack.yml").read_text())
    assert set(doc) == {"version", "provider", "functions"}
    allowed = {"lang", "handler", "image", "environment", "secrets", "labels", "annotations", "limits", "requests"}
    for entry in doc["functions"].values():
        assert set(entry) <= allowed
        assert set(entry["limits"]) == set(entry["requests"]) == {"memory", "cpu"}
        assert all(isinstance(v, str) for v in entry["labels"].values())  # map[string]string


@pytest.mark.parametrize("name, ok", [("classify", True), ("a", True), ("fn-2", True), ("a" * 63, True),
                                      ("a" * 64, False), ("Classify", False), ("-fn", False), ("fn-", False),
                                      ("fn_1", False), ("fn.x", False), ("", False)])
def test_dns_labels(name, ok):
    assert is_dns_label(name) is ok


@pytest.fixture()
def project(tmp_path: Path) -> Path:
    """A minimal valid project: template/python3-accel and one function folder."""
    shutil.copytree(ROOT / "template" / "python3-accel", tmp_path / "template" / "python3-accel",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "fn").mkdir()
    (tmp_path / "fn" / "handler.py").write_text("def handle(event, context):\n    return None\n")
    (tmp_path / "afile").write_text("")
    return tmp_path


def _write(project: Path, doc: dict) -> Path:
    path = project / "stack.yml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _doc(**function) -> dict:
    entry = {"lang": "python3-accel", "handler": "./fn", "image": "x/fn:latest", **function}
    return {"version": 1.0, "provider": {"name": "openfaas", "gateway": "http://127.0.0.1:8080"},
            "functions": {"fn": {k: v for k, v in entry.items() if v is not None}}}


def test_minimal_stack_is_valid(project):
    fn = load_stack(_write(project, _doc())).functions["fn"]
    assert fn.handler == project / "fn" and fn.environment == {} and fn.limits is None


@pytest.mark.parametrize("change, message", [
    (lambda d: d["provider"].update(name="faas"), "'openfaas' is the only valid provider name"),
    (lambda d: d.pop("provider"), "'openfaas' is the only valid provider name"),
    (lambda d: d.update(version="2.0"), "version must be 1.0, found 2.0"),
    (lambda d: d.pop("version"), "version must be 1.0, found none"),
    (lambda d: d.update(functions={}), "no functions"),
    (lambda d: d["functions"].update({"Bad_Name": d["functions"]["fn"]}), "DNS-1123 label"),
    (lambda d: d["functions"].update({"a" * 64: d["functions"]["fn"]}), "DNS-1123 label"),
    (lambda d: d["functions"]["fn"].update(handler="./missing"), "must be a folder"),
    (lambda d: d["functions"]["fn"].update(handler="./afile"), "must be a folder"),
    (lambda d: d["functions"]["fn"].update(lang="python3-nope"), "template 'python3-nope' not found"),
    (lambda d: d["functions"]["fn"].pop("image"), "missing image"),
    (lambda d: d["functions"]["fn"].update(environment=["A=1"]), "environment: must be a mapping"),
    (lambda d: d["functions"]["fn"].update(labels={"a": {"b": 1}}), "labels: a must be a string"),
    (lambda d: d["functions"]["fn"].update(namespace="Not_A_Label"), "namespace"),
])
def test_invalid_stacks_are_rejected_with_the_reason(project, change, message):
    doc = _doc()
    change(doc)
    with pytest.raises(StackError, match=message):
        load_stack(_write(project, doc))


def test_every_problem_is_listed_at_once(project):
    doc = _doc(image=None)
    doc["provider"]["name"] = "faas"
    doc["version"] = "0.9"
    with pytest.raises(StackError) as info:
        load_stack(_write(project, doc))
    assert str(info.value).count("\n  - ") == 3


def test_bad_yaml_and_missing_file(project):
    (project / "stack.yml").write_text("functions: [unclosed")
    with pytest.raises(StackError, match="invalid YAML"):
        load_stack(project / "stack.yml")
    with pytest.raises(StackError, match="cannot read"):
        load_stack(project / "nope.yml")


def test_template_without_template_yml_is_rejected(project):
    (project / "template" / "python3-accel" / "template.yml").unlink()
    with pytest.raises(StackError, match="template.yml"):
        load_stack(_write(project, _doc()))


def test_env_substitution_and_environment_files(project):
    (project / "env.yml").write_text("environment:\n  B: from-file\n  C: ${STAGE:-dev}\n")
    doc = _doc(image="${REGISTRY:-example}/fn:latest", environment={"A": 1, "B": "inline", "D": True},
               environment_file=["env.yml"])
    fn = load_stack(_write(project, doc), environ={"REGISTRY": "ghcr.io/me"}).functions["fn"]
    assert fn.image == "ghcr.io/me/fn:latest"
    assert fn.environment == {"A": "1", "B": "from-file", "C": "dev", "D": "true"}
    assert substitute_env("${X}-${Y:-y}", {"X": "x"}) == "x-y"


def test_up_exits_2_on_an_invalid_stack(project):
    doc = _doc()
    doc["provider"]["name"] = "faas"
    result = subprocess.run([sys.executable, "-m", "shim.up", "-f", str(_write(project, doc)), "--port", "0"],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "only valid provider name" in result.stderr


def test_add_parser_wires_an_up_subcommand():
    import argparse

    from shim.up import add_parser, run

    parser = argparse.ArgumentParser(prog="accelshim")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["up", "-f", "other.yml", "--port", "9090", "--device", "cpu"])
    assert (args.command, args.stack, args.port, args.device, args.func) == ("up", Path("other.yml"), 9090, "cpu", run)
    defaults = parser.parse_args(["up"])
    assert (defaults.stack, defaults.port, defaults.shim_port, defaults.shim_url) == (Path("stack.yml"), 8080, 8000, None)
