"""The HTTP server under `instdisc serve`: uvicorn with limits on connections and on time.

`create_app` (app.py) bounds the work of one request; this module bounds what clients can hold
open, which the ASGI app never sees:

- `max_connections`: a connection over the cap is closed as soon as it is accepted (its file
  handle is freed at once; /health keeps answering under a flood of half-open connections);
- `header_timeout_s`: a connection that has not sent a complete request head this long after
  connecting (or after its previous response) is closed: slowloris clients and idle sockets;
- `keep_alive_s`: idle keep-alive connections are closed after this long (uvicorn's own);
- `shutdown_timeout_s`: on SIGTERM/SIGINT, requests in flight get this long to finish, then
  the server exits anyway (uvicorn's `timeout_graceful_shutdown`).

The request body's own deadline (`Limits.body_timeout_s`, a 408) and the cap on images waiting
to be decoded (`Limits.max_pending`, a 503) are enforced in the app.
Needs uvicorn only (no torch).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerLimits:
    """What clients may hold open; see the module docstring."""

    max_connections: int = 1000
    header_timeout_s: float = 10.0
    keep_alive_s: float = 5.0
    shutdown_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        for key, value in dataclasses.asdict(self).items():
            if value <= 0:
                raise ValueError(f"{key} = {value}: must be > 0")


def protocol_class(limits: ServerLimits) -> type:
    """uvicorn's h11 protocol with the connection cap and the request-head timeout."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11Protocol(H11Protocol):
        _last_refusal_log = 0.0

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._head_timer: asyncio.TimerHandle | None = None
            if len(self.connections) > limits.max_connections:
                now = time.monotonic()
                if now - GuardedH11Protocol._last_refusal_log > 10:  # one line per 10 s flood
                    GuardedH11Protocol._last_refusal_log = now
                    log.warning("refusing connections over --max-connections %d",
                                limits.max_connections)
                transport.abort()
                return
            self._arm_head_timer()

        def data_received(self, data: bytes) -> None:
            if self._head_timer is None and (self.cycle is None or self.cycle.response_complete):
                self._arm_head_timer()  # the next request head on a kept-alive connection
            super().data_received(data)
            if self.cycle is not None and not self.cycle.response_complete:
                self._cancel_head_timer()  # the head is complete: the app has the request

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_head_timer()
            super().connection_lost(exc)

        def _arm_head_timer(self) -> None:
            self._head_timer = self.loop.call_later(limits.header_timeout_s, self._head_timeout)

        def _cancel_head_timer(self) -> None:
            if getattr(self, "_head_timer", None) is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timeout(self) -> None:
            self._head_timer = None
            if not self.transport.is_closing():
                log.info("closing %s: no complete request head within %.0f s (--header-timeout)",
                         "%s:%d" % self.client if self.client else "a connection",
                         limits.header_timeout_s)
                self.transport.abort()

    return GuardedH11Protocol


def server_config(app: Any, host: str = "127.0.0.1", port: int = 8000,
                  limits: ServerLimits = ServerLimits(), access_log: bool = True,
                  log_level: str = "info") -> Any:
    """The uvicorn.Config that `serve` runs (tests run the same on port 0)."""
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=access_log,
                          http=protocol_class(limits),
                          timeout_keep_alive=max(1, round(limits.keep_alive_s)),
                          timeout_graceful_shutdown=max(1, round(limits.shutdown_timeout_s)),
                          lifespan="on")


def serve(app: Any, host: str = "127.0.0.1", port: int = 8000,
          limits: ServerLimits = ServerLimits(), access_log: bool = True) -> None:
    """Run `app` with uvicorn in this process (one worker: one ORT session owns the cores)."""
    import uvicorn

    uvicorn.Server(server_config(app, host, port, limits, access_log)).run()
