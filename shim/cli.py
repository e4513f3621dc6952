"""``accelshim`` commands: ``serve``, ``up``, ``models build``, ``models list``."""
from __future__ import annotations

import argparse
import ctypes
import dataclasses
import json
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn, Sequence

from . import __version__
from .config import Settings, parse_bytes

if TYPE_CHECKING:  # the ops import numpy: not for `accelshim --help`
    from .ops import Op


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="accelshim", description="GPU acceleration shim for serverless functions")
    parser.add_argument("--version", action="version", version=f"accelshim {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve the ops over the Open Inference Protocol")
    serve.add_argument("--host", help="TCP address (default 127.0.0.1; 'none' for the unix socket alone)")
    serve.add_argument("--port", type=int, help="TCP port (default 8000; 0 picks a free one)")
    serve.add_argument("--unix", dest="unix_socket", metavar="PATH", help="also listen on this unix socket")
    serve.add_argument("--vsock", dest="vsock_port", type=int, metavar="PORT",
                       help="also listen on AF_VSOCK, any CID, this port (inside a microVM; see docs/deploy.md)")
    serve.add_argument("--device", choices=["auto", "cpu", "cuda"], help="backend (default auto)")
    serve.add_argument("--gpu-memory-limit", type=parse_bytes, metavar="SIZE",
                       help="GPU memory for requests' operands, e.g. 8GiB (507 for a request over it)")
    serve.add_argument("--gil-switch-us", type=int, metavar="US",
                       help="thread switch interval of the interpreter in microseconds (default Python's 5000): "
                            "shorter lets the batchers' threads back in sooner under load")
    serve.add_argument("--connection-threads", dest="connection_threads", action=argparse.BooleanOptionalAction,
                       default=None,
                       help="read and serve each connection on a thread of its own (the default: one hand-off "
                            "less per request); --no-connection-threads reads them on waitress's event loop and "
                            "serves them on its task threads")
    serve.add_argument("--no-batching", dest="batching", action="store_false", default=None,
                       help="run each classify / raw-model request alone (no dynamic batching)")
    serve.add_argument("--gpu-jpeg", dest="gpu_jpeg", action="store_true", default=None,
                       help="decode classify's plain baseline JPEGs on the GPU's JPEG engines (nvJPEG's hardware "
                            "backend, the nvidia-nvjpeg wheel) instead of on the CPU; off by default (docs/deploy.md "
                            "says when it pays)")
    serve.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false", default=None,
                       help="run models on the GPU node by node instead of replaying a CUDA graph per batch size")
    serve.add_argument("--models", dest="models_dir", type=Path, help="model repository (default ./models)")
    serve.add_argument("--threads", type=int, help="requests served at once (default 32; per worker with --workers)")
    serve.add_argument("--workers", type=int, metavar="N",
                       help="request worker processes that serve the sockets in front of the one process that "
                            "holds the device (default 1: that process serves them itself); see docs/deploy.md")
    serve.add_argument("--max-body-bytes", type=int, help="request body limit (413 above)")
    serve.add_argument("--max-image-pixels", type=int, help="pixel limit per image")
    serve.add_argument("--classify-model", help="model behind classify (default efficientnet-lite0)")
    serve.add_argument("--log-level", help="DEBUG, INFO, WARNING, ...")
    serve.add_argument("--tokens", dest="tokens_file", type=Path, metavar="FILE",
                       help="tenants and their tokens ('tenant: sha256:<hex> ...' lines; read again when it "
                            "changes); required off loopback")
    serve.add_argument("--max-queue", type=int, help="requests waiting for a slot (default 64; 429 above)")
    serve.add_argument("--tenant-max-inflight", type=int, help="slots per tenant (default: all --threads)")
    serve.add_argument("--tenant-max-queue", type=int, help="queued requests per tenant (default: all --max-queue)")
    serve.add_argument("--tenant-max-body-bytes", type=int, help="request body limit per tenant (413 above)")
    serve.add_argument("--tenant-max-buffer-bytes", type=parse_bytes, metavar="SIZE",
                       help="buffer store bytes per tenant, e.g. 256MiB (507 above; default: the store's bound)")
    serve.add_argument("--kernels", dest="kernels_dir", type=Path, metavar="DIR",
                       help="more KaaS kernel libraries: folders with kernels.cu + reference.py (docs/kaas.md)")
    serve.add_argument("--buffer-store-bytes", type=parse_bytes, metavar="SIZE",
                       help="KaaS buffer store bound, e.g. 4GiB (default 1GiB; 507 above)")
    serve.add_argument("--gpu-cache-bytes", type=parse_bytes, metavar="SIZE",
                       help="KaaS GPU-resident buffer cache bound (default 1GiB)")
    serve.add_argument("--state-dir", type=Path, metavar="DIR",
                       help="persist the KaaS buffer store here (survives restarts)")
    serve.add_argument("--no-shared-memory", dest="shared_memory", action="store_false", default=None,
                       help="do not serve the system_shared_memory extension (docs/shared-memory.md)")
    serve.add_argument("--shm-dir", type=Path, metavar="DIR", help="where shared memory keys resolve (default /dev/shm)")
    serve.add_argument("--shm-tenant-dirs", action="store_true", default=None,
                       help="resolve each tenant's shared memory keys in DIR/<tenant>/")
    serve.add_argument("--shm-prefault-threads", type=int, metavar="N",
                       help="threads that fill a new region's page tables before its first request (default 4; 0 off)")

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


def main(argv: list[str] | None = None, *, extra_ops: Sequence[Op] = ()) -> int:
    """Run an ``accelshim`` command; ``extra_ops`` are served besides the built-in ones (tests)."""
    args = _parser().parse_args(argv)
    if args.command == "serve":
        try:
            code = _serve(args, extra_ops)
        except Exception:  # noqa: BLE001 - said, then left as any other exit
            traceback.print_exc()
            code = 1
        _leave(code)
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


def _leave(code: int) -> NoReturn:
    """Exit ``code`` once served, without the interpreter's teardown: the server has closed what it
    opened, and the GPU libraries' destructors can hang there (on the H200, a device process with
    request workers whose warm-up had failed never exited)."""
    flushes = [logging.shutdown, *(s.flush for s in (sys.stdout, sys.stderr) if s is not None),  # None: closed
               lambda: ctypes.CDLL(None).fflush(None)]  # what native libraries wrote with stdio
    for flush in flushes:
        try:
            flush()
        except Exception:  # noqa: BLE001 - a stream gone (a closed pipe): the exit code still counts
            pass
    os._exit(code)


def serve_settings(args: argparse.Namespace) -> Settings:
    """``serve``'s settings: the environment's (``ACCELSHIM_*``), each option given overriding its
    own (every option's ``dest`` is a ``Settings`` field, so none can be left out).

    Raises:
        ValueError: a setting out of its range.
    """
    names = {f.name for f in dataclasses.fields(Settings)}
    return Settings.from_env(**{k: v for k, v in vars(args).items() if k in names})


def _serve(args: argparse.Namespace, extra_ops: Sequence[Op] = ()) -> int:
    try:
        settings = serve_settings(args)
    except ValueError as exc:
        print(f"accelshim: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if settings.gil_switch_us:
        sys.setswitchinterval(settings.gil_switch_us / 1e6)
    from .server.binding import bind_sockets  # noqa: PLC0415
    from .server.serving import Server  # noqa: PLC0415
    from .service import build_service  # noqa: PLC0415

    try:
        service = build_service(settings, extra_ops=extra_ops)
        host = None if settings.host.lower() == "none" else settings.host
        if host is None and not settings.unix_socket and settings.vsock_port is None:
            raise ValueError("--host none needs --unix PATH or --vsock PORT")
        sockets = bind_sockets(host, settings.port, settings.unix_socket, vsock_port=settings.vsock_port)
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"accelshim: {exc}", file=sys.stderr)
        return 1
    if settings.workers > 1:
        if extra_ops:
            print("accelshim: extra ops are served by a single process (no --workers)", file=sys.stderr)
            return 2
        from .workers import serve_with_workers  # noqa: PLC0415

        return serve_with_workers(service, sockets)
    return Server(service, sockets).run()
