"""What each decision costs in-process: CPU per call on one core, no transport, no mesh.

    python -m bench.decision_cost        # prints the figures; `make bench` puts them in RESULTS.md

- the router's start-up on the default config (training the classifier, loading the
  contextual risk encoder) and its decision on every prompt of the labelled routing sets
  (rules, classifier, risk cues, and the encoder for the few prompts it reads), with the
  share of prompts the encoder read and its cost per reading;
- the input gate (injection rules, structural cues, model; banned topics; redaction) on
  the bench's questions and on a 2 kB text, and the output gate on the same text;
- the local extractive model answering from eight handbook passages.

CPU time (time.process_time), so another process on the machine counts little. These
are the figures the timed tests used to guard; speed lives here, not in the tests.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TWO_KB = (
    "My Trek Domane needs new brake pads; I ride 80 km a week in the rain. Email me at "
    "rider@example.com or call +44 20 7946 0958. The 2024 model costs €1,299.00 with 28 mm tyres. "
) * 12


def cpu_us(function: Callable[[], Any], repeat: int) -> float:
    """Mean CPU microseconds per call, after one warm-up call."""
    function()
    started = time.process_time()
    for _ in range(repeat):
        function()
    return (time.process_time() - started) / repeat * 1e6


def labelled_prompts() -> list[str]:
    prompts: dict[str, None] = {}
    for path in sorted((ROOT / "tests" / "data").glob("routing*.jsonl")):
        for line in path.read_text().splitlines():
            if line.strip():
                prompts.setdefault(json.loads(line)["prompt"], None)
    return list(prompts)


def router_figures() -> dict[str, Any]:
    from services.router.routing import Router
    from shared.config import load_config
    from shared.schema import Request
    from shared.settings import Settings

    config = load_config(Settings().config)
    started = time.process_time()
    router = Router(config)
    start_s = time.process_time() - started
    read: list[float] = []
    model = router.risk_model

    def timed(text: str) -> float:
        """The encoder's reading, its CPU time noted."""
        assert model is not None
        begun = time.process_time()
        try:
            return model.probability(text)
        finally:
            read.append(time.process_time() - begun)

    requests = [Request(prompt=prompt) for prompt in labelled_prompts()]
    router.decide(requests[0], timed)
    read.clear()
    costs = []
    for request in requests:
        begun = time.process_time()
        router.decide(request, timed)
        costs.append(time.process_time() - begun)
    return {
        "start_s": round(start_s, 2),
        "encoder_loaded": model is not None,
        "prompts": len(requests),
        "decide_mean_us": round(statistics.fmean(costs) * 1e6, 1),
        "decide_p50_us": round(statistics.median(costs) * 1e6, 1),
        "encoder_read_share": round(len(read) / len(requests), 3),
        "encoder_p50_ms": round(statistics.median(read) * 1e3, 1) if read else None,
    }


def gate_figures() -> dict[str, Any]:
    from bench.baton_bench import QUESTIONS
    from services.guardrail.gates import input_gate, output_gate
    from shared.config import load_config
    from shared.settings import Settings

    spec = load_config(Settings().config).guard
    text = TWO_KB[:2048]
    cycle = iter(QUESTIONS * 200)
    return {
        "input_gate_question_us": round(cpu_us(lambda: input_gate(next(cycle), spec), 1000), 1),
        "input_gate_2kb_us": round(cpu_us(lambda: input_gate(text, spec), 200), 1),
        "output_gate_2kb_us": round(cpu_us(lambda: output_gate(text, spec), 200), 1),
    }


def local_model_figures() -> dict[str, Any]:
    from shared.local_model import LocalExtractive
    from shared.schema import Passage

    paragraphs = [p for path in sorted((ROOT / "corpus" / "handbook").glob("*.md")) for p in path.read_text().split("\n\n") if len(p) > 120]
    passages = [Passage(text=p, score=1.0, source="handbook") for p in paragraphs[:8]]
    model = LocalExtractive()
    return {"local_answer_8_passages_us": round(cpu_us(lambda: model.generate("How do I stop my disc brakes squealing?", passages), 100), 1)}


def run() -> dict[str, Any]:
    return {**router_figures(), **gate_figures(), **local_model_figures()}


if __name__ == "__main__":
    for key, value in run().items():
        print(f"{key:28} {value}")
