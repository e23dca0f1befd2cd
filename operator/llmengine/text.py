"""Text helpers shared by every layer."""

from __future__ import annotations


def one_line(text: object, limit: int = 300) -> str:
    """`text` with its whitespace runs (newlines included) collapsed to single spaces, cut to `limit` characters
    with a trailing "..." when longer: for messages that go into a status, an event or a log field."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."
