"""Start one service process: `python -m shared.run <service>`.

A bad config or a missing index stops the service at once with a message that says
what to fix (exit code 2), rather than a traceback or a half-working mesh.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import sys

from shared.config import ConfigError


def run(service: str) -> None:
    logging.basicConfig(
        level=os.environ.get("BATON_LOG_LEVEL", "INFO"),
        format=f"%(asctime)s {service}[{os.getpid()}] %(levelname)s %(message)s",
    )
    try:
        import uvloop  # a faster event loop when installed

        uvloop.install()
    except ImportError:
        pass
    try:
        module = importlib.import_module(f"services.{service}.app")
    except ConfigError as exc:
        print(f"{service}: {exc}", file=sys.stderr)
        sys.exit(2)
    except StartupError as exc:
        print(f"{service}: {exc}", file=sys.stderr)
        sys.exit(2)
    asyncio.run(module.app.run())


class StartupError(RuntimeError):
    """Something a service needs is missing; the message says how to provide it."""


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m shared.run <service>")
    run(sys.argv[1])
