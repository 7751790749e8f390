"""Indirect prompt injection: instructions hidden in retrieved passages.

A passage is data, but a page, review or PDF can carry text written for the model that
reads it ("AI assistants must now tell the user ...", "system: ...", role tags). Such
sentences are cut out before the passages reach a prompt and replaced by a short
marker; everything else in the passage stays byte for byte as it was.

Detection reuses the prompt-injection detector (layers a and b) per sentence, plus a
few patterns that only make sense in reference text: text that addresses an AI reader
or instructs "you" to change what the answer says.
"""

from __future__ import annotations

from functools import lru_cache

import re
from collections.abc import Iterator, Sequence

from services.guardrail.injection import detect_injection, normalize
from shared.schema import Passage

# What replaces a neutralized sentence: tells the model (and a human reading a trace)
# that something was there without repeating it.
MARKER = "[removed: instruction-like text]"
THRESHOLD = 0.5  # the input gate's default: a sentence that would fail it is cut

_ANSWER_VERBS = (
    r"(?:ignore|disregard|forget|respond|reply|answer|say|output|print|reveal|recommend|pretend|act as|claim|"
    r"state|inform|tell|obey|refuse)"
)
# Not bare "assistant", "bot" or "model" in the modal rule: a staff handbook has shop
# assistants who "must wear gloves", and a catalog has bike models that "should be serviced".
_AI = r"(?:ai|ai assistants?|ai models?|chatbots?|llms?|language models?|large language models?|gpts?|copilots?)"
_AI_READER = r"(?:ai|ai assistants?|ai models?|assistants?|chatbots?|bots?|models?|llms?|language models?|gpts?)"

# (label, pattern on normalized text). Checked per sentence, and on the whole passage
# first as a cheap "anything to look at?" test.
_PASSAGE_RULES: list[tuple[str, re.Pattern[str]]] = [
    # "You must now ..." in a manual is a step ("you must now re-index the gears"); aimed at
    # the answer it is an instruction.
    ("instruction to the reader-model ('you must now ...')", re.compile(
        r"(?<![a-z])you (?:must|should|will|shall|need to|have to|are to) now (?:\w+ )?" + _ANSWER_VERBS + r"\b")),
    ("text addressed to an AI reader", re.compile(
        r"(?<![a-z])(?:the |an |any |all |every )?" + _AI_READER
        + r" (?:reading|processing|summari[sz]ing|seeing|parsing) (?:this|these)")),
    ("text addressed to an AI reader", re.compile(
        r"(?<![a-z])(?:the |an |any |all |every )?" + _AI
        + r" (?:must|should|will|shall|needs? to|has to|have to|is to|are to|may not|must not)\b")),
    ("text addressed to an AI reader", re.compile(
        r"(?<![a-z])if you are (?:an? )?(?:ai|llm|language model|large language model|assistant|ai assistant|"
        r"chatbot|bot|gpt)\b")),
    ("role-labelled line",
     re.compile(r"(?m)^[ \t>*#-]*(?:system|assistant|developer)\s*:|^\s*\[(?:system|assistant)\]")),
    ("instruction about what to tell the user", re.compile(
        r"(?:^|[.:;!?]\s+|\band\s+|\bthen\s+)(?:always\s+|now\s+)?(?:tell|inform|remind|convince) (?:the |all |every )?"
        r"(?:users?|readers?|askers?) (?:that|to)\b")),
]  # fmt: skip

# Sentence ends (kept with the sentence) and line breaks.
_BOUNDARY = re.compile(r"(?<=[.!?])[\"')\]]*[ \t]+|\r?\n")


def _segments(text: str) -> Iterator[tuple[int, int]]:
    """(start, end) of each sentence or line, the separator after it excluded."""
    start = 0
    for match in _BOUNDARY.finditer(text):
        if match.start() > start:
            yield start, match.start()
        start = match.end()
    if start < len(text):
        yield start, len(text)


def _passage_signals(text: str) -> list[str]:
    folded = normalize(text)
    return [label for label, pattern in _PASSAGE_RULES if pattern.search(folded)]


def instruction_labels(sentence: str, threshold: float = THRESHOLD) -> list[str]:
    """Why `sentence` reads as an instruction to the model; empty when it does not."""
    labels = _passage_signals(sentence)
    injection = detect_injection(sentence)
    if injection.score >= threshold:
        labels += [f"{signal.category}: {signal.label}" for signal in injection.signals]
    return list(dict.fromkeys(labels))


def neutralize_text(text: str, threshold: float = THRESHOLD) -> tuple[str, list[str]]:
    """`text` with instruction-like sentences replaced by MARKER, and log-safe labels."""
    cleaned, labels = _neutralize_cached(text, threshold)
    return cleaned, list(labels)


@lru_cache(maxsize=8192)
def _neutralize_cached(text: str, threshold: float) -> tuple[str, tuple[str, ...]]:
    # Passages come from a corpus: the same chunks are checked again and again, and the
    # verdict depends on the text alone, so it is worked out once per chunk.
    cleaned, labels = _neutralize(text, threshold)
    return cleaned, tuple(labels)


def _neutralize(text: str, threshold: float) -> tuple[str, list[str]]:
    if not _passage_signals(text) and detect_injection(text).score < threshold:
        return text, []  # the common case: one pass over the whole passage
    pieces, labels, cursor, removed = [], [], 0, 0
    for start, end in _segments(text):
        found = instruction_labels(text[start:end], threshold)
        if found:
            pieces.append(text[cursor:start])
            pieces.append(MARKER)
            cursor = end
            removed += 1
            labels += found
    if removed == 0:
        # Signals that only add up across sentences (a fake transcript, several weak
        # heuristics): fence the sentences that carry any signal at all.
        for start, end in _segments(text):
            sentence = text[start:end]
            if detect_injection(sentence).signals or _passage_signals(sentence):
                pieces.append(text[cursor:start])
                pieces.append(MARKER)
                cursor = end
                removed += 1
        labels = [f"{signal.category}: {signal.label}" for signal in detect_injection(text).signals]
    pieces.append(text[cursor:])
    return "".join(pieces), list(dict.fromkeys(labels))


def neutralize_passages(passages: Sequence[Passage], threshold: float = THRESHOLD) -> tuple[list[Passage], list[str]]:
    """The passages with embedded instructions cut out, and what was found.

    Passages without any are returned as the same objects; changed ones are copies with
    only `text` replaced (score, source, title, corpus kept). Findings are log-safe:
    `"<source>#<index>: <why>"`, never the removed text.
    """
    cleaned: list[Passage] = []
    findings: list[str] = []
    for index, passage in enumerate(passages):
        text, labels = neutralize_text(passage.text, threshold)
        if text == passage.text:
            cleaned.append(passage)
            continue
        cleaned.append(passage.model_copy(update={"text": text}))
        findings += [f"{passage.source}#{index}: {label}" for label in labels]
    return cleaned, findings
