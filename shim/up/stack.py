"""The OpenFaaS stack file (``stack.yml``) and language templates, read and checked as faas-cli does.

Checks: ``version: 1.0``; ``provider.name: openfaas``; function names are DNS-1123 labels; each
function has ``lang``, ``handler`` and ``image``; the handler is a folder; ``template/<lang>/``
holds a ``template.yml``. As in faas-cli, ``${VAR}`` and ``${VAR:-default}`` are substituted from
the environment before parsing, and ``environment_file`` entries override inline ``environment``.
Paths are resolved against the stack file's folder.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

PROVIDER = "openfaas"
VERSION = "1.0"
DEFAULT_NAMESPACE = "openfaas-fn"
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class StackError(ValueError):
    """The stack file or a template is invalid; the message lists every problem found."""


@dataclass(frozen=True)
class Resources:
    """``limits`` or ``requests`` of a function."""

    memory: str | None = None
    cpu: str | None = None


@dataclass(frozen=True)
class Template:
    """A language template: ``template/<lang>/`` and its ``template.yml``."""

    language: str
    path: Path
    fprocess: str
    welcome_message: str = ""
    build_options: dict[str, list[str]] = field(default_factory=dict)


@dataclass(frozen=True)
class Function:
    """One entry of ``functions:``."""

    name: str
    lang: str
    handler: Path
    image: str
    template: Template
    namespace: str = DEFAULT_NAMESPACE
    fprocess: str | None = None
    environment: dict[str, str] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    secrets: list[str] = field(default_factory=list)
    limits: Resources | None = None
    requests: Resources | None = None

    @property
    def env_process(self) -> str:
        """The process the watchdog runs: the stack's ``fprocess``, else the template's."""
        return self.fprocess or self.template.fprocess


@dataclass(frozen=True)
class Stack:
    """A parsed, checked stack file."""

    path: Path
    version: str
    provider: str
    gateway: str
    functions: dict[str, Function]


def is_dns_label(name: str) -> bool:
    """True for a DNS-1123 label: a-z, 0-9 and inner '-', at most 63 characters."""
    return len(name) <= 63 and bool(_DNS_LABEL.match(name))


def substitute_env(text: str, environ: Mapping[str, str]) -> str:
    """``${VAR}`` -> its value ('' when unset), ``${VAR:-default}`` -> the value or the default."""
    return _ENV_REF.sub(lambda m: environ.get(m.group(1)) or (m.group(2) or ""), text)


def load_template(root: Path, lang: str) -> Template:
    """``root/template/<lang>/template.yml``; raises StackError when missing or invalid."""
    path = root / "template" / lang
    doc = _read_yaml(path / "template.yml", f"template {lang!r}")
    if not isinstance(doc, dict) or not doc.get("fprocess"):
        raise StackError(f"{path / 'template.yml'}: needs 'fprocess'")
    options = {str(o["name"]): [str(p) for p in o.get("packages") or []]
               for o in doc.get("build_options") or [] if isinstance(o, dict) and "name" in o}
    return Template(language=str(doc.get("language", lang)), path=path, fprocess=str(doc["fprocess"]),
                    welcome_message=str(doc.get("welcome_message", "")), build_options=options)


def load_stack(path: Path, environ: Mapping[str, str] | None = None) -> Stack:
    """Read and check the stack file at ``path``.

    Raises:
        StackError: listing every problem (missing file, bad YAML, each invalid field).
    """
    path = Path(path).resolve()
    environ = os.environ if environ is None else environ
    doc = _read_yaml(path, "stack file", lambda text: substitute_env(text, environ))
    if not isinstance(doc, dict):
        raise StackError(f"{path}: not a YAML mapping")
    problems: list[str] = []
    version = "" if doc.get("version") is None else str(doc["version"])
    if version != VERSION:
        problems.append(f"version must be {VERSION}, found {version or 'none'}")
    provider = doc.get("provider") if isinstance(doc.get("provider"), dict) else {}
    if provider.get("name") != PROVIDER:
        problems.append(f"'{PROVIDER}' is the only valid provider name, found {provider.get('name')!r}")
    functions: dict[str, Function] = {}
    entries = doc.get("functions")
    if not isinstance(entries, dict) or not entries:
        problems.append("no functions: the stack needs a 'functions' mapping")
        entries = {}
    for name, entry in entries.items():
        try:
            functions[str(name)] = _function(str(name), entry, path.parent, environ)
        except StackError as exc:
            problems.append(str(exc))
    if problems:
        raise StackError(f"{path}:\n  - " + "\n  - ".join(problems))
    return Stack(path=path, version=version, provider=PROVIDER, gateway=str(provider.get("gateway", "")),
                 functions=functions)


def _function(name: str, entry: Any, root: Path, environ: Mapping[str, str]) -> Function:
    where = f"function {name!r}"
    if not is_dns_label(name):
        raise StackError(f"{where}: the name must be a DNS-1123 label (a-z, 0-9 and '-', "
                         "starting and ending with a letter or digit, at most 63 characters)")
    if not isinstance(entry, dict):
        raise StackError(f"{where}: must be a mapping")
    missing = [k for k in ("lang", "handler", "image") if not entry.get(k)]
    if missing:
        raise StackError(f"{where}: missing {', '.join(missing)}")
    handler = (root / str(entry["handler"])).resolve()
    if not handler.is_dir():
        raise StackError(f"{where}: handler {entry['handler']!r} must be a folder ({handler} is not one)")
    lang = str(entry["lang"])
    if not (root / "template" / lang).is_dir():
        raise StackError(f"{where}: template {lang!r} not found in {root / 'template'} "
                         f"(faas-cli template pull, or copy it there)")
    namespace = str(entry.get("namespace") or DEFAULT_NAMESPACE)
    if not is_dns_label(namespace):
        raise StackError(f"{where}: namespace {namespace!r} must be a DNS-1123 label")
    environment = _strings(entry.get("environment"), f"{where}: environment")
    for env_file in entry.get("environment_file") or []:  # later files win, all over inline values
        doc = _read_yaml(root / str(env_file), f"{where}: environment_file",
                         lambda text: substitute_env(text, environ))
        environment.update(_strings((doc or {}).get("environment"), f"{where}: {env_file}"))
    return Function(
        name=name, lang=lang, handler=handler, image=str(entry["image"]), template=load_template(root, lang),
        namespace=namespace, fprocess=str(entry["fprocess"]) if entry.get("fprocess") else None,
        environment=environment,
        labels=_strings(entry.get("labels"), f"{where}: labels"),
        annotations=_strings(entry.get("annotations"), f"{where}: annotations"),
        secrets=[str(s) for s in entry.get("secrets") or []],
        limits=_resources(entry.get("limits"), f"{where}: limits"),
        requests=_resources(entry.get("requests"), f"{where}: requests"),
    )


def _read_yaml(path: Path, what: str, transform: Any = None) -> Any:
    try:
        text = path.read_text()
    except OSError as exc:
        raise StackError(f"{what}: cannot read {path}: {exc.strerror}") from None
    try:
        return yaml.safe_load(transform(text) if transform else text)
    except yaml.YAMLError as exc:
        raise StackError(f"{what}: invalid YAML in {path}: {exc}") from None


def _strings(value: Any, where: str) -> dict[str, str]:
    """A mapping of scalars as strings, the way faas-cli reads map[string]string (true -> 'true')."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise StackError(f"{where}: must be a mapping")
    out = {}
    for key, item in value.items():
        if isinstance(item, (dict, list)):
            raise StackError(f"{where}: {key} must be a string, not a {type(item).__name__}")
        out[str(key)] = str(item).lower() if isinstance(item, bool) else "" if item is None else str(item)
    return out


def _resources(value: Any, where: str) -> Resources | None:
    if value is None:
        return None
    values = _strings(value, where)
    return Resources(memory=values.get("memory"), cpu=values.get("cpu"))
