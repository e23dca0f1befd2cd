"""TEST SERVER — not trtllm-serve: a local stand-in for the serving container, for the dev cluster only.

The dev cluster's serving pods run no containers, so nothing would answer behind the metering proxy. This stand-in
answers the OpenAI paths the proxy meters, enough for the proxy and the operator's traffic judgement to see real
requests; no model runs and no text is generated. Every answer says what it is: the `model` field is
`test-server-not-trtllm-serve`, the `Server` header names the stand-in, and the reply text says no model ran.

What it imitates of trtllm-serve 1.2 (TensorRT backend), and nothing more:

- Token counts are simple: **one token per whitespace-separated word** of the prompt (`/v1/completions`: the
  `prompt` string, or each string of a list; token-id lists count their ids) or of the message contents
  (`/v1/chat/completions`: no chat template is applied). The reply is a fixed sentence, cut at `max_tokens`
  (`max_completion_tokens` for chat; 16 when unset).
- A prompt longer than the engine allows is refused with HTTP 400 and trtllm-serve's flat error envelope
  (`{"object": "error", "message": ..., "type": "BadRequestError", "param": null, "code": 400}`), in the order
  trtllm-serve checks: prompt + max_tokens over `max_seq_len` gives the TensorRT backend's message (`The sum of
  prompt length (900.0) and query length (0) max_tokens (16) should not exceed max_seq_len (1024)`), a prompt over
  `max_input_len` the C++ executor's (`Prompt length (900) exceeds maximum input length (512).`). Both are what the
  metering proxy reads as `too_long`, with the prompt's length (llmengine.server.meter.responses).
- The limits are those of the engine being served (`build_config` in its config.json, as trtllm-serve loads them),
  read through a callable on every request, so a rollout to a larger engine changes them.
- `stream: true` answers in server-sent events, with the usage-only last chunk when
  `stream_options.include_usage` is on; `GET /health` and `GET /v1/models` answer too.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web

MODEL_ID = "test-server-not-trtllm-serve"
SERVER_HEADER = "llmengine-dev-standin (TEST SERVER - not trtllm-serve)"
REPLY = "TEST SERVER, not trtllm-serve: no model ran and this reply is fixed."
DEFAULT_MAX_TOKENS = 16


@dataclass(frozen=True)
class Limits:
    """The static limits of the engine being served."""

    max_input_len: int
    max_seq_len: int

    @classmethod
    def from_engine_config(cls, doc: Mapping[str, Any]) -> Limits:
        """From an engine's config.json (`build_config.max_input_len` / `max_seq_len`, as trtllm-build writes it)."""
        build = doc.get("build_config")
        if not isinstance(build, Mapping):
            raise ValueError("config.json has no build_config")
        try:
            return cls(int(build["max_input_len"]), int(build["max_seq_len"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"config.json build_config lacks max_input_len / max_seq_len: {e}") from None


LimitsFor = Callable[[], Limits | None]


def count_tokens(text: str) -> int:
    """The stand-in's tokenizer: one token per whitespace-separated word."""
    return len(text.split())


def prompt_lengths(doc: Mapping[str, Any]) -> list[int] | None:
    """Tokens per prompt of a /v1/completions request; None when `prompt` is not a string, a list of strings, or
    token ids."""
    prompt = doc.get("prompt")
    if isinstance(prompt, str):
        return [count_tokens(prompt)]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return [count_tokens(p) for p in prompt]
        if all(isinstance(p, int) for p in prompt):
            return [len(prompt)]
        if all(isinstance(p, list) and all(isinstance(t, int) for t in p) for p in prompt):
            return [len(p) for p in prompt]
    return None


def chat_length(doc: Mapping[str, Any]) -> int | None:
    """Tokens of a /v1/chat/completions request: the words of every message's text content."""
    messages = doc.get("messages")
    if not isinstance(messages, list) or not messages:
        return None
    n = 0
    for m in messages:
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, str):
            n += count_tokens(content)
        elif isinstance(content, list):
            n += sum(count_tokens(p["text"]) for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return n


def refusal(prompt: int, max_tokens: int, limits: Limits) -> str | None:
    """trtllm-serve 1.2's message for a prompt this engine cannot take, in the order it checks; None when it fits."""
    if prompt + max_tokens > limits.max_seq_len:
        # llm.py _check_arguments (TensorRT backend): the prompt length is divided by the context-parallel size.
        return (
            f"The sum of prompt length ({float(prompt)}) and query length (0) max_tokens ({max_tokens}) "
            f"should not exceed max_seq_len ({limits.max_seq_len})"
        )
    if prompt > limits.max_input_len:
        return f"Prompt length ({prompt}) exceeds maximum input length ({limits.max_input_len})."
    return None


def _error(status: int, message: str, kind: str = "BadRequestError") -> web.Response:
    body = {"object": "error", "message": message, "type": kind, "param": None, "code": status}
    return web.json_response(body, status=status, headers={"Server": SERVER_HEADER})


def _max_tokens(doc: Mapping[str, Any], chat: bool) -> int | None:
    value = doc.get("max_completion_tokens") if chat else None
    if value is None:
        value = doc.get("max_tokens")
    if value is None:
        return DEFAULT_MAX_TOKENS
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 1 else None


def _reply(max_tokens: int) -> tuple[str, int, str]:
    """(text, tokens, finish_reason): the fixed sentence, cut at max_tokens."""
    words = REPLY.split()
    if max_tokens < len(words):
        return " ".join(words[:max_tokens]), max_tokens, "length"
    return REPLY, len(words), "stop"


def _usage(prompt: int, output: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": output, "total_tokens": prompt + output}


def _sse(doc: Mapping[str, Any]) -> bytes:
    return b"data: " + json.dumps(doc).encode() + b"\n\n"


async def _stream(
    request: web.Request, base: dict[str, Any], chunks: list[dict[str, Any]], usage: dict[str, int] | None
) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Server": SERVER_HEADER})
    await resp.prepare(request)
    for choice in chunks:
        await resp.write(_sse({**base, "choices": [choice]}))
    if usage is not None:
        await resp.write(_sse({**base, "choices": [], "usage": usage}))
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


def make_standin(limits_for: LimitsFor) -> web.Application:
    """The stand-in's aiohttp app; `limits_for()` gives the served engine's limits, None while none is served."""

    async def read(request: web.Request, chat: bool) -> tuple[dict[str, Any], list[int], int, Limits] | web.Response:
        limits = limits_for()
        if limits is None:
            return _error(503, "TEST SERVER: no engine is being served", "ServiceUnavailableError")
        try:
            doc = json.loads(await request.read())
        except ValueError:
            return _error(400, "TEST SERVER: the request body is not JSON")
        if not isinstance(doc, dict):
            return _error(400, "TEST SERVER: the request body is not a JSON object")
        lengths = ([n] if (n := chat_length(doc)) is not None else None) if chat else prompt_lengths(doc)
        if lengths is None:
            return _error(400, "TEST SERVER: " + ("messages" if chat else "prompt") + " is missing or malformed")
        max_tokens = _max_tokens(doc, chat)
        if max_tokens is None:
            return _error(400, "TEST SERVER: max_tokens must be an integer >= 1")
        for n in lengths:
            if (why := refusal(n, max_tokens, limits)) is not None:
                return _error(400, why)
        return doc, lengths, max_tokens, limits

    def include_usage(doc: Mapping[str, Any]) -> bool:
        opts = doc.get("stream_options")
        return isinstance(opts, dict) and bool(opts.get("include_usage"))

    async def completions(request: web.Request) -> web.StreamResponse:
        got = await read(request, chat=False)
        if isinstance(got, web.Response):
            return got
        doc, lengths, max_tokens, _ = got
        text, out, finish = _reply(max_tokens)
        base = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time())}
        base["model"] = MODEL_ID
        usage = _usage(sum(lengths), out * len(lengths))
        if doc.get("stream") is True:
            chunks = [{"index": i, "text": text, "finish_reason": finish} for i in range(len(lengths))]
            return await _stream(request, base, chunks, usage if include_usage(doc) else None)
        choices = [{"index": i, "text": text, "finish_reason": finish} for i in range(len(lengths))]
        return web.json_response({**base, "choices": choices, "usage": usage}, headers={"Server": SERVER_HEADER})

    async def chat(request: web.Request) -> web.StreamResponse:
        got = await read(request, chat=True)
        if isinstance(got, web.Response):
            return got
        doc, lengths, max_tokens, _ = got
        text, out, finish = _reply(max_tokens)
        usage = _usage(lengths[0], out)
        created = int(time.time())
        if doc.get("stream") is True:
            base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk", "created": created}
            base["model"] = MODEL_ID
            chunks = [
                {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None},
                {"index": 0, "delta": {"content": text}, "finish_reason": finish},
            ]
            return await _stream(request, base, chunks, usage if include_usage(doc) else None)
        message = {"role": "assistant", "content": text}
        body = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": created,
            "model": MODEL_ID,
            "choices": [{"index": 0, "message": message, "finish_reason": finish}],
            "usage": usage,
        }
        return web.json_response(body, headers={"Server": SERVER_HEADER})

    async def models(request: web.Request) -> web.Response:
        doc = {
            "object": "list",
            "data": [{"id": MODEL_ID, "object": "model", "created": 0, "owned_by": "llmengine-dev"}],
        }
        return web.json_response(doc, headers={"Server": SERVER_HEADER})

    async def health(request: web.Request) -> web.Response:
        status = 200 if limits_for() is not None else 503
        return web.Response(status=status, headers={"Server": SERVER_HEADER})

    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    return app
