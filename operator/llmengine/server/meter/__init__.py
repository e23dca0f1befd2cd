"""A metering reverse proxy in front of trtllm-serve.

trtllm-serve 1.2.x exports request latencies and finish reasons, but no token counts and no concurrency. The
operator needs both to tell whether the engine's static shapes (max_input_len, max_seq_len, max_batch_size) are
outgrown, so the serving pod puts this proxy on the public port and moves trtllm-serve to loopback. Every request
passes through unchanged; completions are metered from their OpenAI `usage` and `finish_reason`. Nothing about a
request is ever logged.

`GET /llmengine/metrics` serves this proxy's metrics followed by trtllm-serve's own `/prometheus/metrics`.

The modules: ``responses`` (what a completion response says), ``headers`` (what a proxy passes on), ``outcome``
(what one request saw, read by taps), ``metrics``, ``app`` (the aiohttp proxy) and ``child`` (running next to
trtllm-serve). Callers import from here.
"""

from llmengine.server.meter.app import (
    CONTENT_TYPE,
    MAX_ERROR_BYTES,
    MAX_REQUEST_BYTES,
    METER_KEY,
    METERED_PATHS,
    METRICS_PATH,
    SESSION_KEY,
    UPSTREAM_KEY,
    UPSTREAM_METRICS_PATH,
    TapFor,
    make_app,
)
from llmengine.server.meter.child import (
    LOOPBACK,
    Child,
    MeterError,
    exit_code,
    run_meter,
    serve_meter,
    spawn_child,
    stop_child,
    upstream_port_for,
)
from llmengine.server.meter.headers import HOP_BY_HOP, NO_AUTO_HEADERS, forwardable
from llmengine.server.meter.metrics import CONCURRENCY_BUCKETS, TOKEN_BUCKETS, Meter
from llmengine.server.meter.outcome import MAX_PARSE_BYTES, BodyTap, Outcome, SseTap, Tap
from llmengine.server.meter.responses import (
    RESULTS,
    Result,
    classify_error,
    classify_finish,
    error_message,
    finish_reasons,
    is_too_long,
    is_usage_only,
    prompt_len_in_error,
    usage_tokens,
    with_usage_requested,
)

__all__ = [
    "CONCURRENCY_BUCKETS",
    "CONTENT_TYPE",
    "HOP_BY_HOP",
    "LOOPBACK",
    "MAX_ERROR_BYTES",
    "MAX_PARSE_BYTES",
    "MAX_REQUEST_BYTES",
    "METERED_PATHS",
    "METER_KEY",
    "METRICS_PATH",
    "NO_AUTO_HEADERS",
    "RESULTS",
    "SESSION_KEY",
    "TOKEN_BUCKETS",
    "UPSTREAM_KEY",
    "UPSTREAM_METRICS_PATH",
    "BodyTap",
    "Child",
    "Meter",
    "MeterError",
    "Outcome",
    "Result",
    "SseTap",
    "Tap",
    "TapFor",
    "classify_error",
    "classify_finish",
    "error_message",
    "exit_code",
    "finish_reasons",
    "forwardable",
    "is_too_long",
    "is_usage_only",
    "make_app",
    "prompt_len_in_error",
    "run_meter",
    "serve_meter",
    "spawn_child",
    "stop_child",
    "upstream_port_for",
    "usage_tokens",
    "with_usage_requested",
]
