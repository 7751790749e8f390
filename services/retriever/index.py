"""Lexical retrieval for Baton: turn a folder of Markdown/text into BM25 indexes, and search them.

Plain Python, no NATS: the retriever service wraps this, and `baton ingest` calls `ingest`.

On-disk layout (one bm25s index per corpus, so a route can search only what it should)::

    index_dir/
      manifest.json        # written last; its build_id is the commit point of an ingest
      <corpus>/            # bm25s arrays + chunks.json (passage metadata, same build_id)

Every corpus directory is built beside its final place and renamed in, and the manifest
is replaced atomically, so a running retriever sees the old index or the new one, never
a half-written one. A reader checks that each corpus carries the manifest's build_id
and waits briefly when an ingest is mid-swap.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import bm25s
import numpy as np
from bm25s.stopwords import STOPWORDS_EN

from shared.schema import Passage

try:  # PyStemmer is optional: without it "chains" and "chain" are different words.
    import Stemmer as _pystemmer
except ImportError:  # pragma: no cover - depends on the environment
    _pystemmer = None

log = logging.getLogger(__name__)

INDEX_FORMAT = 1
MANIFEST = "manifest.json"
CHUNKS_FILE = "chunks.json"
DEFAULT_CORPUS = "default"
SOURCE_SUFFIXES = frozenset({".md", ".txt"})

# Chunks this size hold one idea with enough words for BM25 to score it, yet stay small
# enough that several fit in a model's context next to the question.
MIN_WORDS = 40
MAX_WORDS = 180

# A reader that meets a half-swapped index retries for about this long before giving up.
_LOAD_ATTEMPTS = 40
_LOAD_RETRY_S = 0.05

_TOKEN = re.compile(r"(?u)\b\w\w+\b")  # the scikit-learn / bm25s default token pattern
_STOPWORDS = frozenset(STOPWORDS_EN)
_HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.+?)(?:[ \t]+#+)?[ \t]*$")
_FENCE = re.compile(r"^ {0,3}(```|~~~)")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


# --------------------------------------------------------------------------- errors


class RetrieverError(Exception):
    """Base class: anything here that a user can fix by re-running or re-pointing ingest."""


class IngestError(RetrieverError):
    """The source folder cannot be ingested; the message says what to change."""


class IndexMissingError(RetrieverError):
    """No usable index on disk; the message tells the user to run `baton ingest PATH`."""


# --------------------------------------------------------------------------- data


@dataclass
class IngestStats:
    documents: int  # files that produced at least one chunk
    chunks: int
    corpora: dict[str, int]  # corpus name -> chunk count
    seconds: float
    skipped: int = 0  # empty files, or files with no searchable words


@dataclass(frozen=True)
class Chunk:
    text: str
    title: str  # "Doc title — Section heading", or the doc title before any section
    source: str  # path relative to the source folder, forward slashes


@dataclass
class _Section:
    heading: str
    paragraphs: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Piece:
    """A paragraph, or part of one, with its word count; `para` keeps rendering faithful."""

    para: int
    text: str
    words: int


# --------------------------------------------------------------------------- tokenizing


class _Tokenizer:
    """The one tokenizer used for documents and queries: the two must agree exactly."""

    def __init__(self, stemmer: str | None):
        self.stemmer = stemmer
        self._stem = _pystemmer.Stemmer(stemmer).stemWords if stemmer else None

    def __call__(self, text: str) -> list[str]:
        words = [word for word in _TOKEN.findall(text.lower()) if word not in _STOPWORDS]
        return self._stem(words) if self._stem and words else words


def _available_stemmer() -> str | None:
    return "english" if _pystemmer is not None else None


# --------------------------------------------------------------------------- parsing & chunking


def _words(text: str) -> int:
    return len(text.split())


def _strip_front_matter(raw: str) -> str:
    # YAML front matter is metadata for site generators, not prose worth retrieving.
    if raw.startswith("---\n") or raw.startswith("---\r\n"):
        end = re.search(r"^---[ \t]*$", raw[4:], flags=re.MULTILINE)
        if end:
            return raw[4 + end.end() :]
    return raw


def parse_document(raw: str, fallback_title: str) -> tuple[str, list[_Section]]:
    """Split a document into (title, sections of paragraphs).

    The first `# ` heading is the title; every other heading opens a section. Fenced
    code is kept whole so a blank line or `#` comment inside it splits nothing.
    """
    title: str | None = None
    sections = [_Section("")]
    lines: list[str] = []
    in_fence = False

    def end_paragraph() -> None:
        text = "\n".join(lines).strip()
        if text:
            sections[-1].paragraphs.append(text)
        lines.clear()

    for line in _strip_front_matter(raw).splitlines():
        if _FENCE.match(line):
            in_fence = not in_fence
            lines.append(line)
            continue
        heading = None if in_fence else _HEADING.match(line)
        if heading:
            end_paragraph()
            level, text = len(heading.group(1)), heading.group(2).strip()
            if level == 1 and title is None:
                title = text
            else:
                sections.append(_Section(text))
        elif not in_fence and not line.strip():
            end_paragraph()
        else:
            lines.append(line)
    end_paragraph()
    return title or fallback_title, [section for section in sections if section.paragraphs]


def _sentence_pieces(para_id: int, text: str) -> list[_Piece]:
    """Split an oversized paragraph at sentence ends, and a monster sentence at word counts."""
    pieces = []
    for sentence in _SENTENCE_END.split(text):
        words = sentence.split()
        for start in range(0, len(words), MAX_WORDS):
            part = words[start : start + MAX_WORDS]
            text_part = sentence if len(words) <= MAX_WORDS else " ".join(part)
            pieces.append(_Piece(para_id, text_part, len(part)))
    return [piece for piece in pieces if piece.words]


def _cut(piece: _Piece, words: int) -> tuple[_Piece, _Piece]:
    """The first `words` words of a piece, and the rest."""
    parts = piece.text.split()
    head, tail = parts[:words], parts[words:]
    return _Piece(piece.para, " ".join(head), len(head)), _Piece(piece.para, " ".join(tail), len(tail))


def _pack(paragraphs: list[str]) -> list[list[_Piece]]:
    """Greedily fill chunks up to MAX_WORDS, preferring to break between paragraphs.

    A paragraph is only cut into sentences when it cannot fit whole: either it alone is
    too long, or the chunk so far is still too small to stand on its own.
    """
    chunks: list[list[_Piece]] = []
    buffer: list[_Piece] = []
    size = 0

    def flush() -> None:
        nonlocal buffer, size
        if buffer:
            chunks.append(buffer)
        buffer, size = [], 0

    for para_id, text in enumerate(paragraphs):
        words = _words(text)
        if size + words <= MAX_WORDS:
            buffer.append(_Piece(para_id, text, words))
            size += words
            continue
        if size >= MIN_WORDS:
            flush()
            if words <= MAX_WORDS:
                buffer, size = [_Piece(para_id, text, words)], words
                continue
        for piece in _sentence_pieces(para_id, text):
            if size + piece.words > MAX_WORDS and size < MIN_WORDS:
                # Only a very long sentence gets here; cutting it beats leaving a scrap.
                head, piece = _cut(piece, MAX_WORDS - size)
                buffer.append(head)
                size += head.words
            if size + piece.words > MAX_WORDS:
                flush()
            buffer.append(piece)
            size += piece.words
    flush()
    _rebalance_tail(chunks)
    return chunks


def _rebalance_tail(chunks: list[list[_Piece]]) -> None:
    """Keep a section from ending in a scrap: merge it back, or split the last two evenly."""
    if len(chunks) < 2 or sum(p.words for p in chunks[-1]) >= MIN_WORDS:
        return
    merged = chunks[-2] + chunks[-1]
    total = sum(p.words for p in merged)
    if total <= MAX_WORDS:
        chunks[-2:] = [merged]
        return
    pieces = [s for p in merged for s in _sentence_pieces(p.para, p.text)]
    best, running, best_gap = 1, 0, float(total)
    for index, piece in enumerate(pieces[:-1], start=1):
        running += piece.words
        gap = abs(total / 2 - running)
        if gap < best_gap:
            best, best_gap = index, gap
    chunks[-2:] = [pieces[:best], pieces[best:]]


def _render(pieces: list[_Piece]) -> str:
    # Pieces of the same paragraph rejoin with a space; paragraphs keep their blank line.
    parts: list[str] = []
    previous = None
    for piece in pieces:
        if parts and piece.para == previous:
            parts[-1] = f"{parts[-1]} {piece.text}"
        else:
            parts.append(piece.text)
        previous = piece.para
    return "\n\n".join(parts)


def chunk_document(raw: str, source: str, fallback_title: str) -> list[Chunk]:
    """Chunks of roughly MIN_WORDS-MAX_WORDS words that never cross a section boundary."""
    doc_title, sections = parse_document(raw, fallback_title)
    chunks = []
    for section in sections:
        title = f"{doc_title} — {section.heading}" if section.heading else doc_title
        for pieces in _pack(section.paragraphs):
            chunks.append(Chunk(text=_render(pieces), title=title, source=source))
    return chunks


# --------------------------------------------------------------------------- ingest


def _discover(source_dir: Path) -> list[Path]:
    """Source files in a stable order; hidden folders (.git, editor state) are not documents."""
    found = []
    for path in source_dir.rglob("*"):
        relative = path.relative_to(source_dir)
        if path.suffix.lower() not in SOURCE_SUFFIXES or not path.is_file():
            continue
        if any(part.startswith(".") for part in relative.parts):
            continue
        found.append(path)
    return sorted(found, key=lambda p: p.relative_to(source_dir).as_posix())


def _corpus_of(relative: Path) -> str:
    return relative.parts[0] if len(relative.parts) > 1 else DEFAULT_CORPUS


def _check_source(source_dir: Path) -> list[Path]:
    if not source_dir.is_dir():
        what = "is not a directory" if source_dir.exists() else "does not exist"
        raise IngestError(
            f"source folder {source_dir} {what}; run `baton ingest PATH` with the folder "
            "that holds your .md/.txt documents"
        )
    files = _discover(source_dir)
    if not files:
        raise IngestError(
            f"no .md or .txt files found under {source_dir}; add documents there (one subfolder "
            "per corpus, e.g. handbook/guide.md) or point `baton ingest` at another folder"
        )
    return files


def _build_corpus(target: Path, corpus: str, chunks: list[Chunk], tokens: list[list[str]], build_id: str) -> None:
    target.mkdir(parents=True)
    bm25 = bm25s.BM25()
    bm25.index(tokens, show_progress=False)
    bm25.save(str(target), show_progress=False)
    meta = {
        "format": INDEX_FORMAT,
        "build_id": build_id,
        "corpus": corpus,
        "chunks": [{"text": c.text, "title": c.title, "source": c.source} for c in chunks],
    }
    (target / CHUNKS_FILE).write_text(json.dumps(meta, ensure_ascii=False), encoding="utf-8")


def _swap_in(built: Path, target: Path, build_id: str) -> Path | None:
    """Put `built` at `target`; returns the displaced old directory for later removal.

    Two renames, not one: a directory cannot replace a non-empty one. A reader arriving
    between them finds the corpus missing and retries (see `_load_state`).
    """
    old = None
    if target.exists():
        old = target.with_name(f".old-{target.name}-{build_id}")
        os.rename(target, old)
    os.rename(built, target)
    return old


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, ensure_ascii=False)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def _remove_stale_corpora(index_dir: Path, keep: Iterable[str]) -> None:
    # Only directories that hold our chunks file are ours to delete; index_dir might be
    # misconfigured to point somewhere with other content.
    keep = set(keep)
    for entry in index_dir.iterdir():
        if entry.is_dir() and not entry.name.startswith(".") and entry.name not in keep:
            if (entry / CHUNKS_FILE).is_file():
                shutil.rmtree(entry, ignore_errors=True)


def ingest(
    source_dir: Path,
    index_dir: Path,
    progress: Callable[[int, int], None] | None = None,
) -> IngestStats:
    """Chunk every .md/.txt file under `source_dir` and (re)build one BM25 index per corpus.

    A file's corpus is its first-level subfolder ("default" for files at the top).
    `progress(done_files, total_files)` is called after each file.
    """
    started = time.perf_counter()
    source_dir, index_dir = Path(source_dir), Path(index_dir)
    files = _check_source(source_dir)
    tokenizer = _Tokenizer(_available_stemmer())

    by_corpus: dict[str, tuple[list[Chunk], list[list[str]]]] = {}
    documents = skipped = 0
    for done, path in enumerate(files, start=1):
        relative = path.relative_to(source_dir)
        raw = path.read_text(encoding="utf-8-sig", errors="replace")
        kept = 0
        for chunk in chunk_document(raw, relative.as_posix(), path.stem):
            # The title is indexed with the text so "chain replacement" matches a section
            # named that even when its paragraphs only say "replace".
            tokens = tokenizer(f"{chunk.title}\n{chunk.text}")
            if tokens:  # a chunk with no searchable word can never be found
                chunks, token_lists = by_corpus.setdefault(_corpus_of(relative), ([], []))
                chunks.append(chunk)
                token_lists.append(tokens)
                kept += 1
        documents += kept > 0
        skipped += kept == 0
        if progress is not None:
            progress(done, len(files))

    if not by_corpus:
        raise IngestError(
            f"all {len(files)} .md/.txt files under {source_dir} are empty or hold no searchable "
            "words; add some text and run `baton ingest PATH` again"
        )

    counts = _publish(index_dir, by_corpus, tokenizer.stemmer, documents, source_dir)
    return IngestStats(
        documents=documents,
        chunks=sum(counts.values()),
        corpora=counts,
        seconds=time.perf_counter() - started,
        skipped=skipped,
    )


def _publish(
    index_dir: Path,
    by_corpus: dict[str, tuple[list[Chunk], list[list[str]]]],
    stemmer: str | None,
    documents: int,
    source_dir: Path,
) -> dict[str, int]:
    """Build every corpus off to the side, then swap them in and commit the manifest.

    The slow part (building) happens before any swap, so the window in which a reader
    could see corpora of two different builds is a few renames long.
    """
    index_dir.mkdir(parents=True, exist_ok=True)
    build_id = uuid.uuid4().hex
    built: dict[str, Path] = {}
    displaced: list[Path] = []
    try:
        for corpus in sorted(by_corpus):
            chunks, tokens = by_corpus[corpus]
            built[corpus] = index_dir / f".tmp-{corpus}-{build_id}"
            _build_corpus(built[corpus], corpus, chunks, tokens, build_id)
        for corpus, path in built.items():
            old = _swap_in(path, index_dir / corpus, build_id)
            if old is not None:
                displaced.append(old)
        counts = {corpus: len(by_corpus[corpus][0]) for corpus in sorted(by_corpus)}
        manifest = {
            "format": INDEX_FORMAT,
            "build_id": build_id,
            "built_at": datetime.now(timezone.utc).isoformat(),
            "source_dir": str(source_dir.resolve()),
            "tokenizer": {"stopwords": "en", "stemmer": stemmer},
            "documents": documents,
            "chunks": sum(counts.values()),
            "corpora": counts,
        }
        _write_json_atomic(index_dir / MANIFEST, manifest)
    finally:
        for path in [*built.values(), *displaced]:
            if path.exists() and path.name.startswith("."):
                shutil.rmtree(path, ignore_errors=True)
    _remove_stale_corpora(index_dir, counts)
    return counts


# --------------------------------------------------------------------------- search


@dataclass(frozen=True)
class _CorpusIndex:
    name: str
    bm25: bm25s.BM25
    vocab: dict[str, int]
    chunks: list[dict[str, str]]


# Distinct searches whose hits a loaded build remembers. BM25 over one build gives the same
# hits for the same query every time, and questions repeat (FAQs, a client's retry): a
# repeated search skips tokenizing, stemming and scoring, and builds only its Passages.
_REMEMBERED_SEARCHES = 1024

Hit = tuple[float, str, int]  # (score, corpus, chunk position)
SearchKey = tuple[str, int, tuple[str, ...]]  # (query, top_k, corpora searched)


@dataclass(frozen=True)
class _State:
    """One immutable loaded build; a reload swaps the whole object so searches never mix builds."""

    build_id: str
    built_at: str
    stat: tuple[int, int, int]
    tokenizer: _Tokenizer
    corpora: dict[str, _CorpusIndex]


def _stat_key(path: Path | str) -> tuple[int, int, int]:
    # The inode changes on every os.replace, which catches rebuilds inside one mtime tick.
    info = os.stat(path)
    return (info.st_mtime_ns, info.st_ino, info.st_size)


def _read_manifest(index_dir: Path) -> dict[str, Any]:
    path = index_dir / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise IndexMissingError(
            f"no search index at {index_dir} (missing {MANIFEST}); run `baton ingest PATH` "
            "with the folder of your documents first"
        ) from None
    except (OSError, ValueError) as exc:
        raise IndexMissingError(f"cannot read {path} ({exc}); run `baton ingest PATH` to rebuild the index") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != INDEX_FORMAT:
        raise IndexMissingError(
            f"{path} was written by an incompatible version of Baton; run `baton ingest PATH` to rebuild it"
        )
    return manifest


def _tokenizer_for(manifest: dict[str, Any], index_dir: Path) -> _Tokenizer:
    # Queries must be stemmed exactly as the index was, whatever this machine has installed.
    stemmer = manifest.get("tokenizer", {}).get("stemmer")
    if stemmer and _pystemmer is None:
        raise IndexMissingError(
            f"the index at {index_dir} was built with the {stemmer} stemmer but PyStemmer is not "
            "installed here; install PyStemmer or re-run `baton ingest PATH` on this machine"
        )
    return _Tokenizer(stemmer)


def _load_corpus(directory: Path, build_id: str) -> _CorpusIndex | None:
    """The corpus at `directory`, or None when it is missing or from another build."""
    try:
        meta = json.loads((directory / CHUNKS_FILE).read_text(encoding="utf-8"))
        if meta.get("build_id") != build_id:
            return None
        bm25 = bm25s.BM25.load(str(directory), show_progress=False)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return _CorpusIndex(directory.name, bm25, bm25.vocab_dict, meta["chunks"])


def _load_state(index_dir: Path) -> _State:
    for _attempt in range(_LOAD_ATTEMPTS):
        try:  # stat before reading, so a manifest replaced meanwhile looks changed next time
            stat = _stat_key(index_dir / MANIFEST)
        except OSError:
            stat = (0, 0, 0)  # _read_manifest reports the missing file properly
        manifest = _read_manifest(index_dir)
        tokenizer = _tokenizer_for(manifest, index_dir)
        loaded = {name: _load_corpus(index_dir / name, manifest["build_id"]) for name in manifest["corpora"]}
        if all(corpus is not None for corpus in loaded.values()):
            return _State(
                build_id=manifest["build_id"],
                built_at=manifest.get("built_at", ""),
                stat=stat,
                tokenizer=tokenizer,
                corpora=dict(loaded),
            )
        time.sleep(_LOAD_RETRY_S)  # an ingest is between its renames and its manifest
    raise IndexMissingError(
        f"the index at {index_dir} is incomplete (its corpora do not match {MANIFEST}); an ingest may "
        "have been interrupted: run `baton ingest PATH` again"
    )


class Retriever:
    """BM25 search over the corpora of one index directory, held in memory.

    Safe to search from several threads while another calls `reload_if_changed`: each
    search reads one immutable snapshot.
    """

    def __init__(self, index_dir: Path, state: _State):
        self.index_dir = index_dir
        self._state = state
        self._manifest = str(index_dir / MANIFEST)  # stat-ed on every search: build the path once

    @classmethod
    def load(cls, index_dir: Path) -> Retriever:
        index_dir = Path(index_dir)
        return cls(index_dir, _load_state(index_dir))

    @property
    def corpora(self) -> list[str]:
        return sorted(self._state.corpora)

    @property
    def built_at(self) -> str:
        return self._state.built_at

    def search(self, query: str, top_k: int = 4, corpora: list[str] | None = None) -> list[Passage]:
        """The best `top_k` passages with a positive score, best first.

        `corpora` None (or empty) searches every corpus. Scores of different corpora are
        merged as they are: BM25 scores are only roughly comparable across indexes.
        """
        if top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k}")
        # No memo of recent searches: it saved 0.04 ms per repeated question and made a
        # benchmark that cycles ten questions measure a lookup instead of a search.
        state = self._state
        hits = self._search(state, query, top_k, corpora)
        return [_passage(state.corpora[name], position, score) for score, name, position in hits]

    def _search(self, state: _State, query: str, top_k: int, corpora: list[str] | None) -> list[Hit]:
        chosen = self._choose(state, corpora)
        tokens = state.tokenizer(query)
        if not tokens:
            return []
        hits: list[Hit] = []
        for index in chosen:
            hits.extend(_top_hits(index, tokens, top_k))
        hits.sort(key=lambda hit: (-hit[0], hit[1], hit[2]))
        return hits[:top_k]

    def reload_if_changed(self) -> bool:
        """Load a newer build if the manifest changed; True when it did.

        Cheap when nothing changed (one stat). A failed reload keeps serving the old
        index: a broken rebuild should not take search down.
        """
        try:
            stat = _stat_key(self._manifest)
        except OSError:
            return False
        current = self._state
        if stat == current.stat:
            return False
        try:
            manifest = _read_manifest(self.index_dir)
            if (manifest["build_id"], manifest.get("built_at", "")) == (current.build_id, current.built_at):
                self._state = _State(current.build_id, current.built_at, stat, current.tokenizer, current.corpora)
                return False
            self._state = _load_state(self.index_dir)
        except (RetrieverError, OSError, ValueError, KeyError) as exc:
            log.warning("keeping the loaded index; reloading %s failed: %s", self.index_dir, exc)
            return False
        return True

    @staticmethod
    def _choose(state: _State, corpora: list[str] | None) -> list[_CorpusIndex]:
        if not corpora:
            return [state.corpora[name] for name in sorted(state.corpora)]
        unknown = sorted(set(corpora) - set(state.corpora))
        if unknown:
            raise ValueError(f"unknown corpus {', '.join(map(repr, unknown))}; known corpora: {sorted(state.corpora)}")
        return [state.corpora[name] for name in sorted(set(corpora))]


def _top_hits(index: _CorpusIndex, tokens: list[str], top_k: int) -> list[tuple[float, str, int]]:
    ids = [index.vocab[token] for token in tokens if token in index.vocab]
    if not ids:
        return []
    scores = index.bm25.get_scores_from_ids(ids)
    k = min(top_k, len(scores))
    best = np.argpartition(-scores, k - 1)[:k]
    return [(float(scores[i]), index.name, int(i)) for i in best if scores[i] > 0]


def _passage(index: _CorpusIndex, position: int, score: float) -> Passage:
    chunk = index.chunks[position]
    return Passage(text=chunk["text"], score=score, source=chunk["source"], title=chunk["title"], corpus=index.name)
