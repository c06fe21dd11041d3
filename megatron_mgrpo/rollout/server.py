"""Launching and supervising one inference server process (vLLM or SGLang).

The server runs in its own session so that stopping it stops every process it forked (engine
cores, tokenizer workers); its output goes to a log file whose tail is quoted in every error,
because "the server did not come up" is useless without it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx


class ServerError(RuntimeError):
    """The server could not start, died, or stopped answering."""


@dataclass
class ServerSpec:
    """Everything needed to start a server: its full command line and how to reach it."""

    command: list[str]
    port: int
    log_file: Path
    host: str = "127.0.0.1"
    api_key: str | None = None
    health_path: str = "/health"
    env: dict[str, str] = field(default_factory=dict)
    startup_timeout_s: float = 300.0

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


class ServerProcess:
    """One server process: start, wait until healthy, check liveness, stop (process group)."""

    def __init__(self, spec: ServerSpec):
        self.spec = spec
        self._proc: subprocess.Popen | None = None

    def start(self) -> None:
        if self.is_alive():
            return
        if self.healthy():  # else the other server's answers would pass for ours while ours fails to bind
            raise ServerError(f"a server already answers at {self.spec.url}: start this one on another port")
        self.spec.log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.spec.log_file, "ab") as log:
            log.write(f"\n==== starting: {' '.join(self.spec.command)}\n".encode())
            log.flush()
            self._proc = subprocess.Popen(self.spec.command, stdout=log, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, start_new_session=True,
                                          env={**os.environ, **self.spec.env})
        self.wait_healthy()

    def wait_healthy(self) -> None:
        deadline = time.monotonic() + self.spec.startup_timeout_s
        while time.monotonic() < deadline:
            if not self.is_alive():
                raise ServerError(f"server exited with code {self._proc.returncode} during startup; "
                                  f"{self.log_excerpt()}")
            if self.healthy():
                return
            time.sleep(0.5)
        self.stop()
        raise ServerError(f"server not healthy at {self.spec.url}{self.spec.health_path} after "
                          f"{self.spec.startup_timeout_s:.0f} s (raise the startup timeout if the model is "
                          f"large); {self.log_excerpt()}")

    def healthy(self) -> bool:
        headers = {"Authorization": f"Bearer {self.spec.api_key}"} if self.spec.api_key else {}
        try:
            return httpx.get(self.spec.url + self.spec.health_path, headers=headers, timeout=5.0).status_code == 200
        except httpx.HTTPError:
            return False

    def is_alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM the whole process group, then SIGKILL what is left after `grace_s`."""
        if self._proc is None:
            return
        for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self._proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self._proc.wait(timeout=wait)
                _wait_group_gone(self._proc.pid, wait)
                break
            except subprocess.TimeoutExpired:
                continue
        self._proc = None

    def log_excerpt(self) -> str:
        """Where the log is and how it ends: part of every error about the server."""
        return f"log {self.spec.log_file}:\n{self.log_tail()}"

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.spec.log_file.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log written)"

    def __enter__(self) -> ServerProcess:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class RemoteServer(ServerProcess):
    """A server started and supervised by someone else (the Slurm launcher, on another node).

    We only wait until it answers its health check. It is never started or stopped from here: a
    server that went down is waited for (its supervisor restarts it) and then, like a restarted
    local one, given the last pushed weights again by the engine.
    """

    def __init__(self, url: str, *, api_key: str | None = None, health_path: str = "/health",
                 startup_timeout_s: float = 600.0):
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname or parts.port is None or parts.path not in ("", "/"):
            raise ValueError(f"rollout server URL {url!r} must look like http://HOST:PORT")
        super().__init__(ServerSpec(command=[], port=parts.port, host=parts.hostname, api_key=api_key,
                                    log_file=Path(os.devnull), health_path=health_path,
                                    startup_timeout_s=startup_timeout_s))

    def start(self) -> None:
        self.wait_healthy()

    def is_alive(self) -> bool:
        return True  # its process is not ours to see; `healthy()` is the only evidence

    def stop(self, grace_s: float = 0.0) -> None:
        """Nothing: the server belongs to whoever started it."""

    def log_excerpt(self) -> str:
        return "the server was started elsewhere: read its own log (mgrpo launch: the engine's log in --log-dir)"


def _wait_group_gone(pgid: int, timeout_s: float) -> None:
    """Children of the server may outlive its main process by a moment; wait for the group."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    raise subprocess.TimeoutExpired(f"process group {pgid}", timeout_s)
