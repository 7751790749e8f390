"""Guardrail: input, retrieval and output quality gates (plain Python, no messaging)."""

from services.guardrail.gates import ALWAYS_REDACT, GateResult, input_gate, output_gate, retrieval_gate
from services.guardrail.injection import InjectionResult, detect_injection
from shared.pii import KINDS, Finding, find_pii, iban_valid, luhn_valid, redact

__all__ = [
    "ALWAYS_REDACT",
    "KINDS",
    "Finding",
    "GateResult",
    "InjectionResult",
    "detect_injection",
    "find_pii",
    "iban_valid",
    "input_gate",
    "luhn_valid",
    "output_gate",
    "redact",
    "retrieval_gate",
]
