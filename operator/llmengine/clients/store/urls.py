"""GETs of presigned URLs (an engine grant): the same ranged reads as the S3 client's, for pods that hold no store
credentials. urllib3 (botocore's own HTTP library), the proxy and CA bundle taken from the environment as the S3
client takes them (HTTPS_PROXY/NO_PROXY, AWS_CA_BUNDLE)."""

from __future__ import annotations

import os
import threading
import urllib.parse
import urllib.request
from typing import Any, Protocol

import urllib3

from llmengine.clients.store.errors import IntegrityError, StoreError


class Body(Protocol):
    def read(self, amt: int) -> bytes: ...

    def close(self) -> None: ...


class _Response:
    """An urllib3 response read in chunks; its connection goes back to the pool when closed."""

    def __init__(self, rsp: Any) -> None:
        self.rsp = rsp

    @property
    def raw(self) -> Any:
        """The urllib3 response, which receive.py reads from directly."""
        return self.rsp

    def read(self, amt: int) -> bytes:
        data: bytes = self.rsp.read(amt)
        return data

    def close(self) -> None:
        if not self.rsp.closed:
            self.rsp.close()  # not read to its end: the connection cannot serve another request
        self.rsp.release_conn()


_pools: dict[str, urllib3.PoolManager] = {}
_lock = threading.Lock()


def _pool(url: str) -> urllib3.PoolManager:
    """One pool per proxy (none for hosts NO_PROXY names), trusting AWS_CA_BUNDLE when set."""
    host = urllib.parse.urlsplit(url).hostname or ""
    proxies = urllib.request.getproxies()
    proxy = "" if urllib.request.proxy_bypass(host) else proxies.get(urllib.parse.urlsplit(url).scheme, "")
    with _lock:
        if proxy not in _pools:
            kw: dict[str, Any] = {"maxsize": 32, "retries": False}
            ca = os.environ.get("AWS_CA_BUNDLE")
            if ca:
                kw["ca_certs"] = ca
            _pools[proxy] = urllib3.ProxyManager(proxy, **kw) if proxy else urllib3.PoolManager(**kw)
        return _pools[proxy]


def get_range(url: str, name: str, start: int, end: int, ranged: bool) -> Body:
    """GET bytes [start, end) of one granted file (the whole body when not `ranged`). Raises IntegrityError for a
    file that is gone or shorter than asked, StoreError when the URL is refused (an expired grant); connection
    failures are urllib3's, which the store's retries wait out."""
    headers = {"Range": f"bytes={start}-{end - 1}"} if ranged else {}
    rsp = _pool(url).request("GET", url, headers=headers, preload_content=False, timeout=urllib3.Timeout(30, 300))
    if rsp.status in (200, 206):
        return _Response(rsp)
    text = rsp.read(2048).decode(errors="replace")
    rsp.release_conn()
    if rsp.status == 404:
        raise IntegrityError(f"'{name}' disappeared from the store during download", name)
    if rsp.status == 416:
        raise IntegrityError(f"'{name}' is shorter in the store than expected (truncated)", name)
    if rsp.status == 403:
        raise StoreError(
            f"the store refused the engine grant's URL for '{name}' (403): the grant expired or the operator's store "
            f"credentials changed; the operator renews grants at half their lifetime ({_code(text)})"
        )
    raise urllib3.exceptions.ProtocolError(f"GET '{name}' answered {rsp.status}: {_code(text)}")


def _code(text: str) -> str:
    start, end = text.find("<Code>"), text.find("</Code>")
    return text[start + 6 : end] if 0 <= start < end else text[:120].replace("\n", " ")
