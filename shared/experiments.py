"""Stable assignment for experiments: the same unit lands in the same arm on every replica."""

import hashlib


def stable_fraction(text: str) -> float:
    """A number in [0, 1) that depends only on `text`."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2**64
