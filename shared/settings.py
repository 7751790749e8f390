"""Settings from the environment (prefix BATON_). Secrets are SecretStr: never logged."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_NATS_PORT = 4222  # where `baton up` starts NATS unless told --nats-port


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BATON_", extra="ignore")

    nats_url: str = Field(default=f"nats://127.0.0.1:{DEFAULT_NATS_PORT}", validation_alias="NATS_URL")
    # Each service connects as its own NATS user when these are set (deploy/nats holds the users).
    nats_user: str | None = Field(default=None, validation_alias="NATS_USER")
    nats_password: SecretStr | None = Field(default=None, validation_alias="NATS_PASSWORD")
    # The key the router seals envelopes with and the services check them by (shared/envelopes.py);
    # `baton up` makes a fresh one per mesh. Unset: envelopes are not sealed (NATS users alone
    # keep clients off the step subjects).
    envelope_key: SecretStr | None = None
    stream_replicas: int = 1  # 3 on a 3-node cluster: the stream and buckets survive a node
    provision: bool = True  # create the stream, consumers and buckets at start (needs admin rights)
    config: Path = ROOT / "shared" / "default_config.yaml"
    index_dir: Path = ROOT / ".baton" / "index"
    state_dir: Path = ROOT / ".baton"
    results_ttl_s: float = 24 * 3600
    session_ttl_s: float = 3600
    dead_letter_ttl_s: float = 7 * 24 * 3600
    cache_ttl_s: float = 24 * 3600  # the bucket's upper bound; each route sets its own TTL
    # Chaos rehearsal only: "<service>:<text>" makes that service exit hard on a request
    # whose question contains the text, to prove crashes end in a reply. Off when empty.
    chaos_crash_on: str = ""
    ack_wait_s: float = 30.0  # a hop not acked in this time is redelivered
    max_deliver: int = 10  # with backed-off redelivery: rides out about a minute of NATS trouble
    max_workers: int = 64  # messages one replica works on at once (model calls wait on I/O)
    max_request_bytes: int = 256 * 1024
    default_timeout_s: float = 30.0
    openai_api_key: SecretStr | None = Field(default=None, validation_alias="OPENAI_API_KEY")
    openai_base_url: str | None = Field(default=None, validation_alias="OPENAI_BASE_URL")

    @model_validator(mode="after")
    def _find_running_mesh(self) -> "Settings":
        """Without NATS_URL, the mesh `baton up` started (its state folder says where)."""
        if "nats_url" not in self.model_fields_set:
            from shared.mesh_file import read_mesh_file

            self.nats_url = read_mesh_file(self.state_dir).get("nats_url") or self.nats_url
        return self


    @model_validator(mode="after")
    def _local_mesh_credentials(self) -> Settings:
        """Without NATS_USER, the CLI's user of the mesh `baton up` runs from this state folder
        (its credentials.json), unless NATS_URL names another server."""
        if self.nats_user is None:
            user, password = local_credentials(self.state_dir, self.nats_url if "NATS_URL" in os.environ else None)
            if user:
                self.nats_user, self.nats_password = user, SecretStr(password)
        return self


def local_credentials(state_dir: Path, nats_url: str | None = None, user: str | None = None) -> tuple[str | None, str]:
    """(user, password) from `baton up`'s credentials.json: its CLI client, or `user` (e.g. admin).
    Nothing when there is no such file, or it belongs to a mesh at another `nats_url`."""
    from shared.natsd import read_credentials

    found = read_credentials(state_dir)
    if not found or (nats_url is not None and nats_url != found.get("nats_url")):
        return None, ""
    name = user or found.get("client")
    password = found.get("users", {}).get(name)
    return (name, password) if password else (None, "")


@lru_cache
def settings() -> Settings:
    return Settings()


def server_list(url: str) -> list[str]:
    """NATS_URL may name every node of a cluster, separated by commas."""
    return [part.strip() for part in url.split(",") if part.strip()]


def nats_credentials(config: Settings) -> dict[str, str]:
    """Connect options for the configured NATS user, if any."""
    if not config.nats_user:
        return {}
    password = config.nats_password.get_secret_value() if config.nats_password else ""
    return {"user": config.nats_user, "password": password}
