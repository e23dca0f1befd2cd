"""What the metering proxy costs per request, on loopback, against a fake trtllm-serve that answers at once.

Three processes, as in the serving pod: a fake upstream (aiohttp, instant answers in trtllm-serve's format), the
meter in front of it, and this client. Each scenario runs straight against the upstream and through the meter;
the difference is the proxy's cost. The meter's own CPU time per request is read from /proc: on a machine with
fewer cores than the three processes need, that is the number to trust, not the latencies. Prints a markdown table.

    .venv/bin/python scripts/bench_meter.py [--requests 2000] [--concurrency 64] [--chunks 256]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable

import aiohttp
from aiohttp import web

COMPLETION = json.dumps(
    {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "text": "x" * 400, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 512, "completion_tokens": 100, "total_tokens": 612},
    }
).encode()


def fake_upstream(port: int, chunks: int, interval: float) -> None:
    async def completions(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=COMPLETION, content_type="application/json")

    async def chat(request: web.Request) -> web.StreamResponse:
        doc = json.loads(await request.read())
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m"}
        for i in range(chunks):
            finish = "stop" if i == chunks - 1 else None
            choice = {"index": 0, "delta": {"content": "tok "}, "finish_reason": finish}
            await resp.write(b"data: " + json.dumps({**base, "choices": [choice]}).encode() + b"\n\n")
            if interval:  # one token at a time, as a decoding engine sends them
                await asyncio.sleep(interval)
        if (doc.get("stream_options") or {}).get("include_usage"):
            usage = {"prompt_tokens": 512, "completion_tokens": chunks, "total_tokens": 512 + chunks}
            await resp.write(b"data: " + json.dumps({**base, "choices": [], "usage": usage}).encode() + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


def meter(port: int, upstream_port: int) -> None:
    from llmengine.server.meter import make_app

    app = make_app(f"http://127.0.0.1:{upstream_port}")
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None, handler_cancellation=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_up(session: aiohttp.ClientSession, url: str) -> None:
    for _ in range(200):
        try:
            async with session.post(url + "/v1/completions", data=b"{}") as r:
                await r.read()
                return
        except aiohttp.ClientError:
            await asyncio.sleep(0.05)
    raise SystemExit(f"{url} never came up")


async def timed_requests(n: int, concurrency: int, one: Callable[[], Awaitable[None]]) -> tuple[list[float], float]:
    """Per-request latencies (s) and the wall time for n requests at the given concurrency."""
    latencies: list[float] = []
    queue = iter(range(n))

    async def worker() -> None:
        for _ in queue:
            t = time.perf_counter()
            await one()
            latencies.append(time.perf_counter() - t)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, time.perf_counter() - t0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


async def bench(args: argparse.Namespace, direct: str, proxied: str, meter_pid: int) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    body = json.dumps({"model": "m", "prompt": "hello " * 200, "max_tokens": 100}).encode()
    stream_body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}).encode()
    headers = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        await wait_up(s, direct)
        await wait_up(s, proxied)

        def completion(base: str) -> Callable[[], Awaitable[None]]:
            async def one() -> None:
                async with s.post(base + "/v1/completions", data=body, headers=headers) as r:
                    await r.read()

            return one

        ttfb: dict[str, list[float]] = {}

        def stream(base: str) -> Callable[[], Awaitable[None]]:
            async def one() -> None:
                t = time.perf_counter()
                async with s.post(base + "/v1/chat/completions", data=stream_body, headers=headers) as r:
                    await r.content.readuntil(b"\n\n")
                    ttfb.setdefault(base, []).append(time.perf_counter() - t)
                    await r.read()

            return one

        scenarios: list[tuple[str, Callable[[str], Callable[[], Awaitable[None]]], int, int]] = [
            ("completion, sequential", completion, args.requests, 1),
            (f"completion, {args.concurrency} concurrent", completion, args.requests, args.concurrency),
            (f"chat stream, {args.chunks} events {args.interval_ms} ms apart, 1 at a time", stream, 20, 1),
            (
                f"chat stream, {args.chunks} events {args.interval_ms} ms apart, {args.concurrency} concurrent",
                stream,
                4 * args.concurrency,
                args.concurrency,
            ),
        ]
        for name, make, n, conc in scenarios:
            results = {}
            for label, base in (("direct", direct), ("meter", proxied)):
                await timed_requests(min(n, 100), conc, make(base))  # warm-up
                ttfb.pop(base, None)
                cpu = cpu_seconds(meter_pid)
                results[label] = await timed_requests(n, conc, make(base))
            meter_cpu = (cpu_seconds(meter_pid) - cpu) / n
            (d_lat, d_wall), (m_lat, m_wall) = results["direct"], results["meter"]
            first = "-"
            if ttfb:
                first = f"{(statistics.median(ttfb[proxied]) - statistics.median(ttfb[direct])) * 1e3:+.2f}"
                ttfb.clear()
            p50 = statistics.median(m_lat) - statistics.median(d_lat)
            rows.append(
                (
                    name,
                    f"{statistics.median(d_lat) * 1e3:.2f} / {pct(d_lat, 0.99) * 1e3:.2f}",
                    f"{statistics.median(m_lat) * 1e3:.2f} / {pct(m_lat, 0.99) * 1e3:.2f}",
                    f"{p50 * 1e3:+.2f}",
                    first,
                    f"{n / d_wall:.0f} / {n / m_wall:.0f}",
                    f"{meter_cpu * 1e3:.2f}",
                )
            )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--chunks", type=int, default=256, help="events per streamed response")
    p.add_argument("--interval-ms", type=float, default=2.0, help="time between streamed events")
    p.add_argument("--role", choices=("client", "upstream", "meter"), default="client", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--upstream-port", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.role == "upstream":
        return fake_upstream(args.port, args.chunks, args.interval_ms / 1000)
    if args.role == "meter":
        return meter(args.port, args.upstream_port)

    up_port, meter_port = free_port(), free_port()
    me = [sys.executable, os.path.abspath(__file__)]
    procs = [
        subprocess.Popen(
            [
                *me,
                "--role",
                "upstream",
                "--port",
                str(up_port),
                "--chunks",
                str(args.chunks),
                "--interval-ms",
                str(args.interval_ms),
            ]
        ),
        subprocess.Popen([*me, "--role", "meter", "--port", str(meter_port), "--upstream-port", str(up_port)]),
    ]
    try:
        rows = asyncio.run(bench(args, f"http://127.0.0.1:{up_port}", f"http://127.0.0.1:{meter_port}", procs[1].pid))
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait()
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"aiohttp {aiohttp.__version__}\n"
    )
    print(
        "| scenario | direct p50 / p99 (ms) | through the meter p50 / p99 (ms) | added p50 (ms) "
        "| added to the first event, p50 (ms) | req/s direct / meter | meter CPU per request (ms) |"
    )
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
