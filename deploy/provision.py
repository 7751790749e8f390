"""Provision Baton's JetStream objects as the NATS admin user, then exit.

    NATS_URL=nats://nats:4222 NATS_USER=admin NATS_PASSWORD=... python deploy/provision.py
    python deploy/provision.py --replicas 3            # a 3-node cluster
    python deploy/provision.py --no-apply-config      # leave the live config alone

Creates (or updates) the BATON stream, one durable pull consumer per service and the
KV buckets (shared/provision.py), turns on direct gets for buckets an older version
created without them (the users' read permissions need them), and, unless told not to,
stores the config file (BATON_CONFIG) as the active live config. The services run with BATON_PROVISION=false
and least-privilege users that cannot do any of this themselves.

Compose runs it as a one-shot service; Kubernetes as a Job (deploy/k8s/base).
Exit codes: 0 done, 1 NATS unreachable or refused, 2 bad config file.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

import nats  # noqa: E402

from shared import subjects  # noqa: E402
from shared.provision import buckets, provision  # noqa: E402
from shared.settings import Settings, nats_credentials  # noqa: E402


def servers(url: str) -> list[str]:
    """NATS_URL may name every node of a cluster, separated by commas."""
    return [part.strip() for part in url.split(",") if part.strip()]


async def connect(settings: Settings, wait_s: float, refusals: list[str]) -> nats.NATS:
    """Connect as the configured user, retrying while the server is still starting."""
    user = settings.nats_user or "admin"
    deadline = time.monotonic() + wait_s

    async def on_error(exc: Exception) -> None:
        if "permissions violation" in str(exc).lower():
            refusals.append(str(exc))  # this user is not the admin

    while True:
        try:
            # nats-py retries an unreachable server forever on the first connect, even
            # without reconnects: bound each attempt here instead.
            return await asyncio.wait_for(
                nats.connect(
                    servers(settings.nats_url),
                    # The admin may only receive under its own inbox prefix (deploy/nats/auth.conf).
                    inbox_prefix=subjects.inbox_prefix(user).encode(),
                    allow_reconnect=False,
                    connect_timeout=3,
                    error_cb=on_error,
                    **nats_credentials(settings),
                ),
                timeout=5,
            )
        except Exception as exc:  # noqa: BLE001 - any failure to connect is retried until the deadline
            if time.monotonic() > deadline:
                raise SystemExit(f"provision: cannot connect to {settings.nats_url} as {user}: {exc}") from exc
            print(f"provision: waiting for NATS at {settings.nats_url} ({type(exc).__name__})", flush=True)
            await asyncio.sleep(2)


async def allow_direct_gets(js, settings: Settings) -> list[str]:
    """Turn on direct gets for buckets created before Baton created them that way.

    shared/provision.py creates new buckets with direct gets but leaves existing ones as
    they are. The NATS users of deploy/nats read stored Replies only by direct get (the
    key in the subject is what scopes a client to its own Replies), and nats-py reads a
    bucket without direct gets by STREAM.MSG.GET, which on the results bucket only the
    admin may use: so a results bucket from an older deployment is switched here (and
    the other buckets with it). A service keeps the binding FastStream cached before
    the switch until it restarts.
    """
    switched = []
    for bucket, _ in buckets(settings):
        info = await js.stream_info(f"KV_{bucket}")
        if not info.config.allow_direct:
            info.config.allow_direct = True
            await js.update_stream(info.config)
            switched.append(bucket)
    return switched


async def apply_config(js, path: Path) -> str | None:
    try:
        from shared.live_config import publish_config
    except ImportError:  # a build without live configuration: nothing to store
        return None
    bucket = getattr(subjects, "CONFIG_BUCKET", None)
    if bucket is None:
        return None
    from shared.config import ConfigError

    try:
        config = await publish_config(await js.key_value(bucket), path.read_text(), str(path))
    except (OSError, ConfigError) as exc:
        print(f"provision: config {path} not applied: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc
    return config.digest


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Provision Baton's stream, consumers and buckets.")
    parser.add_argument("--replicas", type=int, default=None,
                        help="stream and bucket replicas (3 on a 3-node cluster); default BATON_STREAM_REPLICAS or 1")
    parser.add_argument("--wait", type=float, default=float(os.environ.get("BATON_PROVISION_WAIT_S", "120")),
                        help="seconds to wait for the server to come up")
    parser.add_argument("--apply-config", action=argparse.BooleanOptionalAction, default=True,
                        help="store BATON_CONFIG as the active live config (default: yes)")
    args = parser.parse_args(argv)

    settings = Settings()
    refusals: list[str] = []
    nc = await connect(settings, args.wait, refusals)
    try:
        js = nc.jetstream(timeout=10)
        try:
            await provision(js, settings, replicas=args.replicas)
            switched = await allow_direct_gets(js, settings)
        except nats.errors.Error as exc:
            why = refusals[0] if refusals else f"{type(exc).__name__}: {exc}"
            print(f"provision: refused ({why}); NATS_USER must be the admin user of deploy/nats/auth.conf", file=sys.stderr)
            return 1
        replicas = args.replicas or getattr(settings, "stream_replicas", 1)
        print(f"provision: stream {subjects.STREAM}, consumers {', '.join(subjects.SERVICES)}, "
              f"replicas {replicas}: ready", flush=True)
        if switched:
            print(f"provision: direct gets turned on for existing buckets {', '.join(switched)}", flush=True)
        if args.apply_config:
            digest = await apply_config(js, settings.config)
            if digest:
                print(f"provision: live config {digest} from {settings.config} is active", flush=True)
    finally:
        await nc.close()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
