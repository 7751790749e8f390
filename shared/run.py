"""Start one service process: `python -m shared.run <service>`.

A bad config or a missing index stops the service at once with a message that says
what to fix (exit code 2), rather than a traceback or a half-working mesh.
"""

from __future__ import annotations

import asyncio
import gc
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
        asyncio.run(module.mesh.run())
    except (ConfigError, StartupError) as exc:
        print(f"{service}: {exc}", file=sys.stderr)
        sys.exit(2)


async def settle_memory() -> None:
    """Keep the cyclic garbage collector off what start-up built; call once started.

    Measured under load (perf on a service process): about an eighth of the CPU went
    to the collector walking the loaded models, indexes and modules, again and again,
    because every hop allocates enough to trigger it. Frozen objects are never walked;
    a higher first threshold makes the young-generation sweeps rarer.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])


GC_YOUNG_THRESHOLD = 10_000  # Python's default is 700 allocations


class StartupError(RuntimeError):
    """Something a service needs is missing; the message says how to provide it."""


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m shared.run <service>")
    run(sys.argv[1])
