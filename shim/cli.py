"""``accelshim`` commands: ``serve``, ``up``, ``models build``, ``models list``."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from . import __version__
from .config import Settings


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="accelshim", description="GPU acceleration shim for serverless functions")
    parser.add_argument("--version", action="version", version=f"accelshim {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve the ops over the Open Inference Protocol")
    serve.add_argument("--host", help="TCP address (default 127.0.0.1; 'none' for the unix socket alone)")
    serve.add_argument("--port", type=int, help="TCP port (default 8000; 0 picks a free one)")
    serve.add_argument("--unix", dest="unix_socket", metavar="PATH", help="also listen on this unix socket")
    serve.add_argument("--device", choices=["auto", "cpu", "cuda"], help="backend (default auto)")
    serve.add_argument("--models", dest="models_dir", type=Path, help="model repository (default ./models)")
    serve.add_argument("--threads", type=int, help="worker threads (default 8)")
    serve.add_argument("--max-body-bytes", type=int, help="request body limit (413 above)")
    serve.add_argument("--max-image-pixels", type=int, help="pixel limit per image")
    serve.add_argument("--classify-model", help="model behind classify (default efficientnet-lite0)")
    serve.add_argument("--log-level", help="DEBUG, INFO, WARNING, ...")

    from .up import add_parser as add_up  # light: the heavy imports of ``up`` wait until it runs

    add_up(sub)

    models = sub.add_parser("models", help="the model repository")
    msub = models.add_subparsers(dest="models_command", required=True)
    build = msub.add_parser("build", help="export EfficientNet-Lite0 to ONNX (idempotent)")
    build.add_argument("--dir", type=Path, default=Path("models"))
    build.add_argument("--python", default=os.environ.get("ACCELSHIM_BUILD_PYTHON"),
                       help="the build environment's Python, where torch is (default .venv-build/bin/python)")
    build.add_argument("--force", action="store_true", help="rebuild even if intact")
    lst = msub.add_parser("list", help="list the models of the repository")
    lst.add_argument("--dir", type=Path, default=Path("models"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    if args.command == "up":
        return args.func(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.models_command == "build":
        from .modelbuild import build, default_build_python  # noqa: PLC0415

        try:
            built = build(args.dir, args.python or default_build_python(), force=args.force)
        except (FileNotFoundError, RuntimeError) as exc:
            print(f"accelshim: {exc}", file=sys.stderr)
            return 1
        print(f"{'built' if built else 'up to date'}: {args.dir / 'efficientnet-lite0'}")
        return 0
    from .modelrepo import ModelRepository  # noqa: PLC0415

    repo = ModelRepository(args.dir)
    for name in repo.names():
        config = repo.load(name)
        print(json.dumps({"name": name, "labels": len(config.labels or []), "sha256": config.sha256}))
    return 0


def _serve(args: argparse.Namespace) -> int:
    overrides = {k: getattr(args, k) for k in ("host", "port", "unix_socket", "device", "models_dir", "threads",
                                               "max_body_bytes", "max_image_pixels", "classify_model", "log_level")}
    try:
        settings = Settings.from_env(**overrides)
    except ValueError as exc:
        print(f"accelshim: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from .server.serving import Server, bind_sockets  # noqa: PLC0415
    from .service import build_service  # noqa: PLC0415

    try:
        service = build_service(settings)
        host = None if settings.host.lower() == "none" else settings.host
        if host is None and not settings.unix_socket:
            raise ValueError("--host none needs --unix PATH")
        sockets = bind_sockets(host, settings.port, settings.unix_socket)
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"accelshim: {exc}", file=sys.stderr)
        return 1
    return Server(service, sockets).run()
