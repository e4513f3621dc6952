"""gemm: ``C = alpha * A @ B + beta * C`` on the host's accelerator.

Two request forms, chosen by Content-Type:

- JSON (``application/json``, or any type other than the one below):
  ``{"a": [[...]], "b": [[...]], "c": [[...]] (optional), "alpha": 1.0, "beta": 0.0,
  "dtype": "float32" | "float16" | "float64"}`` -> ``200 application/json`` ``{"c": [[...]]}``.
- ``application/x-npz``: an ``.npz`` (``numpy.savez``) holding arrays ``a`` and ``b`` (and
  optionally ``c``); ``?alpha=``, ``?beta=`` and ``?dtype=`` in the query. The answer is the
  result as an ``.npy`` file, ``200 application/x-npy`` (read it with ``numpy.load``).

The dtype defaults to float32 for JSON and to that of ``a`` for npz (float32 if it is not a float
type). Errors are JSON ``{"error": ...}``: 400 for malformed input or shapes that do not fit, 405
for another method than POST, 413 when over the shim's size limit.
"""
import io
import json
import zipfile

import numpy as np

import accel

NPZ = "application/x-npz"
NPY = "application/x-npy"
DTYPES = ("float16", "float32", "float64")


def handle(event, context):
    if event.method != "POST":
        return {"statusCode": 405, "headers": {"Allow": "POST"},
                "body": {"error": f"POST JSON {{\"a\", \"b\"}} or an .npz ({NPZ})"}}
    content_type = event.headers.get("Content-Type", "").split(";")[0].strip().lower()
    if content_type == NPZ:
        arrays, options = _read_npz(event.body), dict(event.query.items())
    else:
        arrays, options = _read_json(event.body)
    dtype = _dtype(options.get("dtype"), arrays["a"].dtype if content_type == NPZ else None)
    a, b = arrays["a"].astype(dtype, copy=False), arrays["b"].astype(dtype, copy=False)
    c = arrays["c"].astype(dtype, copy=False) if arrays.get("c") is not None else None
    result = context.accel.gemm(a, b, c, alpha=_number(options, "alpha", 1.0), beta=_number(options, "beta", 0.0))
    if content_type == NPZ:
        out = io.BytesIO()
        np.save(out, result, allow_pickle=False)
        return {"statusCode": 200, "body": out.getvalue(), "headers": {"Content-Type": NPY}}
    return {"statusCode": 200, "body": {"c": result.tolist()}}


def _read_json(body):
    try:
        doc = json.loads(body)
    except ValueError:
        raise accel.InvalidInput(f'the body is neither JSON {{"a": [[...]], "b": [[...]]}} nor an .npz '
                                 f"sent with Content-Type: {NPZ}") from None
    if not isinstance(doc, dict) or "a" not in doc or "b" not in doc:
        raise accel.InvalidInput('the JSON body needs matrices "a" and "b": {"a": [[...]], "b": [[...]]}')
    return {k: _matrix(doc, k) for k in ("a", "b", "c") if doc.get(k) is not None}, doc


def _read_npz(body):
    try:
        with np.load(io.BytesIO(body), allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in ("a", "b", "c") if k in npz.files}
    except (ValueError, OSError, zipfile.BadZipFile) as exc:
        raise accel.InvalidInput(f"the body is not a readable .npz: {exc}") from None
    if "a" not in arrays or "b" not in arrays:
        raise accel.InvalidInput(f"the .npz needs arrays a and b, it has {sorted(arrays)}")
    for name, array in arrays.items():
        if array.ndim != 2 or array.dtype.kind not in "iuf":
            raise accel.InvalidInput(f"{name} must be a 2-D numeric array, not {array.ndim}-D {array.dtype}")
    return arrays


def _matrix(doc, name):
    try:
        array = np.asarray(doc[name], dtype=np.float64)
    except (ValueError, TypeError):
        raise accel.InvalidInput(f"{name} must be a matrix of numbers (a list of equal-length rows)") from None
    if array.ndim != 2:
        raise accel.InvalidInput(f"{name} must be 2-D (a list of rows), not {array.ndim}-D")
    return array


def _dtype(requested, default):
    if requested is None:
        return np.dtype(default) if default is not None and np.dtype(default).name in DTYPES else np.dtype("float32")
    if str(requested) not in DTYPES:
        raise accel.InvalidInput(f"dtype must be one of {', '.join(DTYPES)}, not {requested!r}")
    return np.dtype(str(requested))


def _number(options, name, default):
    try:
        return float(options.get(name, default))
    except (TypeError, ValueError):
        raise accel.InvalidInput(f"{name} must be a number, not {options.get(name)!r}") from None
