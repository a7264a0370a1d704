"""Stream a derived batch as NDJSON: one key a line, derived in chunks on a worker thread."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator

import anyio.to_thread
import structlog
from starlette.requests import Request
from starlette.responses import StreamingResponse

from plings_hsm.core.batch import DerivedKey
from plings_hsm.errors import PlingsHsmError
from plings_hsm.service.errors import INTERNAL_MESSAGE, client_message, status_of

__all__ = ["NDJSON_MEDIA_TYPE", "STREAM_CHUNK_KEYS", "ndjson_response", "wants_ndjson"]

log = structlog.get_logger(__name__)

NDJSON_MEDIA_TYPE = "application/x-ndjson"

STREAM_CHUNK_KEYS = 256
"""Keys derived per worker-thread call; one call per key would cost more than the key."""


def wants_ndjson(request: Request) -> bool:
    """Tell whether the request's ``Accept`` header names ``application/x-ndjson``."""
    for part in request.headers.get("accept", "").split(","):
        media_type, _, params = part.strip().partition(";")
        if media_type.strip().lower() == NDJSON_MEDIA_TYPE and "q=0" not in params.replace(
            " ", ""
        ).split(";"):
            return True
    return False


def _close(keys: Iterator[DerivedKey]) -> None:
    close = getattr(keys, "close", None)
    if close is not None:
        close()


def _next_chunk(keys: Iterator[DerivedKey]) -> tuple[bytes, int, Exception | None]:
    """Derive up to STREAM_CHUNK_KEYS keys; an error comes back with the lines before it."""
    lines = []
    failure: Exception | None = None
    try:
        for key in keys:
            lines.append(json.dumps(key.to_wire(), separators=(",", ":")))
            if len(lines) == STREAM_CHUNK_KEYS:
                break
    except Exception as exc:
        failure = exc
    text = "".join(f"{line}\n" for line in lines)
    return text.encode("ascii"), len(lines), failure


def _error_line(request: Request, exc: Exception) -> bytes:
    request_id = request.state.request_id
    log.error(
        "stream_failed",
        request_id=request_id,
        error=type(exc).__name__,
        keys_sent=request.state.keys_derived,
        detail=str(exc),
        exc_info=exc,
    )
    error = {"code": "internal_error", "message": INTERNAL_MESSAGE}
    if isinstance(exc, NotImplementedError):
        error = {"code": "not_implemented", "message": str(exc)}
    elif isinstance(exc, PlingsHsmError) and status_of(exc)[0] != 500:
        error = {"code": status_of(exc)[1], "message": client_message(exc, request_id)}
    line = {"success": False, "error": error, "requestId": request_id}
    return (json.dumps(line) + "\n").encode("ascii")


async def ndjson_response(request: Request, keys: Iterator[DerivedKey]) -> StreamingResponse:
    """Derive the first chunk now, then stream the rest as it is derived.

    An error before the first key (an unknown wallet, a token failure) raises here, so
    it gets its own status. An error after that ends the stream with the keys derived
    so far and one error line in the error body's shape, because the status is sent.
    The key iterator is closed however the stream ends, which wipes the batch node.
    """
    try:
        first, count, failure = await anyio.to_thread.run_sync(_next_chunk, keys)
    except BaseException:
        _close(keys)
        raise
    if failure is not None and not count:
        _close(keys)
        raise failure
    request.state.keys_derived += count

    async def body() -> AsyncIterator[bytes]:
        chunk, count, error = first, 0, failure
        try:
            yield chunk
            while error is None:
                chunk, count, error = await anyio.to_thread.run_sync(_next_chunk, keys)
                if not count and error is None:
                    return
                request.state.keys_derived += count
                yield chunk
            yield _error_line(request, error)
        finally:
            _close(keys)

    return StreamingResponse(body(), media_type=NDJSON_MEDIA_TYPE)
