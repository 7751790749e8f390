"""What a model answered, local or remote: shared by the generator and the fallback's degraded answer."""

from __future__ import annotations

from dataclasses import dataclass, field

from shared.schema import Usage

__all__ = ["Generation", "estimate_tokens"]


@dataclass
class Generation:
    """One finished answer of a model, local or remote."""

    text: str
    model: str
    provider: str
    usage: Usage
    citations: list[int] = field(default_factory=list)  # 1-based passage numbers cited in `text`
    finish_reason: str = "stop"
    grounded: bool = True  # False when the answer is not backed by any passage
    response_id: str | None = None  # the provider's id of this answer
    response_model: str = ""  # the model the provider says answered; `model` may become the catalog alias

    def __post_init__(self) -> None:
        self.response_model = self.response_model or self.model


def estimate_tokens(text: str) -> int:
    """About one token per four characters: good enough for budgets when a provider gives no usage."""
    if not text:
        return 0
    return max(1, round(len(text) / 4))
