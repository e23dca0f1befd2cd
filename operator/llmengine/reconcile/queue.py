"""Per-pool build queue: at most N concurrent builds per GPU pool, first come first served."""

from __future__ import annotations

import time


class BuildQueue:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        # pool -> {build key: first time it asked}
        self.waiting: dict[str, dict[str, float]] = {}

    def position(self, pool: str, key: str, active: set[str]) -> int:
        """0 when `key` may start now; otherwise its 1-based place in the line.

        `active` holds the keys of the pool's running builds (from the Jobs themselves, so it survives restarts).
        """
        if key in active:
            return 0
        line = self.waiting.setdefault(pool, {})
        line.setdefault(key, time.monotonic())
        free = self.limit - len(active)
        order = sorted(line, key=lambda k: line[k])
        idx = order.index(key)
        return 0 if idx < free else idx - max(free, 0) + 1

    def started(self, pool: str, key: str) -> None:
        self.waiting.get(pool, {}).pop(key, None)

    def forget(self, key: str) -> None:
        for line in self.waiting.values():
            line.pop(key, None)

    def depth(self, pool: str) -> int:
        return len(self.waiting.get(pool, {}))

    def head(self, pool: str) -> list[str]:
        """The keys first in line: those that take the pool's slots as they free up."""
        line = self.waiting.get(pool, {})
        return sorted(line, key=lambda k: line[k])[: self.limit]
