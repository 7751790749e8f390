"""The generator service's model layer: the embedded local generator and remote providers."""

from shared.local_model import LOCAL_MODEL, NOT_FOUND, LocalExtractive
from services.generator.providers import (
    DEFAULT_OPENAI_BASE_URL,
    Generation,
    OpenAICompatible,
    ProviderError,
    build_messages,
    citations_in,
    estimate_tokens,
    parse_retry_after,
)

__all__ = [
    "DEFAULT_OPENAI_BASE_URL",
    "LOCAL_MODEL",
    "NOT_FOUND",
    "Generation",
    "LocalExtractive",
    "OpenAICompatible",
    "ProviderError",
    "build_messages",
    "citations_in",
    "estimate_tokens",
    "parse_retry_after",
]
