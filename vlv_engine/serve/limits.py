"""Request body limit, enforced before the body is read.

A declared ``Content-Length`` over the limit is answered 413 without reading a byte;
a body without one (chunked) is counted as it streams and refused the moment it
crosses the limit, so no handler ever buffers more than the limit.
"""

from __future__ import annotations

import json


class BodyTooLarge(Exception):
    pass


def _error_body(limit: int) -> bytes:
    return json.dumps({"error": f"request body over the limit of {limit:,} bytes ({limit / 2**20:g} MiB)",
                       "reason": "body_too_large"}).encode()


class BodyLimitMiddleware:
    def __init__(self, app, max_body_bytes: int):
        self.app = app
        self.limit = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = _content_length(scope)
        if declared is not None and declared > self.limit:
            return await _send_413(send, self.limit)
        seen = 0
        started = False

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise BodyTooLarge()
            return message

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if started:
                raise
            await _send_413(send, self.limit)


def _content_length(scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the server rejects a malformed header itself
    return None


async def _send_413(send, limit: int) -> None:
    body = _error_body(limit)
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
