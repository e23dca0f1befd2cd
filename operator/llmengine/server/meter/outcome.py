"""What one request saw: its outcome, read off the response by a tap as the response passes."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Protocol

from llmengine.server.meter.responses import (
    Result,
    classify_error,
    classify_finish,
    error_message,
    finish_reasons,
    is_usage_only,
    usage_tokens,
)

# What is kept of a response to meter it; a bigger one still passes through, only unmetered.
MAX_PARSE_BYTES = 16 * 1024 * 1024

_EVENT_END = re.compile(rb"(\r?\n\r?\n)")
_FINISHED = re.compile(rb'"finish_reason"\s*:\s*"')


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
