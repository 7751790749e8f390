"""The peer: LiteLLM's proxy (one worker) in front of the same stub model.

LiteLLM lives in its own virtualenv, bench/.venv-litellm, built from
bench/requirements-litellm.txt on first use: installing `litellm[proxy]` into the
project's venv would replace packages the mesh runs on (it pins an older `openai` and
`rich`), which would change what is being measured and break the other engineers' venv.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx

BENCH_DIR = Path(__file__).resolve().parent
VENV = BENCH_DIR / ".venv-litellm"
REQUIREMENTS = BENCH_DIR / "requirements-litellm.txt"
MODEL = "stub-model"


class PeerUnavailable(RuntimeError):
    """LiteLLM could not be installed or started; the message says exactly why."""


def litellm_binary() -> Path:
    return VENV / "bin" / "litellm"


def ensure_litellm(timeout_s: float = 900.0, log_path: Path | None = None) -> tuple[Path, float]:
    """The litellm executable, installing it first if needed; and the seconds the install took."""
    binary = litellm_binary()
    stamp = VENV / ".installed"
    if binary.exists() and stamp.exists() and stamp.read_text() == REQUIREMENTS.read_text():
        return binary, 0.0
    started = time.monotonic()
    log = open(log_path, "wb") if log_path else subprocess.DEVNULL
    try:
        if not (VENV / "bin" / "python").exists():
            base = getattr(sys, "_base_executable", None) or sys.executable
            subprocess.run([base, "-m", "venv", str(VENV)], check=True, stdout=log, stderr=log, timeout=120)
        remaining = max(30.0, timeout_s - (time.monotonic() - started))
        subprocess.run(
            [str(VENV / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check", "-r", str(REQUIREMENTS)],
            check=True,
            stdout=log,
            stderr=log,
            timeout=remaining,
        )
    except subprocess.TimeoutExpired as exc:
        raise PeerUnavailable(f"installing LiteLLM ({REQUIREMENTS.name}) did not finish within {exc.timeout:.0f}s") from None
    except (subprocess.CalledProcessError, OSError) as exc:
        tail = ""
        if log_path and log_path.exists():
            tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-8:])
        raise PeerUnavailable(f"installing LiteLLM failed ({exc}): {tail}") from None
    finally:
        if log_path:
            log.close()  # type: ignore[union-attr]
    if not binary.exists():
        raise PeerUnavailable(f"pip installed {REQUIREMENTS.name} but there is no {binary}")
    stamp.write_text(REQUIREMENTS.read_text())
    return binary, time.monotonic() - started


def litellm_version() -> str | None:
    python = VENV / "bin" / "python"
    if not python.exists():
        return None
    try:
        out = subprocess.run([str(python), "-c", "import importlib.metadata as m; print(m.version('litellm'))"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


@dataclass
class LiteLLMProxy:
    """`litellm --config ... --num_workers 1` on loopback; `stop()` ends its whole process group."""

    workdir: Path
    stub_base_url: str
    port: int
    process: subprocess.Popen | None = None
    log_path: Path = field(init=False)
    master_key: str = field(default_factory=lambda: f"sk-bench-{uuid.uuid4().hex}")

    def start(self, timeout_s: float = 120.0) -> LiteLLMProxy:
        binary, _ = ensure_litellm()
        config = self.workdir / "litellm.yaml"
        config.write_text(
            "model_list:\n"
            f"  - model_name: {MODEL}\n"
            "    litellm_params:\n"
            f"      model: openai/{MODEL}\n"
            f"      api_base: {self.stub_base_url}\n"
            "      api_key: sk-bench-not-a-real-key\n"
            "litellm_settings:\n"
            "  telemetry: false\n"
            "  drop_params: true\n"
            "general_settings:\n"
            f"  master_key: {self.master_key}\n"  # it refuses to start without one; no database: checked in memory
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "VIRTUAL_ENV", "PYTHONPATH"))}
        env.update(
            {
                "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # no network fetch of the price list at start
                "LITELLM_LOG": "ERROR",
                "LITELLM_TELEMETRY": "False",
                "DISABLE_ADMIN_UI": "True",
                "PATH": f"{VENV / 'bin'}:{env.get('PATH', '')}",
            }
        )
        self.log_path = self.workdir / "litellm.log"
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [str(binary), "--config", str(config), "--host", "127.0.0.1", "--port", str(self.port), "--num_workers", "1"],
                cwd=self.workdir,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process.poll() is not None:
                raise PeerUnavailable(f"the LiteLLM proxy exited with code {self.process.returncode} at start:\n{self.tail()}")
            try:
                with urllib.request.urlopen(f"{self.base_url}/health/liveliness", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise PeerUnavailable(f"the LiteLLM proxy did not answer within {timeout_s:.0f}s:\n{self.tail()}") from None
                time.sleep(0.25)
        return self

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def tail(self, lines: int = 12) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            # Our own process group (start_new_session): workers it forked go with it.
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(5)
        else:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)  # orphaned workers, if any
            except ProcessLookupError:
                pass
        self.process = None


class ChatLoad:
    """httpx POSTing the same chat-completions body to an OpenAI-compatible URL.

    Sharded over SHARDS AsyncClients, requests spread round-robin: httpx's connection
    pool degrades sharply with many connections in one client (measured here: 64 in
    flight on one client gave 50-200 req/s at 2-8 ms of client CPU per request; 16
    clients give ~1,000 req/s at ~0.9 ms), and the client must not be what is measured.
    """

    SHARDS = 16

    def __init__(self, url: str, body: bytes, api_key: str = "sk-bench-not-a-real-key"):
        self.url = url
        self.body = body
        self.clients = [
            httpx.AsyncClient(
                timeout=httpx.Timeout(30.0),
                limits=httpx.Limits(max_connections=16, max_keepalive_connections=16),
                headers={"Content-Type": "application/json", "Authorization": f"Bearer {api_key}"},
            )
            for _ in range(self.SHARDS)
        ]

    async def __aenter__(self) -> ChatLoad:
        return self

    async def __aexit__(self, *exc: object) -> None:
        for client in self.clients:
            await client.aclose()

    async def call(self, index: int) -> bool:
        response = await self.clients[index % self.SHARDS].post(self.url, content=self.body)
        return response.status_code == 200 and b'"choices"' in response.content
