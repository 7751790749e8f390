"""Baton's NATS users and their permissions: the one table, and the files made from it.

    python deploy/nats/generate_auth.py          # rewrite auth.conf and the Helm values
    python deploy/nats/generate_auth.py --check  # exit 1 when a generated file is stale
    python deploy/nats/generate_auth.py --config my-config.yaml  # + a user per service of its own steps

Everything is named from `shared/subjects.py`, so a renamed stream, consumer or bucket
changes the permissions with it. The tests import `USERS` and check the running server
against it, subject by subject (tests/integration/test_nats_auth.py).

Least privilege, per role (every subject below was needed by a real run of the code;
see deploy/README.md for how each was found):

- admin: the whole JetStream API ($JS.API.>), writing the live config bucket, and
  replies under its own inbox prefix. Only the provisioning job and operators use it.
- a service: its own durable pull consumer (INFO, MSG.NEXT, ACKs), publishing the next
  hop to any step subject (the slip decides which), the results bucket (read any key + create),
  the live config bucket (read + watch), replies to any client's reply inbox, and its
  own inbox prefix `_INBOX.<service>`. Services that can end a request also read and
  write the sessions, cache and budgets buckets; the router reads sessions and
  cache (and writes the semantic index to the cache bucket); the guardrail and the
  generator share circuit breakers (KV); the generator also stores shadow answers and
  sends streamed chunks; the fallback also handles the max-deliveries advisory (reads
  and deletes the exhausted hop). Every service writes the dead-letter bucket (a poison
  message is terminated at once and kept there); every service but the router tells the
  router which requests it finished (`baton.v1.finished`: the per-client limit).
  No service may publish a request (that would be impersonating a client), and no
  service may create, change or delete streams, consumers or buckets.
- a client: publish its own request subject, receive under `_INBOX.<client>`, read its
  own stored Replies (keys `<client>.<request id>`, by direct get only). Nothing else:
  no other client's inbox or Replies, no step subject, no KV write.
  The HTTP gateway is such a client (id "gateway") that also follows the live config.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from shared import subjects  # noqa: E402
from shared.config import STEP_SERVICES  # noqa: E402

ACCOUNT = "BATON"  # one account for the mesh; KEDA's `account` is this name
AUTH_CONF = HERE / "auth.conf"
DEV_ENV = HERE / "dev.env"
HELM_VALUES = ROOT / "deploy" / "helm" / "nats-values.yaml"
K8S_DEV_ENV = ROOT / "deploy" / "k8s" / "overlays" / "dev" / "nats-users.env"  # the dev Secret's source
HELM_SECRET = "baton-nats-users"  # the Kubernetes Secret holding every password (deploy/k8s)

# The example clients. A real deployment adds one line per client here.
CLIENTS = ("client-acme", "client-globex")
# The HTTP gateway (services/gateway) is a Baton client too: client id "gateway"
# (BATON_GATEWAY_CLIENT_ID), and it follows the live config like the services.
GATEWAY = "gateway"
# The client the `baton` CLI (and a BatonClient on the same machine) connects as to a mesh
# `baton up` started: its credentials are in the state folder (credentials.json).
LOCAL_CLIENT = "cli"

STREAM = subjects.STREAM
RESULTS = subjects.RESULTS_BUCKET
SESSIONS = subjects.SESSIONS_BUCKET
CONFIG = subjects.CONFIG_BUCKET
BREAKERS = subjects.BREAKERS_BUCKET
DEAD_LETTERS = subjects.DEAD_LETTERS_BUCKET
CACHE = subjects.CACHE_BUCKET
BUDGETS = subjects.BUDGETS_BUCKET
SHADOW = subjects.SHADOW_BUCKET

# Where a hop may go next: every service a slip step can name, plus the fallback.
STEP_TARGETS = tuple(sorted({*STEP_SERVICES.values(), "fallback"}))


def kv_stream(bucket: str) -> str:
    return f"KV_{bucket}"


def kv_read(bucket: str) -> list[str]:
    """Read a KV bucket: bind to it (stream info) and get a key.

    nats-py reads with STREAM.MSG.GET unless the bucket's stream allows direct gets, in
    which case it (and the Go client and the nats CLI) use DIRECT.GET with the key in
    the subject. Both are listed so the table works either way.
    """
    stream = kv_stream(bucket)
    return [
        f"$JS.API.STREAM.INFO.{stream}",
        f"$JS.API.STREAM.MSG.GET.{stream}",
        f"$JS.API.DIRECT.GET.{stream}.$KV.{bucket}.>",
    ]


def results_read(client: str | None = None) -> list[str]:
    """Read stored Replies: those of one client (its own keys), or every one (a service).

    The results bucket allows direct gets and Replies are keyed `<client>.<request id>`
    (shared/subjects.py result_key), so a DIRECT.GET with the key in the subject is the
    only way in, and the permission can name the client's own keys. Deliberately absent:
    STREAM.MSG.GET (a get by sequence or by any subject, the subject inside the request
    body where no permission can see it) and the bare `DIRECT.GET.KV_baton_results`
    (the same, in the direct form). A client reads without binding to the bucket
    (baton/client.py result()), so it gets no STREAM.INFO either: that would list every
    stored key. Services bind (FastStream's key_value) and keep it.
    """
    stream = kv_stream(RESULTS)
    if client:
        return [f"$JS.API.DIRECT.GET.{stream}.$KV.{RESULTS}.{client}.>"]
    return [f"$JS.API.STREAM.INFO.{stream}", f"$JS.API.DIRECT.GET.{stream}.$KV.{RESULTS}.>"]


def kv_watch(bucket: str) -> list[str]:
    """Watch keys of a bucket: an ordered push consumer the client creates and owns.

    nats-py creates it without a name (CONSUMER.CREATE.<stream>), asks for its info and
    answers the server's flow-control messages ($JS.FC). Clients that name the consumer
    (Go, the nats CLI) put the name and the filter in the subject: that form is allowed
    only with a filter inside the bucket. The server deletes it after inactivity.
    """
    stream = kv_stream(bucket)
    return [
        f"$JS.API.CONSUMER.CREATE.{stream}",
        f"$JS.API.CONSUMER.CREATE.{stream}.*.$KV.{bucket}.>",
        f"$JS.API.CONSUMER.INFO.{stream}.*",
        f"$JS.FC.{stream}.>",
    ]


def kv_write(bucket: str) -> list[str]:
    """Put/create keys: a publish to $KV.<bucket>.<key>, answered by a PubAck."""
    return [f"$KV.{bucket}.>"]


def pull_consumer(durable: str) -> list[str]:
    """Bind to an existing durable pull consumer, fetch from it, ack/nak/in-progress."""
    return [
        f"$JS.API.CONSUMER.INFO.{STREAM}.{durable}",
        f"$JS.API.CONSUMER.MSG.NEXT.{STREAM}.{durable}",
        f"$JS.ACK.{STREAM}.{durable}.>",
    ]


def own_inbox(name: str) -> str:
    """Replies (PubAcks, JetStream API answers, pulled messages) land under here."""
    return f"{subjects.inbox_prefix(name)}.>"


# Any client's reply inbox: `_INBOX.<client>.reply.<request id>` (request ids have no dots),
# and where streamed partial text goes: `_INBOX.<client>.chunk.<request id>`.
ANY_CLIENT_REPLY = "_INBOX.*.reply.*"
ANY_CLIENT_CHUNK = "_INBOX.*.chunk.*"

# Services that can end a request (Mesh.finish: the last step of a slip, or the
# fallback) record the session turn, fill the answer cache and add the cost to the
# tenant's daily budget. The router never finishes: it reads the session history and
# the cache (a hit is answered at once), indexes questions for the semantic cache, and
# stores error Replies.
FINISHERS = frozenset(subjects.SERVICES) - {"router"}
FINISHER_BUCKETS = (SESSIONS, CACHE, BUDGETS)
ROUTER_READS = (SESSIONS, CACHE)


def extra_for(name: str) -> tuple[list[str], list[str]]:
    """What one service needs beyond every service's share: (publish, subscribe)."""
    if name == "router":
        # The semantic cache's index of questions lives in the cache bucket, one key per
        # question: the router adds each new one and watches the others'. The services
        # tell it which requests they finished: each ends a request its client had in
        # flight (the per-client limit, shared/fairness.py).
        return [*(p for bucket in ROUTER_READS for p in kv_read(bucket)), *kv_write(CACHE), *kv_watch(CACHE)], [subjects.FINISHED]
    if name == "guardrail":
        # The judge layer's circuit breakers, shared with the generator's in one bucket.
        return [*kv_read(BREAKERS), *kv_watch(BREAKERS), *kv_write(BREAKERS)], []
    if name == "generator":
        # Circuit breakers shared by the replicas: watch all keys, compare-and-set writes;
        # shadow answers stored for comparison (write only); the tenant's budget is read
        # before a call (the finisher share below). Only the generator streams partial
        # text (chunk_sender) to a client's inbox.
        return [
            *kv_read(BREAKERS),
            *kv_watch(BREAKERS),
            *kv_write(BREAKERS),
            f"$JS.API.STREAM.INFO.{kv_stream(SHADOW)}",
            *kv_write(SHADOW),
            ANY_CLIENT_CHUNK,
        ], []
    if name == "fallback":
        # The max-deliveries advisory (a queue group of the fallback replicas): fetch the
        # exhausted hop by sequence, keep it as a dead letter, delete it from the stream.
        return [
            f"$JS.API.STREAM.MSG.GET.{STREAM}",
            f"$JS.API.STREAM.MSG.DELETE.{STREAM}",
        ], [subjects.MAX_DELIVERIES_ADVISORY]
    return [], []


@dataclass(frozen=True)
class User:
    name: str
    role: str  # admin | service | client
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    why: str = ""
    password_env: str = field(default="")

    @property
    def password_var(self) -> str:
        """The environment variable nats-server reads this user's password from."""
        return self.password_env or "BATON_" + self.name.upper().replace("-", "_") + "_PASSWORD"

    @property
    def inbox_prefix(self) -> str:
        return subjects.inbox_prefix(self.name)


def admin() -> User:
    return User(
        name="admin",
        role="admin",
        # The whole JetStream API, plus writing the live config (`baton config apply`,
        # deploy/provision.py --apply-config): changing routing is an operator's act.
        publish=("$JS.API.>", *kv_write(CONFIG)),
        subscribe=(own_inbox("admin"),),
        why="provisions the stream, the consumers and the buckets; applies the live config",
    )


def service(name: str, custom: tuple[str, ...] = ()) -> User:
    """A service's user; `custom`: the services of the config's own steps (`steps:`), which
    any hop may forward to and which may finish a request like a built-in."""
    durable = subjects.durable(name)
    publish = [
        *pull_consumer(durable),
        *(subjects.step(target) for target in (*STEP_TARGETS, *custom)),
        *results_read(),
        *kv_write(RESULTS),
        *(p for bucket in FINISHER_BUCKETS for p in (*kv_read(bucket), *kv_write(bucket)) if name in FINISHERS or name in custom),
        *kv_read(CONFIG),
        *kv_watch(CONFIG),
        ANY_CLIENT_REPLY,
        # Tell the router which requests this service finished (its per-client limit).
        *((subjects.FINISHED,) if name != "router" else ()),
        # A message no delivery could ever handle (a poison message) is terminated and kept here.
        f"$JS.API.STREAM.INFO.{kv_stream(DEAD_LETTERS)}",
        *kv_write(DEAD_LETTERS),
    ]
    extra_publish, extra_subscribe = extra_for(name)
    return User(
        name=name,
        role="service",
        publish=tuple(dict.fromkeys([*publish, *extra_publish])),
        # A new consumer leader in a cluster means this replica's pulls are gone: pull again at once.
        subscribe=(own_inbox(name), subjects.leader_elected(durable), *extra_subscribe),
        why=f"pulls from {STREAM}/{durable}, forwards hops, stores and sends Replies, follows the live config",
    )


def client(name: str) -> User:
    return User(
        name=name,
        role="client",
        publish=(subjects.request(name), *results_read(name)),
        subscribe=(own_inbox(name),),
        why="publishes its own requests, receives its replies and chunks, reads its own stored Replies",
    )


def gateway() -> User:
    base = client(GATEWAY)
    return User(
        name=GATEWAY,
        role="client",
        publish=(*base.publish, *kv_read(CONFIG), *kv_watch(CONFIG)),
        subscribe=base.subscribe,
        why="the HTTP gateway: a client that also follows the live config for its model list",
    )


def mesh_users(custom: tuple[str, ...] = ()) -> dict[str, User]:
    """The table: the admin, every service (the built-ins and `custom`, the services of the
    config's own steps), the gateway and the known clients."""
    services = (*subjects.SERVICES, *(c for c in custom if c not in subjects.SERVICES))
    return {u.name: u for u in (admin(), *(service(s, custom) for s in services), gateway(), *(client(c) for c in CLIENTS))}


def local_users(clients: tuple[str, ...] = (), steps: tuple[str, ...] = ()) -> dict[str, User]:
    """The users of a mesh `baton up` runs: the table's (with the config's own step services),
    the CLI's client and any clients asked for."""
    users = mesh_users(steps)
    extra = [client(name) for name in (LOCAL_CLIENT, *clients) if name not in users]
    return {**users, **{u.name: u for u in extra}}


USERS: dict[str, User] = mesh_users()

# Development passwords: compose and the tests use these; production sets the same
# variables from a secret store (deploy/k8s: the baton-nats-users Secret).
DEV_PASSWORDS = {u.password_var: f"dev-{u.name}-password" for u in USERS.values()}


# -- subject matching, as nats-server does it (for the tests and `--explain`) ---------


def matches(pattern: str, subject: str) -> bool:
    """True when `subject` (literal, or a subscription with wildcards) falls under `pattern`.

    For a wildcard subscription the server asks whether the whole subscription is a
    subset of the allowed pattern: `*` in the subscription only fits `*` or `>` in the
    pattern, `>` only fits `>`.
    """
    p, s = pattern.split("."), subject.split(".")
    for i, token in enumerate(p):
        if token == ">":
            return len(s) > i
        if i >= len(s):
            return False
        if token == "*":
            if s[i] == ">":
                return False
            continue
        if token != s[i]:
            return False
    return len(p) == len(s)


def allowed(user: User, action: str, subject: str) -> bool:
    patterns = user.publish if action == "pub" else user.subscribe
    return any(matches(p, subject) for p in patterns)


# -- rendering ---------------------------------------------------------------------------

HEADER = "# GENERATED by deploy/nats/generate_auth.py from its USERS table; do not edit by hand.\n"


def _quote_list(items: tuple[str, ...], indent: str) -> str:
    return "[\n" + "".join(f'{indent}  "{item}"\n' for item in items) + f"{indent}]"


def render_auth_conf(users: dict[str, User] | None = None, passwords: dict[str, str] | None = None) -> str:
    """The accounts block; passwords from the server's environment, or written in (`passwords`,
    for the file `baton up` keeps private in its state folder)."""
    users = USERS if users is None else users
    lines = [
        HEADER.rstrip("\n"),
        "#",
        "# Included by single.conf and cluster/node-*.conf. Every password comes from an",
        "# environment variable of the nats-server process (dev values: dev.env).",
        "# One account for the mesh; anonymous connections are refused.",
        "",
        "accounts {",
        f"  {ACCOUNT} {{",
        "    jetstream: enabled",
        "    users: [",
    ]
    for user in users.values():
        ind = "        "
        password = f'"{passwords[user.name]}"' if passwords else f"${user.password_var}"
        lines += [
            f"      # {user.name} ({user.role}): {user.why}",
            "      {",
            f"        user: \"{user.name}\"",
            f"        password: {password}",
            "        permissions: {",
            f"          publish: {{ allow: {_quote_list(user.publish, ind + '  ')} }}",
            f"          subscribe: {{ allow: {_quote_list(user.subscribe, ind + '  ')} }}",
            "        }",
            "      }",
        ]
    lines += ["    ]", "  }", "}", ""]
    return "\n".join(lines)


def render_dev_env(users: dict[str, User] | None = None) -> str:
    users = USERS if users is None else users
    head = [
        "# GENERATED by deploy/nats/generate_auth.py. DEVELOPMENT passwords only: compose",
        "# and the tests use them. Never use them anywhere reachable from outside.",
    ]
    return "\n".join([*head, *(f"{u.password_var}=dev-{u.name}-password" for u in users.values()), ""])


def render_helm_values(table: dict[str, User] | None = None) -> str:
    """Values for the official NATS chart (1.x): 3-node JetStream cluster + the same users."""
    import yaml

    table = USERS if table is None else table
    users = []
    for user in table.values():
        users.append(
            {
                "user": user.name,
                # The chart writes `<< $VAR >>` unquoted: a variable nats-server resolves
                # from the container environment (container.env below).
                "password": f"<< ${user.password_var} >>",
                "permissions": {"publish": {"allow": list(user.publish)}, "subscribe": {"allow": list(user.subscribe)}},
            }
        )
    env = {
        user.password_var: {"valueFrom": {"secretKeyRef": {"name": HELM_SECRET, "key": user.password_var}}}
        for user in table.values()
    }
    env["GOMEMLIMIT"] = "900MiB"  # ~90% of the memory limit below; Go units
    values = {
        "config": {
            "cluster": {"enabled": True, "replicas": 3},
            "jetstream": {
                "enabled": True,
                "fileStore": {"enabled": True, "dir": "/data", "pvc": {"enabled": True, "size": "10Gi"}},
                "memoryStore": {"enabled": False},
            },
            # /jsz on 8222 is what KEDA's nats-jetstream scaler reads (deploy/k8s/keda).
            "monitor": {"enabled": True, "port": 8222},
            "merge": {
                "max_payload": "<< 1MB >>",
                "accounts": {ACCOUNT: {"jetstream": "enabled", "users": users}},
            },
        },
        "container": {
            "env": env,
            "merge": {"resources": {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"memory": "1Gi"}}},
        },
        "podTemplate": {
            "topologySpreadConstraints": {
                "kubernetes.io/hostname": {"maxSkew": 1, "whenUnsatisfiable": "DoNotSchedule"},
            },
        },
        "natsBox": {"enabled": False},  # it would need its own user; use `nats --user admin` instead
    }
    head = (
        HEADER
        + "#\n"
        + "# Values for the official NATS Helm chart (nats/nats, 1.x): a 3-node JetStream cluster\n"
        + "# with file storage and the users of deploy/nats/auth.conf.\n"
        + "#   helm repo add nats <the chart repository named in the NATS docs>\n"
        + "#   helm install nats nats/nats -n baton -f deploy/helm/nats-values.yaml\n"
        + f"# The passwords come from the Secret `{HELM_SECRET}` (one key per variable; the dev\n"
        + "# overlay of deploy/k8s generates it, in prod create it yourself); the pods wait for it.\n"
        + "# Untested here: no Kubernetes on the machine this was written on.\n"
    )
    return head + yaml.safe_dump(values, sort_keys=False, width=120)


OUTPUTS = {AUTH_CONF: render_auth_conf, DEV_ENV: render_dev_env, K8S_DEV_ENV: render_dev_env, HELM_VALUES: render_helm_values}


def stale(users: dict[str, User] | None = None) -> list[Path]:
    return [path for path, render in OUTPUTS.items() if not path.exists() or path.read_text() != render(users)]


def users_of(config: Path | None) -> dict[str, User]:
    """The table, with a user for each service of the config's own steps (`steps:`)."""
    if config is None:
        return USERS
    from shared.config import ConfigError, load_config

    try:
        custom = tuple(dict.fromkeys(load_config(config).custom_steps.values()))
    except ConfigError as exc:
        raise SystemExit(f"generate_auth: {exc}") from None
    return mesh_users(custom)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a generated file is out of date")
    parser.add_argument("--config", type=Path, help="a mesh config whose own steps (`steps:`) get their NATS users too")
    args = parser.parse_args(argv)
    users = users_of(args.config)
    again = "python deploy/nats/generate_auth.py" + (f" --config {args.config}" if args.config else "")
    if args.check:
        old = stale(users)
        for path in old:
            print(f"stale: {path.relative_to(ROOT)} (run {again})")
        return 1 if old else 0
    for path, render in OUTPUTS.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(render(users))
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
