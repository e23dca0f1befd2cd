"""Structured logging for every llmengine process: JSON lines in production, key=value on a terminal.

Secrets never reach the output: values under secret-looking keys are replaced, and the values of the
credential environment variables (and any registered with `register_secret`) are masked wherever they appear,
including inside messages relayed from subprocesses.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
from collections.abc import Iterable, MutableMapping
from typing import Any

import structlog

REDACTED = "[redacted]"

# Keys whose values are never printed. Word-bounded so that e.g. `tokenizer` or `max_num_tokens` stay visible.
_SECRET_KEY = re.compile(
    r"(^|_)(secret|password|passwd|token|access_key|api_key|authorization|credentials?|session_token)($|_)",
    re.IGNORECASE,
)
# Environment variables whose values are secrets wherever they show up.
SECRET_ENV_VARS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
)
# Short values would mask innocent substrings; real credentials are long.
_MIN_SECRET_LEN = 8

_lock = threading.Lock()
_secrets: set[str] = set()


def register_secret(value: str | None) -> None:
    """Mask this value in every log line from now on (no-op for empty or very short values)."""
    if value and len(value) >= _MIN_SECRET_LEN:
        with _lock:
            _secrets.add(value)


def _register_env_secrets(names: Iterable[str] = SECRET_ENV_VARS) -> None:
    for name in names:
        register_secret(os.environ.get(name))


def _mask(text: str) -> str:
    with _lock:
        values = sorted(_secrets, key=len, reverse=True)
    for v in values:
        if v in text:
            text = text.replace(v, REDACTED)
    return text


def _scrub(value: Any) -> Any:
    if isinstance(value, str):
        return _mask(value)
    if isinstance(value, dict):
        return {k: REDACTED if _is_secret_key(k) else _scrub(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_scrub(v) for v in value)
    return value


def _is_secret_key(key: object) -> bool:
    return isinstance(key, str) and bool(_SECRET_KEY.search(key))


def redact_secrets(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: drop secret values before anything renders the event."""
    for key in list(event_dict):
        event_dict[key] = REDACTED if _is_secret_key(key) else _scrub(event_dict[key])
    return event_dict


def configure_logging(json: bool, level: str = "INFO") -> None:
    """Set up structlog (and the stdlib root logger, for boto3 and friends) to write to stderr.

    stdout is left to the commands' own machine-readable output (reports, results).
    """
    _register_env_secrets()
    lvl = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        redact_secrets,
    ]
    renderer: Any
    if json:
        shared.append(structlog.processors.format_exc_info)
        renderer = structlog.processors.JSONRenderer(sort_keys=False)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    # Libraries (botocore, urllib3) log through the stdlib; keep them quiet and on the same stream.
    root = logging.getLogger()
    root.handlers[:] = [logging.StreamHandler(sys.stderr)]
    root.setLevel(max(lvl, logging.WARNING))
    mask_stdlib_handlers()


class MaskSecrets(logging.Filter):
    """Masks registered secret values in stdlib log records (Kopf, botocore, huggingface_hub) before any handler
    formats them: the structlog processor only sees structlog's own events."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a library's bad format string: leave the record as it is
            return True
        masked = _mask(message)
        if masked != message:
            record.msg, record.args = masked, None
        if record.exc_text:
            record.exc_text = _mask(record.exc_text)
        return True


def mask_stdlib_handlers() -> None:
    """Install MaskSecrets on every handler of the root logger (call after other libraries added theirs)."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, MaskSecrets) for f in handler.filters):
            handler.addFilter(MaskSecrets())


def get_logger(**bound: Any) -> Any:
    """A structlog logger with these keys bound (namespace, name, digest, stage, ...)."""
    return structlog.get_logger().bind(**bound)
