"""A TLS-terminating TCP proxy on loopback: an HTTPS endpoint, with a certificate of a private CA, in front of a
plain-HTTP server (the dev S3). Bytes pass through unchanged, so S3 signatures (which cover the Host header the
client sent) still verify upstream. Tests use it to show what trusts a private CA and what does not."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from llmengine.dev import certs


@dataclass(frozen=True)
class PrivateCa:
    """A CA of its own and a server certificate it signed for 127.0.0.1 and localhost."""

    ca: Path
    cert: Path
    key: Path


def private_ca(dir_: Path, name: str = "llmengine-private-ca") -> PrivateCa:
    pki = certs.make_ca(dir_, common_name=name)
    cert, key = certs.issue(pki, "server", "127.0.0.1", dns=["localhost"], ips=["127.0.0.1"], server=True)
    return PrivateCa(pki.ca_crt, cert, key)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(256 * 1024):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


@contextlib.contextmanager
def tls_proxy(upstream: str, ca: PrivateCa) -> Iterator[str]:
    """Serve https://127.0.0.1:<port> in front of `upstream` (http://host:port) while the block runs; yields the
    https URL. The event loop runs in a thread of its own."""
    up = urlsplit(upstream)
    host, port = up.hostname or "127.0.0.1", up.port or 80
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(ca.cert), str(ca.key))
    loop = asyncio.new_event_loop()
    started: dict[str, int] = {}
    ready = threading.Event()

    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            up_r, up_w = await asyncio.open_connection(host, port)
        except OSError:
            client_w.close()
            return
        await asyncio.gather(_pipe(client_r, up_w), _pipe(up_r, client_w))

    async def serve() -> asyncio.Server:
        server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx)
        started["port"] = server.sockets[0].getsockname()[1]
        return server

    def run() -> None:
        asyncio.set_event_loop(loop)
        server = loop.run_until_complete(serve())
        ready.set()
        try:
            loop.run_forever()
        finally:
            server.close()
            loop.run_until_complete(server.wait_closed())
            loop.close()

    thread = threading.Thread(target=run, name="tls-proxy", daemon=True)
    thread.start()
    if not ready.wait(10):
        raise RuntimeError("the TLS proxy did not start")
    try:
        yield f"https://127.0.0.1:{started['port']}"
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
