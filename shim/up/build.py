"""Build contexts laid out as ``faas-cli build --shrinkwrap`` lays them out.

``build/<fn>/`` is cleared, the template ``template/<lang>/`` is copied into it, and the handler
folder is overlaid onto ``build/<fn>/function/`` (its files replace the template's example, the
example's other files stay). ``function/__init__.py`` is created as the template's Dockerfile
does, so that ``from function import handler`` works when run from ``build/<fn>/``.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from .stack import Function

_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache", "build", ".git")


def shrinkwrap(function: Function, build_root: Path) -> Path:
    """Lay out ``build_root/<name>/`` for ``function``; returns that folder."""
    context = Path(build_root) / function.name
    if context.exists():
        shutil.rmtree(context)
    shutil.copytree(function.template.path, context, ignore=_IGNORE)
    shutil.copytree(function.handler, context / "function", ignore=_IGNORE, dirs_exist_ok=True)
    (context / "function" / "__init__.py").touch()
    return context
