"""BM25 retrieval at scale: a synthetic bike-domain corpus, ingested and searched in process.

The corpus is generated deterministically (a fixed seed): Markdown files of one
section per chunk, each section a paragraph of 60-147 words drawn from a Zipf-like
distribution over a bike-shop vocabulary plus rarer generated terms (part numbers,
model names), so the index has a realistic long tail. Ingest goes through the real
`services.retriever.index.ingest`; search through `Retriever.search`.
"""

from __future__ import annotations

import itertools
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.load import summarize

SECTIONS_PER_FILE = 100

BIKE_WORDS = """
chain cassette chainring derailleur hanger cable housing shifter brake caliper rotor pad lever
hydraulic mineral oil dot fluid bleed piston tyre tire tube tubeless sealant valve presta
schrader rim spoke nipple hub bearing axle thru skewer quick release wheel truing dish tension
frame fork steerer headset stem handlebar grip tape saddle seatpost clamp dropper crank pedal
cleat bottom bracket spindle torque wrench newton metre grease lube wax degreaser solvent rag
brush pump pressure psi bar gauge puncture patch lever tread casing bead width clearance mud
guard fender rack pannier bag light battery charger motor controller display range assist
cadence sensor mode eco turbo commute gravel road mountain trail hybrid cargo folding touring
suspension sag rebound compression damper spring air shock travel lockout stanchion seal
service interval wear indicator elongation stretch checker percent millimetre kilometre mile
rain winter salt rust corrosion squeal noise creak click rattle wobble alignment adjust limit
screw barrel indexing gear ratio tooth cog climb descent sprint cornering braking traffic lane
helmet lock security theft warranty return refund shipping delivery order booking workshop
mechanic repair replace inspect clean rinse dry store shed garage carbon aluminium steel
titanium weight stiffness comfort geometry reach stack size fit height inseam posture
""".split()

FILLER = """
the a an and or of to in on for with when after before every this that your you it is are be
should can will may must check make sure keep use avoid then first next also until while
""".split()


def _vocabulary(rng: random.Random) -> list[str]:
    """Bike words first (frequent), then generated long-tail terms (rare)."""
    syllables = ["ka", "lo", "ri", "ven", "tor", "ax", "mi", "sol", "dra", "pel", "quin", "zet", "bro", "fin", "gal"]
    tail = set()
    while len(tail) < 20_000:
        word = "".join(rng.choice(syllables) for _ in range(rng.randint(2, 4)))
        if rng.random() < 0.3:
            word += str(rng.randint(10, 999))
        tail.add(word)
    return BIKE_WORDS + sorted(tail)


def generate_corpus(target: Path, chunks: int, seed: int = 20261124) -> dict[str, Any]:
    """Write `chunks` sections (one chunk each) under target/synthetic/. Deterministic."""
    rng = random.Random(seed)
    vocabulary = _vocabulary(rng)
    weights = list(itertools.accumulate(1.0 / (rank + 1) ** 1.05 for rank in range(len(vocabulary))))
    corpus_dir = target / "synthetic"
    corpus_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    words_total = 0
    files = (chunks + SECTIONS_PER_FILE - 1) // SECTIONS_PER_FILE
    for file_index in range(files):
        lines = [f"# Workshop notes volume {file_index}", ""]
        for section in range(min(SECTIONS_PER_FILE, chunks - file_index * SECTIONS_PER_FILE)):
            count = rng.randint(45, 110)  # with fillers: 60-147 words, one chunk per section
            content = rng.choices(vocabulary, cum_weights=weights, k=count)
            words = []
            for position, word in enumerate(content):
                words.append(word)
                if position % 3 == 2:
                    words.append(rng.choice(FILLER))
            sentences = [" ".join(words[i : i + 14]).capitalize() + "." for i in range(0, len(words), 14)]
            words_total += len(words)
            heading = " ".join(rng.choices(BIKE_WORDS, k=3))
            lines += [f"## {heading} {section}", "", " ".join(sentences), ""]
        (corpus_dir / f"notes-{file_index:05d}.md").write_text("\n".join(lines), encoding="utf-8")
    return {"files": files, "chunks_planned": chunks, "words": words_total, "generate_s": round(time.perf_counter() - started, 2)}


def make_queries(count: int, seed: int = 7) -> list[str]:
    rng = random.Random(seed)
    templates = ["how do I {} my {} {}", "{} {} {} wear", "why does my {} {} {}", "best {} for {} {}", "{} {} {} {} service"]
    queries = []
    for _ in range(count):
        template = rng.choice(templates)
        queries.append(template.format(*rng.choices(BIKE_WORDS, k=template.count("{}"))))
    return queries


def run(workdir: Path, chunks: int, queries: int, tick: Callable[[str], None] | None = None) -> dict[str, Any]:
    from services.retriever.index import Retriever, ingest

    source, index_dir = workdir / "bm25-source", workdir / "bm25-index"
    if tick:
        tick(f"generating {chunks:,} chunks")
    generated = generate_corpus(source, chunks)
    if tick:
        tick("ingesting")
    stats = ingest(source, index_dir)
    if tick:
        tick("loading")
    load_started = time.perf_counter()
    retriever = Retriever.load(index_dir)
    load_s = time.perf_counter() - load_started
    texts = make_queries(queries)
    for text in texts[:10]:  # warm caches (numba/numpy first calls)
        retriever.search(text, top_k=4)
    if tick:
        tick(f"searching {queries} queries")
    latencies, hits = [], 0
    for text in texts:
        started = time.perf_counter()
        passages = retriever.search(text, top_k=4)
        latencies.append(time.perf_counter() - started)
        hits += bool(passages)
    return {
        "corpus": generated,
        "chunks_indexed": stats.chunks,
        "documents": stats.documents,
        "ingest_s": round(stats.seconds, 2),
        "load_s": round(load_s, 2),
        "index_mb": round(sum(p.stat().st_size for p in index_dir.rglob("*") if p.is_file()) / 1e6, 1),
        "queries": len(texts),
        "queries_with_hits": hits,
        "top_k": 4,
        "search": summarize(latencies),
    }
