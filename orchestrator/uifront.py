"""The owner's door to the MLflow UI: a token, then an HttpOnly cookie; anything else 403.

:class:`Front` listens on a TCP socket it is given (127.0.0.1) and forwards admitted
requests, streamed both ways, to the real server on a Unix socket in a private
directory. A request is admitted when it carries the token:

* ``?token=T`` in the URL (the one ``ui`` prints): a GET or HEAD is answered with a
  redirect to the same URL without the token, setting the cookie; other methods are
  forwarded and set it too;
* the cookie ``orchestrator-ui-<port>`` (HttpOnly, SameSite=Strict, path /);
* ``Authorization: Bearer T`` (what an MLflow client sends for ``MLFLOW_TRACKING_TOKEN``).

Tokens are compared in constant time. Refused requests never reach MLflow, so they
cannot create, register, move an alias or upload anything. aiohttp is imported
lazily: it comes with the full ``mlflow`` package (the ``ui`` extra).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hmac
import logging
import socket
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aiohttp import ClientSession, web
    from multidict import CIMultiDict

log = logging.getLogger(__name__)

TOKEN_PARAM = "token"
FORBIDDEN = ("403 forbidden: this MLflow UI admits only its owner; open the URL `python -m orchestrator ui` "
             "printed (it carries the token)\n")
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
                        "transfer-encoding", "upgrade"})
START_TIMEOUT_S = 60.0


def cookie_name(port: int) -> str:
    """Browsers send a host's cookies to all its ports: the name says which UI it is for."""
    return f"orchestrator-ui-{port}"


class Front:
    """Token-checking reverse proxy from ``listener`` (a bound TCP socket) to the server on ``upstream``."""

    def __init__(self, listener: socket.socket, upstream: Path, token: str) -> None:
        self.listener, self.upstream, self.token = listener, upstream, token
        self.port: int = listener.getsockname()[1]
        self.cookie = cookie_name(self.port)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="ui-front", daemon=True)
        self._ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._session: ClientSession | None = None
        self._runner: web.AppRunner | None = None

    # -- life cycle (called from the main thread) --------------------------------------

    def start(self) -> None:
        """Serving when this returns."""
        self._thread.start()
        self._ready.result(START_TIMEOUT_S)

    def stop(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(START_TIMEOUT_S)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._open())
        except BaseException as exc:  # reported to start() in the main thread
            self._ready.set_exception(exc)
            return
        self._ready.set_result(None)
        try:
            self._loop.run_forever()
        finally:
            self._loop.run_until_complete(self._close())
            self._loop.close()

    async def _open(self) -> None:
        from aiohttp import ClientSession, ClientTimeout, UnixConnector, web

        self._session = ClientSession(connector=UnixConnector(path=str(self.upstream)), auto_decompress=False,
                                      timeout=ClientTimeout(total=None, sock_connect=30))
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        await web.SockSite(self._runner, self.listener).start()

    async def _close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    # -- requests ------------------------------------------------------------------------

    def _is_token(self, value: str | None) -> bool:
        return value is not None and hmac.compare_digest(value.encode(), self.token.encode())

    def admitted_by(self, request: web.Request) -> str | None:
        """``"url"``, ``"cookie"`` or ``"header"`` when ``request`` carries the token, else None."""
        if self._is_token(request.query.get(TOKEN_PARAM)):
            return "url"
        if self._is_token(request.cookies.get(self.cookie)):
            return "cookie"
        scheme, _, value = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() in ("bearer", "token") and self._is_token(value.strip()):
            return "header"
        return None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        from aiohttp import ClientError, web

        how = self.admitted_by(request)
        if how is None:
            log.info("ui: refused %s %s from %s", request.method, request.path, request.remote)
            return web.Response(status=403, text=FORBIDDEN)
        if how == "url" and request.method in ("GET", "HEAD"):
            found = web.HTTPFound(request.rel_url.without_query_params(TOKEN_PARAM))
            self._set_cookie(found)
            return found
        try:
            return await self._forward(request, set_cookie=how == "url")
        except ClientError as exc:  # the server is gone or broke the exchange: one line, no traceback
            log.warning("ui: %s %s: mlflow server: %s", request.method, request.path, exc)
            return web.Response(status=502, text=f"502: the mlflow server did not answer ({exc})\n")

    def _set_cookie(self, response: web.StreamResponse) -> None:
        response.set_cookie(self.cookie, self.token, httponly=True, samesite="Strict", path="/")

    async def _forward(self, request: web.Request, *, set_cookie: bool) -> web.StreamResponse:
        from aiohttp import web

        assert self._session is not None
        url = request.rel_url.without_query_params(TOKEN_PARAM)
        body = request.content if request.body_exists else None
        async with self._session.request(request.method, f"http://mlflow{url}", headers=self._upstream_headers(request),
                                         data=body, allow_redirects=False) as upstream:
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason,
                                          headers=_end_to_end(upstream.headers))
            if set_cookie:
                self._set_cookie(response)
            await response.prepare(request)
            async for chunk in upstream.content.iter_chunked(1 << 16):
                await response.write(chunk)
            await response.write_eof()
            return response

    def _upstream_headers(self, request: web.Request) -> CIMultiDict[str]:
        """The request's end-to-end headers, without our cookie and our token."""
        headers = _end_to_end(request.headers)
        headers.popall("Authorization", None)
        cookies = headers.popall("Cookie", [])
        kept = [c.strip() for line in cookies for c in line.split(";")
                if c.strip() and c.strip().partition("=")[0] != self.cookie]
        if kept:
            headers["Cookie"] = "; ".join(kept)
        return headers


def _end_to_end(headers: Mapping[str, str]) -> CIMultiDict[str]:
    """``headers`` (every repeat kept) without the hop-by-hop ones."""
    from multidict import CIMultiDict

    return CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in HOP_BY_HOP)
