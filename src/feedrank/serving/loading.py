"""Answer while the models load: a single-process ``feedrank serve`` listens at once and says so.

Building the feed service (bundles, the ANN index, replaying the logs) takes seconds to minutes.
uvicorn calls the app factory before it serves, so a person who opened the printed URL watched a
silent, spinning page. ``LoadingApp`` completes the ASGI lifespan start at once, builds the real
app in a thread, and until it is ready answers every request with 503, ``Retry-After: 1`` and a
message naming what is loading, except the ``routes`` it was given (the inspector's page, which
then shows that state and asks again). ``/healthz`` is a 503 too, so a readiness probe waits.

A build that fails is logged with its traceback and the process exits with uvicorn's start-up
failure status (3), as a failing factory made it exit before. With several workers ``feedrank
serve`` does not use it: a worker still loading must not take connections from the shared socket
that a ready worker could answer.

Example::

    app = LoadingApp(lambda: create_app(build_service(settings)), routes=page_routes(), what="runs/demo/bundle")
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import AsyncExitStack

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Route
from starlette.types import Receive, Scope, Send
from uvicorn.config import STARTUP_FAILURE

log = logging.getLogger("uvicorn.error")
_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


def exit_startup_failure(exc: BaseException) -> None:
    """Leave as a failed uvicorn start does (status 3); the traceback is logged already."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(STARTUP_FAILURE)


class LoadingApp:
    """The app ``build`` returns, once built; 503 "model still loading" (or ``routes``) until then."""

    def __init__(self, build: Callable[[], Starlette], routes: Sequence[BaseRoute] = (), what: str = "the models",
                 on_failure: Callable[[BaseException], None] = exit_startup_failure) -> None:  # fmt: skip
        self.build, self.what, self.on_failure = build, what, on_failure
        self.app: Starlette | None = None
        self.failed: BaseException | None = None
        self.loaded = threading.Event()  # set once ``app`` serves (or the build failed)
        self._started = time.monotonic()
        self._stack = AsyncExitStack()
        self._task: asyncio.Task | None = None
        self._waiting = Starlette(routes=[*routes, Route("/{path:path}", self._unavailable, methods=_METHODS)])

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif self.app is not None:
            await self.app(scope, receive, send)
        else:
            await self._waiting(scope, receive, send)

    async def _unavailable(self, request: Request) -> JSONResponse:
        if self.failed is not None:
            detail = f"the service failed to load: {str(self.failed)[:200]}"
        else:
            detail = f"model still loading ({self.what}, {time.monotonic() - self._started:.0f} s so far)"
        return JSONResponse({"detail": detail}, status_code=503, headers={"Retry-After": "1"})

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self._started = time.monotonic()
                self._task = asyncio.create_task(self._load())
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self._task is not None and not self._task.done():
                    self._task.cancel()  # the build thread runs on; its service is never used
                await self._stack.aclose()  # the built app's own shutdown (the service is closed)
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _load(self) -> None:
        try:
            app = await asyncio.to_thread(self.build)
            await self._stack.enter_async_context(app.router.lifespan_context(app))
        except Exception as exc:  # noqa: BLE001 - any failure to build is the start-up failure
            log.exception("the app failed to load (%s)", self.what)
            self.failed = exc
            self.loaded.set()
            self.on_failure(exc)
            return
        self.app = app
        self.loaded.set()
        log.info("the app is loaded (%s, %.1f s)", self.what, time.monotonic() - self._started)
