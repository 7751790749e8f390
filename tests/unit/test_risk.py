"""Risk escalation without metadata: what a human must see goes to high_risk, whatever the topic."""

from __future__ import annotations

import pytest

from services.router.risk import assess_risk
from services.router.routing import Router, _route_event
from shared.config import load_config
from shared.schema import Request
from shared.settings import Settings


@pytest.fixture(scope="module")
def router() -> Router:
    return Router(load_config(Settings().config))


@pytest.mark.parametrize(
    "prompt",
    [
        "Smoke is coming out of my e-bike battery right now, what should I do?",
        "I will sue you if the frame isn't replaced this week.",
        "I've asked my bank for a chargeback on the order you never sent.",
        "My son went over the bars when the stem snapped and he needed stitches.",
        "Someone used my card to order three bikes from your site.",
        "Could you backdate my receipt so it is still under warranty?",
        "The charger sparked and there was a burning smell in the garage.",
        "What is the price of your cheapest helmet? Also my solicitor will contact you about my accident.",
    ],
)
def test_high_risk_requests_without_metadata_reach_high_risk(router, prompt):
    decision = router.decide(Request(prompt=prompt))
    assert decision.route == "high_risk"
    assert decision.risk >= 0.5 and decision.risk_reasons
    event = _route_event(decision)
    assert event.data["risk"] == decision.risk and event.data["risk_reasons"]


@pytest.mark.parametrize(
    "prompt",
    [
        "How often should I replace my chain?",
        "The app crashes when I open the ride history.",
        "Is there a fire sale on helmets this weekend?",
        "What's your returns policy for unworn shoes?",
    ],
)
def test_ordinary_requests_stay_where_they_are(router, prompt):
    decision = router.decide(Request(prompt=prompt))
    assert decision.route != "high_risk" and assess_risk(prompt).score < 0.5


def test_a_route_hint_is_the_callers_choice(router):
    assert router.decide(Request(prompt="My battery is on fire", route="factual")).route == "factual"


@pytest.mark.parametrize(
    ("prompt", "route"),
    [
        # The incident word is in the letter being reworded, not in the user's situation.
        ("Make this sound kinder: Your claim was declined because damage from a crash is not covered by the frame warranty.", "rewrite"),
        ("Label this review as praise or complaint: 'Took a small crash on the first ride and the bar tape survived, love it.'", "classify"),
    ],
)
def test_one_incident_word_in_pasted_material_does_not_escalate(router, prompt, route):
    decision = router.decide(Request(prompt=prompt))
    assert decision.route == route
    assert any("in pasted text" in reason for reason in decision.risk_reasons)


@pytest.mark.parametrize(
    "prompt",
    [
        # Two cues in the material, or one in the instruction itself, still escalate.
        "Summarise this for my insurer: the fork snapped on a descent, I crashed and I am talking to a solicitor about it.",
        "Rewrite my complaint, my daughter was injured: the stem came loose on her first ride after your service.",
    ],
)
def test_strong_or_first_person_incidents_around_a_text_task_still_escalate(router, prompt):
    assert router.decide(Request(prompt=prompt)).route == "high_risk"


@pytest.mark.parametrize(
    "prompt",
    [
        # Incidents told the way customers type them, inside an ordinary question and without
        # the textbook word: no "fire", no "chargeback", no "falsify".
        "my order #123 arrived and the battery is hot and hissing, can I return it?",
        "the shop charged me twice, I'm disputing it with my bank",
        "can you put last year's date on my invoice so warranty applies",
        "quick question: the back wheel slid out on the roundabout and I hit the kerb, is the frame covered?",
        "Charger smells like burning plastic when it's plugged in, normal?",
        "I never placed this order, why is it on my statement",
        "we got a letter before action drafted, expect it monday",
    ],
)
def test_incidents_phrased_as_ordinary_questions_reach_high_risk(router, prompt):
    decision = router.decide(Request(prompt=prompt))
    assert decision.route == "high_risk", decision.reason
    assert decision.risk_reasons


@pytest.mark.parametrize(
    "prompt",
    [
        "haha my legs are on fire after that climb",
        "Is crash damage covered by your frame warranty?",
        "Do you sell fire extinguishers for the garage?",
        "Can you change the date of my service booking?",
        "My chain fell off when I changed gear, how do I fix it?",
        "I fell in love with the Metro 8, is it in stock?",
        "Why does my battery get warm while it charges?",
    ],
)
def test_figurative_and_everyday_uses_of_incident_words_do_not_escalate(router, prompt):
    decision = router.decide(Request(prompt=prompt))
    assert decision.route != "high_risk" and decision.risk < 0.5, decision.risk_reasons


# Written before any result was seen (tests/data/routing_*_13r.jsonl); the held-out part is
# never tuned on. Session 3: high-risk recall 22/22, routing 81/89.
HELD_OUT_13R_ROUTING = 81 / 89
HELD_OUT_13R_MARGIN = 3 / 89


def test_fresh_sets_held_out_part_keeps_every_incident_and_its_routing(router):
    from services.router.evaluate import evaluate, in_split, load_labeled
    from shared.settings import ROOT

    paths = [ROOT / "tests" / "data" / name for name in ("routing_risk_13r.jsonl", "routing_routes_13r.jsonl")]
    items = in_split([item for path in paths for item in load_labeled(path)], "held-out")
    report = evaluate(lambda prompt, metadata: router.decide(Request(prompt=prompt, metadata=metadata)).route, items)
    assert len(items) == 89
    assert report.per_route["high_risk"].recall == 1.0  # a missed incident is the costly error
    # Recall first: session 4's examples and encoder escalate 4 of the 25 look-alikes (session 3: 1).
    assert report.per_route["high_risk"].precision >= 0.8
    assert report.accuracy >= HELD_OUT_13R_ROUTING - HELD_OUT_13R_MARGIN, f"held-out routing accuracy {report.accuracy:.3f}"


# ---------------------------------------------------------------------------
# The second reader: the contextual encoder's risk head (services/router/risk_model.py)


def _never_called() -> float:
    raise AssertionError("the encoder ran below the gate")


def test_the_encoder_reads_only_past_the_gate_and_escalates_at_its_threshold():
    from services.router.risk import ENCODER_GATE, RiskAssessment, with_models

    calm = RiskAssessment(0.0, [])
    assert with_models(calm, ENCODER_GATE / 2, _never_called) == calm  # ordinary questions never pay for it
    assert with_models(calm, ENCODER_GATE, lambda: 0.49) == calm
    high = with_models(calm, ENCODER_GATE, lambda: 0.81)
    assert high.high and high.score == 0.81 and high.reasons == ["encoder: high-risk probability 0.81 (>= 0.5)"]
    # Text the classifier did not see (material after "rewrite this:") is read whatever its probability.
    assert with_models(calm, 0.0, lambda: 0.9, unseen_material=True).high
    # Cues that already escalate need no second opinion.
    cued = RiskAssessment(0.9, ["fraud ('scammed')"])
    assert with_models(cued, 0.5, _never_called) == cued


def test_an_encoder_escalation_carries_its_reason_and_score_to_the_decision_and_event(router, monkeypatch):
    from services.router.risk_model import EncoderRiskModel

    class Reads(EncoderRiskModel):
        """The shipped head and encoder, and a record of what they were asked to read."""

        def __init__(self) -> None:
            super().__init__()
            self.read: list[str] = []

        def probability(self, text: str) -> float:
            self.read.append(text)
            return super().probability(text)

    model = Reads()
    monkeypatch.setattr(router, "risk_model", model)
    # The user's own injury claim told after a colon, without one cue word: the classifier takes
    # it for pasted material and sees only "Bit of a situation".
    prompt = ("Bit of a situation: the bike you sold me threw me off when the bars turned. I've been off work for a "
              "month and I want to know who pays.")
    decision = router.decide(Request(prompt=prompt))
    assert model.read == [prompt]
    assert decision.route == "high_risk" and "escalated from" in decision.reason
    assert decision.risk >= 0.5 and decision.risk_reasons[-1].startswith("encoder: high-risk probability")
    assert _route_event(decision).data["risk_reasons"] == list(decision.risk_reasons)
    # An ordinary question does not wake the encoder.
    assert router.decide(Request(prompt="How often should I replace my chain?")).route == "factual"
    assert model.read == [prompt]


def test_without_the_model_package_the_router_judges_risk_by_cues_and_examples(monkeypatch):
    from services.router import risk_model
    from shared import encoder

    monkeypatch.setattr(encoder, "_shared", None)
    monkeypatch.setattr(encoder.importlib.util, "find_spec", lambda name: None)
    assert risk_model.load_risk_model() is None
    router = Router(load_config(Settings().config))
    assert router.risk_model is None
    assert router.decide(Request(prompt="Smoke is coming out of my e-bike battery right now")).route == "high_risk"


@pytest.mark.parametrize(
    ("prompt", "high_risk"),
    [
        # Written for this test (session 4), never in a labeled set: incidents without a cue
        # word, and their look-alikes.
        ("Quick one: the battery pack has been ticking and feels warm even though it's unplugged, is that ok to leave in the hallway?", True),
        ("After the mechanic fitted new pads my front wheel locked and I went over, now my arm is in a sling. Do you want the bike back?", True),
        ("My card statement shows four payments to you this morning and I only bought a bell.", True),
        ("The handlebar came clean off at 30 km/h on the bypass. What do you need from me?", True),
        ("How warm should a battery get while charging normally?", False),
        ("What pads should I fit for long alpine descents?", False),
        ("Can I pay for the bike in four instalments on my card?", False),
        ("How do I check that the stem bolts are tight enough?", False),
    ],
)
def test_incidents_without_cue_words_reach_high_risk_and_their_look_alikes_do_not(router, prompt, high_risk):
    assert (router.decide(Request(prompt=prompt)).route == "high_risk") == high_risk


def test_seven_voices_held_out_part_keeps_every_incident(router):
    # tests/data/routing_voices_13m.jsonl: terse, rambling, non-native, angry, polite, typos and
    # stories, written before any result (session 4); its held-out part is never tuned on.
    from services.router.evaluate import evaluate, in_split, load_labeled
    from shared.settings import ROOT

    items = in_split(load_labeled(ROOT / "tests" / "data" / "routing_voices_13m.jsonl"), "held-out")
    report = evaluate(lambda prompt, metadata: router.decide(Request(prompt=prompt, metadata=metadata)).route, items)
    assert len(items) == 48
    assert report.per_route["high_risk"].recall == 1.0
    assert report.accuracy >= HELD_OUT_13M_ROUTING, f"held-out routing accuracy {report.accuracy:.3f}"


HELD_OUT_13M_ROUTING = 40 / 48  # session 4 start: 37/48, high-risk recall 0.85
