"""A supervised child process of the local cluster, and the helpers every component shares."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


class ComponentError(RuntimeError):
    """A control plane component failed to start or become ready. Names it, with its log tail."""

    def __init__(self, component: str, reason: str, log_tail: str = "") -> None:
        self.component = component
        self.reason = reason
        self.log_tail = log_tail
        msg = f"{component}: {reason}"
        if log_tail:
            msg += f"\n--- last lines of the {component} log ---\n{log_tail}"
        super().__init__(msg)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        data = path.read_bytes()[-64 * 1024 :].decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(data.splitlines()[-lines:])


def _pdeathsig() -> None:  # runs in the child between fork and exec
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - best effort; atexit and stop() still apply
        pass


@dataclass
class Component:
    name: str
    argv: list[str]
    log: Path
    proc: subprocess.Popen | None = None
    health: Callable[[], bool] | None = None

    def start(self, env: dict[str, str]) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as fh:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=fh,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # own process group: stop() kills the whole group
                # The parent-death signal fires when the *thread* that forked exits, so it is only
                # armed from the main thread; elsewhere atexit and stop() do the cleanup.
                preexec_fn=_pdeathsig if threading.current_thread() is threading.main_thread() else None,
            )

    def check_running(self) -> None:
        if self.proc is None:
            raise ComponentError(self.name, "was never started")
        rc = self.proc.poll()
        if rc is not None:
            raise ComponentError(self.name, f"exited with code {rc}", log_tail(self.log))

    def stop(self, timeout: float = 10.0) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


class ApiError(RuntimeError):
    """An HTTP error answer from a server the dev cluster runs (the apiserver: 404 while a resource
    is not registered yet, 503 while an aggregated API is not Available)."""


# What a polled condition raises while the thing it waits for is not there yet: a connection or HTTP
# error (urllib, sockets, ApiError), a kubectl that failed or timed out, an answer cut short (JSON), a
# key or item not written yet, None read as an object (op_helpers.get_json of an object not created
# yet). Anything else (an AssertionError, a component that died, a bug) is raised at once, not
# reported later as slowness.
NOT_YET: tuple[type[Exception], ...] = (
    OSError,
    ApiError,
    subprocess.SubprocessError,
    json.JSONDecodeError,
    LookupError,
    TypeError,
)


def wait_for(
    condition: Callable[[], object],
    timeout: float,
    what: str,
    interval: float = 0.25,
    retry_on: tuple[type[Exception], ...] = NOT_YET,
) -> object:
    """Poll `condition` until it returns something truthy; raise TimeoutError naming `what`.

    An exception in `retry_on` counts as "not yet" (the last one is named in the timeout and chained to
    it); any other exception propagates at once."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while True:
        try:
            result = condition()
            if result:
                return result
        except retry_on as exc:
            last_exc = exc
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"timed out after {timeout:.0f}s waiting for {what}"
                + (f" (last error: {type(last_exc).__name__}: {last_exc})" if last_exc else "")
            ) from last_exc
        time.sleep(interval)
