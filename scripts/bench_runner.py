"""The dev cluster's pod runner (llmengine.dev.runner) with two benchmark knobs, started in place of the stock one.

- --max-procs N: at most N container processes at once. The stock runner starts one process per pod as soon as the
  pod is bound; a thousand serving pods would mean a thousand Python processes (~64 MiB each) on a 2-core machine.
- --no-serving-exec: serving pods (long-running) become Ready without running their `llmengine serve-engine download`
  init container, as pods without a runnable init container already do. On a real cluster every pod downloads on its
  own node in parallel; here the downloads would share two cores and measure the machine, not the operator. Build Job
  pods always run (the test compiler, the store commit).

    python scripts/bench_runner.py --cluster-dir DIR [--max-procs 4] [--no-serving-exec]
"""

from __future__ import annotations

import argparse
import sys
import threading
from typing import Any

from llmengine.dev import runner


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cluster-dir", required=True)
    ap.add_argument("--max-procs", type=int, default=4)
    ap.add_argument("--no-serving-exec", action="store_true")
    args, _ = ap.parse_known_args()

    slots = threading.BoundedSemaphore(args.max_procs)
    run_container = runner.Runner.run_container

    def bounded(self: runner.Runner, pod: dict[str, Any], c: dict[str, Any], root: Any) -> tuple[int, str]:
        with slots:
            return run_container(self, pod, c, root)

    runner.Runner.run_container = bounded  # type: ignore[method-assign]
    if args.no_serving_exec:
        stock = runner.is_runnable

        def job_pods_only(pod: dict[str, Any], container: dict[str, Any]) -> bool:
            return runner.is_job_pod(pod) and stock(pod, container)

        runner.is_runnable = job_pods_only
    return runner.main(["--cluster-dir", args.cluster_dir])


if __name__ == "__main__":
    sys.exit(main())
