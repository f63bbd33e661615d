"""Graceful shutdown for ``quire serve``: SIGTERM or SIGINT drains the server, then it exits 0.

On the first signal the server keeps listening but refuses every new request (503 with
``Retry-After``, and ``/health`` 503 so load balancers stop sending); requests in flight go on
for up to ``shutdown_timeout`` seconds. Those still running then are aborted (a stream gets a
final error event and ``[DONE]``, a plain request a 500), their KV blocks freed, and uvicorn
shuts down as usual: connections close, the lifespan stops the engine. A second signal skips
what is left of the wait.

uvicorn's own handling would stop listening at once (new clients get connection refused, not a
503) and re-raise the signal after shutting down (a non-zero exit); this subclass replaces both.
"""

from __future__ import annotations

import asyncio
import logging

import uvicorn

from quire.engine.async_engine import AsyncLLMEngine, RequestFailedError

logger = logging.getLogger(__name__)

# After aborting what is left, time for the final error events to reach the clients.
_FLUSH_S = 0.2


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, engine: AsyncLLMEngine, shutdown_timeout: float) -> None:
        super().__init__(config)
        self.engine = engine
        self.shutdown_timeout = shutdown_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain: asyncio.Future | None = None
        self._skip_wait = asyncio.Event()

    async def startup(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets=sockets)

    def handle_exit(self, sig, frame) -> None:
        """Signal handler (main thread): start draining; a second signal cuts the wait short."""
        if self._loop is None or self._loop.is_closed():
            self.should_exit = True
            return
        self._loop.call_soon_threadsafe(self._on_signal, sig)

    def _on_signal(self, sig) -> None:
        if self._drain is None:
            logger.info("signal %s: draining (up to %.1f s for requests in flight)", sig, self.shutdown_timeout)
            self._drain = asyncio.ensure_future(self.drain())
        else:
            logger.info("signal %s again: aborting what is left", sig)
            self._skip_wait.set()

    async def drain(self) -> None:
        """Refuse new requests, let those in flight finish (bounded), abort the rest, then exit."""
        self.engine.begin_drain()
        idle = asyncio.ensure_future(self.engine.wait_idle(self.shutdown_timeout))
        skip = asyncio.ensure_future(self._skip_wait.wait())
        await asyncio.wait({idle, skip}, return_when=asyncio.FIRST_COMPLETED)
        skip.cancel()
        idle.cancel()
        aborted = self.engine.fail_requests(
            RequestFailedError("the server shut down before the request finished; it was aborted.")
        )
        if aborted:
            logger.warning("aborted %d requests still running at shutdown", aborted)
            await asyncio.sleep(_FLUSH_S)
        self.should_exit = True
