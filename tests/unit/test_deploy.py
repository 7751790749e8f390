"""Structural checks of deploy/: what can be checked on a machine without Docker or Kubernetes.

Every YAML parses; the NATS configs pass `nats-server -t`; the generated files match the
permission table; every service has its Deployment (probes, resources, non-root,
read-only root), its compose service and its ScaledObject, all naming the users,
durables and Secrets that exist; overlay patches hit resources of the base. When the
`kubernetes-validate` package is installed, every manifest (and each overlay, built by a
small kustomize stand-in) is validated against the Kubernetes JSON schemas.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from shared import subjects
from shared.natsd import find_binary
from shared.settings import ROOT

DEPLOY = ROOT / "deploy"
NATS_DIR = DEPLOY / "nats"
K8S = DEPLOY / "k8s"
BASE = K8S / "base"
KEDA = K8S / "keda"
OVERLAYS = {name: K8S / "overlays" / name for name in ("dev", "prod")}
SERVICES = list(subjects.SERVICES)


def _load_auth():
    spec = importlib.util.spec_from_file_location("baton_generate_auth", NATS_DIR / "generate_auth.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


auth = _load_auth()


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def kustomization(folder: Path) -> dict:
    return yaml.safe_load((folder / "kustomization.yaml").read_text())


def resources_of(folder: Path) -> list[dict]:
    """Every object of a kustomization's plain resource files (not other kustomizations)."""
    out = []
    for entry in kustomization(folder).get("resources", []):
        path = (folder / entry).resolve()
        if path.is_file():
            out += docs(path)
    return out


def base_objects() -> dict[tuple[str, str], dict]:
    return {(d["kind"], d["metadata"]["name"]): d for d in resources_of(BASE)}


def deployment(name: str) -> dict:
    return base_objects()[("Deployment", name)]


def container(obj: dict) -> dict:
    [c] = obj["spec"]["template"]["spec"]["containers"]
    return c


def env_of(c: dict) -> dict[str, dict]:
    return {e["name"]: e for e in c.get("env", [])}


# -- every file parses ------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(DEPLOY.rglob("*.yaml")), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_yaml_file_parses(path):
    assert docs(path), f"{path} is empty"


def test_generated_files_match_the_permission_table():
    assert auth.stale() == [], "run: python deploy/nats/generate_auth.py"


def test_a_config_with_its_own_step_gets_that_steps_user_in_every_generated_file(tmp_path, capsys):
    config = yaml.safe_load((ROOT / "shared" / "default_config.yaml").read_text())
    config["steps"] = {"agent": {"service": "agent"}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    users = auth.users_of(path)
    agent = users["agent"]
    assert auth.allowed(agent, "pub", f"$JS.API.CONSUMER.MSG.NEXT.{subjects.STREAM}.{subjects.durable('agent')}")
    assert auth.allowed(users["router"], "pub", subjects.step("agent")), "the hop before it must reach it"
    assert not auth.allowed(agent, "pub", subjects.request("client-acme"))
    for path_, render in auth.OUTPUTS.items():
        assert "BATON_AGENT_PASSWORD" in render(users), path_
    # The shipped files are the default config's: for this config they are stale, and it says how to fix that.
    assert auth.main(["--check", "--config", str(path)]) == 1
    assert f"--config {path}" in capsys.readouterr().out


def test_a_broken_config_for_the_table_is_a_sentence_not_a_traceback(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("routes: [")
    with pytest.raises(SystemExit) as stop:
        auth.users_of(path)
    assert str(stop.value).startswith("generate_auth: ")


# -- the NATS users ----------------------------------------------------------------------------


def test_the_auth_table_has_the_admin_every_service_the_gateway_and_the_clients():
    assert set(auth.USERS) == {"admin", *SERVICES, auth.GATEWAY, *auth.CLIENTS}
    assert len({u.password_var for u in auth.USERS.values()}) == len(auth.USERS)
    assert set(auth.DEV_PASSWORDS) == {u.password_var for u in auth.USERS.values()}
    for svc in SERVICES:
        user = auth.USERS[svc]
        durable = subjects.durable(svc)
        assert f"$JS.API.CONSUMER.MSG.NEXT.{subjects.STREAM}.{durable}" in user.publish
        assert f"$JS.ACK.{subjects.STREAM}.{durable}.>" in user.publish
        assert user.subscribe[0] == f"{subjects.inbox_prefix(svc)}.>"
        assert not auth.allowed(user, "pub", subjects.request("client-acme"))
    for name in (*auth.CLIENTS, auth.GATEWAY):
        user = auth.USERS[name]
        assert auth.allowed(user, "pub", subjects.request(name))
        assert user.subscribe == (f"{subjects.inbox_prefix(name)}.>",)


def test_each_client_reads_only_its_own_stored_replies():
    """Replies are stored under <client>.<request id> (shared/subjects.py result_key) and
    read by direct get: the key is in the subject, so the permission can scope it. A client
    reads without binding to the bucket (baton/client.py result()), so it has no stream
    info, which would list every client's keys; services bind and keep it."""
    stream = f"KV_{subjects.RESULTS_BUCKET}"

    def direct_get(key: str) -> str:
        return f"$JS.API.DIRECT.GET.{stream}.$KV.{subjects.RESULTS_BUCKET}.{key}"

    clients = (*auth.CLIENTS, auth.GATEWAY)
    for name in clients:
        user = auth.USERS[name]
        assert direct_get(f"{name}.>") in user.publish
        assert auth.allowed(user, "pub", direct_get(subjects.result_key(name, "r1")))
        for other in (*clients, subjects.ANONYMOUS):
            if other != name:
                assert not auth.allowed(user, "pub", direct_get(subjects.result_key(other, "r1"))), (name, other)
        for refused in (direct_get(">"), direct_get("*.r1"), direct_get("r1"), f"$JS.API.DIRECT.GET.{stream}",
                        f"$JS.API.STREAM.MSG.GET.{stream}", f"$JS.API.STREAM.INFO.{stream}",
                        f"$JS.API.CONSUMER.CREATE.{stream}",
                        f"$KV.{subjects.RESULTS_BUCKET}.{subjects.result_key(name, 'r1')}"):
            assert not auth.allowed(user, "pub", refused), (name, refused)
        assert [p for p in user.publish if "baton_results" in p] == [direct_get(f"{name}.>")]
    for svc in SERVICES:
        user = auth.USERS[svc]
        assert auth.allowed(user, "pub", f"$KV.{subjects.RESULTS_BUCKET}.{subjects.result_key('client-acme', 'r1')}")
        assert auth.allowed(user, "pub", direct_get(subjects.result_key("client-acme", "r1")))
        assert auth.allowed(user, "pub", f"$JS.API.STREAM.INFO.{stream}")  # services bind (FastStream's key_value)
        assert not auth.allowed(user, "pub", f"$JS.API.STREAM.MSG.GET.{stream}")


@pytest.mark.parametrize(
    ("pattern", "subject", "expected"),
    [
        ("a.>", "a.b.c", True),
        ("a.>", "a", False),
        ("a.*", "a.b", True),
        ("a.*", "a.b.c", False),
        ("_INBOX.x.>", "_INBOX.>", False),  # a wider subscription is not inside the pattern
        ("_INBOX.x.>", "_INBOX.x.reply.*", True),
        ("_INBOX.*.reply.*", "_INBOX.x.reply.r1", True),
        ("a.b", "a.b", True),
        ("a.b", "a.c", False),
    ],
)
def test_subject_matching_follows_the_servers_rules(pattern, subject, expected):
    assert auth.matches(pattern, subject) is expected


def _nats_check(conf: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([find_binary(), "-t", "-c", str(conf)], capture_output=True, text=True, env=env, timeout=30)


NATS_CONFS = [NATS_DIR / "single.conf", *sorted((NATS_DIR / "cluster").glob("node-*.conf"))]


@pytest.mark.parametrize("conf", NATS_CONFS, ids=lambda p: p.name)
def test_nats_configs_pass_the_servers_own_check(conf):
    clean = {k: v for k, v in os.environ.items() if not k.endswith("_PASSWORD")}
    result = _nats_check(conf, {**clean, **auth.DEV_PASSWORDS})
    assert result.returncode == 0, result.stdout + result.stderr
    # The passwords really come from the environment: without them the file is refused.
    missing = _nats_check(conf, clean)
    assert missing.returncode != 0 and "BATON_" in missing.stdout + missing.stderr


def test_cluster_nodes_route_to_each_other_and_share_the_users():
    nodes = sorted((NATS_DIR / "cluster").glob("node-*.conf"))
    assert len(nodes) == 3
    listens = set()
    for node in nodes:
        text = node.read_text()
        assert "include ../auth.conf" in text
        assert re.search(r"cluster\s*\{", text) and "name: baton" in text
        listens.add(re.search(r"cluster\s*\{[^}]*listen:\s*(\S+)", text, re.S)[1])
        routes = set(re.findall(r"nats-route://(\S+)", text))
        assert len(routes) == 3
    assert listens == routes  # every node's route list names every node


# -- Kubernetes: kustomize references ------------------------------------------------------------


@pytest.mark.parametrize("folder", [BASE, KEDA, *OVERLAYS.values()], ids=lambda p: str(p.relative_to(K8S)))
def test_every_file_a_kustomization_names_exists(folder):
    k = kustomization(folder)
    named = list(k.get("resources", []))
    named += [p["path"] for p in k.get("patches", []) if "path" in p]
    for gen in (*k.get("configMapGenerator", []), *k.get("secretGenerator", [])):
        named += [f.split("=", 1)[-1] for f in gen.get("files", [])] + gen.get("envs", [])
    assert named
    for entry in named:
        assert (folder / entry).exists(), f"{folder.relative_to(K8S)}: {entry} does not exist"


def test_the_base_has_one_deployment_per_service_collector_gateway_and_the_provision_job():
    objects = base_objects()
    for name in (*SERVICES, "collector", "gateway"):
        assert ("Deployment", name) in objects, name
    for svc in SERVICES:
        assert (BASE / f"{svc}.yaml").exists(), "one file per service"
    assert ("Service", "collector") in objects and ("Service", "gateway") in objects
    assert ("Job", "baton-provision") in objects


@pytest.mark.parametrize("svc", SERVICES)
def test_each_service_deployment_is_probed_bounded_unprivileged_and_its_own_nats_user(svc):
    dep = deployment(svc)
    pod = dep["spec"]["template"]["spec"]
    c = container(dep)
    assert c["command"] == ["python", "-m", "shared.run", svc]
    for probe in ("readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["path"] == "/metrics"
        assert c[probe]["httpGet"]["port"] == "metrics"
    assert {p["name"]: p["containerPort"] for p in c["ports"]}["metrics"] == 9090
    assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"]
    assert c["resources"]["limits"]["memory"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    env = env_of(c)
    assert env["NATS_USER"]["value"] == svc
    ref = env["NATS_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": auth.HELM_SECRET, "key": auth.USERS[svc].password_var}
    assert env["BATON_PROVISION"]["value"] == "false"
    assert env["BATON_METRICS_PORT"]["value"] == "9090" and env["BATON_METRICS_HOST"]["value"] == "0.0.0.0"
    assert env["BATON_CONFIG"]["value"].startswith("/etc/baton/")
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"]["value"] == "http://collector:4318"
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert mounts["tmp"] == "/tmp"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["config"]["configMap"]["name"] == "baton-config"
    assert dep["spec"]["selector"]["matchLabels"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()


def test_collector_gateway_and_job_are_unprivileged_and_use_the_right_users():
    objects = base_objects()
    for kind, name in (("Deployment", "collector"), ("Deployment", "gateway"), ("Job", "baton-provision")):
        obj = objects[(kind, name)]
        c = container(obj)
        assert obj["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        assert c["resources"]["limits"]["memory"]
    job = container(objects[("Job", "baton-provision")])
    assert env_of(job)["NATS_USER"]["value"] == "admin"
    assert env_of(job)["NATS_PASSWORD"]["valueFrom"]["secretKeyRef"]["key"] == auth.USERS["admin"].password_var
    gw = env_of(container(objects[("Deployment", "gateway")]))
    assert gw["NATS_USER"]["value"] == gw["BATON_GATEWAY_CLIENT_ID"]["value"] == auth.GATEWAY
    col = container(objects[("Deployment", "collector")])
    assert col["readinessProbe"]["httpGet"]["path"] == "/healthz"
    assert objects[("Service", "collector")]["spec"]["ports"][0]["port"] == 4318


def test_the_base_config_map_holds_a_valid_routing_config():
    from shared.config import parse_config

    [gen] = kustomization(BASE)["configMapGenerator"]
    assert gen["name"] == "baton-config"
    parse_config((BASE / "config.yaml").read_text(), "deploy/k8s/base/config.yaml")


def test_the_config_map_ships_the_default_config_as_it_is():
    # A copy that drifts deploys weaker gates than the ones tested (it had lost the
    # retrieval gates, the banned topics and the injection model): copy it on every change.
    shipped = (ROOT / "shared" / "default_config.yaml").read_text()
    assert (BASE / "config.yaml").read_text() == shipped, "cp shared/default_config.yaml deploy/k8s/base/config.yaml"


def _selected(target: dict, objects: dict[tuple[str, str], dict]) -> list[tuple[str, str]]:
    hits = []
    for (kind, name), obj in objects.items():
        if target.get("kind") and target["kind"] != kind:
            continue
        if target.get("name") and target["name"] != name:
            continue
        if target.get("labelSelector"):
            key, _, value = target["labelSelector"].partition("=")
            if obj["metadata"].get("labels", {}).get(key) != value:
                continue
        hits.append((kind, name))
    return hits


@pytest.mark.parametrize("overlay", list(OVERLAYS), ids=str)
def test_overlay_patches_and_replicas_target_resources_of_the_base(overlay):
    folder = OVERLAYS[overlay]
    k = kustomization(folder)
    objects = base_objects()
    for patch in k.get("patches", []):
        if "target" in patch:
            assert _selected(patch["target"], objects), f"{overlay}: {patch} selects nothing"
        else:
            [body] = docs(folder / patch["path"])
            assert (body["kind"], body["metadata"]["name"]) in objects, f"{overlay}: {patch['path']} patches nothing"
    for entry in k.get("replicas", []):
        assert ("Deployment", entry["name"]) in objects, entry
    for gen in k.get("secretGenerator", []):
        assert gen["name"] == auth.HELM_SECRET
        keys = {line.split("=", 1)[0] for line in (folder / gen["envs"][0]).read_text().splitlines() if "=" in line and not line.startswith("#")}
        assert keys == set(auth.DEV_PASSWORDS)


# -- KEDA ------------------------------------------------------------------------------------------


def test_every_service_scales_on_its_own_durable_consumer():
    objects = base_objects()
    scaled = {}
    for obj in resources_of(KEDA):
        assert obj["kind"] == "ScaledObject"
        target = obj["spec"]["scaleTargetRef"]["name"]
        assert ("Deployment", target) in objects, f"{obj['metadata']['name']} scales a missing Deployment"
        [trigger] = obj["spec"]["triggers"]
        meta = trigger["metadata"]
        assert trigger["type"] == "nats-jetstream"
        assert meta["stream"] == subjects.STREAM
        assert meta["account"] == auth.ACCOUNT
        assert meta["consumer"] in {subjects.durable(s) for s in SERVICES}
        assert meta["natsServerMonitoringEndpoint"].endswith(":8222")
        assert int(meta["lagThreshold"]) > 0
        assert obj["spec"]["minReplicaCount"] >= 1
        scaled[target] = meta["consumer"]
    assert scaled == {svc: subjects.durable(svc) for svc in SERVICES}


def test_prod_scales_with_keda():
    assert "../../keda" in kustomization(OVERLAYS["prod"])["resources"]


# -- compose ---------------------------------------------------------------------------------------

COMPOSE = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
DEFAULT = re.compile(r"^\$\{(\w+):-(.*)\}$")


def _default(value: str) -> tuple[str, str]:
    match = DEFAULT.match(value)
    assert match, f"{value!r} is not ${{VAR:-default}}"
    return match[1], match[2]


def test_compose_runs_nats_jaeger_collector_provision_gateway_and_every_service():
    services = COMPOSE["services"]
    assert set(services) >= {"nats", "jaeger", "collector", "provision", "gateway", *SERVICES}
    nats = services["nats"]
    mounted = {v.split(":")[0] for v in nats["volumes"] if v.startswith("./")}
    assert {"./nats/single.conf", "./nats/auth.conf"} <= mounted
    for path in mounted:
        assert (DEPLOY / path).exists()
    assert nats["command"][:2] == ["-c", "/etc/nats/single.conf"]
    env = nats["environment"]
    assert set(env) == set(auth.DEV_PASSWORDS)
    for name, value in env.items():
        assert _default(value) == (name, auth.DEV_PASSWORDS[name])
    assert services["jaeger"]["image"].startswith("jaegertracing/jaeger:2.")
    jaeger_ports = {p.split(":")[-1] for p in services["jaeger"]["ports"]}
    assert {"16686", "4317", "4318"} <= jaeger_ports
    collector = services["collector"]["environment"]
    assert collector["BATON_COLLECTOR_FORWARD"] == "http://jaeger:4318"
    assert collector["BATON_COLLECTOR_HOST"] == "0.0.0.0"
    provision = services["provision"]
    assert provision["environment"]["NATS_USER"] == "admin"
    assert provision["command"] == ["python", "/opt/baton/provision.py"]


@pytest.mark.parametrize("svc", SERVICES)
def test_each_compose_service_is_its_own_user_scalable_and_traced(svc):
    service = COMPOSE["services"][svc]
    assert service["command"] == ["python", "-m", "shared.run", svc]
    assert service["deploy"]["replicas"] >= 1
    assert "container_name" not in service and "ports" not in service  # or --scale would collide
    env = service["environment"]
    assert env["NATS_USER"] == svc
    var, default = _default(env["NATS_PASSWORD"])
    assert var == auth.USERS[svc].password_var and default == auth.DEV_PASSWORDS[var]
    assert env["NATS_URL"] == "nats://nats:4222"
    assert env["BATON_PROVISION"] == "false"
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://collector:4318"
    assert env["BATON_METRICS_PORT"] == "9090"
    assert service["depends_on"]["provision"]["condition"] == "service_completed_successfully"
    assert service["build"]["dockerfile"] == "deploy/Dockerfile"
    assert service["read_only"] is True


def test_dockerfile_is_slim_non_root_and_runs_a_service():
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", text, re.M)
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and not users[-1].startswith(("root", "0"))
    assert re.search(r'^CMD \["python", "-m", "shared\.run", "\w+"\]', text, re.M)
    assert "pip install ." in text


# -- Helm -------------------------------------------------------------------------------------------


def test_helm_values_run_a_jetstream_cluster_with_the_same_users():
    values = yaml.safe_load((DEPLOY / "helm" / "nats-values.yaml").read_text())
    config = values["config"]
    assert config["cluster"] == {"enabled": True, "replicas": 3}
    assert config["jetstream"]["enabled"] and config["jetstream"]["fileStore"]["enabled"]
    assert config["jetstream"]["fileStore"]["pvc"]["enabled"]
    users = config["merge"]["accounts"][auth.ACCOUNT]["users"]
    assert [u["user"] for u in users] == list(auth.USERS)
    for entry in users:
        user = auth.USERS[entry["user"]]
        assert entry["permissions"]["publish"]["allow"] == list(user.publish)
        assert entry["permissions"]["subscribe"]["allow"] == list(user.subscribe)
        assert entry["password"] == f"<< ${user.password_var} >>"
        assert values["container"]["env"][user.password_var]["valueFrom"]["secretKeyRef"] == {"name": auth.HELM_SECRET, "key": user.password_var}


# -- schemas (when kubernetes-validate is installed) -------------------------------------------------


def _merge(base, patch):
    """A small strategic-merge: dicts merge, lists of named dicts merge by name."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for key, value in patch.items():
            out[key] = _merge(base[key], value) if key in base else value
        return out
    if isinstance(base, list) and isinstance(patch, list) and all(isinstance(x, dict) and "name" in x for x in base + patch):
        out = [dict(x) for x in base]
        for item in patch:
            for i, existing in enumerate(out):
                if existing["name"] == item["name"]:
                    out[i] = _merge(existing, item)
                    break
            else:
                out.append(item)
        return out
    return patch


def _json_patch(obj: dict, ops: list[dict]) -> dict:
    obj = copy.deepcopy(obj)
    for op in ops:
        *parents, last = [int(p) if p.isdigit() else p for p in op["path"].strip("/").split("/")]
        node = obj
        for key in parents:
            node = node[key]
        assert op["op"] in ("replace", "add") and (op["op"] == "add" or last in node or isinstance(last, int)), op
        node[last] = op["value"]
    return obj


def build_overlay(folder: Path) -> list[dict]:
    """What `kustomize build` would produce, close enough to validate (no name hashes)."""
    k = kustomization(folder)
    objects = {key: copy.deepcopy(obj) for key, obj in base_objects().items()}
    for entry in k.get("resources", []):
        path = (folder / entry).resolve()
        if path.is_file():
            objects.update({(d["kind"], d["metadata"]["name"]): d for d in docs(path)})
        elif path == KEDA.resolve():
            objects.update({(d["kind"], d["metadata"]["name"]): d for d in resources_of(KEDA)})
    for patch in k.get("patches", []):
        body = yaml.safe_load((folder / patch["path"]).read_text())
        if "target" in patch:
            for key in _selected(patch["target"], objects):
                objects[key] = _json_patch(objects[key], body)
        else:
            key = (body["kind"], body["metadata"]["name"])
            objects[key] = _merge(objects[key], body)
    for entry in k.get("replicas", []):
        objects[("Deployment", entry["name"])]["spec"]["replicas"] = entry["count"]
    return list(objects.values())


def _validator():
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate to check manifests against the Kubernetes schemas")
    from kubernetes_validate import utils

    return kv, utils.latest_version()


@pytest.mark.parametrize("where", ["base", "dev", "prod"])
def test_manifests_validate_against_the_kubernetes_schemas(where):
    kv, version = _validator()
    objects = base_objects().values() if where == "base" else build_overlay(OVERLAYS[where])
    checked = 0
    for obj in objects:
        if obj["kind"] == "ScaledObject":  # a CRD: no schema in the package; checked above
            continue
        if where == "base":
            obj = {**obj, "metadata": {**obj["metadata"], "namespace": "baton"}}
        kv.validate(obj, version, strict=True)
        checked += 1
    assert checked >= 10


def test_the_base_runs_jaeger_v2_and_the_collector_forwards_to_it():
    objects = base_objects()
    jaeger = container(objects[("Deployment", "jaeger")])
    assert jaeger["image"].startswith("jaegertracing/jaeger:2.")
    assert {p["containerPort"] for p in jaeger["ports"]} >= {4317, 4318, 16686}
    assert jaeger["securityContext"]["readOnlyRootFilesystem"] is True and jaeger["resources"]["limits"]["memory"]
    service = objects[("Service", "jaeger")]
    ports = {p["name"]: p["port"] for p in service["spec"]["ports"]}
    assert ports["otlp-http"] == 4318 and ports["ui"] == 16686
    assert service["spec"]["selector"].items() <= objects[("Deployment", "jaeger")]["spec"]["template"]["metadata"]["labels"].items()
    forward = env_of(container(objects[("Deployment", "collector")]))["BATON_COLLECTOR_FORWARD"]["value"]
    assert forward == f"http://jaeger:{ports['otlp-http']}"
