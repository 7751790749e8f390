"""Risk escalation without metadata: safety incidents, injuries, crashes, legal threats,
chargebacks, fraud and requests to falsify records go to the high-risk route, whatever
topic they are about, the way a complex request escalates to the frontier tier.

Missing one costs far more than over-escalating one (a human reads high-risk replies;
a burning battery answered by the small model is the failure to avoid), so the cues are
tuned for recall: one strong cue is enough. Each cue has a weight; the score combines
them as a noisy-or, 1 - prod(1 - w), and the reasons name the cues that fired. Plain
Python, no NATS; about 20 microseconds on a question.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from services.router.classifier import PAYLOAD_MARKER, focus_text

if TYPE_CHECKING:  # routing imports this module
    from services.router.routing import RouteDecision

RISK_ROUTE = "high_risk"
RISK_THRESHOLD = 0.5


@dataclass(frozen=True)
class RiskAssessment:
    score: float
    reasons: list[str] = field(default_factory=list)

    @property
    def high(self) -> bool:
        return self.score >= RISK_THRESHOLD


# Software that "crashes" or a "fire sale" is not an incident: these words in the same
# sentence turn the crash/fire cue off.
_NOT_PHYSICAL = r"(?![^.!?\n]{0,40}\b(?:app|website|site|page|software|firmware|computer|laptop|phone|browser|game|sale|course)\b)"

_CUES: list[tuple[str, float, re.Pattern[str]]] = [
    ("safety incident: fire or smoke", 0.9, re.compile(
        r"\b(?:caught fire|on fire|in flames|flames?|burst into|(?:is |was |started )?smok(?:e|ing|ed)\b|"
        r"fire\b" + _NOT_PHYSICAL + r"|explo(?:ded|sion|de)|spark(?:s|ing|ed)|melt(?:ed|ing)|"
        r"burn(?:t|ed|ing)? (?:smell|out|my|his|her|their|a hole)|burning|scorch\w*|overheat\w*|"
        r"swollen battery|battery (?:is )?(?:swelling|swollen|hissing|leaking)|electric(?:al)? shock|got a shock)", re.I)),
    ("injury", 0.9, re.compile(
        r"\b(?:injur\w*|hurt (?:my|his|her|him|me|myself|themselves|their)|hospital|a ?& ?e\b|emergency room|"
        r"(?-i:\bER\b)|ambulance|paramedic|stitches|concussion|bleeding|fractur\w*|broke (?:my|his|her|their) \w+|"
        r"broken (?:arm|wrist|leg|collarbone|bone|nose|rib|ribs|ankle|hand|finger|jaw|teeth|tooth)|"
        r"(?:was|got|been) (?:hurt|injured|knocked)|killed|(?:he|she|they|someone|rider|person|child|son|daughter|"
        r"husband|wife|friend) (?:died|has died)|fatal)", re.I)),
    ("crash or failure while riding", 0.85, re.compile(
        r"\b(?:crash(?:ed|ing)?\b" + _NOT_PHYSICAL + r"|collision|collided|hit by (?:a|an|the) \w+|knocked off|"
        r"thrown (?:off|over)|went over the (?:bars|handlebars)|came off (?:my|the) (?:bike|e-?bike)|"
        r"(?:i|we|he|she|they|my \w+) fell off|fell off (?:my|the|his|her|their) (?:bike|e-?bike)|(?:snapped|broke|failed|came (?:off|loose|apart)|locked up|gave way|collapsed) "
        r"(?:while|when|as|mid|during|on (?:a|the|my) (?:descent|ride|road))|"
        r"(?:brakes?|fork|frame|handlebars?|stem|wheel|crank|pedal|seatpost)(?: on [\w' -]{0,30})? "
        r"(?:failed|snapped|cracked and|gave way|came off))", re.I)),
    ("legal threat", 0.9, re.compile(
        r"\b(?:sue|suing|sued|lawsuit|legal action|lawyers?|solicitors?|attorneys?|court|small claims|"
        r"trading standards|ombudsman|negligen\w*|liab(?:le|ility)|take you to|see you in court|"
        r"legal (?:claim|proceedings|letter)|my rights under|consumer rights act|report you to)", re.I)),
    ("chargeback or payment dispute", 0.9, re.compile(
        r"\b(?:charge ?backs?|dispute[ds]? (?:the|this|a|my)? ?(?:payment|charge|transaction)|"
        r"disputing (?:the|this|a|my)? ?(?:payment|charge|transaction)|"
        r"(?:bank|card issuer|credit card company|paypal) (?:dispute|claim|to reverse)|reverse the (?:charge|payment)|"
        r"(?:filed|opened|raised|raising|opening|filing) a (?:dispute|claim) with (?:my|the) (?:bank|card|paypal))", re.I)),
    ("fraud", 0.9, re.compile(
        r"\b(?:fraud\w*|scam(?:med|mer|s)?|stolen (?:card|identity|credit card)|identity theft|"
        r"(?:someone|somebody) (?:used|has used|is using) my (?:card|account|details)|"
        r"unauthori[sz]ed (?:charge|payment|transaction|purchase)|didn'?t (?:make|authori[sz]e) (?:this|that|the) "
        r"(?:purchase|order|payment)|phishing|hacked)", re.I)),
    ("falsify records", 0.9, re.compile(
        r"\b(?:backdate|back-date|falsif\w*|forge|forged|fake (?:receipt|invoice|record|date|warranty)|"
        r"(?:change|alter|edit|amend) the (?:date|price|amount|details) on (?:my|the|a) (?:\w+ )?(?:invoice|receipt|record|report)|"
        r"mark (?:my|the|this) \w+ as (?:received|delivered|returned|paid|repaired)|"
        r"(?:receipt|invoice|report|record) (?:saying|that says|stating|showing) (?:i|we|it)|"
        r"(?:for|so) (?:my|the) insur(?:ance|er)\w*[^.!?\n]{0,60}\b(?:say|says|show|pretend|instead|different|even though)|"
        r"even though it was|pretend (?:i|we) bought)", re.I)),
    ("threat of harm", 0.6, re.compile(
        r"\b(?:dangerous|unsafe|hazard\w*|recall(?:ed)?|could have (?:killed|died)|nearly (?:killed|died))", re.I)),
]


def assess_risk(text: str) -> RiskAssessment:
    """The request's risk score in [0, 1] and the cues behind it."""
    remaining, reasons = 1.0, []
    for label, weight, pattern in _CUES:
        match = pattern.search(text)
        if match:
            remaining *= 1.0 - weight
            reasons.append(f"{label} ({match.group().strip()!r})")
    return RiskAssessment(round(1.0 - remaining, 4), reasons)


# Cues found only in pasted material ("rephrase this: ... crash damage is not covered") count
# at this share of their weight: one cue there is not enough to escalate, two are.
MATERIAL_WEIGHT = 0.5


def assess_request_risk(text: str) -> RiskAssessment:
    """Risk of a request whose pasted material (see focus_text) may mention incidents.

    A text task about a warranty letter that says "crash damage is not covered" is not an
    incident; "summarize this: I crashed when the fork snapped and I'm taking you to court"
    still is (two cues). Cues in the instruction itself count in full.
    """
    whole = assess_risk(text)
    if not whole.high:
        return whole  # discounting can only lower it: the common case costs one pass
    instruction = focus_text(text)
    if PAYLOAD_MARKER not in instruction:
        return whole
    own = assess_risk(instruction.replace(PAYLOAD_MARKER, " "))
    if own.high:
        return own
    material = [reason for reason in whole.reasons if reason not in own.reasons]
    remaining = 1.0 - own.score
    for label, weight, _ in _CUES:
        if any(reason.startswith(label + " (") for reason in material):
            remaining *= 1.0 - weight * MATERIAL_WEIGHT
    return RiskAssessment(round(1.0 - remaining, 4), [*own.reasons, *(f"{reason} in pasted text" for reason in material)])


def escalate_for_risk(decision: RouteDecision, text: str, routes: Collection[str]) -> RouteDecision:
    """The decision with its risk score and reasons, moved to the high-risk route when the
    text is high-risk. A route hint is the caller's explicit choice and stays; without a
    high-risk route in the config nothing moves."""
    if decision.reason == "route hint" or RISK_ROUTE not in routes:
        return decision
    risk = assess_request_risk(text)
    scored = replace(decision, risk=risk.score, risk_reasons=tuple(risk.reasons))
    if not risk.high or decision.route == RISK_ROUTE:
        return scored
    why = "; ".join(risk.reasons[:3])
    return replace(scored, route=RISK_ROUTE, reason=f"{decision.reason}; escalated from {decision.route}: risk {risk.score:.2f} ({why})")
