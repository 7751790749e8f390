"""The retriever's index: ingest a folder, search it, rebuild it under a running reader."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from services.retriever import index as retriever_index
from services.retriever import (
    IndexMissingError,
    IngestError,
    Retriever,
    chunk_document,
    ingest,
)
from services.retriever.index import MAX_WORDS, MIN_WORDS

CHAIN_WEAR = """\
# Chain Wear

A bicycle chain wears a little with every pedal stroke, and a worn chain grinds down the cassette.

## Chain replacement

Chain replacement is due once a checker shows 0.5 percent wear on an eleven-speed drivetrain.
Fit the new chain with a quick link and cut it two links longer than the big-big length.

## Cleaning

Degreaser and a stiff brush remove the grit that accelerates wear between the rollers.
"""

TYRES = """\
# Tyre Pressure

## Road tyres

Road tyres of 28 mm width are usually inflated to about 80 psi for a 75 kg rider.
Heavier riders add roughly one psi for every extra kilogram of body weight.

## Gravel tyres

Gravel tyres run far softer, often between 30 and 40 psi, to grip loose surfaces.
"""

BRAKES = """\
# Brakes

## Pad wear

Disc brake pads should be swapped when the friction material is thinner than one millimetre.
"""

CATALOG = """\
# Product Catalog

## Drivetrain

The Baton X11 chain costs 29 euros and ships with a reusable quick link.
The Baton tandem cassette has eleven sprockets made of hardened steel.
"""

LOOSE_NOTES = "Opening hours of the workshop are nine to five on weekdays.\n"


def _write(root: Path, files: dict[str, str]) -> Path:
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root


@pytest.fixture
def source(tmp_path: Path) -> Path:
    return _write(
        tmp_path / "docs",
        {
            "handbook/chain-wear.md": CHAIN_WEAR,
            "handbook/tyres/pressure.md": TYRES,
            "handbook/brakes.txt": BRAKES,
            "handbook/empty.md": "",
            "catalog/products.md": CATALOG,
            "opening-hours.txt": LOOSE_NOTES,
            "handbook/image.png": "not a document",
            ".git/notes.md": "# Hidden\n\nchain chain chain\n",
        },
    )


@pytest.fixture
def retriever(source: Path, tmp_path: Path) -> Retriever:
    ingest(source, tmp_path / "index")
    return Retriever.load(tmp_path / "index")


# --------------------------------------------------------------------------- ingest


def test_ingest_counts_corpora_files_and_reports_progress(source: Path, tmp_path: Path) -> None:
    calls: list[tuple[int, int]] = []
    stats = ingest(source, tmp_path / "index", progress=lambda done, total: calls.append((done, total)))

    # Six .md/.txt files outside hidden folders; the empty one is skipped, not indexed.
    assert calls == [(n, 6) for n in range(1, 7)]
    assert stats.documents == 5
    assert stats.skipped == 1
    assert set(stats.corpora) == {"handbook", "catalog", "default"}
    assert stats.chunks == sum(stats.corpora.values())
    assert stats.corpora["default"] == 1
    assert stats.seconds >= 0

    manifest = json.loads((tmp_path / "index" / "manifest.json").read_text())
    assert manifest["corpora"] == stats.corpora
    assert manifest["built_at"]
    for corpus in stats.corpora:
        assert (tmp_path / "index" / corpus / "chunks.json").is_file()


def test_ingest_rejects_missing_or_empty_source(tmp_path: Path) -> None:
    with pytest.raises(IngestError, match="does not exist.*baton ingest"):
        ingest(tmp_path / "nope", tmp_path / "index")

    _write(tmp_path / "pictures", {"a.png": "x", "b/c.pdf": "y"})
    with pytest.raises(IngestError, match=r"no \.md or \.txt files"):
        ingest(tmp_path / "pictures", tmp_path / "index")

    _write(tmp_path / "blank", {"a.md": "", "b/c.txt": "\n\n"})
    with pytest.raises(IngestError, match="empty"):
        ingest(tmp_path / "blank", tmp_path / "index")
    assert not (tmp_path / "index" / "manifest.json").exists()


# --------------------------------------------------------------------------- search


def test_stemming_finds_a_paraphrase(retriever: Retriever) -> None:
    pytest.importorskip("Stemmer")
    # Neither "replacing" nor "chains" appears anywhere: only stems can match.
    passages = retriever.search("replacing chains")

    assert passages, "stemming should map 'replacing chains' onto 'chain replacement'"
    best = passages[0]
    assert best.source == "handbook/chain-wear.md"
    assert best.title == "Chain Wear — Chain replacement"
    assert best.corpus == "handbook"
    assert "0.5 percent" in best.text
    assert not best.text.startswith("#"), "the heading lives in title, not in the text"


def test_question_ranks_the_right_document_first(retriever: Retriever) -> None:
    passages = retriever.search("How much air pressure should I put in my road tyres?", top_k=3)

    assert passages[0].source == "handbook/tyres/pressure.md"
    assert passages[0].title == "Tyre Pressure — Road tyres"
    assert "80 psi" in passages[0].text
    assert len(passages) <= 3
    scores = [passage.score for passage in passages]
    assert scores == sorted(scores, reverse=True)
    assert all(score > 0 for score in scores)


def test_title_falls_back_to_file_stem_and_top_level_files_are_default(retriever: Retriever) -> None:
    [notes] = retriever.search("workshop opening hours", top_k=1)
    assert (notes.source, notes.title, notes.corpus) == ("opening-hours.txt", "opening-hours", "default")

    [pads] = retriever.search("brake pad friction material", top_k=1)
    assert (pads.source, pads.title) == ("handbook/brakes.txt", "Brakes — Pad wear")


def test_corpora_filter(retriever: Retriever) -> None:
    assert retriever.corpora == ["catalog", "default", "handbook"]

    everywhere = {passage.corpus for passage in retriever.search("chain quick link", top_k=10)}
    assert everywhere == {"catalog", "handbook"}

    only_catalog = retriever.search("chain quick link", top_k=10, corpora=["catalog"])
    assert only_catalog and {p.source for p in only_catalog} == {"catalog/products.md"}
    assert "29 euros" in only_catalog[0].text

    only_handbook = retriever.search("chain quick link", corpora=["handbook"])
    assert only_handbook and all(p.corpus == "handbook" for p in only_handbook)


def test_headings_are_searchable_though_not_part_of_the_text(retriever: Retriever) -> None:
    # "Drivetrain" appears in the catalog only as a section heading.
    [hit] = retriever.search("drivetrain", top_k=1, corpora=["catalog"])
    assert hit.title == "Product Catalog — Drivetrain"
    assert "drivetrain" not in hit.text.lower()


def test_unknown_corpus_names_the_known_ones(retriever: Retriever) -> None:
    with pytest.raises(ValueError, match=r"'manuals'.*\['catalog', 'default', 'handbook'\]"):
        retriever.search("chain", corpora=["handbook", "manuals"])


@pytest.mark.parametrize("query", ["", "   ", "the and of it", "?!"])
def test_empty_or_stopword_query_returns_nothing(retriever: Retriever, query: str) -> None:
    assert retriever.search(query) == []


def test_unmatched_query_returns_nothing_and_top_k_is_respected(retriever: Retriever) -> None:
    assert retriever.search("xylophone quantum") == []
    assert len(retriever.search("chain", top_k=1)) == 1
    with pytest.raises(ValueError, match="top_k"):
        retriever.search("chain", top_k=0)


def test_a_repeated_search_answers_alike_with_passages_of_its_own(retriever: Retriever) -> None:
    # Searches answer alike, and what a caller gets (a gate may edit it) is its own.
    first = retriever.search("how worn is my chain", top_k=2, corpora=["handbook"])
    first[0].text = "changed by a gate downstream"
    again = retriever.search("how worn is my chain", top_k=2, corpora=["handbook"])
    assert [p.source for p in again] == [p.source for p in first] and again[0].text != first[0].text
    assert again == retriever.search("how worn is my chain", top_k=2, corpora=["handbook"])
    assert len(retriever.search("how worn is my chain", top_k=1, corpora=["handbook"])) == 1
    with pytest.raises(ValueError, match="'manuals'"):
        retriever.search("how worn is my chain", top_k=2, corpora=["manuals"])


def test_missing_index_says_to_run_ingest(tmp_path: Path) -> None:
    with pytest.raises(IndexMissingError, match=r"baton ingest PATH"):
        Retriever.load(tmp_path / "never-built")


# --------------------------------------------------------------------------- chunking


def _long_document(seed: int = 7) -> tuple[str, list[str]]:
    """A long Markdown document with uneven paragraphs, and the body words in order."""
    rng = random.Random(seed)
    vocabulary = "spoke rim hub axle bearing cone cup race grease torque wrench nipple tension truing stand".split()
    lines = ["# Wheel Building", ""]
    body: list[str] = []
    for section in range(6):
        lines += [f"## Step {section}", ""]
        for _ in range(rng.randint(3, 7)):
            sentences = []
            for _ in range(rng.randint(1, 12)):
                words = [rng.choice(vocabulary) for _ in range(rng.randint(6, 25))]
                sentences.append(" ".join(words).capitalize() + ".")
            paragraph = " ".join(sentences)
            lines += [paragraph, ""]
            body += paragraph.split()
    # One run-on paragraph with no sentence end at all must still be cut.
    run_on = " ".join(rng.choice(vocabulary) for _ in range(420))
    lines += ["## Run-on", "", run_on, ""]
    body += run_on.split()
    return "\n".join(lines), body


def test_chunks_of_a_long_document_stay_within_bounds_and_keep_every_word() -> None:
    text, body = _long_document()
    chunks = chunk_document(text, "wheels/building.md", "building")

    sizes = [len(chunk.text.split()) for chunk in chunks]
    assert len(chunks) >= 10
    assert all(MIN_WORDS <= size <= MAX_WORDS for size in sizes), sizes
    # Chunking reorders, drops or duplicates nothing.
    assert [word for chunk in chunks for word in chunk.text.split()] == body
    assert {chunk.title for chunk in chunks} == {f"Wheel Building — Step {n}" for n in range(6)} | {
        "Wheel Building — Run-on"
    }
    assert all(chunk.source == "wheels/building.md" for chunk in chunks)


def test_small_paragraphs_merge_and_sections_never_mix() -> None:
    text = "# Doc\n\n## A\n\none two three\n\nfour five six\n\n## B\n\nseven eight\n"
    chunks = chunk_document(text, "doc.md", "doc")
    assert [(c.title, c.text) for c in chunks] == [
        ("Doc — A", "one two three\n\nfour five six"),
        ("Doc — B", "seven eight"),
    ]


def test_code_fences_are_not_split_or_read_as_headings() -> None:
    text = "# Doc\n\n```bash\n# not a heading\n\necho hi\n```\n"
    [chunk] = chunk_document(text, "doc.md", "doc")
    assert chunk.title == "Doc"
    assert "# not a heading\n\necho hi" in chunk.text


# --------------------------------------------------------------------------- rebuilds


def test_reingest_replaces_the_index_and_reload_picks_it_up(source: Path, tmp_path: Path) -> None:
    index_dir = tmp_path / "index"
    ingest(source, index_dir)
    retriever = Retriever.load(index_dir)
    assert retriever.reload_if_changed() is False  # nothing changed yet
    assert retriever.search("penny farthing") == []

    _write(source, {"handbook/history.md": "# History\n\nThe penny farthing had a huge front wheel.\n"})
    (source / "catalog" / "products.md").unlink()
    (source / "catalog").rmdir()
    ingest(source, index_dir)

    # The running retriever keeps serving its snapshot until told to reload.
    assert retriever.search("penny farthing") == []
    assert retriever.reload_if_changed() is True
    [hit] = retriever.search("penny farthing", top_k=1)
    assert (hit.source, hit.title) == ("handbook/history.md", "History")
    assert retriever.corpora == ["default", "handbook"]
    assert retriever.reload_if_changed() is False

    # No build leftovers, and the vanished corpus is gone from disk too.
    assert sorted(p.name for p in index_dir.iterdir()) == ["default", "handbook", "manifest.json"]


def test_failed_ingest_leaves_the_old_index_intact(
    source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    index_dir = tmp_path / "index"
    ingest(source, index_dir)
    before = (index_dir / "manifest.json").read_text()

    real_build = retriever_index._build_corpus

    def build_then_fail(target: Path, corpus: str, *args: object) -> None:
        real_build(target, corpus, *args)
        if corpus == "default":  # the second of three corpora, built in name order
            raise OSError("disk full")

    monkeypatch.setattr(retriever_index, "_build_corpus", build_then_fail)
    _write(source, {"catalog/products.md": CATALOG.replace("29 euros", "35 euros")})
    with pytest.raises(OSError, match="disk full"):
        ingest(source, index_dir)

    assert (index_dir / "manifest.json").read_text() == before
    assert sorted(p.name for p in index_dir.iterdir()) == ["catalog", "default", "handbook", "manifest.json"]
    [price] = Retriever.load(index_dir).search("Baton X11 chain price euros", top_k=1, corpora=["catalog"])
    assert "29 euros" in price.text


def test_corpus_from_another_build_is_never_served(source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Simulates a reader arriving mid-swap: the manifest names a build the corpus is not from.
    index_dir = tmp_path / "index"
    ingest(source, index_dir)
    manifest = json.loads((index_dir / "manifest.json").read_text())
    manifest["build_id"] = "some-other-build"
    (index_dir / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setattr(retriever_index, "_LOAD_ATTEMPTS", 2)
    monkeypatch.setattr(retriever_index, "_LOAD_RETRY_S", 0.0)

    with pytest.raises(IndexMissingError, match="incomplete.*baton ingest"):
        Retriever.load(index_dir)
