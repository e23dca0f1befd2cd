"""A metering reverse proxy in front of trtllm-serve.

trtllm-serve 1.2.x exports request latencies and finish reasons, but no token counts and no concurrency. The
operator needs both to tell whether the engine's static shapes (max_input_len, max_seq_len, max_batch_size) are
outgrown, so the serving pod puts this proxy on the public port and moves trtllm-serve to loopback. Every request
passes through unchanged; completions are metered from their OpenAI `usage` and `finish_reason`. Nothing about a
request is ever logged.

`GET /llmengine/metrics` serves this proxy's metrics followed by trtllm-serve's own `/prometheus/metrics`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from yarl import URL

from llmengine.logging import get_logger

METERED_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})
METRICS_PATH = "/llmengine/metrics"
UPSTREAM_METRICS_PATH = "/prometheus/metrics"
LOOPBACK = "127.0.0.1"
# The classic text format: what trtllm-serve's prometheus_client emits too, so the concatenation is one document.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

TOKEN_BUCKETS = (
    16, 32, 64, 128, 256, 512, 1024, 2048, 3072, 4096, 6144, 8192, 12288, 16384, 24576, 32768, 65536, 131072,
)  # fmt: skip
CONCURRENCY_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)

Result = Literal["stop", "length", "too_long", "error", "other"]
RESULTS: tuple[Result, ...] = ("stop", "length", "too_long", "error", "other")

# Prompts run to hundreds of thousands of tokens (and images ride inline): aiohttp's 1 MiB default would refuse them.
MAX_REQUEST_BYTES = 256 * 1024 * 1024
# What is kept of a response to meter it; a bigger one still passes through, only unmetered.
MAX_PARSE_BYTES = 16 * 1024 * 1024
MAX_ERROR_BYTES = 64 * 1024

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# aiohttp's client adds these when absent; the upstream must see only what the client sent.
NO_AUTO_HEADERS = ("Accept", "Accept-Encoding", "User-Agent", "Content-Type")


# -- pure helpers ------------------------------------------------------------------------------------------------------

# "exceed" alone is not enough: trtllm also says "cannot exceed max_batch_size" / "max_beam_width" for n/best_of.
_TOO_LONG = re.compile(
    r"max_input_len|max_seq_len|max_num_tokens|prompt[ _]?length|prompt_len|input[ _]length|context length",
    re.IGNORECASE,
)
# The prompt's own length, not a limit: "prompt length (9000)", "Prompt length (72417.0)", "input length 9000",
# "`splited_prompt_len` (8000)", "input length of 9000". Never "max_input_len (4096)" or "maximum input length (4096)".
_PROMPT_LEN = re.compile(
    r"(?<!max_)(?<!max )(?<!maximum )(?:prompt|input)[ _]?(?:token[ _]?)?(?:length|len)\b[`'\"]?"
    r"\s*(?:[:=]|of|is)?\s*\(?\s*(\d+)(?:\.\d+)?",
    re.IGNORECASE,
)
_EVENT_END = re.compile(rb"(\r?\n\r?\n)")
_FINISHED = re.compile(rb'"finish_reason"\s*:\s*"')


def classify_finish(reasons: Iterable[str | None]) -> Result:
    """One result for a response: `length` if any choice was cut, `stop` if all stopped, else `other`."""
    seen = [r for r in reasons if r]
    if "length" in seen:
        return "length"
    if seen and all(r == "stop" for r in seen):
        return "stop"
    return "other"


def is_too_long(message: str) -> bool:
    return bool(_TOO_LONG.search(message))


def prompt_len_in_error(message: str) -> int | None:
    m = _PROMPT_LEN.search(message)
    return int(m.group(1)) if m else None


def error_message(body: bytes) -> str:
    """The message of an error body: trtllm's flat `{"message": ...}`, OpenAI's `{"error": {...}}`, or raw text."""
    text = body.decode("utf-8", "replace")
    try:
        doc = json.loads(text)
    except ValueError:
        return text
    if isinstance(doc, dict):
        err = doc.get("error")
        for candidate in (doc.get("message"), err.get("message") if isinstance(err, dict) else err, doc.get("detail")):
            if isinstance(candidate, str):
                return candidate
    return text


def classify_error(status: int, message: str) -> Result:
    return "too_long" if status == 400 and is_too_long(message) else "error"


def _count(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int) and value >= 0:
        return value
    if isinstance(value, float) and value >= 0 and value.is_integer():
        return int(value)
    return None


def usage_tokens(doc: object) -> tuple[int | None, int | None]:
    """(prompt_tokens, completion_tokens) of an OpenAI response or chunk; None where absent or malformed."""
    usage = doc.get("usage") if isinstance(doc, dict) else None
    if not isinstance(usage, dict):
        return None, None
    return _count(usage.get("prompt_tokens")), _count(usage.get("completion_tokens"))


def finish_reasons(doc: object) -> dict[int, str]:
    choices = doc.get("choices") if isinstance(doc, dict) else None
    out: dict[int, str] = {}
    for pos, choice in enumerate(choices if isinstance(choices, list) else []):
        if isinstance(choice, dict) and isinstance(choice.get("finish_reason"), str):
            index = choice.get("index")
            out[index if isinstance(index, int) else pos] = choice["finish_reason"]
    return out


def is_usage_only(doc: object) -> bool:
    """The chunk trtllm-serve sends last when `stream_options.include_usage` is on: `choices: []` plus usage."""
    return isinstance(doc, dict) and doc.get("choices") == [] and isinstance(doc.get("usage"), dict)


def with_usage_requested(body: bytes) -> bytes | None:
    """The request body with `stream_options.include_usage` on, or None when it is not a streaming request that
    lacks it (then it is forwarded untouched). Asking adds exactly one usage-only chunk, which the proxy drops."""
    if b'"stream"' not in body:  # spare a long prompt the parse
        return None
    try:
        doc = json.loads(body)
    except ValueError:
        return None
    if not isinstance(doc, dict) or doc.get("stream") is not True:
        return None
    opts = doc.get("stream_options")
    if opts is None:
        opts = {}
    if not isinstance(opts, dict) or opts.get("include_usage"):
        return None
    # continuous_usage_stats only takes effect with include_usage: keep it off so no other chunk changes.
    opts = {**opts, "include_usage": True}
    if opts.get("continuous_usage_stats"):
        opts["continuous_usage_stats"] = False
    doc["stream_options"] = opts
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()


def _connection_tokens(headers: Mapping[str, str]) -> set[str]:
    return {t.strip().lower() for t in headers.get("Connection", "").split(",") if t.strip()}


def forwardable(headers: Mapping[str, str], drop: Iterable[str] = ()) -> CIMultiDict[str]:
    """Headers minus hop-by-hop ones (including those the Connection header names) and `drop`."""
    skip = HOP_BY_HOP | _connection_tokens(headers) | {d.lower() for d in drop}
    out: CIMultiDict[str] = CIMultiDict()
    for k, v in headers.items():
        if k.lower() not in skip:
            out.add(k, v)
    return out


def exit_code(returncode: int) -> int:
    """A child's exit status as a shell would report it (killed by signal N -> 128 + N)."""
    return 128 - returncode if returncode < 0 else returncode


def upstream_port_for(port: int) -> int:
    return port + 1 if port < 65535 else port - 1


# -- what one request saw ----------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    status: int | None = None
    failed: bool = False  # upstream unreachable or broke off mid-response
    complete: bool = False  # the upstream response was read to its end
    finishes: dict[int, str] = field(default_factory=dict)
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    error: str | None = None  # message of an error body or of an error event in a stream

    def add_usage(self, doc: object) -> None:
        p, c = usage_tokens(doc)
        if p is not None:
            self.prompt_tokens = (self.prompt_tokens or 0) + p
        if c is not None:
            self.output_tokens = (self.output_tokens or 0) + c

    def result(self) -> Result:
        if self.failed or self.status is None:
            return "error"
        if not 200 <= self.status < 300:
            return classify_error(self.status, self.error or "")
        if self.error is not None:
            return classify_error(400, self.error)
        return classify_finish(self.finishes.values())


class SseTap:
    """Reads finish reasons and usage out of a `text/event-stream` as it passes, event by event.

    With `drop_usage_only`, the usage-only chunk the proxy asked for is cut out, so only whole events are released
    (a partial one waits for its blank line); otherwise every byte is released as soon as it arrives.
    """

    def __init__(self, outcome: Outcome, drop_usage_only: bool) -> None:
        self.outcome, self.drop = outcome, drop_usage_only
        self._buf = b""
        self._usage_only_seen = False
        self._last_usage: object = None
        self._broken = False

    def feed(self, chunk: bytes) -> bytes:
        if self._broken:
            return chunk
        parts = _EVENT_END.split(self._buf + chunk)  # [event, separator, event, separator, ..., partial]
        self._buf = parts[-1]
        kept: list[bytes] = []
        for i in range(0, len(parts) - 1, 2):
            event = parts[i]
            dropped = self._interesting(event) and self._read(event)
            if self.drop and not dropped:
                kept += (event, parts[i + 1])
        out = b"".join(kept) if self.drop else chunk
        if len(self._buf) > MAX_PARSE_BYTES:  # not SSE after all: stop reading, release everything
            self._broken = True
            out, self._buf = (out + self._buf if self.drop else out), b""
        return out

    @staticmethod
    def _interesting(event: bytes) -> bool:
        # Most events are one token, with neither usage nor a finish reason: skip decoding those.
        return (
            b'"usage"' in event
            or b"error" in event
            or (b'"finish_reason"' in event and _FINISHED.search(event) is not None)
        )

    def close(self) -> bytes:
        tail, self._buf = self._buf, b""
        if tail.strip() and not self._broken and self._interesting(tail):
            self._read(tail)
        if not self._usage_only_seen and self._last_usage is not None:
            self.outcome.add_usage(self._last_usage)  # continuous_usage_stats without a final usage chunk
        return tail if self.drop else b""

    def _read(self, event: bytes) -> bool:
        """Record what the event says; True when it is to be dropped."""
        lines = event.decode("utf-8", "replace").splitlines()
        data = "\n".join(ln[5:].removeprefix(" ") for ln in lines if ln.startswith("data:")).strip()
        if not data or data == "[DONE]":
            return False
        try:
            doc = json.loads(data)
        except ValueError:
            return False
        if isinstance(doc, dict) and (doc.get("object") == "error" or isinstance(doc.get("error"), dict | str)):
            self.outcome.error = error_message(data.encode())
        self.outcome.finishes.update(finish_reasons(doc))
        if is_usage_only(doc):
            self._usage_only_seen = True
            self.outcome.add_usage(doc)
            return self.drop
        if isinstance(doc, dict) and isinstance(doc.get("usage"), dict):
            self._last_usage = doc
        return False


class BodyTap:
    """Keeps (up to a cap) a copy of a non-streamed response to read usage, finish reasons or the error from."""

    def __init__(self, outcome: Outcome, cap: int) -> None:
        self.outcome, self.cap = outcome, cap
        self._parts: list[bytes] = []
        self._size = 0

    def feed(self, chunk: bytes) -> bytes:
        self._size += len(chunk)
        if self._size <= self.cap:
            self._parts.append(chunk)
        return chunk

    def close(self) -> bytes:
        if self._size > self.cap:
            return b""
        body = b"".join(self._parts)
        status = self.outcome.status or 0
        if not 200 <= status < 300:
            self.outcome.error = error_message(body)
            return b""
        try:
            doc = json.loads(body)
        except ValueError:
            return b""
        self.outcome.finishes.update(finish_reasons(doc))
        self.outcome.add_usage(doc)
        return b""


class Tap(Protocol):
    def feed(self, chunk: bytes) -> bytes: ...
    def close(self) -> bytes: ...


# -- metrics -----------------------------------------------------------------------------------------------------------


class Meter:
    """The proxy's metrics, in a private registry (the process-wide one belongs to whoever imports us)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.in_flight = Gauge(
            "llmengine_requests_in_flight", "Completion requests in flight through this pod's proxy", registry=r
        )
        self.concurrency = Histogram(
            "llmengine_request_concurrency",
            "Completion requests in flight when a request arrived, counting itself",
            buckets=CONCURRENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Histogram(
            "llmengine_request_prompt_tokens",
            "Prompt tokens per completion request (from usage, or from the error of a prompt refused as too long)",
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.output_tokens = Histogram(
            "llmengine_request_output_tokens",
            "Generated tokens per completion request (from usage)",
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.requests = Counter(
            "llmengine_requests",
            "Completion requests by result: stop, length (cut at max_tokens or max_seq_len), too_long (refused), "
            "error, other",
            ["result"],
            registry=r,
        )
        for result in RESULTS:
            self.requests.labels(result)
        self._n = 0

    def arrive(self) -> None:
        self._n += 1
        self.in_flight.set(self._n)
        self.concurrency.observe(self._n)

    def leave(self) -> None:
        self._n -= 1
        self.in_flight.set(self._n)

    def record(self, outcome: Outcome) -> None:
        result = outcome.result()
        self.requests.labels(result).inc()
        prompt = outcome.prompt_tokens
        if result == "too_long" and prompt is None:
            prompt = prompt_len_in_error(outcome.error or "")
        if prompt is not None:
            self.prompt_tokens.observe(prompt)
        if outcome.output_tokens is not None and result != "too_long":
            self.output_tokens.observe(outcome.output_tokens)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


# -- the app -----------------------------------------------------------------------------------------------------------

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


# -- running next to trtllm-serve --------------------------------------------------------------------------------------


class Child(Protocol):
    """What the meter needs of the trtllm-serve process (a subprocess.Popen)."""

    @property
    def pid(self) -> int: ...
    def wait(self, timeout: float | None = None) -> int: ...
    def poll(self) -> int | None: ...
    def send_signal(self, sig: int) -> None: ...
    def kill(self) -> None: ...


class MeterError(Exception):
    """The meter could not start; the message is one line."""


def _die_with_parent() -> None:
    # If the meter is killed outright, trtllm-serve gets SIGTERM instead of living on unseen (Linux only).
    with contextlib.suppress(Exception):
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def spawn_child(argv: list[str]) -> Child:
    """Start trtllm-serve sharing our stdout/stderr, so its logs stay the container's logs."""
    return subprocess.Popen(argv, preexec_fn=_die_with_parent if sys.platform == "linux" else None)


def stop_child(child: Child, grace: float = 30.0) -> None:
    if child.poll() is not None:
        return
    child.send_signal(signal.SIGTERM)
    try:
        child.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()


async def serve_meter(listen_host: str, listen_port: int, upstream_port: int, child: Child) -> int:
    """Proxy listen_host:listen_port to trtllm-serve on loopback until the child exits; return its exit code.

    SIGTERM and SIGINT go to the child: trtllm-serve drains and exits, and the meter follows it.
    """
    loop = asyncio.get_running_loop()
    app = make_app(f"http://{LOOPBACK}:{upstream_port}")
    # No access log: nothing per request is logged. Handler cancellation: a client hanging up aborts its generation.
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=5)
    await runner.setup()
    try:
        await web.TCPSite(runner, listen_host, listen_port).start()
    except OSError as exc:
        await runner.cleanup()
        await asyncio.to_thread(stop_child, child)
        raise MeterError(f"cannot listen on {listen_host}:{listen_port}: {exc.strerror or exc}") from exc
    sigs = (signal.SIGTERM, signal.SIGINT)
    for sig in sigs:
        loop.add_signal_handler(sig, child.send_signal, sig)
    get_logger(component="meter").info(
        "metering proxy up", listen=f"{listen_host}:{listen_port}", upstream=f"{LOOPBACK}:{upstream_port}"
    )
    try:
        returncode = await asyncio.to_thread(child.wait)
    finally:
        for sig in sigs:
            loop.remove_signal_handler(sig)
        await runner.cleanup()
    return exit_code(returncode)


def run_meter(listen_host: str, listen_port: int, upstream_port: int, child: Child) -> int:
    return asyncio.run(serve_meter(listen_host, listen_port, upstream_port, child))
