"""What stands between `vaelens serve` and a hostile client: bounded requests, a Host check, safe headers.

`Guard` is a pure ASGI middleware, so it sees every request before FastAPI parses anything:

- the Host header must name this server (`hosts`, and the bound `port`), else 400: a page on another
  site that rebinds its DNS name to 127.0.0.1 still sends its own name, and cannot read the API;
- a body larger than `max_body` is answered 413 from its Content-Length before a byte of it is
  read, and a chunked body as soon as it passes the bound, so the app never holds more than
  `max_body` bytes of one request and JSON parsing (pydantic, on the event loop for async
  endpoints) works on a small body only;
- the whole body must arrive within `body_timeout` seconds, else 408 (a slow sender ties up a
  connection, not a worker);
- a POST must say Content-Type: application/json (415 otherwise): a cross-site page can send text/plain
  or form bodies without the browser asking the server first, but not JSON (that needs a CORS
  preflight, which this server never grants);
- every response carries nosniff, a Content-Security-Policy that lets the page load only its own
  script, style and fetches, X-Frame-Options DENY and Referrer-Policy no-referrer.

uvicorn bounds the rest when started through `server_config`: its h11 protocol (chosen explicitly,
so the bounds hold whether or not httptools is installed) with a header-size limit, a keep-alive
timeout and a connection limit, and — uvicorn has none — a deadline for each request's headers,
counted from the connection (or the previous response), which closes slowloris and idle connections.

fastapi and uvicorn are optional: nothing here imports them at module level.
"""

from __future__ import annotations

import asyncio
import json
from typing import Iterable, Optional

MAX_BODY = 64 * 1024          # the largest real request (/api/decode of a 1000-dimensional z) is ~20 KB
BODY_TIMEOUT = 10.0           # seconds for a whole body of at most MAX_BODY bytes to arrive
HEADER_TIMEOUT = 10.0         # seconds from connecting (or the previous response) to complete request headers
MAX_HEADER = 16 * 1024        # bytes of request line and headers (h11's incomplete-event bound)
KEEP_ALIVE = 5                # seconds an idle keep-alive connection stays open
MAX_CONCURRENCY = 64          # connections and requests at once; more are answered 503

# The page is index.html, app.js and app.css from this server; it fetches /api/* and draws on canvases.
# The one data: URL is the empty favicon (<link rel="icon" href="data:,">), which img-src governs.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = (
    (b"x-content-type-options", b"nosniff"),
    (b"content-security-policy", CSP.encode()),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-resource-policy", b"same-origin"),
)


def split_host(value: str):
    """(name, port) of a Host header, name lower-cased without a trailing dot; (None, None) if malformed.

    ``[::1]:8000`` -> ("[::1]", 8000); ``localhost`` -> ("localhost", None).
    """
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        name, rest = (value[:end + 1], value[end + 1:]) if end > 0 else (None, "")
    else:
        name, colon, port = value.partition(":")
        rest = colon + port
    if not name or (rest and not (rest.startswith(":") and rest[1:].isdigit() and len(rest) <= 6)):
        return None, None
    return name.rstrip("."), int(rest[1:]) if rest else None


class Guard:
    """ASGI middleware: Host allowlist, body bound and deadline, security headers (see the module docstring).

    Parameters
    ----------
    app : ASGI application
    hosts : iterable of str, optional
        Accepted Host names (``127.0.0.1``, ``localhost``, ``[::1]``), compared lower-case; None
        accepts any Host (only for tests and embedding; the CLI always passes a list).
    port : int, optional
        The port the server is bound to; when given, a Host header's port must be it (or absent
        for port 80).
    """

    def __init__(self, app, hosts: Optional[Iterable[str]] = None, port: Optional[int] = None,
                 max_body: int = MAX_BODY, body_timeout: float = BODY_TIMEOUT):
        self.app = app
        self.hosts = None if hosts is None else {split_host(h)[0] or h.lower() for h in hosts}
        self.port = port
        self.max_body = max_body
        self.body_timeout = body_timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":  # lifespan; the app serves no websockets
            return await self.app(scope, receive, send)
        send = _with_headers(send)
        headers = {}
        for k, v in scope.get("headers", ()):
            headers.setdefault(k, []).append(v)
        if not self._host_ok(headers.get(b"host", [])):
            return await _refuse(send, 400, "invalid Host header: this server answers only its own names")
        lengths = headers.get(b"content-length", [])
        if len(lengths) > 1 or (lengths and not lengths[0].isdigit()):
            return await _refuse(send, 400, "malformed Content-Length")
        if lengths and int(lengths[0]) > self.max_body:  # refused before a byte of the body is read
            return await _refuse(send, 413, f"request body larger than {self.max_body} bytes")
        try:
            body = await asyncio.wait_for(self._read_body(receive), self.body_timeout)
        except asyncio.TimeoutError:
            return await _refuse(send, 408, f"request body not received within {self.body_timeout:g} s")
        if body is None:
            return await _refuse(send, 413, f"request body larger than {self.max_body} bytes")
        if body is False:
            return  # the client went away
        if scope["method"] not in ("GET", "HEAD") and not _is_json(headers.get(b"content-type", [])):
            # A cross-site page can POST text/plain or a form without asking; application/json needs a
            # CORS preflight, which this server never grants. So only JSON bodies reach the app.
            return await _refuse(send, 415, "request bodies must be application/json")
        await self.app(scope, _replay(body, receive), send)

    def _host_ok(self, values) -> bool:
        if self.hosts is None:
            return True
        if len(values) != 1:
            return False
        name, port = split_host(values[0].decode("latin-1"))
        if name is None or name not in self.hosts:
            return False
        return self.port is None or port == self.port or (port is None and self.port == 80)

    async def _read_body(self, receive):
        """The whole body (bytes), None once it passes max_body, False if the client disconnected."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return False
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _is_json(values) -> bool:
    return len(values) == 1 and values[0].split(b";")[0].strip().lower() == b"application/json"


def _replay(body: bytes, receive):
    """A receive() that hands the app the body already read, then passes on to the real one (disconnects)."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _with_headers(send):
    async def wrapped(message):
        if message["type"] == "http.response.start":
            present = {k.lower() for k, _ in message.get("headers", ())}
            extra = [(k, v) for k, v in SECURITY_HEADERS if k not in present]
            message = dict(message, headers=list(message.get("headers", ())) + extra)
        await send(message)

    return wrapped


async def _refuse(send, status: int, message: str) -> None:
    """A JSON error like the API's own; the connection is closed after it, since the request's
    body (if any) was not read."""
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


def protocol_class(header_timeout: float = HEADER_TIMEOUT):
    """uvicorn's h11 protocol with a deadline for each request's headers.

    uvicorn arms its keep-alive timer only after a response, so a client that connects and sends
    nothing, or sends its headers a byte at a time, holds the connection for ever (slowloris). Here
    a timer starts when the connection is made and again after each response; if the next request's
    headers are not complete when it fires, the connection is closed.
    """
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class DeadlineH11Protocol(H11Protocol):
        _deadline = None
        _awaiting = None

        def _arm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            self._awaiting = self.cycle  # a different cycle later means a request's headers arrived
            self._deadline = self.loop.call_later(header_timeout, self._expire)

        def _expire(self) -> None:
            self._deadline = None
            if self.cycle is self._awaiting and not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._deadline is not None and self.cycle is not self._awaiting:
                self._deadline.cancel()
                self._deadline = None

        def on_response_complete(self) -> None:
            # armed first: a pipelined request handled inside the call below starts a new cycle,
            # which the timer then leaves alone
            if not self.transport.is_closing():
                self._arm()
            super().on_response_complete()

        def connection_lost(self, exc) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None
            super().connection_lost(exc)

    return DeadlineH11Protocol


def server_config(app, header_timeout: float = HEADER_TIMEOUT, **kw):
    """The `uvicorn.Config` of `vaelens serve`: the bounds above, quiet logs, no lifespan or websockets."""
    import uvicorn

    options = dict(http=protocol_class(header_timeout), ws="none", h11_max_incomplete_event_size=MAX_HEADER,
                   timeout_keep_alive=KEEP_ALIVE, limit_concurrency=MAX_CONCURRENCY, server_header=False,
                   log_level="warning", access_log=False, lifespan="off")
    options.update(kw)
    return uvicorn.Config(app, **options)


def server(app, **kw):
    """A `uvicorn.Server` with `server_config`."""
    import uvicorn

    return uvicorn.Server(server_config(app, **kw))
