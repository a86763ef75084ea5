"""A real ``segcache serve`` in a subprocess on a free port: restarts, kill -9, two servers.

    with ServeProcess(["--dtype", "float32", "--disk-cache", str(d)]) as srv:
        OpenAI(base_url=srv.url + "/v1", api_key="x").chat.completions.create(...)
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.tier_helpers import free_port

ROOT = Path(__file__).resolve().parents[1]


class ServeProcess:
    """``python -m segcache.cli serve ARGS`` on 127.0.0.1 at a free port."""

    def __init__(self, args: list[str], log: Path | None = None, startup_timeout_s: float = 180.0) -> None:
        self.args, self.port, self.log = list(args), free_port(), log
        self.startup_timeout_s = startup_timeout_s
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ServeProcess:
        out = open(self.log, "ab") if self.log else subprocess.DEVNULL  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "segcache.cli", "serve", "--port", str(self.port), *self.args],
            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"segcache serve exited with {self.proc.returncode}{self._tail()}")
            try:
                r = httpx.get(self.url + "/health", timeout=2)
                # segcache's answer, not another server's (Ray binds HTTP servers on random ports)
                if r.status_code == 200 and '"plan"' in r.text:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.kill()
        raise RuntimeError(f"segcache serve did not answer in {self.startup_timeout_s:.0f} s{self._tail()}")

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM: uvicorn finishes running requests, the engine drains its tier writes."""
        if self.proc is None:
            return 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout_s)
        finally:
            self.proc = None

    def kill(self) -> None:
        """SIGKILL (kill -9): nothing is flushed."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def _tail(self) -> str:
        if self.log is None or not self.log.exists():
            return ""
        return "\n" + self.log.read_text(errors="replace")[-3000:]

    def __enter__(self) -> ServeProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill() if self.proc is not None and exc[0] is not None else self.stop()
