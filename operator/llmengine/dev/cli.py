"""`llmengine dev up | down | status | env | logs | traffic`: the local simulated GPU cluster."""

from __future__ import annotations

import argparse
import asyncio
import shlex
import sys
import time
from pathlib import Path

from llmengine.dev import proc, tools, traffic
from llmengine.dev.cluster import DevCluster
from llmengine.dev.servingpath import ServingPathInfo, serving_paths


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="llmengine dev", description=__doc__)
    ap.add_argument("--name", default="dev", help="cluster name; several can run side by side (default: dev)")
    ap.add_argument("--state-dir", type=Path, help="state directory (default: ~/.local/state/llmengine-dev/NAME)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="build missing tools, start the cluster, wait until healthy")
    up.add_argument("--fleet", type=Path, help="node pool file (default: devcluster/fleet.yaml)")
    up.add_argument("--no-build", action="store_true", help="fail instead of building missing tools")
    up.add_argument(
        "--s3-of",
        metavar="NAME",
        help="use the S3 server of the running dev cluster NAME instead of starting one (clusters sharing a store)",
    )
    down = sub.add_parser("down", help="stop every component by PID")
    down.add_argument("--purge", action="store_true", help="also delete the state directory (logs, S3 data)")
    sub.add_parser("status", help="show which components run")
    sub.add_parser("env", help="print the shell exports to use the cluster")
    lg = sub.add_parser("logs", help="print a component's log")
    lg.add_argument("component")
    tr = sub.add_parser(
        "traffic",
        help="send prompts through an engine's metering proxy (the demo's serving path, in front of a test stand-in)",
    )
    tr.add_argument("--tokens", type=int, required=True, help="prompt length (the stand-in counts words as tokens)")
    tr.add_argument("--requests", type=int, default=30, help="prompts to send (default 30)")
    tr.add_argument("--concurrency", type=int, default=4, help="prompts in flight at once (default 4)")
    tr.add_argument("--max-tokens", type=int, default=16, help="max_tokens of each request (default 16)")
    tr.add_argument("--chat", action="store_true", help="use /v1/chat/completions instead of /v1/completions")
    tr.add_argument("--engine", help="the LLMEngine (default: the only one with a serving path)")
    tr.add_argument("-n", "--namespace", help="its namespace")
    args = ap.parse_args(argv)
    s3_of = getattr(args, "s3_of", None)
    shared = DevCluster(s3_of).info() if s3_of else None
    if s3_of and shared is None:
        print(f"llmengine dev up: cluster {s3_of!r} is not up, so it has no S3 server to share", file=sys.stderr)
        return 1
    cluster = DevCluster(args.name, args.state_dir, getattr(args, "fleet", None), s3=shared.s3() if shared else None)

    if args.cmd == "up":
        if not args.no_build:
            tools.ensure_built()
        t0 = time.monotonic()
        try:
            info = cluster.up()
        except (proc.StartupError, tools.ToolMissing) as e:
            print(f"llmengine dev up: {e}", file=sys.stderr)
            return 1
        print(f"cluster {info.name!r} ready in {time.monotonic() - t0:.1f}s: {info.apiserver}", file=sys.stderr)
        print(f'run: eval "$(llmengine dev --name {info.name} env)"', file=sys.stderr)
        return 0
    if args.cmd == "down":
        cluster.down(purge=args.purge)
        return 0
    if args.cmd == "status":
        current = cluster.info()
        st = cluster.status()
        for comp, pid in st.items():
            print(f"{comp:<24} {'running pid ' + str(pid) if pid else 'stopped'}")
        if current:
            print(f"{'apiserver':<24} {current.apiserver}\n{'s3':<24} {current.s3_endpoint}")
        return 0 if current and cluster.healthy() else 1
    if args.cmd == "env":
        current = cluster.info()
        if not current:
            print(
                f"llmengine dev env: cluster {args.name!r} is not up (run `llmengine dev up`)",
                file=sys.stderr,
            )
            return 1
        for k, v in current.env().items():
            print(f"export {k}={shlex.quote(v)}")
        return 0
    if args.cmd == "traffic":
        return _traffic(cluster, args)
    if args.cmd == "logs":
        logs = cluster.logs()
        if args.component not in logs:
            print(f"no log for {args.component!r}; have: {', '.join(logs)}", file=sys.stderr)
            return 1
        sys.stdout.write(logs[args.component].read_text(errors="replace"))
        return 0
    return 2


def _traffic(cluster: DevCluster, args: argparse.Namespace) -> int:
    paths = serving_paths(cluster.dir)
    found = [
        p
        for p in paths
        if (args.engine is None or p.engine == args.engine)
        and (args.namespace is None or p.namespace == args.namespace)
    ]
    if len(found) != 1:
        have = ", ".join(f"{p.namespace}/{p.engine}" for p in paths) or "none"
        what = "no" if not found else "more than one"
        print(
            f"llmengine dev traffic: {what} serving path matches in cluster {cluster.name!r} (have: {have}); "
            "`make demo` starts one, --engine / -n pick one",
            file=sys.stderr,
        )
        return 1
    path: ServingPathInfo = found[0]
    result = asyncio.run(
        traffic.send(path.url, args.tokens, args.requests, args.concurrency, args.max_tokens, chat=args.chat)
    )
    print(f"{path.namespace}/{path.engine}: " + traffic.summary(result, args.tokens, path.url))
    return 0 if result.failed == 0 else 1
