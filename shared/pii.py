"""Find and redact personal data and credentials in free text.

Regexes only propose candidates; anything with a checksum (cards: Luhn, IBAN: mod 97)
or an easily confused shape (phones vs. prices, dates, IPs) is confirmed in code, so a
16-digit order number or "€1,299.00" is left alone. A `Finding` keeps the kind and
the position of a match, never the matched value: findings travel in events and logs.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

KINDS = ("email", "phone", "card", "iban", "national_id", "secret")

# When two detectors claim overlapping text the earlier kind wins: a secret token may
# contain a digit run that looks like a phone, and a valid IBAN is far more specific
# (1 in 97 chance) than a Luhn-valid digit run (1 in 10).
_PRIORITY = {"secret": 0, "iban": 1, "card": 2, "national_id": 3, "email": 4, "phone": 5}


@dataclass(frozen=True, slots=True)
class Finding:
    """One detected item: its kind and where it is. Deliberately no `value` field."""

    kind: str
    start: int
    end: int

    def describe(self) -> str:
        """A log-safe label such as `email@12:31`."""
        return f"{self.kind}@{self.start}:{self.end}"


def placeholder(kind: str) -> str:
    return f"[REDACTED_{kind.upper()}]"


# --- numeric regions ----------------------------------------------------------------

Regions = list[tuple[int, int]]

# Everything a card, phone or SSN can consist of. Scanning for these runs once and
# running the detailed regexes only inside runs long enough to hold one is what keeps
# the detectors fast: a regex that starts with a lookbehind cannot skip ahead to the
# next digit and pays for every character of the text.
_NUMERIC_REGION = re.compile(r"[+(\d][\d ().+/-]*")
_NUMERIC_KINDS = frozenset({"card", "phone", "national_id"})


def _numeric_regions(text: str) -> Regions:
    return [match.span() for match in _NUMERIC_REGION.finditer(text) if match.end() - match.start() >= 9]


def _in_regions(pattern: re.Pattern[str], text: str, regions: Regions, min_chars: int) -> Iterator[re.Match[str]]:
    for start, end in regions:
        if end - start >= min_chars:
            # One character past the region so trailing lookaheads see what really follows;
            # lookbehinds already see the whole string.
            yield from pattern.finditer(text, start, min(end + 1, len(text)))


# --- email -------------------------------------------------------------------------

# The lookbehind makes matches start only at token boundaries, which keeps the scan
# linear on long runs of word characters.
_EMAIL = re.compile(r"(?<![\w.%+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@[A-Za-z0-9.-]+\.[A-Za-z]{2,}(?![A-Za-z])")


def _emails(text: str, regions: Regions) -> Iterator[Finding]:
    if "@" not in text:
        return  # a substring test is ~100x cheaper than scanning with the regex
    for match in _EMAIL.finditer(text):
        yield Finding("email", match.start(), match.end())


# --- payment cards -------------------------------------------------------------------

# A run of digit groups joined by single spaces or dashes; card windows are cut from it.
_DIGIT_RUN = re.compile(r"(?<![\w-])\d+(?:[ -]\d+)*")
_DIGITS = re.compile(r"\d+")
# Visa 4, Mastercard 2/5, Amex/Diners/JCB 3, Discover/UnionPay/Maestro 6: halves the
# false positives of Luhn alone, which any random number passes one time in ten.
_CARD_FIRST_DIGITS = frozenset("23456")


def luhn_valid(digits: str) -> bool:
    """The Luhn checksum of a string of digits (the check every card number carries)."""
    if not digits.isdigit():
        return False
    total = 0
    for index, char in enumerate(reversed(digits)):
        value = ord(char) - 48
        if index % 2 == 1:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


def _is_card(digits: str) -> bool:
    return 13 <= len(digits) <= 19 and digits[0] in _CARD_FIRST_DIGITS and luhn_valid(digits)


def _cards(text: str, regions: Regions) -> Iterator[Finding]:
    for run in _in_regions(_DIGIT_RUN, text, regions, min_chars=13):
        groups = [(m.start(), m.end()) for m in _DIGITS.finditer(text, run.start(), run.end())]
        after = text[run.end() : run.end() + 1]
        if after.isalpha() or after == "_":
            groups.pop()  # "1111abc": the last group is glued to a word, not a number
        yield from _card_windows(text, groups)


def _card_windows(text: str, groups: list[tuple[int, int]]) -> Iterator[Finding]:
    """Group-aligned windows that are valid cards, longest first from each start.

    A card is often written next to other numbers ("exp 12 4111 1111 1111 1111"), so
    the run as a whole is not the card; trying every start keeps redaction stable:
    what is left after redacting contains no window that was not already rejected.
    """
    start = 0
    while start < len(groups):
        best, digits = None, ""
        for end in range(start, len(groups)):
            digits += text[groups[end][0] : groups[end][1]]
            if len(digits) > 19:
                break
            if _is_card(digits):
                best = end
        if best is None:
            start += 1
            continue
        yield Finding("card", groups[start][0], groups[best][1])
        start = best + 1


# --- IBAN ----------------------------------------------------------------------------

# Check digits and 11-30 alphanumerics with optional single spaces; the two letters of
# the country code before them are checked in code. Starting at the digits lets the
# regex engine skip straight to digits instead of trying every letter of the text.
_IBAN_TAIL = re.compile(r"\d\d(?: ?[A-Za-z0-9]){11,30}")
# Official lengths; a known country lets us cut an IBAN out of a longer candidate
# ("DE89 3704 0044 0532 0130 00 and more words").
_IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22,
    "BR": 29, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DK": 18, "DO": 28, "EE": 20,
    "ES": 24, "FI": 18, "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23, "GL": 18, "GR": 27,
    "GT": 28, "HR": 21, "HU": 28, "IE": 22, "IL": 23, "IS": 26, "IT": 27, "JO": 30, "KW": 30,
    "KZ": 20, "LB": 28, "LI": 21, "LT": 20, "LU": 20, "LV": 21, "MC": 27, "MD": 24, "ME": 22,
    "MK": 19, "MR": 27, "MT": 31, "MU": 30, "NL": 18, "NO": 15, "PK": 24, "PL": 28, "PS": 29,
    "PT": 25, "QA": 29, "RO": 24, "RS": 22, "SA": 24, "SE": 24, "SI": 19, "SK": 24, "SM": 27,
    "TN": 24, "TR": 26, "UA": 29, "VG": 24, "XK": 20,
}  # fmt: skip


def iban_valid(candidate: str) -> bool:
    """ISO 13616 check: move the first four characters to the end, letters to numbers, mod 97 == 1."""
    compact = candidate.replace(" ", "").upper()
    if not (15 <= len(compact) <= 34 and compact.isalnum() and compact[:2].isalpha() and compact[2:4].isdigit()):
        return False
    expected = _IBAN_LENGTHS.get(compact[:2])
    if expected is not None and len(compact) != expected:
        return False
    rearranged = compact[4:] + compact[:4]
    return int("".join(str(int(char, 36)) for char in rearranged)) % 97 == 1


def _ibans(text: str, regions: Regions) -> Iterator[Finding]:
    pos = 0
    while match := _IBAN_TAIL.search(text, pos):
        finding = _iban_at(text, match.start() - 2, match.end())
        # A rejected candidate may hide a real IBAN that starts inside it, so step one
        # character; an accepted one is consumed whole.
        pos = finding.end if finding else match.start() + 1
        if finding:
            yield finding


def _iban_at(text: str, start: int, end: int) -> Finding | None:
    country = text[max(start, 0) : start + 2]
    if start < 0 or not (country.isascii() and country.isalpha()):
        return None
    if start > 0 and (text[start - 1].isalnum() or text[start - 1] == "_"):
        return None  # inside a longer token
    # Positions of the non-space characters, so a compact prefix maps back to the text.
    positions = [i for i in range(start, end) if text[i] != " "]
    expected = _IBAN_LENGTHS.get(country.upper(), len(positions))
    if len(positions) < expected:
        return None
    end = positions[expected - 1] + 1
    after = text[end : end + 1]
    if after.isalnum() or after == "_" or not iban_valid(text[start:end]):
        return None  # cut in the middle of a longer token, or the checksum fails
    return Finding("iban", start, end)


# --- US social security number --------------------------------------------------------

# Area 000, 666 and 900-999 are never issued; group 00 and serial 0000 neither.
_SSN = re.compile(r"(?<![\w-])(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}(?![\w-])")


def _ssns(text: str, regions: Regions) -> Iterator[Finding]:
    for match in _in_regions(_SSN, text, regions, min_chars=11):
        yield Finding("national_id", match.start(), match.end())


# --- phone numbers -------------------------------------------------------------------

_PHONE = re.compile(
    r"""
    (?<![\w+/.,-])                 # start at a token boundary, not inside 1,299 or v1.2
    (?:(?:\+|\b00)\d{1,3}[ .-]?)?  # country code: +44 or 0044
    (?:\(\d{1,5}\)[ .-]?)?         # area code in parentheses: (555) or (0)
    \d{1,12}(?:[ .-]\d{1,8}){0,6}  # digit groups; bare runs are vetted in _looks_like_phone
    """,
    re.X,
)
_PHONE_SSN_SHAPE = re.compile(r"\d{3}-\d{2}-\d{4}")
_PHONE_DATE_PREFIX = re.compile(r"(?:\d{1,2}[./-]\d{1,2}[./-]\d{4}|\d{4}[./-]\d{1,2}[./-]\d{1,2})(?!\d)")
_CURRENCY_BEFORE = re.compile(r"[$€£¥₹]\s?$")
_UNIT_AFTER = re.compile(
    r"\s?(?:%|[$€£¥₹]|(?:eur|usd|gbp|chf|euros?|dollars?|kg|g|km|mm|cm|m|w|wh|kwh|mph|rpm|psi|bar|x)\b)", re.I
)


def _looks_like_phone(text: str, start: int, end: int) -> bool:
    candidate = text[start:end]
    digits = "".join(char for char in candidate if char.isdigit())
    if not 9 <= len(digits) <= 15:  # E.164 caps a full number at 15 digits
        return False
    international = candidate.startswith(("+", "00"))
    if candidate.isdigit() and not (international or (candidate.startswith("0") and len(digits) <= 11)):
        return False  # a bare digit run is an order number or id far more often than a phone
    if _PHONE_SSN_SHAPE.fullmatch(candidate) or _PHONE_DATE_PREFIX.match(candidate):
        return False
    groups = candidate.split(".")
    if len(groups) == 4 and all(group.isdigit() and len(group) <= 3 for group in groups):
        return False  # an IPv4 address
    after = text[end : end + 1]
    if after.isalnum() or after == "_" or (after in ",." and text[end + 1 : end + 2].isdigit()):
        return False  # more of a number or word follows: 1 299 000,50 or 12345abc
    return not (_CURRENCY_BEFORE.search(text, max(0, start - 2), start) or _UNIT_AFTER.match(text, end))


def _phones(text: str, regions: Regions) -> Iterator[Finding]:
    for match in _in_regions(_PHONE, text, regions, min_chars=9):
        if _looks_like_phone(text, match.start(), match.end()):
            yield Finding("phone", match.start(), match.end())


# --- secrets ---------------------------------------------------------------------------

# (pattern, whether the value must mix letters and digits). A named group "v" marks the
# secret part when the pattern also matches a label such as "Bearer" or "api_key=".
# The markers (lower case) are substrings every match contains, used as a cheap prefilter.
_SECRET_PATTERNS: list[tuple[re.Pattern[str], bool, tuple[str, ...]]] = [
    (re.compile(r"\bsk-(?:ant-|proj-)?[A-Za-z0-9_-]{20,}"), True, ("sk-",)),  # OpenAI, Anthropic
    (re.compile(r"\bgh[pousr]_[A-Za-z0-9]{30,}"), False, ("ghp_", "gho_", "ghu_", "ghs_", "ghr_")),  # GitHub
    (re.compile(r"\bgithub_pat_[A-Za-z0-9_]{22,}"), False, ("github_pat_",)),  # GitHub fine-grained
    (re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"), False, ("akia", "asia")),  # AWS access key id
    (re.compile(r"\bxox[abposr]-[A-Za-z0-9-]{10,}"), False, ("xox",)),  # Slack
    (re.compile(r"\b[Bb]earer\s+(?P<v>[A-Za-z0-9._~+/=-]{20,})"), True, ("bearer",)),
    (
        re.compile(
            r"(?i)\b(?:api[_-]?key|access[_-]?token|auth[_-]?token|secret[_-]?key|client[_-]?secret|password|passwd)"
            r"[\"']?\s*[:=]\s*[\"']?(?P<v>[^\s\"',;]{12,})"
        ),
        False,
        ("key", "token", "secret", "passw"),
    ),
]


def _mixes_letters_and_digits(value: str) -> bool:
    return any(char.isdigit() for char in value) and any(char.isalpha() for char in value)


def _secrets(text: str, regions: Regions) -> Iterator[Finding]:
    lowered = text.lower()
    for pattern, needs_mix, markers in _SECRET_PATTERNS:
        if not any(marker in lowered for marker in markers):
            continue  # every match contains one of the markers; skip the scan when none is there
        for match in pattern.finditer(text):
            group = "v" if "v" in pattern.groupindex else 0
            if needs_mix and not _mixes_letters_and_digits(match.group(group)):
                continue  # "sk-8-speed-cassette-...": a product code, not a key
            yield Finding("secret", match.start(group), match.end(group))


# --- public API ----------------------------------------------------------------------

_DETECTORS: dict[str, Callable[[str, Regions], Iterator[Finding]]] = {
    "email": _emails,
    "phone": _phones,
    "card": _cards,
    "iban": _ibans,
    "national_id": _ssns,
    "secret": _secrets,
}


def _check_kinds(kinds: Iterable[str]) -> list[str]:
    kinds = list(dict.fromkeys(kinds))
    unknown = [kind for kind in kinds if kind not in _DETECTORS]
    if unknown:
        raise ValueError(f"unknown PII kind(s) {unknown}; known kinds are {list(KINDS)}")
    return kinds


def find_pii(text: str, kinds: Iterable[str] = KINDS) -> list[Finding]:
    """Non-overlapping findings of the requested kinds, in text order.

    Only the requested detectors run, so with kinds=["phone"] an Amex number written
    like a phone is reported as a phone: for redaction, erring towards removal is right.
    """
    kinds = _check_kinds(kinds)
    regions = _numeric_regions(text) if _NUMERIC_KINDS.intersection(kinds) else []
    candidates = [finding for kind in kinds for finding in _DETECTORS[kind](text, regions)]
    return _without_overlaps(candidates)


def _without_overlaps(candidates: list[Finding]) -> list[Finding]:
    """Keep the highest-priority (then longest) finding wherever candidates overlap."""
    candidates.sort(key=lambda f: (_PRIORITY[f.kind], -(f.end - f.start), f.start))
    kept: list[Finding] = []  # sorted by start and non-overlapping, so one neighbour check each side suffices
    for finding in candidates:
        index = bisect.bisect_left(kept, finding.start, key=lambda f: f.start)
        if index > 0 and kept[index - 1].end > finding.start:
            continue
        if index < len(kept) and kept[index].start < finding.end:
            continue
        kept.insert(index, finding)
    return kept


def redact(text: str, kinds: Iterable[str] = KINDS) -> tuple[str, list[Finding]]:
    """The text with each finding replaced by `[REDACTED_<KIND>]`, and the findings.

    Finding positions refer to the original text.
    """
    findings = find_pii(text, kinds)
    pieces, cursor = [], 0
    for finding in findings:
        pieces.append(text[cursor : finding.start])
        pieces.append(placeholder(finding.kind))
        cursor = finding.end
    pieces.append(text[cursor:])
    return "".join(pieces), findings


# Redacted from every answer and every trace whatever the config says: secrets.
ALWAYS_REDACT: tuple[str, ...] = ("secret",)


def redaction_kinds(configured: Iterable[str]) -> list[str]:
    """The kinds to redact: the config's `guard.redact`, and always secrets."""
    return list(dict.fromkeys([*configured, *ALWAYS_REDACT]))
