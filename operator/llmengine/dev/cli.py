"""`llmengine dev up | down | status | env | logs`: the local simulated GPU cluster."""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from llmengine.dev import proc, tools
from llmengine.dev.cluster import DevCluster


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="llmengine dev", description=__doc__)
    ap.add_argument("--name", default="dev", help="cluster name; several can run side by side (default: dev)")
    ap.add_argument("--state-dir", type=Path, help="state directory (default: ~/.local/state/llmengine-dev/NAME)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="build missing tools, start the cluster, wait until healthy")
    up.add_argument("--fleet", type=Path, help="node pool file (default: devcluster/fleet.yaml)")
    up.add_argument("--no-build", action="store_true", help="fail instead of building missing tools")
    down = sub.add_parser("down", help="stop every component by PID")
    down.add_argument("--purge", action="store_true", help="also delete the state directory (logs, S3 data)")
    sub.add_parser("status", help="show which components run")
    sub.add_parser("env", help="print the shell exports to use the cluster")
    lg = sub.add_parser("logs", help="print a component's log")
    lg.add_argument("component")
    args = ap.parse_args(argv)
    cluster = DevCluster(args.name, args.state_dir, getattr(args, "fleet", None))

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
    if args.cmd == "logs":
        logs = cluster.logs()
        if args.component not in logs:
            print(f"no log for {args.component!r}; have: {', '.join(logs)}", file=sys.stderr)
            return 1
        sys.stdout.write(logs[args.component].read_text(errors="replace"))
        return 0
    return 2
