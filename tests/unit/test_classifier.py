"""The route classifier, the complexity score and the evaluation harness, without NATS.

The prompts here are written for these tests; none comes from tests/data/routing_eval.jsonl,
which is only used as a whole, to measure accuracy.
"""

import json
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from services.router.classifier import (
    RouteClassifier,
    available_backends,
    complexity,
    focus_text,
)
from services.router.evaluate import (
    LabeledDataError,
    LabeledPrompt,
    classifier_decide,
    evaluate,
    in_split,
    load_labeled,
    render,
)
from shared.config import load_config
from shared.settings import Settings

EVAL_SET = Path(__file__).resolve().parents[1] / "data" / "routing_eval.jsonl"
SHIPPED_CONFIG = Path(__file__).resolve().parents[2] / "shared" / "default_config.yaml"
ROUTES = ["smalltalk", "factual", "complex", "support", "shopping", "summarize", "rewrite", "classify", "high_risk"]


@pytest.fixture(scope="module")
def config():
    return load_config(Settings().config)


@pytest.fixture(scope="module")
def classifier(config):
    return RouteClassifier.from_config(config)


# ---------------------------------------------------------------------------
# The shipped config gives the classifier what it needs


def test_every_route_has_ten_to_forty_five_hand_written_examples_and_the_routing_section(config):
    # Varied phrasings (terse, chatty, typos) are what generalize past the team's own wording;
    # the cap keeps each route's hand-written list readable for the product people who edit it.
    # The dev part of the labeled sets follows in a block the tool maintains (next test).
    hand_written = _hand_written_config()
    assert list(config.routes) == ROUTES
    for name, route in config.routes.items():
        assert 10 <= len(hand_written.routes[name].examples) <= 45, name
        assert len(set(route.examples)) == len(route.examples), f"{name} repeats an example"
    assert (config.routes["factual"].escalate_to, config.routes["shopping"].escalate_to) == ("complex", "complex")
    assert config.routes["high_risk"].match.metadata == {"risk": "high"}
    assert config.routing.classifier == "embeddings" and config.routing.min_confidence == 0.45


def _hand_written_config():
    from shared.config import parse_config
    from tools.merge_routing_examples import _without_blocks

    return parse_config("\n".join(_without_blocks(SHIPPED_CONFIG.read_text().split("\n"))), "hand-written part")


def test_no_held_out_prompt_is_among_the_examples(config):
    # The dev part of every labeled set teaches the classifier (tools/merge_routing_examples.py);
    # the frozen held-out part never may, or its figure stops being a measurement.
    def norm(text):
        return " ".join(text.lower().split())

    examples = {norm(e) for route in config.routes.values() for e in route.examples}
    labeled = [item for path in sorted(EVAL_SET.parent.glob("routing_*.jsonl")) for item in load_labeled(path)]
    held_out = in_split(labeled, "held-out")
    assert len(labeled) > 900 and len(held_out) > 250
    leaked = [item.prompt for item in held_out if norm(item.prompt) in examples]
    assert leaked == []


def test_the_dev_part_of_every_labeled_set_is_among_the_examples():
    # A set added or edited without rerunning the tool would leave the shipped router behind.
    from tools.merge_routing_examples import dev_examples, merge

    text = SHIPPED_CONFIG.read_text()
    assert merge(text, dev_examples()) == text, "run: .venv/bin/python -m tools.merge_routing_examples"


# ---------------------------------------------------------------------------
# The classifier


@pytest.mark.parametrize(
    ("prompt", "route"),
    [
        ("thank you, you've saved my weekend", "smalltalk"),
        ("bye, speak soon", "smalltalk"),
        ("How do I replace a worn brake cable?", "factual"),
        ("How do I stop my chain from rusting?", "factual"),
        ("Why is my rear wheel rubbing on the brake pads?", "factual"),
        ("Compare belt drives with chains for a year-round commuter, explain the maintenance trade-offs, and then recommend one for someone who rides in snow.", "complex"),
        ("I weigh 120 kg and want to ride gravel every weekend. Which wheels, tyres and brakes should I choose, and how should I plan the upgrades over a year?", "complex"),
        ("Can I return a lock that I've already used once?", "support"),
        ("How long will my new bike take to be delivered?", "support"),
        ("How much does the Pocket Fold E cost?", "shopping"),
        ("What do customers say about the Urban Shell helmet?", "shopping"),
        ("Summarise this for me: The shop will close early on Thursday for stocktaking. Orders placed after noon ship on Monday. Workshop bookings are unaffected.", "summarize"),
        ("Rephrase this to sound more polite: Fix my bike today or I'm taking it elsewhere, I've waited long enough.", "rewrite"),
        ("Classify this message as complaint, question, praise or other: 'The new saddle is fantastic, my back pain is gone.'", "classify"),
    ],
)
def test_unseen_prompts_go_to_their_route(classifier, config, prompt, route):
    best, confidence = classifier.best(prompt)
    assert best == route
    assert confidence >= config.routing.min_confidence


def test_probabilities_cover_every_route_best_first_and_sum_to_one(classifier):
    for prompt in ["hello!", "How do I index my gears?", "asdf qwerty", "Make this shorter: " + "word " * 40]:
        ranked = classifier.predict(prompt)
        assert sorted(route for route, _ in ranked) == sorted(ROUTES)
        probabilities = [p for _, p in ranked]
        assert sum(probabilities) == pytest.approx(1.0)
        assert probabilities == sorted(probabilities, reverse=True)
        assert all(0.0 <= p <= 1.0 for p in probabilities)
        assert classifier.best(prompt) == ranked[0]


def test_nonsense_is_not_confident(classifier, config):
    _, confidence = classifier.best("asdf qwerty zxcv")
    assert confidence < config.routing.min_confidence  # so the default route answers


def test_two_trainings_give_identical_predictions(config, classifier):
    again = RouteClassifier.from_config(config)
    assert again.temperature == classifier.temperature
    for prompt in ["Where is my parcel?", "Is the Tempo SL carbon?", "tl;dr: the shop moves to Elm Street in May and opens at 9."]:
        assert again.predict(prompt) == classifier.predict(prompt)


def test_routes_without_examples_are_never_predicted():
    model = RouteClassifier.train({"greet": ["hello there", "hi!", "good morning"], "ask": ["how do I fix a flat", "what pressure for my tyres", "how do I adjust brakes"], "empty": []})
    assert model.routes == ("greet", "ask")
    ranked = model.predict("hello, how do I fix my brakes?")
    assert [route for route, _ in ranked] in (["greet", "ask"], ["ask", "greet"])
    assert sum(p for _, p in ranked) == pytest.approx(1.0)  # two routes: the binary case still sums to 1


def test_one_route_is_always_certain_and_none_is_an_error():
    assert RouteClassifier.train({"only": ["anything at all"], "none": []}).predict("whatever") == [("only", 1.0)]
    with pytest.raises(ValueError, match="no route has examples"):
        RouteClassifier.train({"a": [], "b": ["  "]})
    with pytest.raises(ValueError, match="unknown classifier backend"):
        RouteClassifier.train({"a": ["x"]}, backend="magic")


def test_keywords_are_hints_that_join_the_training_set():
    examples = {"shop": ["how much is the road bike", "what does the blue one cost"], "help": ["can I send it back", "my parcel is late"]}
    without = RouteClassifier.train(examples).predict("warranty")
    with_hint = RouteClassifier.train(examples, {"help": ["warranty", "guarantee"], "missing": ["ignored"]}).predict("warranty")
    assert dict(with_hint)["help"] > dict(without)["help"]
    assert with_hint[0][0] == "help"


def _sklearn_reference(config):
    """The training set and scikit-learn's TF-IDF over it, the way the router used to build it."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    from services.router.classifier import _training_set

    examples = {name: list(route.examples) for name, route in config.routes.items()}
    hints = {name: list(route.hints) for name, route in config.routes.items()}
    routes = tuple(name for name, texts in examples.items() if texts)
    texts, labels, weights = _training_set(examples, hints, routes)
    focused = [focus_text(t) for t in texts]
    words = TfidfVectorizer(analyzer="word", ngram_range=(1, 2), sublinear_tf=True, token_pattern=r"(?u)\b\w[\w'&-]*\b").fit(focused)
    chars = TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True).fit(focused)

    def dense(text: str) -> np.ndarray:
        return np.concatenate([words.transform([focus_text(text)]).toarray()[0], chars.transform([focus_text(text)]).toarray()[0]])

    return texts, np.array([routes.index(label) for label in labels]), weights, dense


def test_the_numpy_tfidf_gives_scikit_learns_numbers(config):
    # The router runs without scikit-learn; its TF-IDF must stay the one the examples were tuned with.
    from services.router.classifier import _TfidfFeatures

    texts, _, _, reference = _sklearn_reference(config)
    features = _TfidfFeatures()
    features.fit(texts)
    probes = ["Can you condense these notes? Ride at 8, cafe at 10, home by noon, lights on.", "hi!!", "qqqq", "a", "I'm  off -- e-bike's   gone & so's my lock", texts[5]]
    for text in probes:
        columns, values = features.vectorize(text)
        ours = np.zeros(features.width)
        ours[columns] = values
        assert np.allclose(ours, reference(text), atol=1e-12), text


def test_the_numpy_logistic_regression_finds_scikit_learns_weights(config):
    from sklearn.linear_model import LogisticRegression

    from services.router.classifier import TFIDF_C, _TfidfFeatures
    from services.router.learning import fit_softmax, gram, primal

    texts, targets, weights, reference = _sklearn_reference(config)
    matrix = np.stack([reference(text) for text in texts])
    expected = LogisticRegression(C=TFIDF_C, solver="newton-cg", fit_intercept=False, tol=1e-10, max_iter=1000).fit(matrix, targets, sample_weight=weights).coef_
    features = _TfidfFeatures()
    rows = features.fit(texts)
    coef = primal(rows, features.width, fit_softmax(gram(rows, features.width), targets, weights, TFIDF_C, int(targets.max()) + 1))
    assert np.abs(coef - expected).max() < 1e-6 * np.abs(expected).max()


def test_the_router_runs_without_scikit_learn_or_scipy():
    # They cost the router ~60 MB of resident memory for a few hundred examples.
    import subprocess
    import sys

    code = (
        "import sys; from shared.config import load_config; from shared.settings import ROOT;"
        "from services.router.routing import Router; from shared.schema import Request;"
        "Router(load_config(ROOT / 'shared' / 'default_config.yaml')).decide(Request(prompt='hi'));"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('sklearn', 'scipy', 'threadpoolctl')))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "[]"


def test_the_embeddings_backend_runs_on_the_shipped_static_embedder():
    # Wording the examples never use: the embedding carries the meaning across.
    assert "embeddings" in available_backends()
    model = RouteClassifier.train(
        {"smalltalk": ["hello there", "thanks, bye"], "support": ["can I return my helmet", "where is my parcel"]},
        backend="embeddings",
    )
    assert model.best("good evening, nice to meet you")[0] == "smalltalk"
    assert model.best("my delivery has not turned up")[0] == "support"


@pytest.mark.parametrize(
    ("text", "focus"),
    [
        ("Summarize this review: 'Great bike, light and fast, but the saddle is hard and the brakes squeal in the rain.'", "Summarize this review: xxpayload"),
        ("Make this friendlier: Bikes not collected within 30 days will be charged a storage fee of five pounds a day.", "Make this friendlier xxpayload"),
        ("Can you condense these club notes? Ride at 8. Cafe at 10. Home by noon. Bring lights and a spare tube.", "Can you condense these club notes xxpayload"),
        ("Quick question: how do I stop my disc brakes rubbing on the rotor when I ride?", "Quick question: how do I stop my disc brakes rubbing on the rotor when I ride?"),
        ("What does the 'H' screw do?", "What does the 'H' screw do?"),
        # After a text-task verb pointing at material, a short tail is material too.
        ("tag this: when do you open on Sundays?", "tag this xxpayload"),
        ("Please turn this into a formal greeting: hi all", "Please turn this into a formal greeting xxpayload"),
        ("Is this normal: my brakes squeal a bit?", "Is this normal: my brakes squeal a bit?"),
    ],
)
def test_the_classifier_looks_at_the_instruction_not_the_pasted_text(text, focus):
    assert focus_text(text) == focus


# ---------------------------------------------------------------------------
# Complexity


def test_short_factual_questions_score_low():
    for prompt in ["How often should I lube my chain?", "What pressure for 32 mm tyres?", "Why does my chain skip?", "Do you recommend a chain checker?", "hi there"]:
        assert complexity(prompt).score < 0.35, prompt


def test_multi_part_and_comparative_requests_score_high():
    for prompt in [
        "Compare a steel touring frame with an aluminium one for a 100 kg rider carrying panniers, and explain which is easier to fix abroad.",
        "I ride 30 km a day in the rain. What lights should I fit, how often should I service the brakes, and what tyres would you recommend?",
        "First explain what causes brake fade on long descents, then give me a step by step plan to upgrade my rotors and pads.",
        "What are the pros and cons of a cargo bike versus a trailer for two kids, and which would you recommend for a hilly town?",
    ]:
        result = complexity(prompt)
        assert result.score > 0.6, (prompt, result)
        assert result.reasons


def test_complexity_grows_with_the_demands_of_the_request():
    ladder = [
        "thanks!",
        "How do I fit a mudguard?",
        "Should I fit mudguards or a saddle bag for commuting?",
        "Compare full mudguards and clip-on ones for a commuter in a wet climate, then recommend one.",
        "Compare full mudguards and clip-on ones for a heavy commuter in a wet climate: weigh up fit, spray protection, rattles and cost, explain the trade-offs, and then plan the install step by step. Also, what tools will I need?",
    ]
    scores = [complexity(p).score for p in ladder]
    assert scores == sorted(scores), scores
    assert max(scores[:3]) < 0.35 < 0.6 < scores[3] < scores[4] <= 1.0, scores


# ---------------------------------------------------------------------------
# Evaluation


def _tiny_set():
    return [
        LabeledPrompt("hello", "smalltalk"),
        LabeledPrompt("hi again", "smalltalk"),
        LabeledPrompt("how do I fix a flat", "factual"),
        LabeledPrompt("what is sag", "factual"),
        LabeledPrompt("price of the Metro 8", "shopping"),
        LabeledPrompt("my fork snapped", "high_risk", {"risk": "high"}),
    ]


def _tiny_decide(prompt, metadata):
    # Deliberately imperfect: "what is sag" goes to shopping, and a route outside the gold set appears.
    if metadata.get("risk") == "high":
        return "high_risk"
    if prompt.startswith(("hello", "hi")):
        return "smalltalk" if prompt == "hello" else "classify"
    return "factual" if prompt.startswith("how") else "shopping"


def test_evaluate_counts_exactly():
    report = evaluate(_tiny_decide, _tiny_set())
    assert (report.total, report.correct) == (6, 4)
    assert report.accuracy == pytest.approx(4 / 6)
    assert report.labels == ["smalltalk", "factual", "shopping", "high_risk", "classify"]
    assert report.confusion["smalltalk"] == {"smalltalk": 1, "factual": 0, "shopping": 0, "high_risk": 0, "classify": 1}
    assert report.confusion["factual"] == {"smalltalk": 0, "factual": 1, "shopping": 1, "high_risk": 0, "classify": 0}
    assert report.confusion["classify"] == dict.fromkeys(report.labels, 0)
    shopping = report.per_route["shopping"]
    assert (shopping.support, shopping.predicted, shopping.precision, shopping.recall) == (1, 2, 0.5, 1.0)
    factual = report.per_route["factual"]
    assert (factual.precision, factual.recall) == (1.0, 0.5)
    classify = report.per_route["classify"]
    assert (classify.support, classify.predicted, classify.precision, classify.recall) == (0, 1, 0.0, 0.0)
    assert [(m.prompt, m.gold, m.predicted) for m in report.misrouted] == [("hi again", "smalltalk", "classify"), ("what is sag", "factual", "shopping")]


def test_render_shows_the_headline_and_both_tables():
    console = Console(record=True, width=100)
    console.print(render(evaluate(_tiny_decide, _tiny_set())))
    shown = console.export_text()
    assert "Routing accuracy 66.7%" in shown and "(4/6 prompts)" in shown
    assert "Per route" in shown and "Confusion" in shown and "Misrouted (2)" in shown
    assert "what is sag" in shown


def test_load_labeled_reads_prompts_routes_and_metadata(tmp_path):
    path = tmp_path / "set.jsonl"
    path.write_text('{"prompt": "hi", "route": "smalltalk"}\n\n{"prompt": "fork snapped", "route": "high_risk", "metadata": {"risk": "high"}}\n')
    # Lines without a "source" are credited to the file, for the per-source figures.
    assert load_labeled(path) == [LabeledPrompt("hi", "smalltalk", source="set"), LabeledPrompt("fork snapped", "high_risk", {"risk": "high"}, source="set")]


@pytest.mark.parametrize(
    ("bad_line", "says"),
    [
        ('{"prompt": "hi", "route": ', "not valid JSON"),
        ('["hi", "smalltalk"]', "expected an object"),
        ('{"prompt": "hi"}', "'route' must be a non-empty string"),
        ('{"prompt": "", "route": "factual"}', "'prompt' must be a non-empty string"),
        ('{"prompt": "hi", "route": "smalltalk", "metadata": {"risk": 3}}', "'metadata' must be an object"),
    ],
)
def test_a_bad_line_is_named(tmp_path, bad_line, says):
    path = tmp_path / "set.jsonl"
    path.write_text('{"prompt": "hi", "route": "smalltalk"}\n{"prompt": "yo", "route": "smalltalk"}\n' + bad_line + "\n")
    with pytest.raises(LabeledDataError) as caught:
        load_labeled(path)
    assert f"{path}:3:" in str(caught.value) and says in str(caught.value)


def test_a_missing_labeled_file_is_a_clear_error(tmp_path):
    with pytest.raises(LabeledDataError, match="cannot read the labeled set"):
        load_labeled(tmp_path / "absent.jsonl")


# ---------------------------------------------------------------------------
# The shipped examples against the held-out labeled set


def test_accuracy_on_the_labeled_set_with_the_intended_precedence(config, classifier):
    def decide(prompt, metadata):
        # Metadata rules first, then the classifier when it is confident, else the default route.
        if metadata.get("risk") == "high":
            return "high_risk"
        route, confidence = classifier.best(prompt)
        return route if confidence >= config.routing.min_confidence else config.default_route

    items = load_labeled(EVAL_SET)
    report = evaluate(decide, items)
    misrouted = [(m.gold, m.predicted, m.prompt[:60]) for m in report.misrouted]
    assert report.accuracy >= 0.85, f"accuracy {report.accuracy:.3f}; misrouted: {json.dumps(misrouted, indent=1)}"
    # The library's decide function implements the same precedence from the config.
    assert evaluate(classifier_decide(config, classifier), items).accuracy == report.accuracy
