"""jacobi: solve ``A x = b`` with Jacobi iterations run as a Kernel-as-a-Service graph on the shim.

POST JSON ``{"a": [[...]], "b": [...], "iterations": 200}`` (A square, n <= 2048, with a nonzero
diagonal; Jacobi converges when A is strictly diagonally dominant) -> ``200 application/json``
``{"x": [...], "residual": |b - A x|, "relative_residual": |b - A x| / |b|, "iterations": k,
"device": "cuda" | "cpu", "kernel_ms": ...}``.

A is uploaded once as a ``const`` buffer under a key made of its hash, so later calls with the same
matrix find it resident on the GPU; b, x and the residual are per-call buffers, deleted afterwards.
The solve is one request (two ``jacobi_step`` kernels, x -> xn -> x, ``nIter = iterations / 2``);
the residual ``r = b - A x`` a second one. Errors are JSON ``{"error": ...}``: 400 for malformed
input, 405 for another method than POST, 507 when the shim's buffer store is full.
"""
import hashlib
import json
import uuid

import numpy as np

import accel

MAX_N = 2048
MAX_ITERATIONS = 20000
A_PREFIX = "jacobi-A-"


def handle(event, context):
    if event.method != "POST":
        return {"statusCode": 405, "headers": {"Allow": "POST"},
                "body": {"error": 'POST JSON {"a": [[...]], "b": [...], "iterations": 200}'}}
    a, b, iterations = _read(event.body)
    n = b.size
    client = context.accel
    a_key = A_PREFIX + hashlib.sha256(a.tobytes()).hexdigest()[:32]
    call = uuid.uuid4().hex[:16]
    b_key, x_key, r_key = (f"jacobi-{call}-{name}" for name in ("b", "x", "r"))
    if a_key not in {info["key"] for info in client.list_buffers()}:
        _put_matrix(client, a_key, a)
    try:
        client.put_buffer(b_key, b)
        client.put_buffer(x_key, np.zeros(n, np.float32))
        solve = client.kaas(solve_request(n, iterations, a_key, b_key, x_key))
        client.kaas(residual_request(n, a_key, b_key, x_key, r_key))
        x = client.get_buffer(x_key, dtype=np.float32)
        r = client.get_buffer(r_key, dtype=np.float32)
    finally:
        for key in (b_key, x_key, r_key):
            try:
                client.delete_buffer(key)
            except accel.OpNotFound:
                pass
    residual = float(np.linalg.norm(r))
    return {"statusCode": 200, "body": {
        "x": x.tolist(), "residual": residual, "relative_residual": residual / max(float(np.linalg.norm(b)), 1e-30),
        "iterations": iterations, "device": solve["device"],
        "kernel_ms": sum(k["ms"] for k in solve["timings_ms"]["kernels"])}}


def _launch(n):
    return {"nGrid": min(4096, (n + 3) // 4), "nBlock": 128}  # one warp per row, four rows per block


def solve_request(n, iterations, a_key, b_key, x_key):
    """``iterations`` (even) Jacobi steps from the x stored under ``x_key``, written back there."""
    a = {"name": "A", "key": a_key, "size": n * n * 4, "const": True}
    b = {"name": "b", "key": b_key, "size": n * 4}
    x = {"name": "x", "key": x_key, "size": n * 4}
    xn = {"name": "xn", "size": n * 4, "ephemeral": True}
    lit = [{"type": "i", "val": n}]
    step = lambda src, dst: {"library": "jacobi", "kernel": "jacobi_step", "literals": lit,  # noqa: E731
                             "arguments": [[a, "i"], [b, "i"], [src, "i"], [dst, "o"]], **_launch(n)}
    return {"kernels": [step(x, xn), step(xn, x)], "nIter": iterations // 2}


def residual_request(n, a_key, b_key, x_key, r_key):
    args = [[{"name": "A", "key": a_key, "size": n * n * 4, "const": True}, "i"],
            [{"name": "b", "key": b_key, "size": n * 4}, "i"], [{"name": "x", "key": x_key, "size": n * 4}, "i"],
            [{"name": "r", "key": r_key, "size": n * 4}, "o"]]
    return {"kernels": [{"library": "jacobi", "kernel": "residual", "literals": [{"type": "i", "val": n}],
                         "arguments": args, **_launch(n)}]}


def _put_matrix(client, key, a):
    """Upload A; when the store is full, drop the matrices of earlier calls and try once more."""
    try:
        client.put_buffer(key, a)
    except accel.InsufficientStorage:
        for info in client.list_buffers():
            if info["key"].startswith(A_PREFIX):
                client.delete_buffer(info["key"])
        client.put_buffer(key, a)


def _read(body):
    try:
        doc = json.loads(body)
    except ValueError:
        raise accel.InvalidInput('the body must be JSON {"a": [[...]], "b": [...], "iterations": 200}') from None
    if not isinstance(doc, dict) or "a" not in doc or "b" not in doc:
        raise accel.InvalidInput('the JSON body needs "a" (a square matrix) and "b" (a vector)')
    try:
        a = np.asarray(doc["a"], dtype=np.float32)
        b = np.asarray(doc["b"], dtype=np.float32)
    except (ValueError, TypeError):
        raise accel.InvalidInput('"a" must be a matrix and "b" a vector of numbers') from None
    if a.ndim != 2 or a.shape[0] != a.shape[1] or not 1 <= a.shape[0] <= MAX_N:
        raise accel.InvalidInput(f'"a" must be a square matrix of 1 to {MAX_N} rows, not shape {list(a.shape)}')
    if b.shape != (a.shape[0],):
        raise accel.InvalidInput(f'"b" must be a vector of {a.shape[0]} numbers, not shape {list(b.shape)}')
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise accel.InvalidInput('"a" and "b" must be finite')
    if not np.diagonal(a).all():
        raise accel.InvalidInput("the diagonal of a must be nonzero (Jacobi divides by it)")
    iterations = doc.get("iterations", 200)
    if type(iterations) is not int or not 2 <= iterations <= MAX_ITERATIONS:
        raise accel.InvalidInput(f'"iterations" must be an integer from 2 to {MAX_ITERATIONS}')
    return a, b, iterations + iterations % 2
