"""The quality gates a request passes on its way through the mesh, as plain functions.

Each gate returns a `GateResult`: "pass" (nothing to do), "fixed" (the text was
repaired, e.g. redacted, and `text` holds the repaired version; for the retrieval gate
`passages` holds the repaired passages) or "fail" (stop the request). Gates are
synchronous and cheap (regexes compiled at import or once per config), so the
guardrail service can call them inline without a thread pool.

- input: size (characters, estimated tokens), prompt injection, banned topics, redaction.
- retrieval: enough passages, good enough scores, on the question's topic, and no
  instructions hidden inside them (indirect injection is cut out: verdict "fixed").
- output: size, JSON schema, groundedness in the passages, refusals, redaction.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Literal

from services.guardrail.grounding import groundedness, term_overlap
from services.guardrail.indirect import neutralize_passages
from services.guardrail.injection import InjectionResult, combine, detect_injection, normalize
from shared.pii import ALWAYS_REDACT, KINDS, Finding, redact
from shared.config import GuardSpec
from shared.schema import Passage

__all__ = [
    "ALWAYS_REDACT",
    "GateResult",
    "banned_topic",
    "detect_refusal",
    "estimate_tokens",
    "groundedness",
    "injection_layer",
    "input_gate",
    "neutralize_passages",
    "output_gate",
    "retrieval_gate",
    "validate_json",
]

Verdict = Literal["pass", "fixed", "fail"]

# Credentials are redacted even when config does not list them: no answer or prompt
# ever needs a live API key.
# How many of the best passages must share terms with the question.
TOP_PASSAGES = 3
# A sentence is supported when this share of its content terms is in one passage.
SUPPORT_THRESHOLD = 0.5
_QUOTE_CHARS = 160  # the most of an answer sentence a reason quotes


@dataclass
class GateResult:
    gate: str  # "input", "retrieval" or "output"
    verdict: Verdict
    score: float
    reason: str
    text: str | None = None  # the repaired text, set only when verdict == "fixed"
    findings: list[str] = field(default_factory=list)  # log-safe labels, never raw values
    passages: list[Passage] | None = None  # the repaired passages (retrieval gate, verdict "fixed")

    @property
    def ok(self) -> bool:
        return self.verdict != "fail"

    def to_event_data(self) -> dict[str, Any]:
        """Data for an `Event(kind="gate")`: JSON-safe and free of raw PII.

        The repaired text is left out on purpose (it is the request's question or
        answer, which the envelope already carries); only whether there was one.
        """
        return {
            "gate": self.gate,
            "verdict": self.verdict,
            "score": round(self.score, 4) if math.isfinite(self.score) else None,
            "reason": self.reason,
            "findings": list(self.findings),
            "fixed": self.text is not None or self.passages is not None,
        }


def _redaction_kinds(spec: GuardSpec, always: Iterable[str]) -> list[str]:
    return list(dict.fromkeys([*spec.redact, *always]))


def _summarize(findings: Sequence[Finding]) -> str:
    """'2 email, 1 phone' in first-seen order."""
    counts = Counter(finding.kind for finding in findings)
    return ", ".join(f"{count} {kind}" for kind, count in counts.items())


def _too_long(gate: str, what: str, text: str, limit: int) -> GateResult | None:
    if len(text) <= limit:
        return None
    return GateResult(gate, "fail", 1.0, f"{what} is {len(text)} characters, over the limit of {limit}")


def _quote(text: str) -> str:
    """A piece of the answer, safe for a reason: PII redacted, length capped."""
    safe, _ = redact(text, KINDS)
    return repr(safe if len(safe) <= _QUOTE_CHARS else safe[: _QUOTE_CHARS - 1] + "…")


# --- input gate ----------------------------------------------------------------------------


def estimate_tokens(text: str) -> int:
    """Tokens as characters / 4, rounded up: close enough for English, no tokenizer needed."""
    return math.ceil(len(text) / 4)


@lru_cache(maxsize=64)
def _topic_patterns(
    topics: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...],
) -> tuple[tuple[str, re.Pattern[str] | None, re.Pattern[str] | None], ...]:
    """Per topic: one regex for its keywords (on normalized text) and one for its patterns.

    Keywords match whole words, with any run of whitespace between the words of a phrase
    and an optional plural "s"/"es", so "e-bike tuning" also finds "E-Bike   tunings".
    """
    compiled = []
    for name, keywords, patterns in topics:
        words = [r"\s+".join(re.escape(part) for part in normalize(keyword).split()) for keyword in keywords]
        words = [word for word in words if word]
        keyword_re = re.compile(r"(?<!\w)(?:" + "|".join(words) + r")(?:e?s)?(?!\w)") if words else None
        pattern_re = re.compile("|".join(f"(?:{pattern})" for pattern in patterns), re.I) if patterns else None
        compiled.append((name, keyword_re, pattern_re))
    return tuple(compiled)


def banned_topic(text: str, spec: GuardSpec) -> str | None:
    """The name of the first configured banned topic `text` touches, or None."""
    if not spec.banned_topics:
        return None
    key = tuple((t.name, tuple(t.keywords), tuple(t.patterns)) for t in spec.banned_topics)
    folded = None
    for name, keyword_re, pattern_re in _topic_patterns(key):
        if keyword_re is not None:
            folded = normalize(text) if folded is None else folded
            if keyword_re.search(folded):
                return name
        if pattern_re is not None and pattern_re.search(text):
            return name
    return None


def injection_layer(text: str, spec: GuardSpec) -> InjectionResult:
    """The input gate's injection score: patterns and heuristics (plus configured phrases),
    and the TF-IDF classifier as one more signal when `spec.injection_model` is on."""
    result = detect_injection(text, spec.injection_phrases)
    if spec.injection_model:
        from services.guardrail.injection_model import model_signal

        signal = model_signal(text)
        if signal is not None:
            signals = [*result.signals, signal]
            result = InjectionResult(score=combine(s.weight for s in signals), signals=signals)
    return result


def input_gate(
    text: str,
    spec: GuardSpec,
    *,
    threshold: float | None = None,
    always_redact: Iterable[str] = ALWAYS_REDACT,
) -> GateResult:
    """Size limits, then prompt injection, then banned topics, then redaction of
    spec.redact kinds (and secrets).

    `threshold` overrides spec.injection_threshold (a step parameter). Score is the
    injection score, also on pass, so near misses show up in events.
    """
    threshold = spec.injection_threshold if threshold is None else threshold
    if failed := _too_long("input", "input", text, spec.max_input_chars):
        return failed
    if spec.max_input_tokens is not None and (tokens := estimate_tokens(text)) > spec.max_input_tokens:
        reason = f"input is about {tokens} tokens (characters / 4), over the limit of {spec.max_input_tokens}"
        return GateResult("input", "fail", 1.0, reason)
    injection = injection_layer(text, spec)
    if injection.score >= threshold:
        categories = ", ".join(injection.categories)
        return GateResult(
            "input",
            "fail",
            injection.score,
            f"possible prompt injection ({categories}): score {injection.score:.2f} >= {threshold:.2f}",
            findings=injection.reasons,
        )
    if (topic := banned_topic(text, spec)) is not None:
        return GateResult(
            "input", "fail", injection.score, f"banned topic {topic!r}: this assistant does not discuss it",
            findings=[f"banned_topic: {topic}"],
        )  # fmt: skip
    redacted, findings = redact(text, _redaction_kinds(spec, always_redact))
    if findings:
        return GateResult(
            "input",
            "fixed",
            injection.score,
            f"redacted {_summarize(findings)}",
            text=redacted,
            findings=[finding.describe() for finding in findings],
        )
    return GateResult("input", "pass", injection.score, f"no injection signal above {threshold:.2f}, nothing to redact")


# --- retrieval gate --------------------------------------------------------------------------


def retrieval_gate(
    question: str,
    passages: Sequence[Passage],
    *,
    min_score: float = 0.0,
    min_passages: int = 1,
    min_overlap: float = 0.0,
    neutralize: bool = True,
) -> GateResult:
    """Fail when retrieval found too little, or nothing on the question's topic, to ground
    an answer; cut out instructions hidden in the passages. Score is the top passage score.

    Off-topic: the top TOP_PASSAGES passages must contain at least `min_overlap` of the
    question's distinct content terms (stemmed, stopwords removed), and always at least
    one. A question with no content terms at all ("q", "?") is not judged.

    With `neutralize` (the default), passages carrying instruction-like sentences come
    back repaired in `result.passages` with verdict "fixed"; the caller must use them.
    """
    top = max((passage.score for passage in passages), default=0.0)
    ranked = sorted(range(len(passages)), key=lambda index: passages[index].score, reverse=True)
    sources = [passages[index].source for index in ranked[:5]]
    if len(passages) < min_passages:
        reason = f"found {len(passages)} passage(s), need at least {min_passages}"
        return GateResult("retrieval", "fail", top, reason, findings=sources)
    if top < min_score:
        reason = f"top passage score {top:.3f} is below the minimum {min_score:.3f}"
        return GateResult("retrieval", "fail", top, reason, findings=sources)
    repaired, neutralized = neutralize_passages(passages) if neutralize else (list(passages), [])
    if passages:
        best = [repaired[index] for index in ranked[:TOP_PASSAGES]]
        overlap, _ = term_overlap(question, best)
        if overlap == 0.0 or overlap < min_overlap:
            if overlap == 0.0:
                reason = f"off-topic: the top {len(best)} passage(s) contain none of the question's content terms"
            else:
                reason = (
                    f"off-topic: the top {len(best)} passage(s) contain {overlap:.0%} of the question's content "
                    f"terms, below the minimum {min_overlap:.0%}"
                )
            return GateResult("retrieval", "fail", top, reason, findings=sources)
    if neutralized:
        changed = sum(1 for original, fixed in zip(passages, repaired) if original is not fixed)
        reason = f"{len(passages)} passage(s), top score {top:.3f}; cut instruction-like text from {changed} passage(s)"
        return GateResult("retrieval", "fixed", top, reason, findings=sources + neutralized, passages=repaired)
    reason = f"{len(passages)} passage(s), top score {top:.3f}"
    return GateResult("retrieval", "pass", top, reason, findings=sources)


# --- output gate -----------------------------------------------------------------------------

# Refusals, on normalized text. Specific on purpose: "I can't find the torque value in
# the manual" is an honest answer, not a refusal.
_REFUSAL = re.compile(
    r"(?<![a-z])(?:"
    r"i(?:'m| am)? (?:not able|unable|not allowed|not permitted) to (?:help|assist|answer|comply|provide|discuss|"
    r"share|do)(?: you)?(?: with)? (?:that|this|it|your request|the request|such)"
    r"|i (?:can'?t|cannot|can not|won'?t|will not) (?:help|assist|answer|comply|provide|discuss|share|do|fulfil|"
    r"fulfill|support)(?: you)?(?: with)? (?:that|this|it|your request|the request|such)\b"
    r"|as an ai(?: language model| assistant| model)?,? i (?:can'?t|cannot|can not|don'?t|do not|am not able|"
    r"am unable|won'?t|will not|must not)"
    r"|i (?:must|have to|need to) (?:respectfully |politely )?decline"
    r"|(?:this|that|your) request (?:goes against|violates|is against|is not something i)"
    r"|i'?m sorry,? but i (?:can'?t|cannot|won'?t|am unable|'m unable|am not able|'m not able)"
    r")"
)


def detect_refusal(answer: str) -> bool:
    """Whether the answer refuses ("I can't help with that", "As an AI language model I cannot")."""
    return _REFUSAL.search(normalize(answer)) is not None


_FENCE = re.compile(r"^\s*```[a-zA-Z]*\s*\n(.*?)\n\s*```\s*$", re.S)


@lru_cache(maxsize=32)
def _validator(schema_json: str) -> Any:
    from jsonschema.validators import validator_for

    schema = json.loads(schema_json)
    cls = validator_for(schema)
    cls.check_schema(schema)  # jsonschema.SchemaError for a broken schema
    return cls(schema)


def validate_json(answer: str, schema: dict[str, Any]) -> str | None:
    """None when `answer` (optionally in a ``` fence) is JSON matching `schema`, else why not."""
    from jsonschema import SchemaError
    from jsonschema.exceptions import best_match

    fenced = _FENCE.match(answer)
    try:
        document = json.loads(fenced.group(1) if fenced else answer)
    except ValueError as exc:
        return f"answer is not valid JSON: {exc}"
    try:
        validator = _validator(json.dumps(schema, sort_keys=True))
    except SchemaError as exc:
        return f"the response schema itself is invalid: {exc.message}"
    error = best_match(validator.iter_errors(document))
    if error is None:
        return None
    message, _ = redact(error.message, KINDS)  # messages quote the offending value
    if len(message) > 300:
        message = message[:299] + "…"
    return f"answer does not match the response schema at {error.json_path}: {message}"


def output_gate(
    answer: str,
    spec: GuardSpec,
    *,
    passages: Sequence[Passage | str] | None = None,
    min_grounded: float | None = None,
    response_schema: dict[str, Any] | None = None,
    always_redact: Iterable[str] = ALWAYS_REDACT,
) -> GateResult:
    """Size limit, JSON schema, groundedness, refusal, then redaction of PII and secrets.

    - `response_schema`: the answer must be JSON (a ``` fence around it is accepted)
      valid against this JSON Schema; fail with the validation message otherwise.
    - `passages` and `min_grounded`: fail when less than `min_grounded` of the answer's
      sentences are supported by a passage (see grounding.groundedness); the reason
      quotes the first unsupported sentence, PII redacted.
    - A refusal adds a "refusal" finding; it fails only with spec.fail_on_refusal.

    Score is the groundedness share when it was measured; otherwise 1.0 on fail and 0.0
    otherwise.
    """
    if failed := _too_long("output", "answer", answer, spec.max_output_chars):
        return failed
    if response_schema is not None and (problem := validate_json(answer, response_schema)) is not None:
        return GateResult("output", "fail", 1.0, problem, findings=["schema"])
    grounded: float | None = None
    if passages is not None and min_grounded is not None:
        grounded, unsupported = groundedness(answer, passages, threshold=SUPPORT_THRESHOLD)
        if grounded < min_grounded:
            reason = (
                f"answer is {grounded:.0%} grounded in the passages, below {min_grounded:.0%}; "
                f"{len(unsupported)} unsupported sentence(s), first: {_quote(unsupported[0])}"
            )
            return GateResult("output", "fail", grounded, reason, findings=[f"unsupported: {len(unsupported)}"])
    findings: list[str] = []
    if detect_refusal(answer):
        if spec.fail_on_refusal:
            return GateResult("output", "fail", 1.0 if grounded is None else grounded, "the answer is a refusal",
                              findings=["refusal"])  # fmt: skip
        findings.append("refusal")
    score = 0.0 if grounded is None else grounded
    notes = [] if grounded is None else [f"{grounded:.0%} grounded"]
    notes += ["looks like a refusal"] if findings else []
    redacted, leaks = redact(answer, _redaction_kinds(spec, always_redact))
    if leaks:
        reason = "; ".join([f"redacted {_summarize(leaks)} from the answer", *notes])
        return GateResult(
            "output", "fixed", score, reason, text=redacted, findings=findings + [leak.describe() for leak in leaks]
        )
    return GateResult("output", "pass", score, "; ".join(["nothing to redact", *notes]), findings=findings)
