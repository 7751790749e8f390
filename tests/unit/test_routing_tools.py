"""The tools that feed the router its examples and measure it leave-one-source-out."""

from __future__ import annotations

from pathlib import Path

from services.router.evaluate import LabeledPrompt
from shared.config import load_config
from shared.settings import Settings
from tools.merge_routing_examples import BEGIN, END, merge
from tools.routing_loso import folds, with_examples


def _items(source: str, n: int = 2) -> list[LabeledPrompt]:
    return [LabeledPrompt(prompt=f"{source} prompt {i}", route="factual", source=source) for i in range(n)]


def test_folds_leave_out_files_voices_and_whole_writers():
    files = {
        Path("routing_eval.jsonl"): _items("team"),
        Path("routing_voices_13m.jsonl"): [item for voice in ("terse", "angry", "polite", "typos") for item in _items(voice)],
        Path("routing_check_13m.jsonl"): _items("slang"),
        Path("routing_risk_13r.jsonl"): _items("high-risk") + _items("lookalike"),
    }
    made = folds(files)
    assert made["routing_eval"] == {("routing_eval", "team")}
    assert made["routing_voices_13m:angry"] == {("routing_voices_13m", "angry")}
    assert "routing_risk_13r:lookalike" not in made  # two sources of one kind of writing stay one fold
    assert made["author 13m"] == {("routing_voices_13m", v) for v in ("terse", "angry", "polite", "typos")} | {("routing_check_13m", "slang")}
    assert made["author 13r"] == made["routing_risk_13r"]


def test_a_folds_examples_are_its_training_prompts_added_once_after_the_hand_written_ones():
    config = load_config(Settings().config)
    first = config.routes["factual"].examples[0]
    extra = [LabeledPrompt(prompt="what is a thru-axle, in plain words?", route="factual"),
             LabeledPrompt(prompt="what is a thru-axle, in plain words?", route="factual"),
             LabeledPrompt(prompt=first, route="factual"),
             LabeledPrompt(prompt="my battery is smoking", route="high_risk", metadata={"risk": "high"})]
    grown = with_examples(config, extra)
    assert grown.routes["factual"].examples == [*config.routes["factual"].examples, "what is a thru-axle, in plain words?"]
    assert grown.routes["high_risk"].examples == config.routes["high_risk"].examples  # metadata routes it, not words


def test_merging_writes_one_marked_block_per_route_and_is_idempotent():
    text = "routes:\n  a:\n    examples:\n      - \"hello\"\n    steps: []\n  b:\n    examples:\n      - \"x\"\n"
    merged = merge(text, {"a": ["hello", "hi there"], "b": ["y"]})
    assert merged.count(BEGIN) == 2 and merged.count(END) == 2
    assert '      - "hi there"' in merged and merged.count('"hello"') == 1  # a hand-written example is not repeated
    assert merge(merged, {"a": ["hello", "hi there"], "b": ["y"]}) == merged
    assert merge(merged, {"a": [], "b": []}) == text  # a block goes when its prompts do
