"""Processes of the dev cluster: free loopback ports, background start with logs and PID files, ordered stop."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def free_port() -> int:
    """A port that is free on 127.0.0.1 right now (the kernel picks it, so parallel clusters do not collide)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something accepts TCP connections on host:port now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


@dataclass(frozen=True)
class Proc:
    name: str
    pid: int
    log: Path


def start(
    name: str,
    argv: Sequence[str],
    state_dir: Path,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> Proc:
    """Start argv detached from our session, output to <state>/logs/<name>.log, PID in <state>/pids/<name>."""
    logs, pids = state_dir / "logs", state_dir / "pids"
    logs.mkdir(parents=True, exist_ok=True)
    pids.mkdir(parents=True, exist_ok=True)
    log = logs / f"{name}.log"
    with open(log, "ab") as out:
        p = subprocess.Popen(
            list(argv),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            cwd=cwd,
            start_new_session=True,
        )
    (pids / name).write_text(str(p.pid))
    return Proc(name, p.pid, log)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still answers kill(0); reap it if it is ours.
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    return True


def stop_child(p: subprocess.Popen[Any], grace: float = 10.0) -> None:
    """SIGTERM a child process started here, SIGKILL after the grace period, and reap it."""
    p.terminate()
    try:
        p.wait(grace)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


def stop_pid(pid: int, grace: float = 10.0) -> None:
    """SIGTERM the process group, then SIGKILL after the grace period."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if not alive(pid):
                return
            time.sleep(0.05)


def stop_named(state_dir: Path, name: str, grace: float = 10.0) -> bool:
    pidfile = state_dir / "pids" / name
    if not pidfile.exists():
        return False
    try:
        pid = int(pidfile.read_text().strip())
    except ValueError:
        pidfile.unlink()
        return False
    stop_pid(pid, grace)
    pidfile.unlink(missing_ok=True)
    return True


def running(state_dir: Path, name: str) -> int | None:
    pidfile = state_dir / "pids" / name
    if not pidfile.exists():
        return None
    try:
        pid = int(pidfile.read_text().strip())
    except ValueError:
        return None
    return pid if alive(pid) else None


class StartupError(RuntimeError):
    """A component did not become healthy; the message names it and ends with the tail of its log."""


def log_tail(log: Path, lines: int = 30) -> str:
    try:
        text = log.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return "(no log)"
    return "\n".join(text[-lines:])


def wait_until(
    what: str, check: Callable[[], bool], timeout: float, proc: Proc | None = None, interval: float = 0.2
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and not alive(proc.pid):
            raise StartupError(f"{what}: process exited; last log lines:\n{log_tail(proc.log)}")
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(interval)
    tail = f"; last log lines:\n{log_tail(proc.log)}" if proc else ""
    raise StartupError(f"{what}: not healthy after {timeout:.0f}s{tail}")


def tcp_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0
