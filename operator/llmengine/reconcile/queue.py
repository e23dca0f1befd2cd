"""Per-pool build queue: at most N concurrent builds per GPU pool, first come first served."""

from __future__ import annotations

import time
from collections.abc import Set

# How long a build that was given a slot counts against it at most, while no Job list shows its Job.
RESERVATION_SECONDS = 60.0

Engine = tuple[str, str]  # (namespace, name)


class BuildQueue:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        # pool -> {build key: first time it asked}
        self.waiting: dict[str, dict[str, float]] = {}
        # pool -> {build key: when its Job was being created}: a Job just created may be missing from a Job list
        # that was read before the create went through; it holds its slot all the same.
        self.reserved: dict[str, dict[str, float]] = {}
        # engine -> (pool, build key) of the build it wants; engines of one identity share a build
        self.engines: dict[Engine, tuple[str, str]] = {}
        # identity (engine digest and store key) -> (build key, when last claimed): which namespace builds it
        self.claims: dict[str, tuple[str, float]] = {}

    def position(self, pool: str, key: str, active: Set[str], listed: Set[str] = frozenset()) -> int:
        """0 when `key` may start now; otherwise its 1-based place in the line.

        `active` holds the keys of the pool's running builds, `listed` those of all its Jobs, ended ones included
        (both from the Jobs themselves, so they survive restarts). A reservation ends once a list shows its Job.
        """
        now = time.monotonic()
        reserved = self.reserved.setdefault(pool, {})
        for k, at in list(reserved.items()):
            if k in listed or k in active or now - at > RESERVATION_SECONDS:
                del reserved[k]
        occupied = set(active) | set(reserved)
        if key in occupied:
            return 0
        line = self.waiting.setdefault(pool, {})
        line.setdefault(key, now)
        free = self.limit - len(occupied)
        order = sorted(line, key=lambda k: line[k])
        idx = order.index(key)
        return 0 if idx < free else idx - max(free, 0) + 1

    def claim(self, identity: str, key: str) -> str | None:
        """Claim the build of `identity` (an engine identity into one store) for build key `key`: None when it is
        ours to build, else the key that holds a fresh claim. Closes the window in which engines of one identity in
        two namespaces both see no Job and both create one; the Jobs themselves say the rest."""
        now = time.monotonic()
        held = self.claims.get(identity)
        if held is not None and held[0] != key and now - held[1] < RESERVATION_SECONDS:
            return held[0]
        self.claims[identity] = (key, now)
        return None

    def release(self, identity: str, key: str) -> None:
        """Give up `key`'s claim on `identity`: the pass that took it does not start the build (it failed for good,
        waits out a backoff, or queues), so it must not keep engines of other namespaces waiting on a start that does
        not come."""
        held = self.claims.get(identity)
        if held is not None and held[0] == key:
            del self.claims[identity]

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

    # ---- which engine waits on which build ------------------------------------------------------------------
    def join(self, engine: Engine, pool: str, key: str) -> None:
        """`engine` wants the build `key` (and no longer the one it wanted before, if its identity moved)."""
        previous = self.engines.get(engine)
        self.engines[engine] = (pool, key)
        if previous and previous[1] != key:
            self._release(previous[1])

    def leave(self, engine: Engine) -> None:
        previous = self.engines.pop(engine, None)
        if previous:
            self._release(previous[1])

    def wanting(self, key: str) -> list[Engine]:
        """The engines that want the build `key` (a build in the operator's namespace has no engine owners)."""
        return sorted(eng for eng, (_, k) in self.engines.items() if k == key)

    def next_in_line(self, pool: str) -> list[Engine]:
        """The engines whose builds are next in the pool's line: to wake when a slot frees, instead of at their
        next queued poll."""
        head = set(self.head(pool))
        return sorted(eng for eng, (p, key) in self.engines.items() if p == pool and key in head)

    def _release(self, key: str) -> None:
        """Drop a build from the line unless another engine still waits on it (same identity: same build)."""
        if not any(k == key for _, k in self.engines.values()):
            self.forget(key)
