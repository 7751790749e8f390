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
from collections.abc import Callable, Collection
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from services.router.classifier import PAYLOAD_MARKER, asks_for_text_task, focus_text

if TYPE_CHECKING:  # routing imports this module
    from services.router.routing import RouteDecision

RISK_ROUTE = "high_risk"
RISK_THRESHOLD = 0.5


@dataclass(frozen=True)
class RiskAssessment:
    score: float
    reasons: list[str] = field(default_factory=list)
    by_model: bool = False  # a model's probability crossed its own threshold (see with_models)

    @property
    def high(self) -> bool:
        return self.by_model or self.score >= RISK_THRESHOLD


# Software that "crashes" or a "fire sale" is not an incident: these words in the same
# sentence turn the crash/fire cue off.
_NOT_PHYSICAL = r"(?![^.!?\n]{0,40}\b(?:app|website|site|page|software|firmware|computer|laptop|phone|browser|game|sale|course)\b)"
# Figurative or product uses found around a match ("my legs are on fire", "prices are
# crashing", "crash damage is covered?", "the Fire 2 light"): that match does not count,
# though a later one in the same text still can.
_FIGURATIVE_FIRE = re.compile(
    r"\b(?:legs|lungs|quads|calves|thighs|sale|deals|prices|offers|form|descent|ride|climb|run|session|pace|team|you)\s+(?:\w+\s+){0,2}on fire\b|"
    r"\bon fire\W+(?:\w+\W+){0,2}(?:haha|lol)\b|\b(?:stop|prevent|avoid|keep)\b[^.!?\n]{0,40}overheat\w*|\bfire ?\d|"
    r"\b(?:brakes?|rotors?|discs?|pads?|rims?)\b[^.!?\n]{0,25}overheat\w*|"
    r"\bfire[- ]?(?:extinguishers?|blankets?|safety|alarms?|proof|resistant|rated|retardant|resistance)")
_FIGURATIVE_CRASH = re.compile(
    r"\b(?:prices?|sales?|market|stocks?|shares|server|app|website|site|system|computer|phone)\s+(?:\w+\s+){0,2}crash\w*|"
    r"\bcrash[- ](?:damage|replacement|tested|test|protection|pads?|course|helmet|cover|policy|sensors?|detection)|"
    r"\bhit the road\b(?!\s+(?:hard|face|head))|\bfell (?:in love|asleep|for|behind|through|short)|"
    r"\b(?:chain|kickstand|mudguard|fender|bottle|light|bell|reflector|bag|pump|cap|lock|mount|sticker|decal)s? (?:fell|came) off")
_ENERGY = r"(?:battery|batteries|charger|motor|pack|cells?|plug|cable|display|controller)"
_MONEY_BACK = r"(?:revers|claw|dispute|investigat|recover|money back|chargeback|cancel|block|stop(?:ped)? the payment)"
_CARD_SIDE = r"(?:bank|card (?:issuer|company|provider)|credit card(?: company| provider)?|visa|mastercard|amex|paypal)"

Cue = tuple[str, float, "re.Pattern[str]", "re.Pattern[str] | None"]
_CUES: list[Cue] = [
    ("safety incident: fire or smoke", 0.9, re.compile(
        r"\b(?:caught fire|on fire|in flames|flames?|burst into|(?:is |was |started )?smok(?:e|ing|ed|y)\b|"
        r"fire\b" + _NOT_PHYSICAL + r"|explo(?:ded|sion|de)|spark(?:s|ing|ed)|melt(?:ed|ing)|"
        r"burn(?:t|ed|ing)? (?:smell|out|my|his|her|their|a hole)|burning|burns\b|scorch\w*|overheat\w*|"
        r"smel(?:l|ls|lt|led|ling) (?:of|like) (?:burning|smoke|plastic|melting|electrical|fire|chemicals?)|"
        r"(?:swollen|swelling|bulging|puffed(?: up)?|puffy|hissing|smoking|leaking) " + _ENERGY + r"|"
        + _ENERGY + r"\b[^.!?\n]{0,40}\b(?:hiss\w*|bulg\w*|swell\w*|swollen|puff(?:ed|ing|y)\b|crackl\w*|leak(?:s|ed|ing)\b|"
        r"fizz\w*|popp(?:ed|ing)|(?:went|goes|go) (?:pop|bang)|blacken\w*|scorch\w*|(?:really|very|too|so|extremely|boiling|super|scorching) hot|hot (?:to (?:the )?touch|and)|"
        r"smell(?:s|ing)? (?:funny|weird|strange|bad|awful|of|like))|"
        r"electric(?:al)? shock|got a shock)"), _FIGURATIVE_FIRE),
    ("injury", 0.9, re.compile(
        r"\b(?:injur\w*|hurt (?:my|his|her|him|me|myself|themselves|their)|hospital|a ?& ?e\b|emergency room|"
        r"ambulance|paramedic|stitches|concussion|bleeding|fractur\w*|broke (?:my|his|her|their) \w+|"
        r"broken (?:arm|wrist|leg|collarbone|bone|nose|rib|ribs|ankle|hand|finger|jaw|teeth|tooth|hip|shoulder)|"
        r"(?:was|got|been|am|is|are) (?:hurt|injured|knocked)|killed|(?:he|she|they|someone|rider|person|child|son|daughter|"
        r"husband|wife|friend) (?:died|has died)|fatal|"
        r"(?:wrist|ankle|knee|hand|arm|leg|face|eye|shoulder|hip|elbow|finger|foot|head) (?:is |was |got |has )?(?:swollen|broken|bleeding|gashed|fractured)|gash\w*|"
        r"cut (?:up|open)|scrap(?:ed|es) (?:up|my|his|her)|grazed|road rash|skinned|bruis\w*|sprain\w*|whiplash|dislocat\w*|chipped (?:a|my|his|her) tooth|"
        r"(?:in|so much|a lot of) pain\b|lucky to be alive|knocked (?:out|unconscious|down)|hit (?:my|his|her|their) head|"
        r"(?:lost|knocked out|chipped|broke|cracked) (?:a|two|three|some|his|her|my|their)(?: front)? teeth|"
        r"landed (?:flat )?on (?:his|her|my|their) (?:face|head|back|side|shoulder|hip|chin)|"
        r"(?:doctor|gp|nurse) (?:says|said|thinks)|medical (?:bills?|costs?|attention|expenses)|x-?rays?)"), None),
    ("crash or failure while riding", 0.85, re.compile(
        r"\b(?:crash(?:ed|ing)?\b" + _NOT_PHYSICAL + r"|collision|collided|hit by (?:a|an|the) \w+|knocked off|"
        r"thrown (?:off|over)|lost control|doored|t-?boned|rear-?ended|side-?swiped|hit and run|went over the (?:bars|handlebars|front)|(?:flew|went|was thrown) over the (?:bars|handlebars|front)|"
        r"came off (?:my|the|his|her) (?:bike|e-?bike)|(?:i|we|he|she|they|my \w+) (?:fell|went down|came off|slid out|wiped out|slipped|skidded)|"
        r"fell (?:off|over)|face ?plant\w*|"
        r"(?:hit|ran into|rode into|rolled into|went into|slammed into|smashed into) (?:a|an|the|some) (?:\w+ )?"
        r"(?:car|van|bus|lorry|truck|wall|kerb|curb|tree|post|pole|fence|pedestrian|person|cyclist|bollard|gate|barrier|parked|ground|deck|tarmac|road|floor|pavement|hedge|ditch)|"
        r"(?:couldn'?t|could not|can'?t|unable to) stop\b|(?:throttle|motor|accelerator) (?:stuck|kept (?:going|pushing|running))|"
        r"(?:snapped|broke|failed|came (?:off|loose|apart|out)|locked up|gave way|gave out|stopped working|collapsed|fell out|fell off) "
        r"(?:while|when|as|mid|during|on (?:a|the|my) (?:descent|ride|road)|going (?:down|downhill))|"
        r"(?:brakes?|fork|frame|handlebars?|stem|wheel|crank(?: arm)?|pedal|seatpost|chain)(?: on [\w' -]{0,30})? "
        r"(?:failed|snapped|cracked and|gave way|gave out|came off|fell out|just stopped working|stopped working (?:going|on|while|when)))"),
        _FIGURATIVE_CRASH),
    ("legal threat", 0.9, re.compile(
        r"\b(?:sue|suing|sued|lawsuit|legal (?:action|team|department|advice|claim|proceedings|letter|case|route)|"
        r"lawyers?|solicitors?|attorneys?|court|small claims|"
        r"trading standards|citizens advice|ombudsman|negligen\w*|liab(?:le|ility)|take you to|see you in court|letter before (?:action|claim)|"
        r"claim against (?:you|your|the shop)|my rights under|consumer rights|report(?:ed|ing)? (?:you|your shop|this) to|"
        r"compensat\w+)"), None),
    ("chargeback or payment dispute", 0.9, re.compile(
        r"\b(?:charge ?backs?|disput(?:e|es|ed|ing)\b|section 75|"
        r"(?:my|the) " + _CARD_SIDE + r"\b[^.!?\n]{0,60}?\b" + _MONEY_BACK + r"|"
        + _MONEY_BACK + r"\w*[^.!?\n]{0,40}?\b(?:with|through|via|from|by) (?:my|the) " + _CARD_SIDE + r"|"
        r"(?:paypal|card) (?:claim|case)|(?:contact\w*|call\w*|rang|phoned|told|asked|gone to|went to) (?:my |the )?" + _CARD_SIDE + r"\b|(?:go|going|went|gone|talk\w*|speak\w*|spoke|contact\w*|call\w*|ring\w*|complain\w*|complaint|report\w*) "
        r"(?:\w+ ){0,2}(?:to|with) (?:my|the) " + _CARD_SIDE + r"|(?:bank|card issuer|credit card company|paypal) (?:dispute|claim|to reverse)|"
        r"reverse the (?:charge|payment|transaction))"), None),
    ("fraud", 0.9, re.compile(
        r"\b(?:fraud\w*|scam(?:med|mer|s)?|stolen (?:card|identity|credit card|details)|identity theft|"
        r"(?:card|wallet|details|identity|account|purse) (?:was|were|got|has been|have been) (?:stolen|hacked|compromised|cloned)|"
        r"reported (?:my |the )?(?:card|it|them) (?:as )?stolen|(?:registered|listed|reported|flagged) as stolen|"
        r"(?:someone|somebody|a stranger) (?:\w+ ){0,2}(?:on|with|using) my (?:card|account|details|name)|"
        r"(?:someone|somebody) (?:used|has used|is using) my (?:card|account|details)|without my (?:permission|consent|knowledge)|"
        r"used without (?:my )?(?:permission|consent)|stole my (?:identity|card|details|account)|stolen (?:bike|goods|e-?bike)|"
        r"unauthori[sz]ed (?:charge|payment|transaction|purchase|order)|didn'?t (?:make|authori[sz]e|place) (?:this|that|the) "
        r"(?:purchase|order|payment)|never (?:made|placed|ordered|authori[sz]ed|bought)|don'?t recogni[sz]e|"
        r"phishing|hacked|pretending to be (?:you|your|the shop)|impersonat\w*|(?:took|stole|taken|stolen) my money|debt collector|(?:fake|cloned|copycat|bogus) (?:website|site|shop|email|text|page|account)|"
        r"(?:pay|paid) (?:a fee |the fee )?(?:by|via|through|with) (?:a |the |this )?link|\blink to pay\b|suspicious (?:email|text|message|link|call)|"
        r"(?:asking|asked|asks|wants?|wanted|told) (?:me )?to (?:confirm|verify|re-?enter|update) (?:my )?(?:bank|card|account|login|payment) (?:details|information|info|password)|"
        r"(?:gift card|voucher)s?\b[^.!?\n]{0,40}\b(?:real|genuine|legit|fake|valid)\b)"), None),
    ("falsify records", 0.9, re.compile(
        r"\b(?:backdate|back-date|back date|falsif\w*|forge[ds]?\b|forgery|fake (?:\w+ )?(?:receipt|invoice|record|date|warranty|claim|report|accident|theft)|"
        r"(?:name|date|price|amount|total) on (?:my|the|a|an|this) (?:\w+ )?(?:invoice|receipt|record|report|registration|certificate|paperwork)|"
        r"(?:change|alter|edit|amend|move|update) (?:the |my )?(?:purchase|invoice|receipt|sale|order) date|date (?:the|my|an|a) (?:invoice|receipt|record|report|claim)|"
        r"make (?:the|my|a|an) (?:invoice|receipt|record|report) (?:say|show|state|read)|"
        r"(?:an? )?(?:older|earlier|different|previous|old|last year'?s|past) date|date on (?:my|the|a) (?:\w+ )?(?:invoice|receipt)|"
        r"(?:change|alter|edit|amend) the (?:date|price|amount|details) on (?:my|the|a) (?:\w+ )?(?:invoice|receipt|record|report)|"
        r"(?:mark|list|record|register|report|log|put down) (?:my|the|this|it) (?:\w+ )?as (?:received|delivered|returned|paid|repaired|stolen|lost|faulty|defective|unused|new|damaged)|"
        r"(?:receipt|invoice|report|record) (?:saying|that says|stating|showing) (?:i|we|it)|"
        r"(?:receipt|invoice|report|record)[^.!?\n]{0,30}\b(?:say|says|show|shows|state|states)\b[^.!?\n]{0,30}\b(?:paid|cost|bought|faulty|defective|higher|lower|different|more|less)|"
        r"(?:say|write|state|put|note|claim|pretend) (?:that )?(?:the|it|my) (?:\w+ ){0,2}(?:was|were|happened|arrived|came) (?:faulty|defective|broken|damaged|stolen|in transit|like that|before)|"
        r"(?:that way|so|then) (?:my|the) insur\w+ (?:pays|will pay|covers|would pay)|"
        r"(?:say|write|state|put|note|claim|pretend) (?:that )?(?:the|it|my) (?:\w+ ){0,2}(?:was|were) (?:there|already \w+) (?:when|before) (?:i|we) (?:bought|got|collected)|"
        r"(?:make|print|write|issue|give) (?:me )?(?:up )?(?:a|an) (?:new )?(?:receipt|invoice)[^.!?\n]{0,40}\b(?:elsewhere|somewhere else|older|didn'?t|never|even though)|"
        r"(?:for|so) (?:my|the) insur(?:ance|er)\w*[^.!?\n]{0,60}\b(?:say|says|show|pretend|instead|different|even though)|"
        r"(?:invoice|receipt)s?\b[^.!?\n]{0,60}\b(?:higher|lower|different|bigger|smaller) (?:value|price|amount|total|figure)s? than|"
        r"(?:invoice|receipt)s? (?:dated|with the date) (?:\w+ ){0,2}(?:not|instead of|rather than)\b|"
        r"so (?:it|that it) looks like|nobody will know|no one will know|even though it was|pretend (?:i|we) bought)"), None),
    ("threat of harm", 0.6, re.compile(
        r"\b(?:dangerous|unsafe|hazard\w*|recall(?:ed)?|could have (?:killed|died)|nearly (?:killed|died))"), None),
]


def _first_real_match(pattern: re.Pattern[str], unless: re.Pattern[str] | None, text: str) -> re.Match[str] | None:
    """The first match that is not a figurative or product use of the cue word."""
    for match in pattern.finditer(text):
        around = unless.finditer(text, max(0, match.start() - 30), match.end() + 30) if unless else ()
        if not any(use.start() < match.end() and use.end() > match.start() for use in around):
            return match
    return None


# The cues are written in lower case and matched against the lowered text: case-insensitive
# matching costs Python's re about three times as much. "ER" is the one cue that needs its case.
_ER = re.compile(r"\bER\b")


def assess_risk(text: str) -> RiskAssessment:
    """The request's risk score in [0, 1] and the cues behind it."""
    text = _ER.sub("emergency room", text).lower()
    remaining, reasons = 1.0, []
    for label, weight, pattern, unless in _CUES:
        match = pattern.search(text) if unless is None else _first_real_match(pattern, unless, text)
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
    if PAYLOAD_MARKER not in instruction or not asks_for_text_task(instruction):
        return whole  # "quick question: <my story>" is the user's own situation, not material
    own = assess_risk(instruction.replace(PAYLOAD_MARKER, " "))
    if own.high:
        return own
    material = [reason for reason in whole.reasons if reason not in own.reasons]
    remaining = 1.0 - own.score
    for label, weight, _, _ in _CUES:
        if any(reason.startswith(label + " (") for reason in material):
            remaining *= 1.0 - weight * MATERIAL_WEIGHT
    return RiskAssessment(round(1.0 - remaining, 4), [*own.reasons, *(f"{reason} in pasted text" for reason in material)])


# Past the cues, a reader that learned from examples (many writers and voices, see
# tools/merge_routing_examples.py) judges meaning rather than words: the contextual encoder's
# risk head (risk_model.py, 15-30 ms of CPU). It reads a request when the route classifier
# gives the high-risk route at least ENCODER_GATE of probability though another route won,
# or when the classifier did not see all of the text (a story told after a colon is taken
# for pasted material, see focus_text). Ordinary questions below the gate never pay for it. Leave-one-source-out over
# eight writers and voices: every cue miss recovered; see README for precision.
ENCODER_GATE = 0.05


def with_models(cues: RiskAssessment, high_risk_probability: float | None, second_reader: Callable[[], float] | None = None,
                second_threshold: float = 0.5, *, unseen_material: bool = False) -> RiskAssessment:
    """The cues' assessment, escalated when the encoder reads the text as high-risk.

    `high_risk_probability` is the route classifier's probability for the high-risk route
    (None without a classifier); `second_reader` computes the encoder's probability and is
    called only past the gate.
    """
    if cues.high or high_risk_probability is None or second_reader is None:
        return cues
    if high_risk_probability < ENCODER_GATE and not unseen_material:
        return cues
    probability = second_reader()
    if probability < second_threshold:
        return cues
    reason = f"encoder: high-risk probability {probability:.2f} (>= {second_threshold})"
    return RiskAssessment(max(cues.score, round(probability, 4)), [*cues.reasons, reason], by_model=True)


def escalate_for_risk(decision: RouteDecision, text: str, routes: Collection[str], risk: RiskAssessment | None = None) -> RouteDecision:
    """The decision with its risk score and reasons, moved to the high-risk route when the
    text is high-risk (by `risk` when given, else by the cues). A route hint is the caller's
    explicit choice and stays; without a high-risk route in the config nothing moves."""
    if decision.reason == "route hint" or RISK_ROUTE not in routes:
        return decision
    risk = risk if risk is not None else assess_request_risk(text)
    scored = replace(decision, risk=risk.score, risk_reasons=tuple(risk.reasons))
    if not risk.high or decision.route == RISK_ROUTE:
        return scored
    why = "; ".join(risk.reasons[:3])
    return replace(scored, route=RISK_ROUTE, reason=f"{decision.reason}; escalated from {decision.route}: risk {risk.score:.2f} ({why})")
