"""Measure the guard detectors on a labeled set: precision, recall, false-positive rate.

A labeled set is JSON lines, one `{"text": ..., "labels": [...]}` per line, labels a
subset of LABELS. Each label is scored by the detector that decides it in the mesh:

- injection: the input gate's injection layer (`gates.injection_layer`, which honours
  spec.injection_phrases and spec.injection_model) at spec.injection_threshold;
- pii: PII and secret detection (`pii.find_pii`) over all kinds by default, i.e. what the
  detector can find, not only the kinds spec.redact asks the gates to remove.

    python -m services.guardrail.evaluate tests/data/guard_eval.jsonl [--model]

The injection corpus (tests/data/injection_corpus.jsonl: text, label, source, license,
split) is judged across sources instead: `leave_one_source_out` trains the model on
every source but one and tests on the held-out split of the one left out, for each
source; the figure to quote is the worst fold (`baton eval guard --loso`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.guardrail.gates import injection_layer
from shared.pii import KINDS, find_pii
from shared.config import GuardSpec

LABELS: tuple[str, ...] = ("injection", "pii")
CORPUS = Path(__file__).resolve().parents[2] / "tests/data/injection_corpus.jsonl"
GATES = {"injection": "input.injection", "pii": "pii.detect"}
MAX_MISSES = 3  # wrong examples kept per fold


class LabeledDataError(ValueError):
    """A labeled file that cannot be used; the message names the file and line."""

    def __init__(self, path: str, line: int | None, problem: str):
        self.path, self.line, self.problem = path, line, problem
        where = f"{path}:{line}" if line is not None else path
        super().__init__(f"{where}: {problem}")


@dataclass(frozen=True)
class LabeledItem:
    text: str
    labels: frozenset[str]
    line: int = 0  # 1-based line in the source file; 0 when built in code


def _item(raw: Any, path: str, line: int | None) -> LabeledItem:
    def bad(problem: str) -> LabeledDataError:
        return LabeledDataError(path, line, problem)

    if not isinstance(raw, Mapping):
        raise bad(f"expected an object with 'text' and 'labels', got {type(raw).__name__}")
    unknown = sorted(set(raw) - {"text", "labels"})
    if unknown:
        raise bad(f"unknown key(s) {unknown}; an item has only 'text' and 'labels'")
    text, labels = raw.get("text"), raw.get("labels")
    if not isinstance(text, str) or not text:
        raise bad("'text' must be a non-empty string")
    if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
        raise bad("'labels' must be a list of strings (empty for a benign item)")
    strange = sorted(set(labels) - set(LABELS))
    if strange:
        raise bad(f"unknown label(s) {strange}; known labels are {list(LABELS)}")
    return LabeledItem(text, frozenset(labels), line or 0)


def load_labeled(path: Path | str) -> list[LabeledItem]:
    """The items of a JSON-lines file; blank lines are skipped, anything else wrong is an
    error naming the line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise LabeledDataError(str(path), None, f"cannot read the file: {exc}") from exc
    items = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as exc:
            raise LabeledDataError(str(path), number, f"not valid JSON: {exc.msg} (column {exc.colno})") from exc
        items.append(_item(raw, str(path), number))
    if not items:
        raise LabeledDataError(str(path), None, "no items")
    return items


@dataclass(frozen=True)
class Misclassified:
    index: int  # position in the evaluated items
    line: int  # line in the source file, 0 when unknown
    text: str
    expected: bool
    predicted: bool
    score: float  # injection score, or the number of PII findings
    why: list[str]  # detector reasons or PII kinds; empty for a miss

    @property
    def kind(self) -> str:
        return "false positive" if self.predicted else "false negative"


@dataclass
class LabelReport:
    label: str
    gate: str
    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0
    misclassified: list[Misclassified] = field(default_factory=list)

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 0.0

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 0.0

    @property
    def false_positive_rate(self) -> float:
        return self.fp / (self.fp + self.tn) if self.fp + self.tn else 0.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "label": self.label, "gate": self.gate, "tp": self.tp, "fp": self.fp, "fn": self.fn, "tn": self.tn,
            "precision": self.precision, "recall": self.recall, "false_positive_rate": self.false_positive_rate,
            "f1": self.f1, "misclassified": [m.index for m in self.misclassified],
        }  # fmt: skip


@dataclass
class GuardReport:
    items: int
    labels: dict[str, LabelReport]
    spec: GuardSpec

    def __getitem__(self, label: str) -> LabelReport:
        return self.labels[label]

    def as_dict(self) -> dict[str, Any]:
        return {"items": self.items, "labels": {name: report.as_dict() for name, report in self.labels.items()}}


Detector = Callable[[str], tuple[bool, float, list[str]]]


def _detectors(spec: GuardSpec, pii_kinds: Iterable[str]) -> dict[str, Detector]:
    kinds = tuple(pii_kinds)

    def injection(text: str) -> tuple[bool, float, list[str]]:
        result = injection_layer(text, spec)
        return result.score >= spec.injection_threshold, result.score, result.reasons

    def pii(text: str) -> tuple[bool, float, list[str]]:
        findings = find_pii(text, kinds)
        return bool(findings), float(len(findings)), [finding.kind for finding in findings]

    return {"injection": injection, "pii": pii}


def evaluate_guard(
    items: Iterable[LabeledItem | Mapping[str, Any]],
    spec: GuardSpec | None = None,
    *,
    pii_kinds: Iterable[str] = KINDS,
) -> GuardReport:
    """Confusion counts and misclassified items per label. Items may be LabeledItem or
    plain `{"text", "labels"}` mappings (validated like file lines)."""
    spec = spec or GuardSpec()
    detectors = _detectors(spec, pii_kinds)
    reports = {label: LabelReport(label, GATES[label]) for label in LABELS}
    count = 0
    for index, raw in enumerate(items):
        item = raw if isinstance(raw, LabeledItem) else _item(raw, f"<item {index}>", None)
        count += 1
        for label, detect in detectors.items():
            expected = label in item.labels
            predicted, score, why = detect(item.text)
            report = reports[label]
            if expected and predicted:
                report.tp += 1
            elif predicted:
                report.fp += 1
            elif expected:
                report.fn += 1
            else:
                report.tn += 1
            if expected != predicted:
                report.misclassified.append(Misclassified(index, item.line, item.text, expected, predicted, score, why))
    return GuardReport(count, reports, spec)


def render(report: GuardReport, *, show_misses: bool = True) -> Any:
    """The report as a rich renderable: a metrics table, then the misclassified items."""
    from rich.console import Group
    from rich.table import Table

    table = Table(title=f"Guard evaluation ({report.items} items)")
    for column in ("gate", "label", "precision", "recall", "FPR", "F1", "tp", "fp", "fn", "tn"):
        table.add_column(column, justify="left" if column in ("gate", "label") else "right")
    for item in report.labels.values():
        table.add_row(
            item.gate, item.label, f"{item.precision:.3f}", f"{item.recall:.3f}", f"{item.false_positive_rate:.3f}",
            f"{item.f1:.3f}", str(item.tp), str(item.fp), str(item.fn), str(item.tn),
        )  # fmt: skip
    if not show_misses or not any(item.misclassified for item in report.labels.values()):
        return table
    misses = Table(title="Misclassified")
    for column in ("label", "line", "kind", "score", "text", "why"):
        misses.add_column(column, overflow="fold")
    for item in report.labels.values():
        for miss in item.misclassified:
            text = miss.text if len(miss.text) <= 120 else miss.text[:119] + "…"
            misses.add_row(item.label, str(miss.line or miss.index), miss.kind, f"{miss.score:.2f}", text,
                           "; ".join(miss.why))  # fmt: skip
    return Group(table, misses)


# --- the injection corpus, leave-one-source-out ------------------------------------------


@dataclass(frozen=True)
class CorpusRow:
    text: str
    label: int  # 1 = injection or jailbreak, 0 = benign
    source: str
    license: str
    split: str  # "train" or "test", frozen when the corpus was built


def load_corpus(path: Path | str = CORPUS) -> list[CorpusRow]:
    path = Path(path)
    rows = []
    try:
        lines = path.read_text(encoding="utf-8").split("\n")  # not splitlines: texts hold U+2028
    except (OSError, UnicodeDecodeError) as exc:
        raise LabeledDataError(str(path), None, f"cannot read the file: {exc}") from exc
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
            row = CorpusRow(str(raw["text"]), int(raw["label"]), str(raw["source"]), str(raw.get("license", "")),
                            str(raw.get("split", "test")))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise LabeledDataError(str(path), number, f"expected text, label (0/1), source: {exc}") from exc
        if row.label not in (0, 1) or row.split not in ("train", "test"):
            raise LabeledDataError(str(path), number, "label must be 0 or 1 and split 'train' or 'test'")
        rows.append(row)
    if not rows:
        raise LabeledDataError(str(path), None, "no rows")
    return rows


@dataclass
class Fold:
    source: str
    kind: str  # "injection" (recall counts) or "benign" (false-positive rate counts)
    tested: int
    flagged: int
    misses: list[str] = field(default_factory=list)  # injections let through / benign flagged, first few

    @property
    def rate(self) -> float:
        return self.flagged / self.tested if self.tested else 0.0

    def as_dict(self) -> dict[str, Any]:
        metric = "recall" if self.kind == "injection" else "false_positive_rate"
        return {"source": self.source, "kind": self.kind, "tested": self.tested, "flagged": self.flagged,
                metric: round(self.rate, 4), "examples_wrong": self.misses}


@dataclass
class LosoReport:
    folds: list[Fold]
    threshold: float

    def _worst(self, kind: str, pick: Callable[..., Fold]) -> Fold | None:
        folds = [fold for fold in self.folds if fold.kind == kind and fold.tested]
        return pick(folds, key=lambda fold: fold.rate) if folds else None

    @property
    def worst_recall(self) -> Fold | None:
        return self._worst("injection", min)

    @property
    def worst_fpr(self) -> Fold | None:
        return self._worst("benign", max)

    def as_dict(self) -> dict[str, Any]:
        worst_recall, worst_fpr = self.worst_recall, self.worst_fpr
        return {
            "threshold": self.threshold,
            "worst_fold_recall": worst_recall.as_dict() if worst_recall else None,
            "worst_fold_false_positive_rate": worst_fpr.as_dict() if worst_fpr else None,
            "folds": [fold.as_dict() for fold in self.folds],
        }


def leave_one_source_out(
    rows: list[CorpusRow], spec: GuardSpec | None = None, *, split: str = "test", min_probability: float | None = None
) -> LosoReport:
    """For each source: fit the model on the train rows of all other sources, then run the
    whole injection layer (patterns, heuristics, decoded views, model) on the left-out
    source's `split` rows."""
    from services.guardrail.injection import InjectionResult, combine, detect_injection
    from services.guardrail.injection_model import MIN_PROBABILITY, model_signal, train

    spec = spec or GuardSpec()
    folds = []
    for source in sorted({row.source for row in rows}):
        training = [row for row in rows if row.source != source and row.split == "train"]
        weights = train([row.text for row in training], [row.label for row in training])
        tested = [row for row in rows if row.source == source and (split == "all" or row.split == split)]
        # The kind comes from every row of the source: a source with no rows in `split` is still what it is.
        kind = "injection" if any(row.label == 1 for row in rows if row.source == source) else "benign"
        fold = Fold(source, kind, len(tested), 0)
        for row in tested:
            result = detect_injection(row.text, spec.injection_phrases)
            signal = model_signal(row.text, min_probability or MIN_PROBABILITY, weights=weights)
            signals = [*result.signals, *([signal] if signal else [])]
            flagged = InjectionResult(combine(s.weight for s in signals), signals).score >= spec.injection_threshold
            fold.flagged += flagged
            if flagged != (row.label == 1) and len(fold.misses) < MAX_MISSES:
                fold.misses.append(row.text[:160])
        folds.append(fold)
    return LosoReport(folds, spec.injection_threshold)


def render_loso(report: LosoReport) -> Any:
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    table = Table(title=f"Injection, leave-one-source-out (threshold {report.threshold})")
    for column in ("left-out source", "kind", "tested", "flagged", "recall / FPR"):
        table.add_column(column, justify="left" if column in ("left-out source", "kind") else "right")
    for fold in report.folds:
        table.add_row(fold.source, fold.kind, str(fold.tested), str(fold.flagged), f"{fold.rate:.3f}")
    lines = []
    if report.worst_recall:
        lines.append(f"worst-fold recall: {report.worst_recall.rate:.3f} ({report.worst_recall.source})")
    if report.worst_fpr:
        lines.append(f"worst-fold false-positive rate: {report.worst_fpr.rate:.3f} ({report.worst_fpr.source})")
    return Group(table, Text("\n".join(lines)))


def main(argv: list[str] | None = None) -> int:
    import argparse

    from rich.console import Console

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", type=Path)
    parser.add_argument("--model", action="store_true", help="add the TF-IDF classifier (spec.injection_model)")
    parser.add_argument("--threshold", type=float, default=None, help="injection threshold (default: the spec's)")
    args = parser.parse_args(argv)
    spec = GuardSpec(injection_model=args.model)
    if args.threshold is not None:
        spec = spec.model_copy(update={"injection_threshold": args.threshold})
    try:
        items = load_labeled(args.path)
    except LabeledDataError as exc:
        parser.exit(2, f"{exc}\n")
    Console().print(render(evaluate_guard(items, spec)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
