"""The config file: the shipped default works, every mistake names its key."""

import pytest

from shared.config import ConfigError, load_config, parse_config
from shared.settings import Settings

DEFAULT = Settings().config


def test_the_shipped_default_loads_with_a_version_digest():
    config = load_config(DEFAULT)
    assert config.default_route in config.routes
    assert len(config.digest) == 12
    factual = config.routes["factual"]
    assert [s.name for s in factual.steps] == ["guard.input", "retrieve", "guard.retrieval", "generate", "guard.output"]
    assert [s.service for s in factual.steps] == ["guardrail", "retriever", "guardrail", "generator", "guardrail"]
    assert factual.steps[1].budget_ms == 1000 and "budget_ms" not in factual.steps[1].params


def _with(text_change: tuple[str, str]) -> str:
    old, new = text_change
    text = DEFAULT.read_text()
    assert old in text
    return text.replace(old, new, 1)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (("default_route: factual", "default_route: nowhere"), "default_route"),
        (("price_in_per_mtok: 0.15", "price_in_per_mtok: cheap"), "models.gpt-small.price_in_per_mtok"),
        (("provider: local", "provider: lokal"), "models.local-extractive.provider"),
        (("latency_budget_ms: 5000", "latency_budget_ms: -1"), "routes.smalltalk.latency_budget_ms"),
        (("      - guard.output\n    latency_budget_ms: 5000", "      - guard.outptu\n    latency_budget_ms: 5000"), "guard.outptu"),
        (("      - retrieve: {top_k: 4", "      - retreive: {top_k: 4"), "retreive"),
        (("models: [gpt-small, local-extractive]\n    fallback", "models: [gpt-small, mystery-model]\n    fallback"), "mystery-model"),
        (("    match:\n      patterns:", "    matches:\n      patterns:"), "routes.smalltalk.matches"),
        (("'^\\s*how are you'", "'^(unclosed'"), "routes.smalltalk.match.patterns"),
    ],
)
def test_each_kind_of_mistake_names_the_bad_key(change, named):
    with pytest.raises(ConfigError) as caught:
        parse_config(_with(change), "test.yaml")
    assert named in str(caught.value)
    assert "test.yaml" in str(caught.value)


def test_not_yaml_and_not_a_mapping_are_refused_clearly():
    with pytest.raises(ConfigError, match="not valid YAML"):
        parse_config("routes: [unclosed", "x.yaml")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        parse_config("- just\n- a list", "x.yaml")


def test_a_missing_file_says_what_to_set(tmp_path):
    with pytest.raises(ConfigError, match="BATON_CONFIG"):
        load_config(tmp_path / "absent.yaml")


def test_a_step_model_outside_the_route_allow_list_is_refused():
    text = _with(("generate: {models: [gpt-small, local-extractive], budget_ms: 15000}\n      - guard.output\n    latency_budget_ms: 20000\n    models: [gpt-small, local-extractive]\n    fallback",
                  "generate: {models: [gpt-frontier], budget_ms: 15000}\n      - guard.output\n    latency_budget_ms: 20000\n    models: [gpt-small, local-extractive]\n    fallback"))
    with pytest.raises(ConfigError, match="allow-list"):
        parse_config(text)


# -- issue 17: step parameters and model names checked on load, every mistake named ---------


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (("retrieve: {top_k: 4, corpora: [handbook]", "retrieve: {top_k: many, corpora: [handbook]"), "routes.factual.steps.1.retrieve.top_k"),
        (("retrieve: {top_k: 4, corpora: [handbook]", "retrieve: {top_k: 0, corpora: [handbook]"), "routes.factual.steps.1.retrieve.top_k"),
        (("retrieve: {top_k: 4, corpora: [handbook]", "retrieve: {topk: 4, corpora: [handbook]"), "routes.factual.steps.1.retrieve.topk"),
        (("guard.retrieval: {min_overlap: 0.6}", "guard.retrieval: {min_overlap: lots}"), "guard.retrieval.min_overlap"),
        (("generate: {task: chat,", "generate: {task: chatter,"), "generate.task"),
        (("generate: {task: chat, models: [local-extractive]", "generate: {task: chat, models: [local-extractiv]"), "'local-extractiv' is not in the models catalog"),
    ],
)
def test_a_bad_step_parameter_or_unknown_model_is_refused_on_load(change, named):
    with pytest.raises(ConfigError) as caught:
        parse_config(_with(change), "test.yaml")
    assert named in str(caught.value)


def test_every_mistake_in_a_file_is_named_not_only_the_first():
    text = DEFAULT.read_text()
    for old, new in [
        ("provider: local", "provider: lokal"),
        ("retrieve: {top_k: 4, corpora: [handbook]", "retrieve: {top_k: many, corpora: [handbook]"),
        ("generate: {models: [gpt-small, local-extractive], budget_ms: 15000}", "generate: {models: [gpt-smal, local-extractive], budget_ms: 15000}"),
        ("      - guard.output\n    latency_budget_ms: 5000", "      - guard.outptu\n    latency_budget_ms: 5000"),
    ]:
        text = text.replace(old, new, 1)
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "test.yaml")
    message = str(caught.value)
    for named in ("models.local-extractive.provider", "retrieve.top_k", "'gpt-smal'", "guard.outptu"):
        assert named in message
    assert len(caught.value.problems) >= 4


def test_a_yaml_syntax_error_names_its_line_and_column():
    with pytest.raises(ConfigError) as caught:
        parse_config("version: 1\nroutes: [unclosed\nfoo: 1\n", "mine.yaml")
    message = str(caught.value)
    assert "mine.yaml" in message and "line 3, column 4" in message and "<unicode string>" not in message


def test_validated_step_parameters_reach_the_services_typed():
    text = _with(("retrieve: {top_k: 4, corpora: [handbook]", "retrieve: {top_k: '6', corpora: [handbook]"))
    retrieve = parse_config(text).routes["factual"].steps[1]
    assert retrieve.params == {"top_k": 6, "corpora": ["handbook"]}
