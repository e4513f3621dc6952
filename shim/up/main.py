"""What ``accelshim up`` does, once its arguments are parsed (see the package docstring)."""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

from accel import Client

from ..auth import hash_token, new_token

from .build import shrinkwrap
from .gateway import GatewayServer, Route, create_gateway
from .stack import Function, Stack, StackError, load_stack
from .supervisor import Child, LogMux, ProcessSpec, StartupError, Supervisor, free_port, tcp_probe

HOST = "127.0.0.1"
TOKEN_SECRET = "accel-token"  # the secret that holds a function's token for the shim
TOKENS_FILE = "tokens"        # in the run dir: the shim's `--tokens` (digests only)


def run(args: argparse.Namespace) -> int:
    """Run ``up`` until Ctrl-C/SIGTERM; returns the exit code (2: bad stack, 1: failed to start)."""
    try:
        stack = load_stack(args.stack)
    except StackError as exc:
        print(f"accelshim up: {exc}", file=sys.stderr)
        return 2
    mux = LogMux(width=max([7, *map(len, stack.functions)]))
    stop = threading.Event()
    routes: dict[str, Route] = {}
    try:
        server = GatewayServer(create_gateway(routes, timeout=args.timeout, log=lambda l: mux.line("gateway", l)),
                               HOST, args.port)
    except OSError as exc:
        print(f"accelshim up: cannot listen on {HOST}:{args.port}: {exc.strerror}", file=sys.stderr)
        return 1
    run_dir = args.run_dir or Path(tempfile.mkdtemp(prefix="accelshim-up-"))
    sock = Path(run_dir) / "accel.sock"
    supervisor = Supervisor(mux, stopping=stop)
    _on_signals(stop, mux)
    started = time.monotonic()
    try:
        tokens = {} if args.shim_url else _tenant_tokens(stack, Path(run_dir), mux)
        shim = _start_shim(args, sock, supervisor, mux, Path(run_dir) / TOKENS_FILE if tokens else None)
        build_dir = args.build_dir or stack.path.parent / "build"
        children = {name: _start_function(fn, build_dir, shim, supervisor, mux, tokens.get(name))
                    for name, fn in stack.functions.items()}
        for name, (child, url) in children.items():
            supervisor.wait_ready(child, args.startup_timeout)
            routes[name] = Route(stack.functions[name], url, child.ready)
        supervisor.watch()
        _banner(mux, stack, server.url, shim, time.monotonic() - started)
        server.serve_until(stop)
        mux.line("up", "gateway closed; stopping the functions, then the shim")
        return 0
    except (StartupError, OSError) as exc:  # OSError: a context that cannot be built, an fprocess not found
        if stop.is_set():  # Ctrl-C while starting
            return 0
        mux.line("up", f"failed to start: {exc}")
        return 1
    finally:
        server.close()
        supervisor.stop_all()
        if not args.shim_url and sock.is_socket():  # the shim leaves its socket file behind
            sock.unlink()
        if args.run_dir is None:
            shutil.rmtree(run_dir, ignore_errors=True)
        mux.line("up", "stopped")


def _on_signals(stop: threading.Event, mux: LogMux) -> None:
    def on_signal(signum: int, _frame: object) -> None:
        mux.line("up", f"{signal.Signals(signum).name}: stopping the gateway, the functions, then the shim")
        stop.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)


def _tenant_tokens(stack: Stack, run_dir: Path, mux: LogMux) -> dict[str, str]:
    """A fresh token for each function that asks for the ``accel-token`` secret, its tenant named after
    it; their digests go to ``run_dir/TOKENS_FILE`` for the shim. Returns function name -> token."""
    tokens = {name: new_token() for name, fn in stack.functions.items() if TOKEN_SECRET in fn.secrets}
    if tokens:
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / TOKENS_FILE
        path.write_text("".join(f"{name}: {hash_token(token)}\n" for name, token in tokens.items()))
        path.chmod(0o600)
        for name in stack.functions.keys() - tokens.keys():
            mux.line("up", f"{name}: no {TOKEN_SECRET} secret in the stack; the shim will refuse its calls (401)")
    return tokens


def _start_shim(args: argparse.Namespace, sock: Path, supervisor: Supervisor, mux: LogMux,
                tokens_file: Path | None = None) -> str:
    """Start ``accelshim serve`` (unless ``--shim-url``) and wait until ready; returns the functions' URL."""
    if args.shim_url:
        probe = Client(args.shim_url, timeout=5.0).ready
        deadline = time.monotonic() + args.startup_timeout
        while not probe():
            if time.monotonic() > deadline or supervisor.stopping.is_set():
                raise StartupError(f"the shim at {args.shim_url} is not ready")
            time.sleep(0.1)
        mux.line("up", f"using the shim at {args.shim_url}")
        return args.shim_url
    port = args.shim_port or free_port(HOST)
    argv = [sys.executable, "-m", "shim", "serve", "--host", HOST, "--port", str(port), "--unix", str(sock)]
    argv += ["--device", args.device] if args.device else []
    argv += ["--models", str(args.models)] if args.models else []
    argv += ["--tokens", str(tokens_file)] if tokens_file else []
    tcp_url = f"http://{HOST}:{port}"
    child = supervisor.start(ProcessSpec("shim", argv, Path.cwd(), dict(os.environ),
                                         probe=Client(tcp_url, timeout=5.0).ready, tier=0))
    supervisor.wait_ready(child, args.startup_timeout)
    mux.line("up", f"shim ready: {tcp_url} unix://{sock}")
    return f"unix://{sock}"


def _start_function(fn: Function, build_dir: Path, shim_url: str, supervisor: Supervisor,
                    mux: LogMux, token: str | None = None) -> tuple[Child, str]:
    """Shrinkwrap ``fn`` and start its process (not waiting); returns it and its URL.

    ``token`` (its ``accel-token`` secret) reaches it as ``$ACCEL_TOKEN``, which the accel client
    reads before the secret file that OpenFaaS would mount."""
    context = shrinkwrap(fn, build_dir)
    port = free_port(HOST)
    url = f"http://{HOST}:{port}"
    if fn.environment.get("ACCEL_SHIM_URL", shim_url) != shim_url:
        mux.line("up", f"{fn.name}: ACCEL_SHIM_URL {fn.environment['ACCEL_SHIM_URL']} of the stack "
                       f"replaced by {shim_url}")
    others = [s for s in fn.secrets if s != TOKEN_SECRET]
    if others:
        mux.line("up", f"{fn.name}: secrets {', '.join(others)} are not mounted by accelshim up")
    env = {**os.environ, **fn.environment, "ACCEL_SHIM_URL": shim_url, "http_port": str(port),
           "upstream_url": url, "PYTHONUNBUFFERED": "1"}
    if token is not None:
        env["ACCEL_TOKEN"] = token
    spec = ProcessSpec(fn.name, _argv(fn.env_process), context, env, probe=tcp_probe(HOST, port), tier=1)
    return supervisor.start(spec), url


def _argv(fprocess: str) -> list[str]:
    """The fprocess as argv, with ``python`` meaning this interpreter (its environment has flask)."""
    argv = shlex.split(fprocess)
    if argv and argv[0] in ("python", "python3"):
        argv[0] = sys.executable
    return argv


def _banner(mux: LogMux, stack: Stack, gateway: str, shim: str, took: float) -> None:
    lines = [f"ready in {took:.1f}s: gateway {gateway} ({stack.path.name}), shim {shim}"]
    lines += [f"  {name:<12} {gateway}/function/{name}" for name in stack.functions]
    lines += [f"  {'list':<12} curl {gateway}/system/functions"]
    for name, fn in stack.functions.items():
        example = fn.annotations.get("accelshim.example", "curl -d hello {url}")
        lines.append(f"try: {example.replace('{url}', f'{gateway}/function/{name}')}")
    first = next(iter(stack.functions))
    lines += [f"or:  faas-cli invoke {first} --gateway {gateway} < request-body", "Ctrl-C stops everything"]
    for line in lines:
        mux.line("up", line)
