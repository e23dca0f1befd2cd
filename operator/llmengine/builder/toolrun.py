"""Running an NVIDIA tool (trtllm-build, trtllm-bench, the conversion driver) as a child process: its output is
relayed line by line into the structured log, and the last lines are kept for the failure message."""

from __future__ import annotations

import subprocess
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ToolRun:
    returncode: int
    output: str  # the tail of stdout and stderr together


def relay(
    argv: list[str],
    log: Any,
    *,
    tail_lines: int,
    tool: str | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> ToolRun:
    """Run argv to its end, each output line logged with tool=`tool` (default: argv[0]'s name). Raises
    FileNotFoundError when argv[0] is not there: the caller says which stage that fails."""
    log.info("running", argv=argv)
    name = tool or Path(argv[0]).name
    tail: deque[str] = deque(maxlen=tail_lines)
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        errors="replace",
        env=dict(env) if env is not None else None,
        cwd=cwd,
    )
    with proc:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.rstrip()
            if line:
                tail.append(line)
                log.info(line, tool=name)
        rc = proc.wait()
    return ToolRun(rc, "\n".join(tail))
