"""``accelshim up``: the functions of a stack file, their shim and a gateway, on this machine.

The local counterpart of ``faas-cli up`` for a box without Kubernetes: it checks the stack as
faas-cli does, starts the shim (or uses ``--shim-url``), builds each function's context the
``faas-cli build --shrinkwrap`` way into ``build/<fn>/`` and runs it there as its own process
(``fprocess`` of its template, the stack's ``environment``, ``ACCEL_SHIM_URL`` set to the shim),
then serves a gateway with OpenFaaS's routes on 127.0.0.1. Children's log lines are prefixed with
their names; a function that dies is restarted; Ctrl-C or SIGTERM stops it all, functions first.
"""
from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["add_parser", "configure", "run"]


def configure(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the options of ``up`` to ``parser``."""
    parser.add_argument("-f", "--file", dest="stack", type=Path, default=Path("stack.yml"),
                        help="the stack file (default stack.yml)")
    parser.add_argument("--port", type=int, default=8080, help="gateway port on 127.0.0.1 (default 8080)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], help="the shim's backend (default auto)")
    parser.add_argument("--models", type=Path, help="the shim's model repository (default ./models)")
    parser.add_argument("--shim-port", type=int, default=8000,
                        help="the shim's TCP port on 127.0.0.1 (default 8000; 0 picks a free one)")
    parser.add_argument("--shim-url", help="use this running shim instead of starting one")
    parser.add_argument("--build-dir", type=Path, help="where contexts are built (default build/ beside the stack)")
    parser.add_argument("--run-dir", type=Path, help="where the shim's socket goes (default a new temporary folder)")
    parser.add_argument("--startup-timeout", type=float, default=120.0, help="seconds to wait for each process")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds a function may take per call")
    return parser


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``up`` subcommand to an ``accelshim`` subparsers object."""
    parser = subparsers.add_parser("up", help="run a stack's functions, their shim and a gateway locally",
                                   description=__doc__.split("\n\n")[1] if __doc__ else None)
    configure(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``up`` until Ctrl-C/SIGTERM; returns the exit code (2: bad stack, 1: failed to start)."""
    from .main import run as run_up  # flask, requests, yaml: imported only when ``up`` runs

    return run_up(args)
