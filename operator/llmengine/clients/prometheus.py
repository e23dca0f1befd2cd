"""A Prometheus server's HTTP API: one instant query (GET /api/v1/query), its JSON answer decoded."""

from __future__ import annotations

import asyncio
import json
import ssl
from pathlib import Path
from typing import Any

import aiohttp

# The answer for a fleet of 1,000 engines of two pods each is about 40 MB (docs/traffic.md); far more is not ours.
MAX_BYTES = 512 * 1024 * 1024


class PrometheusError(Exception):
    """Prometheus could not be asked, or its answer could not be read; the message says which and why."""


class Prometheus:
    def __init__(
        self, url: str, timeout_seconds: float, bearer_token_file: str | None = None, ca_file: str | None = None
    ) -> None:
        self.url = url.rstrip("/")
        self.timeout = aiohttp.ClientTimeout(total=timeout_seconds)
        self.token_file = bearer_token_file
        # Read once: a CA file that cannot be read is a configuration error the operator reports at start.
        self.ssl: ssl.SSLContext | bool = ssl.create_default_context(cafile=ca_file) if ca_file else True

    def _headers(self) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        if self.token_file:
            # Read on every query: a projected or rotated Secret changes under the mount.
            try:
                token = Path(self.token_file).read_text().strip()
            except OSError as e:
                raise PrometheusError(f"cannot read the bearer token file {self.token_file}: {e}") from None
            headers["Authorization"] = f"Bearer {token}"
        return headers

    async def query(self, promql: str) -> Any:
        """The decoded JSON of an instant query's answer: also for error statuses (400, 422, 503), whose bodies say
        what went wrong. Raises PrometheusError when there is no JSON answer to read."""
        endpoint = f"{self.url}/api/v1/query"
        try:
            async with (
                aiohttp.ClientSession(timeout=self.timeout) as session,
                session.get(endpoint, params={"query": promql}, headers=self._headers(), ssl=self.ssl) as resp,
            ):
                body = await resp.content.read(MAX_BYTES + 1)
                status, kind = resp.status, resp.content_type
        except TimeoutError:
            raise PrometheusError(f"{endpoint} did not answer within {self.timeout.total:g} s") from None
        except aiohttp.ClientError as e:
            raise PrometheusError(f"{endpoint}: {type(e).__name__}: {e}") from None
        if len(body) > MAX_BYTES:
            raise PrometheusError(f"{endpoint} answered more than {MAX_BYTES} bytes")
        if kind != "application/json":
            text = body[:200].decode("utf-8", errors="replace").strip()
            raise PrometheusError(f"{endpoint} answered HTTP {status} ({kind}), not the Prometheus API: {text}")
        try:
            # Off the event loop: a fleet's answer (tens of MB) takes a second to decode.
            return await asyncio.to_thread(json.loads, body)
        except ValueError as e:
            raise PrometheusError(f"{endpoint} answered HTTP {status} with JSON that does not parse: {e}") from None
