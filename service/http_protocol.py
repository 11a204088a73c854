"""uvicorn's HTTP protocol with a deadline on a request's head (request line and headers).

uvicorn arms no timer on a new connection, and its keep-alive timer is cancelled by any byte
received: a client that sends its headers one byte every few seconds holds a connection (and
a slot of ``limit_concurrency``) for as long as it likes. Bodies have their own deadlines
(service/uploads.py: ``FLAVA_BODY_IDLE_S``, ``FLAVA_BODY_MIN_RATE``); this bounds the head:
``FLAVA_HEADER_TIMEOUT_S`` from the connection's first moment (or, on a kept-alive
connection, from the next request's first byte) to the end of its headers, else 408
``header_timeout`` and the connection is closed. A response sent before the request's body
was read (a 408 ``body_timeout`` among them) closes the connection too.

:func:`server_options` is what ``flava serve`` (and the tests) pass to uvicorn.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.settings import ApiSettings

log = logging.getLogger(__name__)


def _timeout_response(timeout_s: float) -> bytes:
    """A whole 408 response, ``Connection: close``; the body as the API's errors are."""
    reason = f"the request's headers did not arrive within {timeout_s:g} s"
    body = json.dumps({"detail": {"code": "header_timeout", "reason": reason}}).encode()
    head = (
        "HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body


class HeaderDeadline(HttpToolsProtocol):
    """HttpToolsProtocol plus a timer from a request's start to its headers' end."""

    def __init__(self, *args, header_timeout_s: float = 10.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.header_timeout_s = header_timeout_s
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()  # a silent connection counts too

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm()  # the next request on a kept-alive connection

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        """A response sent before its request's body was read (408, 413, 401, 415) closes
        the connection: else the client could trickle the rest of that body for ever, every
        byte cancelling uvicorn's keep-alive timer."""
        unread = self.cycle is not None and self.cycle.more_body
        super().on_response_complete()
        if unread and not self.transport.is_closing():
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._head_timer is None:  # one deadline per head: later bytes do not extend it
            self._head_timer = self.loop.call_later(self.header_timeout_s, self._too_slow)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _too_slow(self) -> None:
        """408 and close; a pipelined response still being written finishes first."""
        self._head_timer = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.keep_alive = False  # closed once the response in progress is sent
            return
        log.info("headers too slow from %s: cut after %s s", self.client, self.header_timeout_s)
        self.transport.write(_timeout_response(self.header_timeout_s))
        self.transport.close()


def server_options(settings: ApiSettings) -> dict:
    """uvicorn options bounding what slow or many clients can hold (see the module doc)."""
    protocol = functools.partial(HeaderDeadline, header_timeout_s=settings.header_timeout_s)
    # past this many connections uvicorn answers 503 at once
    return {"limit_concurrency": settings.limit_concurrency, "http": protocol}
