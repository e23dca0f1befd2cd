"""The shell the Job commands share: `llmengine build-engine` and `llmengine bench-engine`.

Both read a request file, work in a scratch directory and always end with a result (a JobResult): printed to stdout,
written to the container's termination message for the operator to read, and turned into the exit code (0 when it
succeeded, 1 when not). A failed stage raises BuildFailure and becomes a failed result; anything else a run did not
expect becomes a retryable InternalError.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from llmengine.api.artifacts import JobResult, first_problem
from llmengine.builder.compiler import BuildFailure
from llmengine.logging import configure_logging, get_logger

TERMINATION_LOG = Path("/dev/termination-log")

R = TypeVar("R", bound=JobResult)


class InternalError(BuildFailure):
    """What a run did not expect (a bug, an odd environment), reported as a failure that a retry may get past."""

    def __init__(self, exc: Exception) -> None:
        super().__init__("internal", "InternalError", f"{type(exc).__name__}: {exc}")


@dataclass
class Attempt:
    """One run so far, as its failure result needs it: the engine digest once the request has named it, the logger
    bound to that digest, and when the run started."""

    log: Any
    digest: str = "unknown"
    started: float = field(default_factory=time.monotonic)

    def begin(self, digest: str, event: str, **fields: Any) -> None:
        """The request is loaded: bind its digest to the logger and log `event`."""
        self.digest = digest
        self.log = self.log.bind(engine_digest=digest)
        self.log.info(event, **fields)

    def seconds(self) -> float:
        return time.monotonic() - self.started

    def run(self, what: str, work: Callable[[], R], failed: Callable[[BuildFailure], R]) -> R:
        """work(), or failed(why) when it raises: always a result, never an exception."""
        try:
            return work()
        except BuildFailure as failure:
            self.log.error(
                f"{what} failed",
                stage=failure.stage,
                reason=failure.reason,
                permanent=failure.permanent,
                error=failure.message,
            )
            return failed(failure)
        except Exception as exc:
            self.log.exception(f"{what} crashed")
            return failed(InternalError(exc))


def failed(kind: type[R], digest: str, failure: BuildFailure, **measured: Any) -> R:
    """A failed result of this kind: where the run failed and why, and what it measured before it did."""
    return kind.model_validate(
        {
            "engine_digest": digest,
            "succeeded": False,
            "stage": failure.stage,
            "reason": failure.reason,
            "message": failure.message,
            "permanent": failure.permanent,
            **measured,
        }
    )


@contextlib.contextmanager
def work_dir(path: Path | None, prefix: str) -> Iterator[Path]:
    """The given scratch directory (kept, for debugging), or a temporary one removed afterwards."""
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        yield Path(tmp)


M = TypeVar("M", bound=BaseModel)


def load_request(path: Path, model: type[M], what: str, failure: type[BuildFailure] = BuildFailure) -> M:
    """The request file as `model`, or a permanent validate failure naming the file or the field at fault."""
    try:
        return model.model_validate_json(path.read_bytes())
    except FileNotFoundError as exc:
        raise failure("validate", "InvalidRequest", f"{what} {path} does not exist", True) from exc
    except ValidationError as exc:
        where = "field " if exc.errors()[0]["loc"] else f"{path}: "
        raise failure("validate", "InvalidRequest", f"{what} {where}{first_problem(exc)}", True) from exc


def write_result(text: str, path: Path | None) -> None:
    """stdout always; the termination message path too when it is writable."""
    print(text, flush=True)
    target = path if path is not None else (TERMINATION_LOG if os.access(TERMINATION_LOG, os.W_OK) else None)
    if target is not None:
        try:
            target.write_text(text)
        except OSError as exc:
            get_logger().warning("could not write the build result", path=str(target), error=str(exc))


def parse_args(argv: list[str], *, prog: str, description: str, request: str, result: str) -> argparse.Namespace:
    """The command line of a Job command that reads a `request` document and writes a `result` document."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--request", type=Path, required=True, help=f"{request} JSON file")
    p.add_argument("--work-dir", type=Path, default=None, help="scratch directory (default: a temporary one)")
    p.add_argument(
        "--result",
        type=Path,
        default=None,
        help=f"where to write the {result} (default: /dev/termination-log when writable; always stdout)",
    )
    p.add_argument("--log-format", choices=("json", "console"), default="json")
    p.add_argument("--log-level", default="INFO")
    return p.parse_args(argv)


def main(
    argv: list[str] | None,
    run: Callable[[Path, Path | None], JobResult],
    *,
    prog: str,
    description: str,
    request: str,
    result: str,
) -> int:
    """Parse the command line, run(request file, scratch directory), write the result; the exit code."""
    args = parse_args(
        sys.argv[1:] if argv is None else argv, prog=prog, description=description, request=request, result=result
    )
    configure_logging(json=args.log_format == "json", level=args.log_level)
    outcome = run(args.request, args.work_dir)
    write_result(outcome.fit_json(), args.result)
    return 0 if outcome.succeeded else 1
