"""Leave-one-source-out for routing and high-risk recall: how the router does on a writer it never learned from.

    .venv/bin/python tools/routing_loso.py [--no-encoder]

The shipped router learns from the hand-written examples plus the dev part of every labeled
set (tools/merge_routing_examples.py), and its risk encoder's head from the same examples
(tools/train_risk_encoder.py). Each fold rebuilds both without one source (every prompt of
it, dev and held-out) and routes that source with the whole router. Folds: each set file,
each source inside a file that has several (the seven voices of routing_voices_13m), and
each author whose files share a suffix (routing_*_13r, routing_*_13m). The worst fold is the
figure to quote. Takes a few minutes (each fold trains a router).
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.router.evaluate import LabeledPrompt, in_split, load_labeled  # noqa: E402
from services.router.risk import RISK_ROUTE  # noqa: E402
from services.router.risk_model import THRESHOLD, EncoderRiskModel, fit_head  # noqa: E402
from services.router.routing import Router  # noqa: E402
from shared.config import MeshConfig, parse_config  # noqa: E402
from shared.schema import Request  # noqa: E402
from tools.merge_routing_examples import CONFIGS, SETS, _without_blocks  # noqa: E402

_AUTHOR = re.compile(r"_(\d+[a-z]+)$")


class _FoldHead(EncoderRiskModel):
    """The shipped encoder with a head fitted on one fold's examples."""

    def __init__(self, weights: np.ndarray, bias: float, embed) -> None:
        self.weights, self.bias, self.threshold, self._embed = weights, bias, THRESHOLD, embed

    def probability(self, text: str) -> float:
        return float(1.0 / (1.0 + np.exp(-(float(self._embed(text) @ self.weights) + self.bias))))


def folds(items_by_file: dict[Path, list[LabeledPrompt]]) -> dict[str, set[tuple[str, str]]]:
    """Fold name -> the (file, source) pairs it leaves out."""
    out: dict[str, set[tuple[str, str]]] = {}
    for path, items in items_by_file.items():
        sources = {(path.stem, item.source) for item in items}
        out[path.stem] = sources
        if len(sources) > 3:  # a file of several voices: each is a source of its own
            for pair in sources:
                out[f"{path.stem}:{pair[1]}"] = {pair}
        author = _AUTHOR.search(path.stem)
        if author:
            out.setdefault(f"author {author.group(1)}", set()).update(sources)
    return out


def with_examples(hand_written: MeshConfig, extra: Iterable[LabeledPrompt]) -> MeshConfig:
    routes = {}
    added: dict[str, list[str]] = {}
    for item in extra:
        if not item.metadata and item.route in hand_written.routes:
            added.setdefault(item.route, []).append(item.prompt)
    for name, spec in hand_written.routes.items():
        own = set(spec.examples)
        new = list(dict.fromkeys(p for p in added.get(name, []) if p not in own))
        routes[name] = spec.model_copy(update={"examples": [*spec.examples, *new]})
    return hand_written.model_copy(update={"routes": routes})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--no-encoder", action="store_true", help="cues and classifier only (no risk encoder)")
    args = parser.parse_args(argv)
    hand_written = parse_config("\n".join(_without_blocks(CONFIGS[0].read_text().split("\n"))), "hand-written examples")
    items_by_file = {path: load_labeled(path) for path in SETS}
    tagged = [(path.stem, item) for path, items in items_by_file.items() for item in items]
    embed = _cached_encoder() if not args.no_encoder else None
    print(f"{'fold':42s} {'routing':>15s} {'high-risk recall':>17s} {'precision':>10s}")
    worst: dict[str, tuple[float, str]] = {}
    for name, left_out in folds(items_by_file).items():
        started = time.process_time()
        train = [item for stem, item in tagged if (stem, item.source) not in left_out]
        test = [item for stem, item in tagged if (stem, item.source) in left_out]
        config = with_examples(hand_written, in_split(train, "dev"))
        router = Router(config, risk_model=_head(config, embed) if embed else None)
        routed = [router.decide(Request(prompt=item.prompt, metadata=item.metadata)).route for item in test]
        correct = sum(route == item.route for route, item in zip(routed, test))
        incidents = [route == RISK_ROUTE for route, item in zip(routed, test) if item.route == RISK_ROUTE and not item.metadata]
        escalated = [item.route == RISK_ROUTE for route, item in zip(routed, test) if route == RISK_ROUTE]
        recall = sum(incidents) / len(incidents) if incidents else None
        precision = sum(escalated) / len(escalated) if escalated else None
        print(f"{name:42s} {correct:>5d}/{len(test):<4d}{correct / len(test):6.1%} "
              f"{_ratio(sum(incidents), len(incidents)):>17s} {_ratio(sum(escalated), len(escalated)):>10s}  ({time.process_time() - started:.0f} s)", flush=True)
        _keep_worst(worst, "routing", correct / len(test), name)
        if recall is not None:
            _keep_worst(worst, "high-risk recall", recall, name)
        if precision is not None and incidents:  # a fold without incidents has no precision worth ranking
            _keep_worst(worst, "high-risk precision", precision, name)
    for what, (value, name) in worst.items():
        print(f"worst {what}: {value:.3f} ({name})")
    return 0


def _cached_encoder():
    from shared.encoder import shared_encoder

    encoder, cache = shared_encoder(), {}

    def embed(text: str) -> np.ndarray:
        if text not in cache:
            cache[text] = encoder.embed(text)
        return cache[text]

    return embed


def _head(config: MeshConfig, embed) -> _FoldHead:
    texts = [(text, name == RISK_ROUTE) for name, route in config.routes.items() for text in route.examples]
    weights, bias = fit_head(np.stack([embed(text) for text, _ in texts]), np.array([label for _, label in texts]))
    return _FoldHead(weights, bias, embed)


def _ratio(hits: int, total: int) -> str:
    return f"{hits}/{total} {hits / total:.2f}" if total else "-"


def _keep_worst(worst: dict[str, tuple[float, str]], what: str, value: float, name: str) -> None:
    if what not in worst or value < worst[what][0]:
        worst[what] = (value, name)


if __name__ == "__main__":
    raise SystemExit(main())
