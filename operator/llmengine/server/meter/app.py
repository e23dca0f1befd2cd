"""The proxy: an aiohttp app that passes every request through to trtllm-serve and meters completions."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import aiohttp
from aiohttp import web
from yarl import URL

from llmengine.server.meter.headers import NO_AUTO_HEADERS, forwardable
from llmengine.server.meter.metrics import Meter
from llmengine.server.meter.outcome import MAX_PARSE_BYTES, BodyTap, Outcome, SseTap, Tap
from llmengine.server.meter.responses import Result, with_usage_requested

METERED_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})
METRICS_PATH = "/llmengine/metrics"
UPSTREAM_METRICS_PATH = "/prometheus/metrics"
# The classic text format: what trtllm-serve's prometheus_client emits too, so the concatenation is one document.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Prompts run to hundreds of thousands of tokens (and images ride inline): aiohttp's 1 MiB default would refuse them.
MAX_REQUEST_BYTES = 256 * 1024 * 1024
MAX_ERROR_BYTES = 64 * 1024

METER_KEY = web.AppKey("meter", Meter)
SESSION_KEY = web.AppKey("session", aiohttp.ClientSession)
UPSTREAM_KEY = web.AppKey("upstream", str)


def make_app(upstream: str, meter: Meter | None = None) -> web.Application:
    """The proxy for `upstream` (e.g. http://127.0.0.1:8001)."""
    app = web.Application(client_max_size=MAX_REQUEST_BYTES)
    app[METER_KEY] = meter or Meter()
    app[UPSTREAM_KEY] = upstream.rstrip("/")
    app.cleanup_ctx.append(_client_session)
    app.router.add_get(METRICS_PATH, _metrics)
    app.router.add_route("*", "/{tail:.*}", _proxy)
    return app


async def _client_session(app: web.Application) -> AsyncIterator[None]:
    # No pool limit (the default 100 would cap concurrency), no total timeout (generations run long), bytes as sent.
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, force_close=False),
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
        auto_decompress=False,
    )
    app[SESSION_KEY] = session
    yield
    await session.close()


async def _metrics(request: web.Request) -> web.Response:
    app = request.app
    body = app[METER_KEY].exposition()
    try:
        async with app[SESSION_KEY].get(
            app[UPSTREAM_KEY] + UPSTREAM_METRICS_PATH,
            # prometheus_client gzips when asked, and this session does not decompress.
            headers={"Accept": "text/plain", "Accept-Encoding": "identity"},
            timeout=aiohttp.ClientTimeout(total=5),
        ) as up:
            theirs = await up.read() if up.status == 200 else b""
            if up.content_type.startswith("application/openmetrics"):
                theirs = b""  # a different format cannot be appended to ours
    except (aiohttp.ClientError, TimeoutError):
        theirs = b""
    if theirs and not theirs.endswith(b"\n"):
        theirs += b"\n"
    return web.Response(body=body + theirs, headers={"Content-Type": CONTENT_TYPE})


TapFor = Callable[[int, str], Tap | None]


def _no_tap(status: int, content_type: str) -> Tap | None:
    return None


async def _proxy(request: web.Request) -> web.StreamResponse:
    if request.method != "POST" or request.path not in METERED_PATHS:
        return await _forward(request, await request.read(), _no_tap, Outcome())
    meter = request.app[METER_KEY]
    outcome = Outcome()
    meter.arrive()
    try:
        body = await request.read()
        injected = with_usage_requested(body)

        def tap_for(status: int, content_type: str) -> Tap | None:
            outcome.status = status
            if content_type.startswith("text/event-stream"):
                return SseTap(outcome, drop_usage_only=injected is not None)
            return BodyTap(outcome, MAX_PARSE_BYTES if 200 <= status < 300 else MAX_ERROR_BYTES)

        resp = await _forward(request, body if injected is None else injected, tap_for, outcome)
    except asyncio.CancelledError:  # the client went away (handler cancellation): nothing finished
        _record(meter, outcome, forced="other")
        raise
    finally:
        meter.leave()
    _record(meter, outcome)
    return resp


def _record(meter: Meter, outcome: Outcome, forced: Result | None = None) -> None:
    try:  # metering never fails a request
        if forced is None:
            meter.record(outcome)
        else:
            meter.requests.labels(forced).inc()
    except Exception:
        pass


async def _forward(request: web.Request, body: bytes, tap_for: TapFor, outcome: Outcome) -> web.StreamResponse:
    app = request.app
    try:
        up = await app[SESSION_KEY].request(
            request.method,
            URL(app[UPSTREAM_KEY] + request.raw_path, encoded=True),
            # aiohttp answered the client's Expect: 100-continue already; the length is recomputed.
            headers=forwardable(request.headers, drop=("Content-Length", "Expect")),
            data=body or None,
            allow_redirects=False,
            skip_auto_headers=NO_AUTO_HEADERS,
        )
    except aiohttp.ClientError:
        outcome.failed = True
        return web.Response(status=502, text="upstream unavailable\n")
    try:
        return await _relay(request, up, tap_for, outcome)
    finally:
        # An unfinished upstream response is closed, not pooled: trtllm-serve then aborts that generation.
        if outcome.complete:
            up.release()
        else:
            up.close()


async def _relay(
    request: web.Request, up: aiohttp.ClientResponse, tap_for: TapFor, outcome: Outcome
) -> web.StreamResponse:
    try:
        tap = tap_for(up.status, up.content_type)
    except Exception:
        tap = None
    size = up.content_length
    if request.method != "HEAD" and size is not None and size <= MAX_PARSE_BYTES:
        # A sized body (every non-streamed answer of trtllm-serve) goes out with its headers in one write, and an
        # upstream that breaks off mid-body can still be answered with a 502.
        try:
            body = await up.read()
        except aiohttp.ClientError:
            outcome.failed = True
            return web.Response(status=502, text="upstream broke off\n")
        outcome.complete = True
        if tap is not None:
            body = _feed(tap, body) + _close(tap)
        headers = forwardable(up.headers, drop=("Content-Length",))
        return web.Response(body=body, status=up.status, reason=up.reason, headers=headers)
    dropping = isinstance(tap, SseTap) and tap.drop
    resp = web.StreamResponse(status=up.status, reason=up.reason)
    resp.headers.extend(forwardable(up.headers, drop=("Content-Length",) if dropping else ()))
    await resp.prepare(request)
    try:
        async for chunk in up.content.iter_any():
            out = chunk if tap is None else _feed(tap, chunk)
            if out:
                await resp.write(out)
        outcome.complete = True
        if tap is not None:
            tail = _close(tap)
            if tail:
                await resp.write(tail)
    except aiohttp.ClientError:
        # The upstream broke off: break the client's connection too, rather than end the body as if complete.
        outcome.failed = True
        if request.transport is not None:
            request.transport.close()
        return resp
    except ConnectionResetError:  # the client went away mid-response: nothing finished for it
        outcome.finishes.clear()
        return resp
    await resp.write_eof()
    return resp


def _feed(tap: Tap, chunk: bytes) -> bytes:
    try:
        return tap.feed(chunk)
    except Exception:
        return chunk


def _close(tap: Tap) -> bytes:
    try:
        return tap.close()
    except Exception:
        return b""
