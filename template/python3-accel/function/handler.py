"""An example python3-accel function: echo the request body back by way of the accel shim.

    curl -d hello http://127.0.0.1:8080/function/<name>     -> hello (it went through the shim)
    curl http://127.0.0.1:8080/function/<name>              -> {"shim": "...", "ready": true}

Replace it with your own ``handle``; ``context.accel`` also has ``classify``, ``gemm`` and ``infer``.
"""
from accel import Tensor


def handle(event, context):
    """Args: event (body, headers, method, query, path), context (accel, call_id, hostname)."""
    if event.method == "GET":
        return {"statusCode": 200, "body": {"shim": context.accel.url, "ready": context.accel.ready()}}
    # the shim's noop op returns its inputs unchanged: the body makes the round trip as bytes
    outputs = context.accel.infer_tensors("noop", [Tensor.from_bytes_list("body", [event.body])])
    return {
        "statusCode": 200,
        "body": outputs["body"].bytes_list()[0],
        "headers": {"Content-Type": event.headers.get("Content-Type", "application/octet-stream")},
    }
