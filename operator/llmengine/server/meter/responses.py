"""What an OpenAI completion response says: its finish reasons, token usage and errors, as one result."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Literal

Result = Literal["stop", "length", "too_long", "error", "other"]
RESULTS: tuple[Result, ...] = ("stop", "length", "too_long", "error", "other")

# "exceed" alone is not enough: trtllm also says "cannot exceed max_batch_size" / "max_beam_width" for n/best_of.
_TOO_LONG = re.compile(
    r"max_input_len|max_seq_len|max_num_tokens|prompt[ _]?length|prompt_len|input[ _]length|context length",
    re.IGNORECASE,
)
# The prompt's own length, not a limit: "prompt length (9000)", "Prompt length (72417.0)", "input length 9000",
# "`splited_prompt_len` (8000)", "input length of 9000". Never "max_input_len (4096)" or "maximum input length (4096)".
_PROMPT_LEN = re.compile(
    r"(?<!max_)(?<!max )(?<!maximum )(?:prompt|input)[ _]?(?:token[ _]?)?(?:length|len)\b[`'\"]?"
    r"\s*(?:[:=]|of|is)?\s*\(?\s*(\d+)(?:\.\d+)?",
    re.IGNORECASE,
)


def classify_finish(reasons: Iterable[str | None]) -> Result:
    """One result for a response: `length` if any choice was cut, `stop` if all stopped, else `other`."""
    seen = [r for r in reasons if r]
    if "length" in seen:
        return "length"
    if seen and all(r == "stop" for r in seen):
        return "stop"
    return "other"


def is_too_long(message: str) -> bool:
    return bool(_TOO_LONG.search(message))


def prompt_len_in_error(message: str) -> int | None:
    m = _PROMPT_LEN.search(message)
    return int(m.group(1)) if m else None


def error_message(body: bytes) -> str:
    """The message of an error body: trtllm's flat `{"message": ...}`, OpenAI's `{"error": {...}}`, or raw text."""
    text = body.decode("utf-8", "replace")
    try:
        doc = json.loads(text)
    except ValueError:
        return text
    if isinstance(doc, dict):
        err = doc.get("error")
        for candidate in (doc.get("message"), err.get("message") if isinstance(err, dict) else err, doc.get("detail")):
            if isinstance(candidate, str):
                return candidate
    return text


def classify_error(status: int, message: str) -> Result:
    return "too_long" if status == 400 and is_too_long(message) else "error"


def _count(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int) and value >= 0:
        return value
    if isinstance(value, float) and value >= 0 and value.is_integer():
        return int(value)
    return None


def usage_tokens(doc: object) -> tuple[int | None, int | None]:
    """(prompt_tokens, completion_tokens) of an OpenAI response or chunk; None where absent or malformed."""
    usage = doc.get("usage") if isinstance(doc, dict) else None
    if not isinstance(usage, dict):
        return None, None
    return _count(usage.get("prompt_tokens")), _count(usage.get("completion_tokens"))


def finish_reasons(doc: object) -> dict[int, str]:
    choices = doc.get("choices") if isinstance(doc, dict) else None
    out: dict[int, str] = {}
    for pos, choice in enumerate(choices if isinstance(choices, list) else []):
        if isinstance(choice, dict) and isinstance(choice.get("finish_reason"), str):
            index = choice.get("index")
            out[index if isinstance(index, int) else pos] = choice["finish_reason"]
    return out


def is_usage_only(doc: object) -> bool:
    """The chunk trtllm-serve sends last when `stream_options.include_usage` is on: `choices: []` plus usage."""
    return isinstance(doc, dict) and doc.get("choices") == [] and isinstance(doc.get("usage"), dict)


def with_usage_requested(body: bytes) -> bytes | None:
    """The request body with `stream_options.include_usage` on, or None when it is not a streaming request that
    lacks it (then it is forwarded untouched). Asking adds exactly one usage-only chunk, which the proxy drops."""
    if b'"stream"' not in body:  # spare a long prompt the parse
        return None
    try:
        doc = json.loads(body)
    except ValueError:
        return None
    if not isinstance(doc, dict) or doc.get("stream") is not True:
        return None
    opts = doc.get("stream_options")
    if opts is None:
        opts = {}
    if not isinstance(opts, dict) or opts.get("include_usage"):
        return None
    # continuous_usage_stats only takes effect with include_usage: keep it off so no other chunk changes.
    opts = {**opts, "include_usage": True}
    if opts.get("continuous_usage_stats"):
        opts["continuous_usage_stats"] = False
    doc["stream_options"] = opts
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()
