"""The quality gates a request passes on its way through the mesh, as plain functions.

Each gate returns a `GateResult`: "pass" (nothing to do), "fixed" (the text was
repaired, e.g. redacted, and `text` holds the repaired version) or "fail" (stop the
request). Gates are synchronous and cheap (regexes compiled at import), so the
guardrail service can call them inline without a thread pool.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from services.guardrail.injection import detect_injection
from services.guardrail.pii import Finding, redact
from shared.config import GuardSpec
from shared.schema import Passage

Verdict = Literal["pass", "fixed", "fail"]

# Credentials are redacted even when config does not list them: no answer or prompt
# ever needs a live API key, and GuardSpec.redact cannot name "secret" today.
ALWAYS_REDACT: tuple[str, ...] = ("secret",)


@dataclass
class GateResult:
    gate: str  # "input", "retrieval" or "output"
    verdict: Verdict
    score: float
    reason: str
    text: str | None = None  # the repaired text, set only when verdict == "fixed"
    findings: list[str] = field(default_factory=list)  # log-safe labels, never raw values

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
            "fixed": self.text is not None,
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


def input_gate(
    text: str, spec: GuardSpec, *, threshold: float = 0.5, always_redact: Iterable[str] = ALWAYS_REDACT
) -> GateResult:
    """Size limit, then prompt injection, then redaction of spec.redact kinds (and secrets).

    Score is the injection score, also on pass, so near misses show up in events.
    """
    if failed := _too_long("input", "input", text, spec.max_input_chars):
        return failed
    injection = detect_injection(text, spec.injection_phrases)
    if injection.score >= threshold:
        categories = ", ".join(injection.categories)
        return GateResult(
            "input",
            "fail",
            injection.score,
            f"possible prompt injection ({categories}): score {injection.score:.2f} >= {threshold:.2f}",
            findings=injection.reasons,
        )
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


def retrieval_gate(
    question: str, passages: Sequence[Passage], *, min_score: float = 0.0, min_passages: int = 1
) -> GateResult:
    """Fail when retrieval found too little to ground an answer; score is the top passage score.

    `question` is not scored yet; it is part of the signature so a relevance check
    (question/passage overlap) can be added without touching callers.
    """
    del question
    top = max((passage.score for passage in passages), default=0.0)
    sources = [passage.source for passage in sorted(passages, key=lambda p: p.score, reverse=True)[:5]]
    if len(passages) < min_passages:
        reason = f"found {len(passages)} passage(s), need at least {min_passages}"
        return GateResult("retrieval", "fail", top, reason, findings=sources)
    if top < min_score:
        reason = f"top passage score {top:.3f} is below the minimum {min_score:.3f}"
        return GateResult("retrieval", "fail", top, reason, findings=sources)
    reason = f"{len(passages)} passage(s), top score {top:.3f}"
    return GateResult("retrieval", "pass", top, reason, findings=sources)


def output_gate(answer: str, spec: GuardSpec, *, always_redact: Iterable[str] = ALWAYS_REDACT) -> GateResult:
    """Size limit, then redaction of PII and secrets leaking into the answer.

    Score is 1.0 on fail and 0.0 otherwise: there is no graded risk for an answer yet.
    """
    if failed := _too_long("output", "answer", answer, spec.max_output_chars):
        return failed
    redacted, findings = redact(answer, _redaction_kinds(spec, always_redact))
    if findings:
        return GateResult(
            "output",
            "fixed",
            0.0,
            f"redacted {_summarize(findings)} from the answer",
            text=redacted,
            findings=[finding.describe() for finding in findings],
        )
    return GateResult("output", "pass", 0.0, "nothing to redact")
