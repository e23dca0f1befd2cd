"""The one way times are read and written: Kubernetes' RFC 3339 in UTC with a Z, to the second."""

from __future__ import annotations

import datetime


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def iso(t: datetime.datetime) -> str:
    """2026-12-04T17:04:26Z: what the API server writes in metav1.Time fields."""
    return t.astimezone(datetime.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def parse_iso(text: str | None) -> datetime.datetime | None:
    """A metav1.Time (or any ISO 8601 time with a zone); None for nothing or garbage."""
    if not text:
        return None
    try:
        t = datetime.datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    except ValueError:
        return None
    return t if t.tzinfo is not None else t.replace(tzinfo=datetime.UTC)


def seconds_between(start: str | None, end: str | None) -> float | None:
    s, e = parse_iso(start), parse_iso(end)
    return (e - s).total_seconds() if s is not None and e is not None else None
