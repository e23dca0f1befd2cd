"""`llmengine dev traffic`: send prompts of a given length through an engine's serving path on the dev cluster.

The prompts go to the metering proxy (llmengine.dev.servingpath), which meters them as in a serving pod and passes
them to the test stand-in. A prompt of N tokens is N words (the stand-in counts one token per whitespace-separated
word). Answers are sorted the way the proxy sorts them: answered (2xx), refused as too long (HTTP 400 whose message
is about the engine's length limits, llmengine.server.meter.responses), failed (anything else).
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from dataclasses import dataclass, field

import aiohttp

from llmengine.server.meter import classify_error, error_message


def prompt_of(tokens: int) -> str:
    """A prompt the stand-in counts as `tokens` tokens."""
    return " ".join(f"w{i % 1000}" for i in range(tokens))


@dataclass
class TrafficResult:
    answered: int = 0
    refused: int = 0  # too long for the engine
    failed: int = 0
    refusal: str | None = None  # one refusal's message, as the engine sent it
    failures: Counter[str] = field(default_factory=Counter)

    @property
    def sent(self) -> int:
        return self.answered + self.refused + self.failed


async def send(
    url: str, tokens: int, requests: int, concurrency: int = 4, max_tokens: int = 16, chat: bool = False
) -> TrafficResult:
    """Send `requests` prompts of `tokens` tokens to `url` (the proxy's base URL), `concurrency` at a time."""
    path = "/v1/chat/completions" if chat else "/v1/completions"
    text = prompt_of(tokens)
    body: dict[str, object] = {"model": "any", "max_tokens": max_tokens}
    body |= {"messages": [{"role": "user", "content": text}]} if chat else {"prompt": text}
    data = json.dumps(body).encode()
    result = TrafficResult()
    todo = iter(range(requests))

    async def one(session: aiohttp.ClientSession) -> None:
        try:
            async with session.post(url + path, data=data, headers={"Content-Type": "application/json"}) as resp:
                raw = await resp.read()
                if 200 <= resp.status < 300:
                    result.answered += 1
                    return
                message = error_message(raw)
                if classify_error(resp.status, message) == "too_long":
                    result.refused += 1
                    result.refusal = result.refusal or message
                    return
                result.failed += 1
                result.failures[f"HTTP {resp.status}: {message.strip()[:200]}"] += 1
        except (aiohttp.ClientError, TimeoutError) as e:
            result.failed += 1
            result.failures[f"{type(e).__name__}: {e}"[:200]] += 1

    async def worker(session: aiohttp.ClientSession) -> None:
        for _ in todo:
            await one(session)

    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await asyncio.gather(*(worker(session) for _ in range(max(1, concurrency))))
    return result


def summary(result: TrafficResult, tokens: int, url: str) -> str:
    lines = [
        f"sent {result.sent} prompts of {tokens} tokens to {url}: {result.answered} answered, "
        f"{result.refused} refused as too long, {result.failed} failed"
    ]
    if result.refusal:
        lines.append(f"  refusal: {result.refusal}")
    lines += [f"  failed ({n}x): {why}" for why, n in result.failures.most_common(3)]
    return "\n".join(lines)
