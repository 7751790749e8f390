"""Routing decisions and the slip they write, without NATS."""

import pytest

from services.router.routing import Router, UnknownRoute
from shared.config import load_config
from shared.schema import ChatMessage, Request
from shared.settings import Settings


@pytest.fixture(scope="module")
def router():
    return Router(load_config(Settings().config))


@pytest.mark.parametrize(
    ("prompt", "route"),
    [
        ("hi there!", "smalltalk"),
        ("Thanks, that helped", "smalltalk"),
        ("How often should I replace my chain?", "factual"),
        ("What does the Ridgeline 29 cost?", "shopping"),
        ("How do I return my helmet?", "support"),
        ("Compare rim and disc brakes for commuting and then recommend one", "complex"),
        ("Summarize: my chain squeaks and the gears skip.", "summarize"),
    ],
)
def test_rules_pick_the_route(router, prompt, route):
    assert router.decide(Request(prompt=prompt)).route == route


def test_a_route_hint_wins_and_an_unknown_hint_is_an_error(router):
    decision = router.decide(Request(prompt="hi", route="factual"))
    assert (decision.route, decision.reason) == ("factual", "route hint")
    with pytest.raises(UnknownRoute, match="configured routes"):
        router.decide(Request(prompt="hi", route="bogus"))


def test_no_rule_falls_back_to_the_default_route_with_low_confidence(router):
    # Words no example uses: the classifier knows nothing, so the default route answers.
    decision = router.decide(Request(prompt="Zorbing quokkas wibble?"))
    assert decision.route == "factual" and decision.confidence < 0.5
    assert "default" in decision.reason


def test_the_envelope_carries_the_slip_deadline_and_decision(router):
    request = Request(messages=[ChatMessage(role="user", content="hello"), ChatMessage(role="assistant", content="hi!"), ChatMessage(role="user", content="How do I fix a puncture?")], max_latency_ms=3000)
    decision = router.decide(request)
    env = router.envelope("r1", request, decision, "_INBOX.x.reply.r1", now=1000.0)
    assert env.slip[0].name == "guard.input" and env.cursor == 0
    assert env.deadline == pytest.approx(1003.0)  # the request's own limit is tighter than the route's
    assert env.context.question == "How do I fix a puncture?"
    assert [m.content for m in env.context.history] == ["hello", "hi!"]
    assert env.events[0].kind == "route" and env.events[0].data["route"] == decision.route
    env.slip[0].params["x"] = 1  # the slip is a copy: one request cannot change the route
    assert "x" not in router.config.routes[decision.route].steps[0].params


def test_metadata_rules_win_over_the_classifier(router):
    decision = router.decide(Request(prompt="hi there!", metadata={"risk": "high"}))
    assert decision.route == "high_risk" and decision.reason.startswith("metadata")


def test_the_classifier_routes_unseen_phrasing_with_a_confidence(router):
    decision = router.decide(Request(prompt="do you have any cargo e-bikes in stock and what do they cost?"))
    assert decision.route == "shopping"
    assert decision.reason.startswith("classifier") and decision.confidence >= router.config.routing.min_confidence


def test_low_confidence_falls_back_to_the_default_route(router):
    decision = router.decide(Request(prompt="zxq vlorp"))
    assert decision.route == router.config.default_route
    assert "default route" in decision.reason and decision.confidence < router.config.routing.min_confidence


def test_a_complex_request_escalates_to_the_frontier_route(router):
    prompt = ("My chain keeps dropping and the gears skip under load; first explain the likely causes, "
              "then compare replacing the chain versus the whole drivetrain, and recommend a plan with costs.")
    decision = router.decide(Request(prompt=prompt))
    assert decision.route == "complex" and decision.complexity >= router.config.routing.complexity_threshold
    simple = router.decide(Request(prompt="How do I oil my chain?"))
    assert simple.route == "factual" and simple.complexity < router.config.routing.complexity_threshold


def test_eval_routing_accuracy_on_the_labeled_set_stays_high(router):
    from services.router.evaluate import evaluate, load_labeled
    from shared.settings import ROOT

    items = load_labeled(ROOT / "tests" / "data" / "routing_eval.jsonl")
    report = evaluate(lambda prompt, metadata: router.decide(Request(prompt=prompt, metadata=metadata)).route, items)
    assert len(items) >= 60 and report.accuracy >= 0.9


# Routing on the blind set (tests/data/routing_blind.jsonl, frozen before any tuning), as
# reported in the README and `baton eval routing`: 99/105 (session 3; its dev part has since
# been tuned on). The margin is three prompts.
BLIND_ACCURACY_REPORTED = 99 / 105
BLIND_MARGIN = 3 / 105
# The frozen held-out part of all three sets (services/router/evaluate.py is_held_out), never
# tuned on: 80/86 in session 3.
HELD_OUT_REPORTED = 80 / 86
HELD_OUT_MARGIN = 3 / 86


def test_routing_on_the_frozen_held_out_part_does_not_regress(router):
    from services.router.evaluate import DEFAULT_SETS, evaluate, in_split, load_labeled

    items = in_split([item for path in DEFAULT_SETS for item in load_labeled(path)], "held-out")
    report = evaluate(lambda prompt, metadata: router.decide(Request(prompt=prompt, metadata=metadata)).route, items)
    assert len(items) == 86 and report.accuracy >= HELD_OUT_REPORTED - HELD_OUT_MARGIN, f"held-out routing accuracy {report.accuracy:.3f}"
    assert report.per_route["high_risk"].recall == 1.0


def test_routing_on_the_frozen_blind_set_does_not_regress(router):
    from services.router.evaluate import evaluate, load_labeled
    from shared.settings import ROOT

    items = load_labeled(ROOT / "tests" / "data" / "routing_blind.jsonl")
    report = evaluate(lambda prompt, metadata: router.decide(Request(prompt=prompt, metadata=metadata)).route, items)
    assert len(items) >= 100 and {item.route for item in items} == set(router.config.routes)
    assert report.accuracy >= BLIND_ACCURACY_REPORTED - BLIND_MARGIN, f"blind routing accuracy {report.accuracy:.3f}"
    assert report.per_route["high_risk"].recall == 1.0  # a missed incident is the costly error


def test_citations_are_renumbered_from_one_in_the_order_the_answer_cites_them():
    from shared.replies import renumber_citations
    from shared.schema import Citation

    answer = "Use mineral oil [3]. Bleed yearly [5]. Mineral oil again [3]; see step [9]."
    text, citations = renumber_citations(answer, [Citation(index=5, source="b.md"), Citation(index=3, source="a.md")])
    assert text == "Use mineral oil [1]. Bleed yearly [2]. Mineral oil again [1]; see step [9]."
    assert [(c.index, c.source) for c in citations] == [(1, "a.md"), (2, "b.md")]


def test_the_generator_reorders_passages_so_cited_sources_read_from_one():
    from shared.replies import cited_first

    passages = ["p1", "p2", "p3", "p4"]
    text, cited, reordered = cited_first("Oil [3]. Bleed [2]. Oil [3].", [2, 3], passages)
    assert text == "Oil [1]. Bleed [2]. Oil [1]."
    assert cited == [2, 1] and reordered == ["p3", "p2", "p1", "p4"]
    assert cited_first("A [1]. B [2].", [1, 2], passages) == ("A [1]. B [2].", [1, 2], passages)


# -- issue 17: what `match` means is explicit -----------------------------------------------

TYRES = """
  tyres:
    description: Tyre questions.
    match:
      words: [tubeless, tyre, tyres]
    steps: [guard.input, generate]
"""


def _config_with(route_yaml: str):
    from shared.config import parse_config

    text = Settings().config.read_text().replace("\nroutes:\n", "\nroutes:\n" + route_yaml, 1)
    return parse_config(text, "custom.yaml")


def test_a_custom_route_matched_by_words_fires_while_the_classifier_is_on():
    router = Router(_config_with(TYRES))
    assert router.classifier is not None
    decision = router.decide(Request(prompt="Is tubeless worth it?"))
    assert decision.route == "tyres" and decision.reason == "words tubeless"


def test_the_old_match_keywords_is_refused_with_the_way_to_migrate():
    from shared.config import ConfigError

    with pytest.raises(ConfigError) as caught:
        _config_with(TYRES.replace("words:", "keywords:"))
    message = str(caught.value)
    assert "routes.tyres.match" in message and "hints" in message and "match.words" in message


def test_hints_teach_the_classifier_but_never_route_on_their_own():
    router = Router(_config_with(TYRES.replace("    match:\n      words: [tubeless, tyre, tyres]\n", "    hints: [tubeless]\n    examples: [\"which tyres for winter\"]\n")))
    assert router.decide(Request(prompt="Is tubeless worth it?")).reason != "words tubeless"
