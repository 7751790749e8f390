"""The mesh configuration: models, routes and their pipelines, gates, fallback policy.

One YAML file. The shipped default lives beside this module; BATON_CONFIG points at
another. Every mistake is reported with the path of the bad key, and a mesh refuses
to start on a file that does not validate.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from shared.schema import Step

# Which service runs each kind of step. A step name is "<kind>" or "<kind>.<variant>".
STEP_SERVICES = {
    "guard": "guardrail",
    "retrieve": "retriever",
    "generate": "generator",
}
GATES = ("guard.input", "guard.retrieval", "guard.output")
BUILT_IN_SERVICES = ("router", "retriever", "generator", "guardrail", "fallback", "gateway", "collector")
CUSTOM_NAME = r"^[a-z][a-z0-9_-]{0,31}$"  # a subject token and a durable name


def custom_steps_of(raw: Any) -> dict[str, str]:
    """{step name: service} of the file's `steps:` section (custom steps), as far as it is readable."""
    section = raw.get("steps") if isinstance(raw, dict) else None
    if not isinstance(section, dict):
        return {}
    found = {}
    for name, spec in section.items():
        service = (spec.get("service") if isinstance(spec, dict) else None) or name
        if isinstance(name, str) and isinstance(service, str):
            found[name] = service
    return found


class ConfigError(ValueError):
    """A configuration file that cannot be used; `problems` name each bad key."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        listed = "\n".join(f"  - {problem}" for problem in problems)
        super().__init__(f"invalid Baton config {source}:\n{listed}")


def _compiled(patterns: list[str]) -> list[str]:
    """The patterns, once each is known to be a valid regular expression."""
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"pattern {pattern!r} is not a valid regular expression: {exc}") from exc
    return patterns


class _Strict(BaseModel):
    # A misspelled key is a mistake to report, not something to ignore.
    model_config = ConfigDict(extra="forbid")


class ModelSpec(_Strict):
    provider: Literal["local", "openai", "anthropic"]
    model: str = ""  # the provider's own model name; defaults to the catalog key
    tier: Literal["local", "small", "frontier"] = "small"
    price_in_per_mtok: float = Field(default=0.0, ge=0)
    price_out_per_mtok: float = Field(default=0.0, ge=0)
    context_tokens: int = Field(default=8192, gt=0)
    max_output_tokens: int = Field(default=512, gt=0)
    base_url: str | None = None
    base_url_env: str | None = None  # environment variable holding the base URL
    api_key_env: str | None = None  # environment variable holding the key, never the key itself
    timeout_s: float = Field(default=30.0, gt=0)
    retries: int = Field(default=2, ge=0, le=5)  # for errors that can succeed on a second try


class MatchRule(_Strict):
    """Rules that route a request on their own, before the classifier is asked."""

    words: list[str] = Field(default_factory=list)  # any of these whole words (case-insensitive) picks the route
    patterns: list[str] = Field(default_factory=list)
    metadata: dict[str, str] = Field(default_factory=dict)

    _patterns_compile = field_validator("patterns")(lambda cls, patterns: _compiled(patterns))

    @model_validator(mode="before")
    @classmethod
    def _keywords_renamed(cls, raw: Any) -> Any:
        # `keywords` used to be a classifier hint while the classifier was on and a rule when
        # it was off: a custom route keyed on it silently never fired. Refuse the old name.
        if isinstance(raw, dict) and "keywords" in raw:
            raise ValueError(
                "match.keywords was renamed, because it never routed while the classifier was on: "
                "move the words to the route's `hints` (the classifier learns from them, as before) "
                "or to `match.words` (any of them routes the request, whatever the classifier says)"
            )
        return raw

    @property
    def empty(self) -> bool:
        return not (self.words or self.patterns or self.metadata)


class FallbackPolicy(_Strict):
    models: list[str] = Field(default_factory=list)  # tried in order when generation fails
    degrade: bool = True  # answer extractively from retrieved passages when models fail
    max_depth: int = Field(default=2, ge=0, le=5)
    # When the retrieval gate finds nothing good enough: say so, or answer without the
    # knowledge base behind a disclaimer.
    no_context: Literal["say_so", "answer_without"] = "say_so"


class CacheSpec(_Strict):
    enabled: bool = True
    ttl_s: float = Field(default=3600.0, gt=0)


class Variant(_Strict):
    """One arm of an A/B experiment: the models the route's generate steps use."""

    name: str
    weight: float = Field(gt=0)
    models: list[str]


class ShadowSpec(_Strict):
    """A candidate model that answers a share of requests on the side, never to the client."""

    model: str
    share: float = Field(default=1.0, gt=0, le=1)


class TenantSpec(_Strict):
    daily_budget_usd: float | None = Field(default=None, ge=0)
    models: list[str] = Field(default_factory=list)  # the tenant's allow-list; empty means the route's
    # Requests of this tenant's client (a client id that names the tenant) the router works
    # on at once; None: limits.max_in_flight_per_client.
    max_in_flight: int | None = Field(default=None, gt=0)


class LimitsSpec(_Strict):
    """What one client may ask of the mesh, checked before any work is done."""

    # Requests of one client the router works on at once: a flood waits behind its own limit.
    max_in_flight_per_client: int = Field(default=16, gt=0)
    max_slip_steps: int = Field(default=16, gt=0)  # a longer slip is a forged envelope
    max_deadline_s: float = Field(default=600.0, gt=0)  # the longest a request may be given


class RouteSpec(_Strict):
    description: str = ""
    match: MatchRule = Field(default_factory=MatchRule)
    examples: list[str] = Field(default_factory=list)  # labeled utterances the classifier learns from
    hints: list[str] = Field(default_factory=list)  # words the classifier learns from too (weakly); they never route on their own
    escalate_to: str | None = None  # the route that takes this route's requests when they are complex
    # How a streamed request's partial text reaches the client: "live" as the model writes it
    # (the output gate then applies to the final Reply only), or "after_gate": nothing
    # partial, the gated answer at the end.
    stream: Literal["live", "after_gate"] = "live"
    steps: list[Step]
    latency_budget_ms: int = Field(default=20_000, gt=0)
    models: list[str] = Field(default_factory=list)  # allow-list; empty means any
    fallback: FallbackPolicy = Field(default_factory=FallbackPolicy)
    cost_budget_usd: float | None = Field(default=None, ge=0)  # most one request may cost
    cache: CacheSpec = Field(default_factory=CacheSpec)
    variants: list[Variant] = Field(default_factory=list)
    shadow: ShadowSpec | None = None

    @field_validator("steps", mode="before")
    @classmethod
    def _expand_steps(cls, raw: Any, info: ValidationInfo) -> list[dict[str, Any]]:
        if not isinstance(raw, list) or not raw:
            raise ValueError("steps must be a non-empty list")
        custom = (info.context or {}).get("custom_steps", {})
        steps, problems = [], []
        for index, item in enumerate(raw):
            try:
                step = _expand_step(item, custom)
            except ValueError as exc:
                problems.append(f"{index}: {exc}")
                continue
            if step["name"] in custom:
                steps.append(step)  # its own parameter model checks them, in its process
                continue
            step["params"], bad = _checked_params(step["name"], step["params"])
            problems += [f"{index}.{problem}" for problem in bad]
            steps.append(step)
        if problems:
            raise ValueError(_MANY.join(problems))
        return steps


class GuardSpec(_Strict):
    class BannedTopic(_Strict):
        """A topic the input gate refuses: any keyword (whole words, case-insensitive) or pattern."""

        name: str = Field(min_length=1)
        keywords: list[str] = Field(default_factory=list)
        patterns: list[str] = Field(default_factory=list)  # regular expressions, matched case-insensitively

        _patterns_compile = field_validator("patterns")(lambda cls, patterns: _compiled(patterns))

        @model_validator(mode="after")
        def _not_empty(self) -> GuardSpec.BannedTopic:
            if not any(keyword.strip() for keyword in self.keywords) and not self.patterns:
                raise ValueError(f"banned topic {self.name!r} needs at least one keyword or pattern")
            return self

    max_input_chars: int = Field(default=8000, gt=0)
    max_output_chars: int = Field(default=8000, gt=0)
    max_input_tokens: int | None = Field(default=None, gt=0)  # estimated as characters / 4; None: no limit
    injection_phrases: list[str] = Field(default_factory=list)
    injection_threshold: float = Field(default=0.5, gt=0, le=1)  # input gate fails at or above this score
    injection_model: bool = False  # add the TF-IDF classifier to the injection score (needs scikit-learn)
    banned_topics: list[BannedTopic] = Field(default_factory=list)
    fail_on_refusal: bool = False  # output gate: fail a refusal instead of passing it with a finding
    redact: list[Literal["email", "phone", "card", "iban", "national_id", "secret"]] = Field(
        default_factory=lambda: ["email", "phone", "card"]  # type: ignore[arg-type]  # mypy reads the literals as list[str]
    )


class RoutingSpec(_Strict):
    classifier: Literal["tfidf", "embeddings", "off"] = "tfidf"  # embeddings only when a model package is installed
    min_confidence: float = Field(default=0.45, ge=0, le=1)  # below this, the default route answers
    complexity_threshold: float = Field(default=0.6, ge=0, le=1)  # above this, a route escalates


class BreakerSpec(_Strict):
    threshold: int = Field(default=5, gt=0)  # consecutive failures that open a model's breaker
    cooldown_s: float = Field(default=30.0, gt=0)  # open this long before one probe call


class SessionSpec(_Strict):
    max_turns: int = Field(default=20, gt=0)  # older turns are dropped first
    max_chars: int = Field(default=16_000, gt=0)


class RetrievalSpec(_Strict):
    default_top_k: int = Field(default=4, gt=0, le=50)


# -- step parameters: each kind of step says what it takes, so a typo or a wrong type is
# refused when the file is loaded or applied, not on the first request of the route.


class RetrieveParams(_Strict):
    top_k: int | None = Field(default=None, gt=0, le=50)  # None: retrieval.default_top_k
    corpora: list[str] | None = None  # None: every corpus


class GenerateParams(_Strict):
    models: list[str] = Field(default_factory=list)  # tried in order; empty: the route's models
    task: Literal["answer", "chat", "summarize", "rewrite", "classify"] = "answer"
    max_sentences: int = Field(default=3, gt=0)
    labels: list[str] | None = None  # for task: classify


class JudgeParams(_Strict):
    model: str  # a name from models, openai-compatible (services/guardrail/judge.py)
    budget_ms: int | None = Field(default=None, gt=0)
    when_unavailable: Literal["pass", "fail"] = "pass"


class InputGateParams(_Strict):
    threshold: float | None = Field(default=None, gt=0, le=1)  # None: guard.injection_threshold
    judge: JudgeParams | None = None  # the route's optional guard model


class RetrievalGateParams(_Strict):
    min_score: float = Field(default=0.0, ge=0)
    min_passages: int = Field(default=1, ge=0)
    min_overlap: float = Field(default=0.0, ge=0, le=1)
    neutralize: bool = True


class OutputGateParams(_Strict):
    min_grounded: float | None = Field(default=None, ge=0, le=1)


STEP_PARAMS: dict[str, type[_Strict]] = {
    "retrieve": RetrieveParams,
    "generate": GenerateParams,
    "guard.input": InputGateParams,
    "guard.retrieval": RetrievalGateParams,
    "guard.output": OutputGateParams,
}


def _checked_params(name: str, params: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The step's parameters, typed, or the problem with each bad one."""
    model = STEP_PARAMS.get(name) or STEP_PARAMS[name.split(".", 1)[0]]
    try:
        return model.model_validate(params).model_dump(exclude_unset=True), []
    except ValidationError as exc:
        return params, [_describe(error, prefix=name) for error in exc.errors()]


class CustomStep(_Strict):
    """A step of your own (`baton serve <module>`): the service whose consumer runs it."""

    service: str = Field(default="", pattern=r"^$|" + CUSTOM_NAME)  # empty: the step's name
    description: str = ""


class MeshConfig(_Strict):
    version: str = "1"
    default_route: str
    models: dict[str, ModelSpec]
    routes: dict[str, RouteSpec]
    routing: RoutingSpec = Field(default_factory=RoutingSpec)
    sessions: SessionSpec = Field(default_factory=SessionSpec)
    breakers: BreakerSpec = Field(default_factory=BreakerSpec)
    guard: GuardSpec = Field(default_factory=GuardSpec)
    retrieval: RetrievalSpec = Field(default_factory=RetrievalSpec)
    tenants: dict[str, TenantSpec] = Field(default_factory=dict)
    limits: LimitsSpec = Field(default_factory=LimitsSpec)
    steps: dict[str, CustomStep] = Field(default_factory=dict)  # custom steps, by name
    digest: str = ""  # content hash, set on load; recorded on every Reply

    @model_validator(mode="after")
    def _references_exist(self) -> MeshConfig:
        problems = reference_problems(self.model_dump())
        if problems:
            raise ValueError(_MANY.join(problems))
        return self

    @field_validator("steps")
    @classmethod
    def _custom_names(cls, steps: dict[str, CustomStep]) -> dict[str, CustomStep]:
        for name, spec in steps.items():
            if not re.match(CUSTOM_NAME, name):
                raise ValueError(f"custom step {name!r}: a name is 1-32 lowercase letters, digits, '-' or '_', starting with a letter")
            if name.split(".", 1)[0] in STEP_SERVICES:
                raise ValueError(f"custom step {name!r}: {sorted(STEP_SERVICES)} are built-in steps")
            spec.service = spec.service or name
            if spec.service in BUILT_IN_SERVICES:
                raise ValueError(f"custom step {name!r}: service {spec.service!r} is a built-in service")
        return steps

    @property
    def custom_steps(self) -> dict[str, str]:
        """{step name: the service that runs it} for the steps declared under `steps:`."""
        return {name: spec.service for name, spec in self.steps.items()}

    def route(self, name: str) -> RouteSpec:
        return self.routes[name]

    def max_in_flight(self, client: str) -> int:
        """How many of one client's requests the router works on at once."""
        tenant = self.tenants.get(client)
        if tenant is not None and tenant.max_in_flight is not None:
            return tenant.max_in_flight
        return self.limits.max_in_flight_per_client


_MANY = "\n"  # joins several problems found by one validator; _describe splits them again


def reference_problems(raw: Any) -> list[str]:
    """Names that point nowhere: routes, and models missing from the catalog or the route's allow-list.

    Works on the raw file too, so these are reported alongside type errors elsewhere
    (pydantic skips a model's own checks once a field has failed).
    """
    if not isinstance(raw, dict):
        return []
    models = _mapping(raw.get("models"))
    routes = _mapping(raw.get("routes"))
    problems = []
    default_route = raw.get("default_route")
    if isinstance(default_route, str) and routes and default_route not in routes:
        problems.append(f"default_route: {default_route!r} is not one of the routes {sorted(routes)}")
    for name, route in routes.items():
        if not isinstance(route, dict):
            continue
        escalate_to = route.get("escalate_to")
        if isinstance(escalate_to, str) and escalate_to not in routes:
            problems.append(f"routes.{name}.escalate_to: {escalate_to!r} is not one of the routes")
        allowed = _names(route.get("models"))
        variants = [m for v in _list(route.get("variants")) if isinstance(v, dict) for m in _names(v.get("models"))]
        shadow = _mapping(route.get("shadow")).get("model")
        named = allowed + _names(_mapping(route.get("fallback")).get("models")) + variants + ([shadow] if isinstance(shadow, str) else [])
        problems += [f"routes.{name}: model {model!r} is not in the models catalog" for model in dict.fromkeys(named) if model not in models]
        for index, item in enumerate(_list(route.get("steps"))):
            for model in _names(_step_params(item).get("models")):
                if model not in models:
                    problems.append(f"routes.{name}.steps.{index}.models: {model!r} is not in the models catalog")
                elif allowed and model not in allowed:
                    problems.append(f"routes.{name}.steps.{index}.models: {model!r} is not in the route's allow-list {allowed}")
    for name, tenant in _mapping(raw.get("tenants")).items():
        for model in _names(_mapping(tenant).get("models")):
            if model not in models:
                problems.append(f"tenants.{name}.models: {model!r} is not in the models catalog")
    return problems


def _mapping(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list:
    return value if isinstance(value, list) else []


def _names(value: Any) -> list[str]:
    return [item for item in _list(value) if isinstance(item, str)]


def _step_params(item: Any) -> dict:
    """A step's parameters, whether written in the file (`{retrieve: {...}}`) or expanded."""
    if isinstance(item, dict) and "params" in item and "name" in item:
        return _mapping(item["params"])
    if isinstance(item, dict) and len(item) == 1:
        return _mapping(next(iter(item.values())))
    return {}


def _expand_step(item: Any, custom: dict[str, str] | None = None) -> dict[str, Any]:
    """`retrieve` or `{retrieve: {top_k: 4, budget_ms: 500}}` -> a Step's fields."""
    params: dict[str, Any]
    if isinstance(item, str):
        name, params = item, {}
    elif isinstance(item, dict) and len(item) == 1:
        name, params = next(iter(item.items()))
        params = dict(params or {})
    else:
        raise ValueError(f"a step is a name or a one-key mapping of name to parameters, got {item!r}")
    kind = name.split(".", 1)[0]
    service = (custom or {}).get(name) or STEP_SERVICES.get(kind)
    if service is None:
        declared = f"; or declare it under `steps:` (steps: {{{name}: {{service: <its service>}}}})" if isinstance(name, str) else ""
        raise ValueError(f"unknown step {name!r}; steps start with one of {sorted(STEP_SERVICES)}{declared}")
    if kind == "guard" and name not in GATES:
        raise ValueError(f"unknown gate {name!r}; gates are {', '.join(GATES)}")
    if not isinstance(params, dict):
        raise ValueError(f"parameters of step {name!r} must be a mapping")
    budget = params.pop("budget_ms", None)
    return {"service": service, "name": name, "params": params, "budget_ms": budget}


def parse_config(text: str, source: str = "<text>") -> MeshConfig:
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(source, [_yaml_problem(exc)]) from exc
    if not isinstance(raw, dict):
        raise ConfigError(source, ["the file must be a mapping at the top level"])
    try:
        config = MeshConfig.model_validate(raw, context={"custom_steps": custom_steps_of(raw)})
    except ValidationError as exc:
        problems = [line for error in exc.errors() for line in _describe(error).split(_MANY)]
        problems += [p for p in reference_problems(raw) if p not in problems]  # found even past a type error
        raise ConfigError(source, list(dict.fromkeys(problems))) from exc
    config.digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    return config


def load_config(path: Path | str) -> MeshConfig:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(str(path), [f"cannot read the file: {exc.strerror}; set BATON_CONFIG to a readable YAML file"]) from exc
    return parse_config(text, str(path))


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """`line L, column C: not valid YAML: <problem>` (yaml's own text names a "<unicode string>")."""
    mark = getattr(exc, "problem_mark", None)
    problem = " ".join(filter(None, [getattr(exc, "context", None), getattr(exc, "problem", None)])) or str(exc)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"{where}not valid YAML: {problem}"


def _describe(error: Mapping[str, Any], prefix: str = "") -> str:
    """`where: why` for one pydantic error; a message holding several problems (one validator
    checking a list) gives each its own line, under the same `where`."""
    where = ".".join(str(part) for part in ([prefix] if prefix else []) + list(error["loc"])) or "(top level)"
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        message = "unknown key (misspelled?)"
    return _MANY.join(f"{where}.{line}" if prefix == "" and _is_located(line) else f"{where}: {line}" for line in message.split(_MANY))


def _is_located(line: str) -> bool:
    """A problem that already starts with its own place (`3.retrieve.top_k: ...`)."""
    head = line.split(":", 1)[0]
    return ":" in line and " " not in head and head[:1].isdigit()
