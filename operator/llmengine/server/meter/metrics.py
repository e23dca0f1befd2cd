"""The proxy's metrics."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from llmengine.server.meter.outcome import Outcome
from llmengine.server.meter.responses import RESULTS, prompt_len_in_error

TOKEN_BUCKETS = (
    16, 32, 64, 128, 256, 512, 1024, 2048, 3072, 4096, 6144, 8192, 12288, 16384, 24576, 32768, 65536, 131072,
)  # fmt: skip
CONCURRENCY_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


class Meter:
    """The proxy's metrics, in a private registry (the process-wide one belongs to whoever imports us)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.in_flight = Gauge(
            "llmengine_requests_in_flight", "Completion requests in flight through this pod's proxy", registry=r
        )
        self.concurrency = Histogram(
            "llmengine_request_concurrency",
            "Completion requests in flight when a request arrived, counting itself",
            buckets=CONCURRENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Histogram(
            "llmengine_request_prompt_tokens",
            "Prompt tokens per completion request (from usage, or from the error of a prompt refused as too long)",
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.output_tokens = Histogram(
            "llmengine_request_output_tokens",
            "Generated tokens per completion request (from usage)",
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.requests = Counter(
            "llmengine_requests",
            "Completion requests by result: stop, length (cut at max_tokens or max_seq_len), too_long (refused), "
            "error, other",
            ["result"],
            registry=r,
        )
        for result in RESULTS:
            self.requests.labels(result)
        self._n = 0

    def arrive(self) -> None:
        self._n += 1
        self.in_flight.set(self._n)
        self.concurrency.observe(self._n)

    def leave(self) -> None:
        self._n -= 1
        self.in_flight.set(self._n)

    def record(self, outcome: Outcome) -> None:
        result = outcome.result()
        self.requests.labels(result).inc()
        prompt = outcome.prompt_tokens
        if result == "too_long" and prompt is None:
            prompt = prompt_len_in_error(outcome.error or "")
        if prompt is not None:
            self.prompt_tokens.observe(prompt)
        if outcome.output_tokens is not None and result != "too_long":
            self.output_tokens.observe(outcome.output_tokens)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
