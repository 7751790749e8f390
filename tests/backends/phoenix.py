"""Arize Phoenix, a real OTLP backend that reads OpenInference, run from its own venv.

`make trace-check` builds .venv-phoenix (tests/backends/requirements-phoenix.txt) and
runs tests/e2e/test_phoenix.py, which starts Phoenix on free loopback ports through
`running_phoenix()`. `make phoenix` runs it in the foreground for a person:

    make phoenix                                        # UI and OTLP/HTTP on http://127.0.0.1:6006
    BATON_COLLECTOR_FORWARD=http://127.0.0.1:6006 baton up   # the collector copies every export there

Phoenix keeps its data in a working directory (SQLite); nothing leaves the machine
(its telemetry and external downloads are switched off).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
from shared import children

ROOT = Path(__file__).resolve().parents[2]
VENV = ROOT / ".venv-phoenix"
BINARY = VENV / "bin" / "phoenix"


def available() -> bool:
    return BINARY.exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def phoenix_env(port: int, grpc_port: int, workdir: Path) -> dict[str, str]:
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "PHOENIX_"))},
        "PHOENIX_HOST": "127.0.0.1",
        "PHOENIX_PORT": str(port),
        "PHOENIX_GRPC_PORT": str(grpc_port),
        "PHOENIX_WORKING_DIR": str(workdir),
        "PHOENIX_TELEMETRY_ENABLED": "false",
        "PHOENIX_ALLOW_EXTERNAL_RESOURCES": "false",
    }


@contextmanager
def running_phoenix(workdir: Path | None = None, timeout_s: float = 90.0) -> Iterator[str]:
    """Phoenix on free loopback ports; yields its base URL (OTLP/HTTP at /v1/traces)."""
    port, grpc_port = _free_port(), _free_port()
    with tempfile.TemporaryDirectory(prefix="phoenix-") as tmp:
        workdir = workdir or Path(tmp)
        log = open(workdir / "phoenix.log", "wb")
        process = subprocess.Popen([str(BINARY), "serve"], env=phoenix_env(port, grpc_port, workdir), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"Phoenix exited with code {process.returncode}:\n{(workdir / 'phoenix.log').read_text()[-2000:]}")
                try:
                    if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"Phoenix did not answer within {timeout_s:.0f}s")
                time.sleep(0.3)
            yield url
        finally:
            children.stop(process)
            log.close()


def main() -> None:
    if not available():
        sys.exit("Phoenix is not installed: `make phoenix` builds .venv-phoenix first")
    port = int(os.environ.get("PHOENIX_PORT", "6006"))
    workdir = Path(os.environ.get("PHOENIX_WORKING_DIR", ROOT / ".baton" / "phoenix"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"Phoenix on http://127.0.0.1:{port} (OTLP/HTTP at /v1/traces); point the mesh at it with\n"
          f"  BATON_COLLECTOR_FORWARD=http://127.0.0.1:{port} baton up", flush=True)
    env = phoenix_env(port, int(os.environ.get("PHOENIX_GRPC_PORT", "4317")), workdir)
    os.execve(str(BINARY), [str(BINARY), "serve"], env)


if __name__ == "__main__":
    main()
