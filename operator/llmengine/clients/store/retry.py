"""Waiting out a store that is briefly away."""

from __future__ import annotations

import random
import time
from typing import Any

from llmengine.clients.store.errors import is_transient
from llmengine.text import one_line


class Patience:
    """Retries of one operation against a store that is briefly away, bounded by a time budget.

    botocore's own retries (standard mode) give up within about a second; a restarting S3 gateway or a rolling
    MinIO upgrade takes longer, and giving up means redoing a whole build or failing a serving pod. Waits grow
    from 0.5 s to 10 s with jitter; every wait is logged.
    """

    def __init__(self, budget_s: float, what: str, log: Any) -> None:
        self.deadline = time.monotonic() + budget_s
        self.what, self.log, self.attempt = what, log, 0

    def wait_or_raise(self, exc: BaseException, endpoint: str) -> None:
        """Sleep before the next attempt, or re-raise `exc` (the caller is in its except block)."""
        delay = min(0.5 * 2**self.attempt, 10.0) * random.uniform(0.5, 1.0)
        left = self.deadline - time.monotonic()
        if not is_transient(exc) or left < delay:
            raise exc
        self.attempt += 1
        self.log.warning(
            "S3 request failed; retrying",
            op=self.what,
            endpoint=endpoint,
            attempt=self.attempt,
            retry_in_s=round(delay, 2),
            budget_left_s=round(left, 1),
            error=f"{type(exc).__name__}: {one_line(str(exc), 200)}",
        )
        time.sleep(delay)
