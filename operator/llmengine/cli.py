"""The `llmengine` command. Each subcommand lives in its own module and parses its own arguments."""

from __future__ import annotations

import importlib
import sys

# name -> (module, function, one-line help). The function takes argv (after the subcommand) and returns an exit code.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "plan": ("llmengine.plan_cli", "main", "validate LLMEngine manifests offline and say what applying would do"),
    "operator": ("llmengine.handlers", "main", "run the operator (Kopf)"),
    "build-engine": ("llmengine.builder.main", "main", "build one engine from a build request and commit it"),
    "bench-engine": (
        "llmengine.builder.benchmark",
        "main",
        "benchmark a committed engine with trtllm-bench before rollout",
    ),
    "serve-engine": ("llmengine.server.main", "main", "download, verify and serve a committed engine"),
    "dev": ("llmengine.dev.cli", "main", "run a local simulated GPU cluster with S3 (up|down|status|env|logs|traffic)"),
    "slim-botocore-data": (
        "llmengine.clients.store.slimdata",
        "main",
        "write botocore's data cut to the store's S3 calls (the operator image; LLMENGINE_BOTOCORE_DATA)",
    ),
    "generate": ("llmengine.generate", "main", "write the CRD (from the API models) and the chart's README"),
}


def usage() -> str:
    lines = ["usage: llmengine COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<19}{help_}" for name, (_, _, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if name in ("-V", "--version", "version"):
        from llmengine import __version__

        print(__version__)
        return 0
    if name not in COMMANDS:
        print(f"llmengine: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module, func, _ = COMMANDS[name]
    entry = getattr(importlib.import_module(module), func)
    return int(entry(rest))


if __name__ == "__main__":
    raise SystemExit(main())


def kubectl_main(argv: list[str] | None = None) -> int:
    """`kubectl llmengine ...` (installed as kubectl-llmengine on PATH): the plan command, with kubectl's
    -n/--namespace, --context and --kubeconfig flags."""
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help", "help"):
        print("usage: kubectl llmengine plan -f FILE|DIR [-R] [-n NS] [--against cluster] [--context C] [-o json|yaml]")
        return 0 if args else 2
    if args[0] in ("-V", "--version", "version"):
        return main(["version"])
    if args[0] != "plan":
        print(f"kubectl llmengine: unknown command {args[0]!r}: use plan", file=sys.stderr)
        return 2
    return main(args)
