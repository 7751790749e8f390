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


def _process(service: str) -> None:
    logging.basicConfig(
        level=os.environ.get("BATON_LOG_LEVEL", "INFO"),
        format=f"%(asctime)s {service}[{os.getpid()}] %(levelname)s %(message)s",
    )
    try:
        import uvloop  # a faster event loop when installed

        uvloop.install()
    except ImportError:
        pass


def run(service: str) -> None:
    _process(service)
    try:
        module = importlib.import_module(f"services.{service}.app")
        asyncio.run(module.mesh.run())
    except (ConfigError, StartupError) as exc:
        print(f"{service}: {exc}", file=sys.stderr)
        sys.exit(2)


def step_of(target: str, step_name: str | None = None):
    """The one @step registered by `target` (a .py file or a module name); StartupError otherwise."""
    from shared.steps import steps_of

    module = _import(target)
    registered = steps_of(module.__name__)
    found = [spec for spec in registered if step_name in (None, spec.name)]
    if len(found) != 1:
        names = [spec.name for spec in registered]
        what = "no step" if not names else f"several steps {names}; pick one with --step"
        raise StartupError(f"{target}: {what}{' named ' + repr(step_name) if step_name else ''} registered with @step(...)")
    return found[0]


def serve(target: str, step_name: str | None = None) -> None:
    """Run the custom step in `target` (a .py file or a module name) as its service:
    `baton serve examples/agent_step.py`. The config must declare it under `steps:`."""
    from shared.config import load_config
    from shared.mesh import Mesh
    from shared.settings import settings
    from shared.steps import runner

    try:
        spec = step_of(target, step_name)
        config = load_config(settings().config)
        service = config.custom_steps.get(spec.name)
        if service is None:
            raise StartupError(f"step {spec.name!r} is not declared in {settings().config}: add `steps: {{{spec.name}: {{service: {spec.name}}}}}`")
    except (ConfigError, StartupError) as exc:
        print(f"baton serve: {exc}", file=sys.stderr)
        sys.exit(2)
    _process(service)
    mesh = Mesh(service)
    mesh.step_handler(runner(spec))
    try:
        asyncio.run(mesh.run())
    except (ConfigError, StartupError) as exc:
        print(f"{service}: {exc}", file=sys.stderr)
        sys.exit(2)


def _import(target: str):
    """A module from a file path or a dotted name."""
    import importlib.util
    from pathlib import Path

    path = Path(target)
    if path.suffix == ".py":
        if not path.is_file():
            raise StartupError(f"no such file: {target}")
        name = path.stem
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        return module
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as exc:
        raise StartupError(f"cannot import {target!r}: {exc}") from None


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
