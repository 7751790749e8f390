"""Live configuration: one active config in a KV bucket, watched by every replica.

`baton config apply FILE` validates a file and stores it as a version (`v.<digest>`)
and as `active`. Each replica adopts a new active version without a restart; a
request keeps the version it started with (its envelope names the digest), so a
replica asked about an older version fetches that version instead of guessing.
An invalid value in the bucket is refused and the running version stays.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from contextlib import suppress

from nats.js.errors import NotFoundError
from nats.js.kv import KeyValue

from shared.config import ConfigError, MeshConfig, parse_config
from shared.watching import Follower

log = logging.getLogger("baton.config")

ACTIVE = "active"
KEEP_VERSIONS = 16  # requests in flight rarely span more than a couple of versions


def version_key(digest: str) -> str:
    return f"v.{digest}"


async def publish_config(kv: KeyValue, text: str, source: str) -> MeshConfig:
    """Validate `text` and make it the active version. Raises ConfigError, storing nothing."""
    config = parse_config(text, source)
    await kv.put(version_key(config.digest), text.encode())
    await kv.put(ACTIVE, text.encode())
    return config


class ConfigStore:
    def __init__(self, initial: MeshConfig):
        self.current = initial
        self._versions: OrderedDict[str, MeshConfig] = OrderedDict()
        self._remember(initial)
        self._kv: KeyValue | None = None
        self._follower = Follower("live-config")

    async def attach(self, kv: KeyValue) -> None:
        """Adopt the bucket's active version now and every later one as it is applied."""
        self._kv = kv
        with suppress(NotFoundError):
            entry = await kv.get(ACTIVE)
            if entry.value:
                self._adopt(entry.value.decode())
        await self._follower.start(kv, ACTIVE, self._entry)

    async def detach(self) -> None:
        await self._follower.stop()

    def _entry(self, entry: KeyValue.Entry) -> None:
        if entry.value:
            self._adopt(entry.value.decode())

    def _adopt(self, text: str) -> None:
        try:
            config = parse_config(text, f"KV {ACTIVE}")
        except ConfigError as exc:
            log.error("refused a new active config; keeping version %s:\n%s", self.current.digest, exc)
            return
        if config.digest != self.current.digest:
            log.info("config version %s is now active (was %s)", config.digest, self.current.digest)
        self._remember(config)
        self.current = config

    def _remember(self, config: MeshConfig) -> None:
        self._versions[config.digest] = config
        self._versions.move_to_end(config.digest)
        while len(self._versions) > KEEP_VERSIONS:
            self._versions.popitem(last=False)

    async def get(self, digest: str) -> MeshConfig:
        """The config a request started with."""
        known = self._versions.get(digest)
        if known is not None:
            return known
        if self._kv is not None and digest:
            with suppress(NotFoundError):
                entry = await self._kv.get(version_key(digest))
                if entry.value:
                    config = parse_config(entry.value.decode(), version_key(digest))
                    self._remember(config)
                    return config
        log.warning("config version %r is unknown here; using the active version %s", digest, self.current.digest)
        return self.current
