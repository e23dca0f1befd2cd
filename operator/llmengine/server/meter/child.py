"""Running next to trtllm-serve: the meter starts it, proxies to it on loopback, and exits with it."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import signal
import subprocess
import sys
from typing import Protocol

from aiohttp import web

from llmengine.logging import get_logger
from llmengine.server.meter.app import make_app

LOOPBACK = "127.0.0.1"


def exit_code(returncode: int) -> int:
    """A child's exit status as a shell would report it (killed by signal N -> 128 + N)."""
    return 128 - returncode if returncode < 0 else returncode


def upstream_port_for(port: int) -> int:
    return port + 1 if port < 65535 else port - 1


class Child(Protocol):
    """What the meter needs of the trtllm-serve process (a subprocess.Popen)."""

    @property
    def pid(self) -> int: ...
    def wait(self, timeout: float | None = None) -> int: ...
    def poll(self) -> int | None: ...
    def send_signal(self, sig: int) -> None: ...
    def kill(self) -> None: ...


class MeterError(Exception):
    """The meter could not start; the message is one line."""


def _die_with_parent() -> None:
    # If the meter is killed outright, trtllm-serve gets SIGTERM instead of living on unseen (Linux only).
    with contextlib.suppress(Exception):
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def spawn_child(argv: list[str]) -> Child:
    """Start trtllm-serve sharing our stdout/stderr, so its logs stay the container's logs."""
    return subprocess.Popen(argv, preexec_fn=_die_with_parent if sys.platform == "linux" else None)


def stop_child(child: Child, grace: float = 30.0) -> None:
    if child.poll() is not None:
        return
    child.send_signal(signal.SIGTERM)
    try:
        child.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()


async def serve_meter(listen_host: str, listen_port: int, upstream_port: int, child: Child) -> int:
    """Proxy listen_host:listen_port to trtllm-serve on loopback until the child exits; return its exit code.

    SIGTERM and SIGINT go to the child: trtllm-serve drains and exits, and the meter follows it.
    """
    loop = asyncio.get_running_loop()
    app = make_app(f"http://{LOOPBACK}:{upstream_port}")
    # No access log: nothing per request is logged. Handler cancellation: a client hanging up aborts its generation.
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=5)
    await runner.setup()
    try:
        await web.TCPSite(runner, listen_host, listen_port).start()
    except OSError as exc:
        await runner.cleanup()
        await asyncio.to_thread(stop_child, child)
        raise MeterError(f"cannot listen on {listen_host}:{listen_port}: {exc.strerror or exc}") from exc
    sigs = (signal.SIGTERM, signal.SIGINT)
    for sig in sigs:
        loop.add_signal_handler(sig, child.send_signal, sig)
    get_logger(component="meter").info(
        "metering proxy up", listen=f"{listen_host}:{listen_port}", upstream=f"{LOOPBACK}:{upstream_port}"
    )
    try:
        returncode = await asyncio.to_thread(child.wait)
    finally:
        for sig in sigs:
            loop.remove_signal_handler(sig)
        await runner.cleanup()
    return exit_code(returncode)


def run_meter(listen_host: str, listen_port: int, upstream_port: int, child: Child) -> int:
    return asyncio.run(serve_meter(listen_host, listen_port, upstream_port, child))
