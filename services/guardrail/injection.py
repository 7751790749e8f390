"""A layered prompt-injection and jailbreak detector: no model, only patterns.

Layer (a) matches known attack phrases on a normalized copy of the text (NFKC, case
folded, zero-width characters dropped, common homoglyphs mapped) with patterns that
accept a separator between letters ("i g n o r e") and leetspeak ("1gn0re"). Layer (b)
adds weaker heuristics. Each signal has a weight; the score combines them as a
noisy-or, 1 - prod(1 - w), so one strong phrase is enough to reject while a single
weak heuristic is not.

Phrases require the object of the attack ("previous instructions", "system prompt",
"your rules"), not just the verb, so cycling questions such as "how do I ignore the
noise from my derailleur?" or "forget the previous bike" score zero.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

# Characters that attackers put between letters to dodge filters, and look-alikes.
_INVISIBLE = dict.fromkeys(map(ord, "\u00ad\u200b\u200c\u200d\u200e\u200f\u2060\ufeff"), None)
# Curly apostrophes too, so "you’re" matches "you're".
_HOMOGLYPHS = str.maketrans("авеосрухіјѕмтнкαεικνοτυ’‘", "abeocpyxijsmthkaeikvotu''")
# Leetspeak substitutions accepted for each letter inside fuzzy words.
_LEET = {"a": "a4@", "b": "b8", "e": "e3", "g": "g9", "i": "i1!|", "l": "l1|", "o": "o0", "s": "s5$", "t": "t7+"}
# At most one separator between the letters of a word: "i.g.n.o.r.e", "ign ore".
_LETTER_GAP = r"[\s._*~-]?"
_BETWEEN_WORDS = r"[\W_]+"


@dataclass(frozen=True)
class Signal:
    category: str
    label: str
    weight: float


@dataclass
class InjectionResult:
    score: float  # in [0, 1]
    signals: list[Signal] = field(default_factory=list)

    @property
    def reasons(self) -> list[str]:
        return [f"{signal.category}: {signal.label}" for signal in self.signals]

    @property
    def categories(self) -> list[str]:
        return list(dict.fromkeys(signal.category for signal in self.signals))


def normalize(text: str) -> str:
    return unicodedata.normalize("NFKC", text).translate(_INVISIBLE).casefold().translate(_HOMOGLYPHS)


def _fuzzy(word: str) -> str:
    """One word as a regex tolerant of leetspeak and split letters.

    Short words stay exact: "d a n" style splitting of three letters would match
    across ordinary words ("and an").
    """
    if " " in word:
        return _BETWEEN_WORDS.join(_fuzzy(part) for part in word.split())
    if len(word) < 4:
        return re.escape(word)
    letters = ["[" + re.escape(_LEET[char]) + "]" if char in _LEET else re.escape(char) for char in word]
    return _LETTER_GAP.join(letters)


def _any(*words: str) -> str:
    return "(?:" + "|".join(_fuzzy(word) for word in words) + ")"


def _gap(max_words: int) -> str:
    """Word separators with up to `max_words` filler words in between."""
    return rf"(?:{_BETWEEN_WORDS}\w+){{0,{max_words}}}{_BETWEEN_WORDS}"


def _phrase(*parts: str) -> re.Pattern[str]:
    # Letters on both ends must not continue a longer word ("signore", "dance").
    return re.compile(r"(?<![a-z])" + "".join(parts) + r"(?![a-z])")


_IGNORE = _any("ignore", "disregard", "forget", "skip", "bypass", "discard", "drop", "overlook", "neglect")
_EARLIER = _any("previous", "prior", "above", "earlier", "preceding", "original", "initial", "former", "system")
_RULES = _any(
    "instructions", "instruction", "rules", "directions", "directives", "guidelines", "prompts", "prompt",
    "commands", "programming", "constraints", "policies", "restrictions", "guardrails",
)  # fmt: skip
_YOUR = r"(?:your|all (?:of )?your|any (?:of )?your|the ai'?s|its)"
_OVERRIDE = _any("override", "bypass", "disable", "circumvent", "deactivate", "turn off", "get around", "break")
_REVEAL = _any(
    "reveal", "print", "show", "display", "output", "repeat", "leak", "dump", "tell", "give", "share",
    "write out", "expose", "what is", "what's", "what are", "what were",
)  # fmt: skip
_HIDDEN = _any("system", "initial", "hidden", "original", "secret", "internal", "developer", "pre")
_UNRESTRICTED = _any("unrestricted", "unfiltered", "uncensored", "unlimited", "unbound", "evil", "amoral", "rogue")
_LIMITS = _any(
    "rules", "restrictions", "guidelines", "filters", "limits", "limitations", "boundaries", "ethics",
    "policies", "morals", "censorship",
)  # fmt: skip

# (category, label, weight, pattern) for layer (a).
_PHRASES: list[tuple[str, str, float, re.Pattern[str]]] = [
    ("instruction_override", "ignore previous instructions", 0.9,
     _phrase(_IGNORE, _gap(2), _EARLIER, _gap(1), _RULES)),
    ("instruction_override", "ignore your instructions", 0.85,
     _phrase(_IGNORE, _BETWEEN_WORDS, _YOUR, _gap(1), _RULES)),
    ("instruction_override", "ignore everything above", 0.8,
     _phrase(_IGNORE, _BETWEEN_WORDS, _any("everything", "all"), _gap(1),
             _any("above", "before", "you were told", "you have been told"))),
    ("prompt_leak", "reveal the system prompt", 0.85,
     _phrase(_REVEAL, _gap(3), _HIDDEN, _BETWEEN_WORDS, _any("prompt", "prompts", "instructions"))),
    # "message" and "rules" only with "your": "tell me what the system message E010 means" is benign.
    ("prompt_leak", "reveal your instructions", 0.7,
     _phrase(_REVEAL, _gap(2), r"your", _gap(1),
             _any("prompt", "instructions", "message", "rules", "guidelines", "configuration"))),
    ("prompt_leak", "repeat the text above", 0.45,
     _phrase(_any("repeat", "print", "output", "copy"), _gap(2), _any("words", "text", "everything"),
             _BETWEEN_WORDS, _any("above", "before this"))),
    ("jailbreak_persona", "you are now <persona>", 0.9,
     _phrase(r"you(?:'re| are)", _BETWEEN_WORDS, _fuzzy("now"), _gap(2),
             _any("dan", "jailbroken", "unrestricted", "unfiltered", "uncensored", "evil", "developer mode",
                  "free from", "no longer bound", "not bound", "an ai without"))),
    ("jailbreak_persona", "developer mode enabled", 0.7,
     _phrase(_any("developer mode", "dev mode", "god mode", "sudo mode"), _BETWEEN_WORDS,
             _any("enabled", "activated", "engaged"))),
    ("jailbreak_persona", "enable jailbreak mode", 0.85,
     _phrase(_any("enable", "activate", "enter", "switch to", "turn on"), _gap(1),
             _any("god mode", "jailbreak mode", "dan mode", "unrestricted mode"))),
    # Weak alone: people enable developer mode on their phone to update bike firmware.
    ("jailbreak_persona", "enable developer mode", 0.4,
     _phrase(_any("enable", "activate", "enter", "switch to", "turn on"), _gap(1), _any("developer mode", "dev mode"))),
    ("jailbreak_persona", "DAN", 0.9,
     _phrase(r"(?:\bdan\b", _BETWEEN_WORDS, _any("mode", "prompt", "jailbreak"), "|", _fuzzy("do anything now"), ")")),
    ("jailbreak_persona", "act as an unrestricted AI", 0.9,
     _phrase(_any("act as", "act like", "pretend to be", "roleplay as", "behave like", "become", "you are"), _gap(2),
             _UNRESTRICTED, _gap(1), _any("ai", "assistant", "model", "chatbot", "bot", "llm", "version", "mode"))),
    ("jailbreak_persona", "pretend you have no rules", 0.9,
     _phrase(_any("pretend", "imagine", "act as if", "suppose", "assume", "from now on"), _gap(3),
             r"you", _BETWEEN_WORDS, r"(?:have|had|got)", _BETWEEN_WORDS, r"(?:no|zero)", _gap(1), _LIMITS)),
    ("jailbreak_persona", "jailbroken", 0.45,
     _phrase(_any("jailbroken", "jailbreak", "jail break"))),
    ("guideline_override", "override your guidelines", 0.85,
     _phrase(_OVERRIDE, _BETWEEN_WORDS, _YOUR, _gap(1), _RULES)),
    ("guideline_override", "disable safety filters", 0.85,
     _phrase(_OVERRIDE, _gap(2), _any("safety", "content", "ethical", "moral", "moderation"), _BETWEEN_WORDS,
             _any("guidelines", "filters", "filter", "rules", "policies", "policy", "restrictions", "protocols"))),
    ("new_instructions", "new instructions:", 0.8,
     _phrase(_any("new", "updated", "revised", "real", "actual", "override", "secret"), _BETWEEN_WORDS,
             _any("instructions", "instruction", "rules", "directive", "system prompt"), r"\s*[:\-=]")),
    # Not "maintenance mode": e-bike displays have one.
    ("new_instructions", "system override", 0.75, _phrase(_any("system override", "admin override"))),
    ("role_tag", "chat-template role tag", 0.95,
     re.compile(r"<\|?\s*im_start\s*\|?>\s*(?:system|assistant|developer)|<\|(?:system|assistant|im_end|endoftext)\|>")),
    ("role_tag", "markdown role header", 0.85,
     re.compile(r"(?:^|\n)\s*#{2,}\s*(?:system|instructions?|assistant|developer)\s*(?::|\n)")),
    ("role_tag", "llama-style tag", 0.85, re.compile(r"\[/?inst\]|<<\s*/?sys\s*>>|</?system>")),
]  # fmt: skip

# Layer (b): weaker signals, none of which rejects on its own.
_IMPERATIVE = re.compile(
    r"(?<![a-z])(?:you (?:must|will|shall|should|are to)|from now on|do not|don't|never|stop|no longer)\b[^.!?\n]{0,60}?"
    r"\b(?:follow|obey|apply|use|mention|bound by|adhere to|listen to)?\s*(?:your|these|those|any|the) "
    r"(?:rules|guidelines|instructions|restrictions|filters|programming|policies|system prompt|training)"
    r"|(?:rules|restrictions|filters|guidelines) (?:no longer|do not|don't) apply"
)
_FROM_NOW_ON = re.compile(r"(?<![a-z])(?:from now on|for the rest of (?:this|the) conversation),? (?:you|respond|answer|act|reply)")
_WITHOUT_LIMITS = re.compile(
    r"(?<![a-z])without (?:any )?(?:restrictions|filters|filtering|censorship|limitations|guidelines|rules|ethics)"
)
# Base64-looking: long, and mixing upper, lower and digits (hex digests and words don't).
_BLOB = re.compile(r"[A-Za-z0-9+/]{40,}={0,2}")
_ROLE_LINE = re.compile(r"(?:^|\n)\s*(?:system|assistant|user|human|ai|developer)\s*:", re.I)


def _looks_base64(blob: str) -> bool:
    return any(c.isupper() for c in blob) and any(c.islower() for c in blob) and any(c.isdigit() for c in blob)


def _heuristics(original: str, folded: str) -> list[Signal]:
    signals = []
    if _IMPERATIVE.search(folded):
        signals.append(Signal("heuristic", "imperative aimed at the assistant's rules", 0.35))
    if _FROM_NOW_ON.search(folded):
        signals.append(Signal("heuristic", "persistent behaviour change ('from now on')", 0.3))
    if _WITHOUT_LIMITS.search(folded):
        signals.append(Signal("heuristic", "asks for answers without restrictions", 0.3))
    # Case matters for base64, so this one looks at the original text.
    if any(_looks_base64(match.group()) for match in _BLOB.finditer(original)):
        signals.append(Signal("heuristic", "base64-looking blob over 40 characters", 0.35))
    if len(_ROLE_LINE.findall(original)) >= 2:
        signals.append(Signal("heuristic", "several role-labelled lines (fake transcript)", 0.4))
    return signals


@lru_cache(maxsize=64)
def _configured(phrases: tuple[str, ...]) -> tuple[tuple[str, re.Pattern[str]], ...]:
    """Operator phrases from config, compiled once per distinct list."""
    compiled = []
    for phrase in phrases:
        words = re.findall(r"\w+", normalize(phrase))
        if words:
            compiled.append((phrase, _phrase(_BETWEEN_WORDS.join(_fuzzy(word) for word in words))))
    return tuple(compiled)


def combine(weights: Iterable[float]) -> float:
    """Noisy-or: independent pieces of evidence, each able to push the score towards 1."""
    remaining = 1.0
    for weight in weights:
        remaining *= 1.0 - min(max(weight, 0.0), 1.0)
    return round(1.0 - remaining, 4)


def detect_injection(text: str, extra_phrases: Sequence[str] = ()) -> InjectionResult:
    """Score `text` for prompt injection; `extra_phrases` (from config) count as strong signals."""
    folded = normalize(text)
    signals = [Signal(category, label, weight) for category, label, weight, pattern in _PHRASES if pattern.search(folded)]
    signals += [
        Signal("configured_phrase", f"configured phrase {phrase!r}", 0.9)
        for phrase, pattern in _configured(tuple(extra_phrases))
        if pattern.search(folded)
    ]
    signals += _heuristics(text, folded)
    return InjectionResult(score=combine(signal.weight for signal in signals), signals=signals)
