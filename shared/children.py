"""Stopping child processes: ask first, kill only what does not listen."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterable


def stop(process: subprocess.Popen, grace_s: float = 10.0, sig: int = signal.SIGTERM) -> None:
    """Send `sig` (a clean shutdown) and wait up to `grace_s`; then SIGKILL."""
    stop_all([process], grace_s, sig)


def stop_all(processes: Iterable[subprocess.Popen], grace_s: float = 10.0, sig: int = signal.SIGTERM) -> None:
    """Signal every one first, so they shut down side by side within one `grace_s`."""
    processes = list(processes)
    for process in processes:
        if process.poll() is None:
            process.send_signal(sig)
    deadline = time.monotonic() + grace_s
    for process in processes:
        try:
            process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
