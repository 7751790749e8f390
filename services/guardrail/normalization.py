"""Views of a prompt to score besides its surface: decoded payloads, undone leetspeak,
and where it switches language or script.

Attackers hide an instruction from filters by encoding it (base64, hex, %-escapes),
by spelling it in leetspeak or look-alike letters, or by writing it in a language the
filter was not trained on, inside an ordinary English frame. `views` returns every
decoded form worth scoring (the detector scores each and keeps the worst), and
`foreign_segments` finds a sentence written in another script, or in a language the
English WordPiece vocabulary breaks into fragments, inside otherwise English text: a
risk feature in its own right, since the detector cannot read what it says.

Plain Python; every step is bounded by the input length and skipped when the text
has nothing it could apply to (most prompts: plain ASCII, no long tokens, no "%").
"""

from __future__ import annotations

import base64
import binascii
import codecs
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from urllib.parse import unquote

from services.guardrail.injection import normalize
from shared.embedder import language_words

_B64 = re.compile(r"[A-Za-z0-9+/_-]{16,}={0,2}")
_HEX = re.compile(r"[0-9a-fA-F]+")
_URL_ESCAPE = re.compile(r"%[0-9a-fA-F]{2}")
_LEET_TABLE = str.maketrans("4@8(3910!|5$7+", "aabcegioilsstt")
# A word of 3-15 characters mixing letters with leet digits or symbols; not a unit or a size
# ("28mm", "10km", "2x"), which is digits then a short suffix.
_LEET_WORD = re.compile(r"(?<![\w@$!|+])(?!\d+[a-z]{1,3}(?![\w@$!|+]))(?=[\w@$!|+]*[a-z])(?=[\w@$!|+]*[0-9@$!|+])[\w@$!|+]{3,15}(?![\w@$!|+])")


def _printable(raw: bytes) -> str | None:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    letters = sum(char.isalpha() for char in text)
    if len(text) < 6 or letters < 0.5 * len(text) or " " not in text.strip():
        return None  # random bytes, an id, a hash: not a smuggled sentence
    return text if all(char.isprintable() or char.isspace() for char in text) else None


def decode_base64(text: str) -> list[str]:
    found = []
    for token in text.split():
        if len(token) < 16:
            continue
        for match in _B64.finditer(token):
            blob = match.group()
            try:
                raw = base64.b64decode(blob + "=" * (-len(blob) % 4), altchars=b"-_" if "-" in blob or "_" in blob else None)
            except (binascii.Error, ValueError):
                continue
            decoded = _printable(raw)
            if decoded:
                found.append(decoded)
    return found


def decode_hex(text: str) -> list[str]:
    """Hex runs of 16+ digits ("69676e6f7265..." or "0x6967..."); phone numbers have no a-f."""
    found = []
    for token in text.split():
        digits = token[2:] if token[:2].lower() == "0x" else token
        if len(digits) >= 16 and _HEX.fullmatch(digits):
            decoded = _printable(bytes.fromhex(digits[: len(digits) // 2 * 2]))
            if decoded:
                found.append(decoded)
    return found


def decode_url(text: str) -> list[str]:
    if "%" not in text or len(_URL_ESCAPE.findall(text)) < 3:
        return []
    decoded = unquote(text.replace("+", " "))
    return [decoded] if decoded != text else []


def undo_leetspeak(text: str) -> str | None:
    """"1gn0r3 4ll pr3v10u5" -> "ignore all previous"; None when no word looks leet."""
    folded = normalize(text)
    if not _LEET_WORD.search(folded):
        return None
    undone = _LEET_WORD.sub(lambda match: match.group().translate(_LEET_TABLE), folded)
    return undone if undone != folded else None


# Letters split by one repeated separator: "I.g.n.o.r.e", "i-g-n-o-r-e", "i g n o r e".
_SPLIT_LETTERS = re.compile(r"(?<![^\W_])[^\W_](?:([ .\-_*|/+~])[^\W_]){3,}(?![^\W_])")
# The request to decode that a rot13 or reversed payload needs, or the model could not read it either.
_ROT13_HINT = re.compile(r"rot[\s_-]?13|caesar|cipher", re.I)
_REVERSED_HINT = re.compile(r"revers|backwards|right to left", re.I)


def join_split_letters(text: str) -> str | None:
    """"I.g.n.o.r.e a.l.l" -> "Ignore all"; None when no word is spelled out letter by letter."""
    if not _SPLIT_LETTERS.search(text):
        return None
    joined = _SPLIT_LETTERS.sub(lambda match: match.group().replace(match.group(1), ""), text)
    return joined if joined != text else None


def decode_rot13_or_reversed(text: str) -> list[str]:
    """The whole text rot13-decoded or reversed, only when it asks for that decoding."""
    found = []
    if _ROT13_HINT.search(text):
        found.append(codecs.decode(text, "rot13"))
    if _REVERSED_HINT.search(text):
        found.append(text[::-1])
    return found


# The words attacks are made of, to be found again when scrambled ("insturctions": first and
# last letter kept, the middle shuffled) or typed with one letter too many ("iunstructions").
_ATTACK_WORDS = (
    "ignore", "disregard", "forget", "previous", "prior", "above", "instructions", "instruction", "rules",
    "guidelines", "system", "prompt", "reveal", "bypass", "override", "restrictions", "filters", "pretend",
    "developer", "jailbreak", "unrestricted", "unfiltered", "confidential", "secret", "password", "everything",
    "directives", "constraints", "policies", "initial", "original", "hidden",
)  # fmt: skip
_SCRAMBLED = {(w[0], w[-1], "".join(sorted(w[1:-1]))): w for w in _ATTACK_WORDS}
_KNOWN = frozenset(_ATTACK_WORDS)
_WORD = re.compile(r"[a-z]{5,15}")


_KNOWN_BY_DROP = {w: w for w in _ATTACK_WORDS if len(w) >= 7}
# Cheap pre-checks: a scramble keeps first letter, last letter and length; a word with one
# letter too many is one longer and keeps its first or second letter first.
_SCRAMBLE_SIGNATURES = frozenset((w[0], w[-1], len(w)) for w in _ATTACK_WORDS)
_DROP_SIGNATURES = frozenset((first, len(w) + 1) for w in _KNOWN_BY_DROP for first in w[:2])
_INFLECTED = frozenset(f"{w}{end}" for w in _ATTACK_WORDS for end in ("s", "d", "es", "ed"))


def _respelled(word: str) -> str | None:
    if word in _KNOWN or word in _INFLECTED:
        return None
    found = None
    if (word[0], word[-1], len(word)) in _SCRAMBLE_SIGNATURES:
        found = _SCRAMBLED.get((word[0], word[-1], "".join(sorted(word[1:-1]))))
    if found is None and (word[0], len(word)) in _DROP_SIGNATURES:
        found = next((_KNOWN_BY_DROP[word[:i] + word[i + 1:]] for i in range(len(word))
                      if word[:i] + word[i + 1:] in _KNOWN_BY_DROP), None)
    return found


def unscramble(text: str) -> str | None:
    """"ignroe all prevoius insturctions" -> "ignore all previous instructions"; None when no
    attack word was misspelled that way."""
    folded = normalize(text)
    fixes = {word: found for word in set(_WORD.findall(folded)) if (found := _respelled(word))}
    if not fixes:
        return None
    return _WORD.sub(lambda match: fixes.get(match.group(), match.group()), folded)


def decoded_payloads(text: str) -> list[str]:
    """The base64, hex, %-escaped, rot13, reversed, letter-by-letter and respelled payloads in
    `text`, decoded (the rules score these; leetspeak they already read, their patterns accept
    "1gn0re")."""
    return list(_decoded_payloads(text))


@lru_cache(maxsize=32)  # the rules and the model both ask, for the same request
def _decoded_payloads(text: str) -> tuple[str, ...]:
    joined, respelled = join_split_letters(text), unscramble(text)
    return tuple(dict.fromkeys([*decode_base64(text), *decode_hex(text), *decode_url(text),
                                *decode_rot13_or_reversed(text), *([joined] if joined else []),
                                *([respelled] if respelled else [])]))[:8]


def views(text: str) -> list[str]:
    """Every decoded form of `text` worth scoring on its own, leetspeak undone too (the model
    scores these: its vocabulary knows "ignore", not "1gn0r3")."""
    found = decoded_payloads(text)
    for candidate in (text, *found):
        leet = undo_leetspeak(candidate)
        if leet:
            found.append(leet)
    return list(dict.fromkeys(found))[:8]


# --- a sentence in another language or script -------------------------------------

_ASCII_LETTERS = re.compile(r"[A-Za-z]")
_NON_ASCII = re.compile(r"[^\x00-\x7f]")
_SENTENCE = re.compile(r"[^.!?:;\n。！？]+[.!?:;。！？]?")


def _script(char: str) -> str:
    name = unicodedata.name(char, "")
    return name.split(" ", 1)[0] if name else ""


@dataclass(frozen=True)
class ForeignSegment:
    text: str
    reason: str  # "script CYRILLIC in LATIN text", "not English (fragmentation 2.4)"


def foreign_segments(text: str, pieces_per_word: Callable[[str], float] | None = None) -> list[ForeignSegment]:
    """Sentences in a different script, or (with `pieces_per_word`) a different language,
    from the bulk of the text. Needs at least two sentences: a prompt wholly in one other
    language is a customer writing in their own language, not a smuggled instruction."""
    sentences = [s.strip() for s in _SENTENCE.findall(text) if len(s.split()) >= 2]
    if len(sentences) < 2:
        return []
    scripts = []
    for sentence in sentences:
        if sentence.isascii():
            scripts.append("LATIN")
            continue
        counts: dict[str, int] = {"LATIN": len(_ASCII_LETTERS.findall(sentence))}
        for char in _NON_ASCII.findall(sentence):
            if char.isalpha():
                script = _script(char)
                counts[script] = counts.get(script, 0) + 1
        scripts.append(max(counts, key=counts.__getitem__) if counts else "")
    majority = max(set(scripts), key=scripts.count)
    found = [ForeignSegment(s, f"script {sc} in {majority} text")
             for s, sc in zip(sentences, scripts) if sc and sc != majority]
    if pieces_per_word is None or majority != "LATIN":
        return found
    if pieces_per_word(text) < 1.15:
        return found  # too few broken-up words in the whole text for a foreign sentence
    ratios = [pieces_per_word(s) for s in sentences]
    # English by its vocabulary, or by its function words when short ("Please summarize:"
    # breaks "summarize" into three pieces but is English).
    english = [r for r, sc, s in zip(ratios, scripts, sentences)
               if sc == "LATIN" and (r <= 1.5 or (_has_function_word(s) and (r < 1.9 or len(language_words(s)) < 3)))]
    if len(english) * 2 < len(sentences):
        return found  # the bulk is not English: nothing to stand out from
    for sentence, ratio, sc in zip(sentences, ratios, scripts):
        if sc == "LATIN" and ratio >= 1.9 and len(language_words(sentence)) >= 4:
            found.append(ForeignSegment(sentence, f"not English (fragmentation {ratio:.1f})"))
    if not found:
        found = _without_english_words(sentences, ratios)
    return found


# English function words: nearly every English sentence of five words or more has one,
# while a sentence in Afrikaans, Vietnamese or Irish has none (or only "an").
_CODE = re.compile(r"[$_=\\/{}<>]|--")  # a command line or code has no function words either
_ENGLISH_FUNCTION_WORDS = frozenset(
    "the a to of and or is are was were be been in on at for with by from it its this that these those you your i my "
    "me we our he she they them his her their not no do does did can could will would should what how why when where "
    "which who if as but so there here have has had just please all any some than then".split())


def _has_function_word(sentence: str) -> bool:
    return any(word.strip(".,;:!?()\"'") in _ENGLISH_FUNCTION_WORDS for word in sentence.lower().split())


def _without_english_words(sentences: list[str], ratios: list[float]) -> list[ForeignSegment]:
    """A sentence of five or more words with no English function word, in a text whose other
    sentences have them, when its words are also not plain English (broken up by the English
    vocabulary or spelled with accents): a product list or a title has no function words either,
    but its words are English."""
    words = [language_words(sentence) for sentence in sentences]
    english = [_has_function_word(sentence) for sentence in sentences]
    if not any(english):
        return []
    return [ForeignSegment(sentence, "no English words")
            for sentence, ws, is_english, ratio in zip(sentences, words, english, ratios)
            if not is_english and len(ws) >= 5 and ratio >= (1.8 if sentence.isascii() else 1.3)
            and not _CODE.search(sentence)]


# --- attack words in other languages --------------------------------------------------

# Stems of the words an injected instruction is made of, in about forty languages (accents
# kept and dropped): a foreign sentence that has them is an instruction about instructions,
# not a review or a greeting that a customer wants translated. Matched as substrings of the
# lower-cased sentence; only ever applied to a sentence already found to be foreign.
_CONCEPTS: dict[str, tuple[str, ...]] = {
    "instructions": (
        "instruc", "instruç", "instruț", "istruzion", "anweisung", "instructie", "instrukc", "instrukt", "instruks",
        "udhëzim", "udhezim", "treoir", "treorach", "stiùireadh", "stiuireadh", "imiyalelo", "maagizo", "maelekezo",
        "talimat", "utasítás", "utasitas", "ohjee", "ohjei", "juhis", "norādījum", "noradijum", "nurodym", "upute",
        "navodil", "hướng dẫn", "huong dan", "tagubilin", "cyfarwyddiad", "arahan", "pokyn", "инструкц", "інструкц",
        "указани", "指示", "指令", "지시", "تعليمات", "הוראות", "निर्देश", "οδηγί", "consigne", "regeln", "reglas",
        "regole", "règles", "regras", "regels", "kurallar", "säännö", "szabály",
    ),
    "ignore": (
        "ignor", "olvid", "esqueç", "esquec", "dimentic", "oublie", "vergiss", "vergess", "negeer", "vergeet",
        "zapomn", "glöm", "glem ", "injoro", "harroj", "neamhaird", "leig seachad", "ziba ", "ungazinaki", "puuza",
        "sahau", "abaikan", "lupakan", "yok say", "unut", "bỏ qua", "bo qua", "figyelmen kívül", "figyelmen kivul",
        "felejtsd", "ohita", "unohda", "unusta", "anwybydd", "kalimutan", "pansinin", "игнорир", "забудь",
        "ігнор", "忽略", "無視", "무시", "تجاهل", "התעלם", "अनदेखा", "αγνό", "αγνο",
    ),
    "previous": (
        "anterior", "precedent", "précédent", "vorherig", "vorige", "eerdere", "poprzedni", "předchozí", "predchozi",
        "tidigare", "tidligere", "mëparshme", "meparshme", "roimhe", "yangaphambili", "yaliyotangulia", "iliyopita",
        "sebelumnya", "önceki", "onceki", "trước", "truoc", "korábbi", "korabbi", "aiemm", "eelnev", "blaenorol",
        "naunang", "предыдущ", "попередн", "之前", "先前", "以前", "이전", "السابقة",
    ),
    "password": (
        "password", "contraseña", "contrasena", "senha", "passwort", "kennwort", "mot de passe", "wachtwoord",
        "hasło", "haslo", "heslo", "lösenord", "passord", "fjalëkalim", "fjalekalim", "pasfhocal", "facal-faire",
        "iphasiwedi", "nenosiri", "kata sandi", "kata laluan", "şifre", "sifre", "mật khẩu", "mat khau", "jelszó",
        "jelszo", "salasana", "parool", "cyfrinair", "пароль", "密码", "パスワード", "비밀번호", "كلمة المرور",
    ),
    "system prompt": ("prompt", "sistem", "système", "systeem", "systém", "córas", "uhlelo", "mfumo", "система", "系统"),
}  # fmt: skip


def attack_concepts(sentence: str) -> list[str]:
    """Which of the concepts above a (foreign) sentence names."""
    lowered = sentence.lower() + " "
    return [concept for concept, stems in _CONCEPTS.items() if any(stem in lowered for stem in stems)]

