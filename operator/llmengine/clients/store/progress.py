"""Progress of a transfer, logged at intervals."""

from __future__ import annotations

import threading
import time
from typing import Any

from llmengine.clients.store.layout import MiB


class Progress:
    """Thread-safe byte counter that logs bytes, total and rate at most every `interval` seconds."""

    def __init__(self, log: Any, op: str, total: int, interval: float) -> None:
        self._log, self._op, self._total, self._interval = log, op, total, interval
        self._lock = threading.Lock()
        self._done = 0
        self._start = self._last = time.monotonic()

    def add(self, n: int) -> None:
        with self._lock:
            self._done += n
            now = time.monotonic()
            if now - self._last < self._interval:
                return
            self._last = now
            done, elapsed = self._done, now - self._start
        self._log.info(
            f"{self._op} progress",
            bytes=done,
            total_bytes=self._total,
            percent=round(100.0 * done / self._total, 1) if self._total else 100.0,
            rate_mib_s=round(done / MiB / elapsed, 1) if elapsed > 0 else None,
        )

    def summary(self) -> dict[str, Any]:
        elapsed = time.monotonic() - self._start
        return {
            "bytes": self._done,
            "seconds": round(elapsed, 3),
            "rate_mib_s": round(self._done / MiB / elapsed, 1) if elapsed > 0 else None,
        }
