"""The retriever: BM25 indexes built from a folder of documents, searched per corpus."""

from services.retriever.index import (
    Chunk,
    IndexMissingError,
    IngestError,
    IngestStats,
    Retriever,
    RetrieverError,
    chunk_document,
    ingest,
)

__all__ = [
    "Chunk",
    "IndexMissingError",
    "IngestError",
    "IngestStats",
    "Retriever",
    "RetrieverError",
    "chunk_document",
    "ingest",
]
