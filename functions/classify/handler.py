"""classify: POST an image, get its ImageNet classes.

Request: ``POST /function/classify`` with the encoded image (JPEG, PNG, WebP, BMP, GIF) as the
body, any Content-Type; ``?top_k=N`` (1..1000, default 5) classes are returned.
Response: ``200 application/json`` ``{"predictions": [{"label", "score", "index"}, ...]}``, best
first. Errors are JSON ``{"error": ...}``: 400 for a body that is not an image or a bad top_k,
405 for another method than POST, 413 for an image over the shim's limits, 503 while the shim is
unreachable.
"""
import accel

MAX_TOP_K = 1000


def handle(event, context):
    if event.method != "POST":
        return _error(405, "POST an image (JPEG, PNG, WebP, BMP or GIF) as the request body",
                      {"Allow": "POST"})
    try:
        top_k = int(event.query.get("top_k", 5))
    except ValueError:
        return _error(400, f"top_k must be an integer, not {event.query.get('top_k')!r}")
    if not 1 <= top_k <= MAX_TOP_K:
        return _error(400, f"top_k must be between 1 and {MAX_TOP_K}, not {top_k}")
    if not event.body:
        return _error(400, "the request body is empty: POST an image (JPEG, PNG, WebP, BMP or GIF)")
    try:
        predictions = context.accel.classify(event.body, top_k=top_k)
    except accel.InvalidInput as exc:  # top_k was checked above: what the shim rejects is the image
        return _error(400, f"the request body is not an image this function can read: {exc.message}")
    # accel.PayloadTooLarge (413) and the other accel errors keep their status in index.py
    return {
        "statusCode": 200,
        "body": {"predictions": [{"label": p.label, "score": p.score, "index": p.index} for p in predictions]},
    }


def _error(status, message, headers=None):
    return {"statusCode": status, "body": {"error": message}, "headers": headers or {}}
