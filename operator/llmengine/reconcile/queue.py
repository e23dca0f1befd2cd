"""Per-pool build queue: at most N concurrent builds per GPU pool, first come first served."""

from __future__ import annotations

import time

# How long a build that was given a slot counts against it before its Job shows in the Job list.
RESERVATION_SECONDS = 60.0


class BuildQueue:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        # pool -> {build key: first time it asked}
        self.waiting: dict[str, dict[str, float]] = {}
        # pool -> {build key: when its Job was being created}: a Job just created may be missing from a Job list
        # that was read before the create went through; it holds its slot all the same.
        self.reserved: dict[str, dict[str, float]] = {}

    def position(self, pool: str, key: str, active: set[str]) -> int:
        """0 when `key` may start now; otherwise its 1-based place in the line.

        `active` holds the keys of the pool's running builds (from the Jobs themselves, so it survives restarts).
        """
        now = time.monotonic()
        reserved = self.reserved.setdefault(pool, {})
        for k, at in list(reserved.items()):
            if k in active or now - at > RESERVATION_SECONDS:
                del reserved[k]
        occupied = active | set(reserved)
        if key in occupied:
            return 0
        line = self.waiting.setdefault(pool, {})
        line.setdefault(key, now)
        free = self.limit - len(occupied)
        order = sorted(line, key=lambda k: line[k])
        idx = order.index(key)
        return 0 if idx < free else idx - max(free, 0) + 1

    def reserve(self, pool: str, key: str) -> None:
        """The build's Job is being created: it holds a slot from now on."""
        self.reserved.setdefault(pool, {})[key] = time.monotonic()

    def started(self, pool: str, key: str) -> None:
        self.waiting.get(pool, {}).pop(key, None)

    def forget(self, key: str) -> None:
        for line in (*self.waiting.values(), *self.reserved.values()):
            line.pop(key, None)

    def depth(self, pool: str) -> int:
        return len(self.waiting.get(pool, {}))

    def head(self, pool: str) -> list[str]:
        """The keys first in line: those that take the pool's slots as they free up."""
        line = self.waiting.get(pool, {})
        return sorted(line, key=lambda k: line[k])[: self.limit]
