"""Which headers a proxy passes on: none of the hop-by-hop ones."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from multidict import CIMultiDict

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# aiohttp's client adds these when absent; the upstream must see only what the client sent.
NO_AUTO_HEADERS = ("Accept", "Accept-Encoding", "User-Agent", "Content-Type")


def _connection_tokens(headers: Mapping[str, str]) -> set[str]:
    return {t.strip().lower() for t in headers.get("Connection", "").split(",") if t.strip()}


def forwardable(headers: Mapping[str, str], drop: Iterable[str] = ()) -> CIMultiDict[str]:
    """Headers minus hop-by-hop ones (including those the Connection header names) and `drop`."""
    skip = HOP_BY_HOP | _connection_tokens(headers) | {d.lower() for d in drop}
    out: CIMultiDict[str] = CIMultiDict()
    for k, v in headers.items():
        if k.lower() not in skip:
            out.add(k, v)
    return out
