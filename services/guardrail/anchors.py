"""Run a regex only where one of its anchors occurs: the guard's rule tables share this."""

from __future__ import annotations

from collections.abc import Iterable, Sequence


class AnchorIndex:
    """Which of many items (rules, cues) may match a text: those with an anchor in it.

    Most prompts hold none of an item's anchors, and many items share anchors, so each
    distinct anchor is looked up once per text; an anchor is a str sought in the folded
    text or bytes sought in its squashed form. Positions come back in table order."""

    def __init__(self, anchors_per_item: Sequence[Iterable[str | bytes]]) -> None:
        wakes: dict[str | bytes, list[int]] = {}
        for position, anchors in enumerate(anchors_per_item):
            for anchor in anchors:
                wakes.setdefault(anchor, []).append(position)
        self._words = tuple(anchor for anchor in wakes if isinstance(anchor, str))
        self._squashed = tuple(anchor for anchor in wakes if isinstance(anchor, bytes))
        self._wakes = {anchor: tuple(positions) for anchor, positions in wakes.items()}

    def woken(self, folded: str, squashed: bytes = b"") -> list[int]:
        wakes = self._wakes
        positions = {position for anchor in self._words if anchor in folded for position in wakes[anchor]}
        if squashed:
            positions.update(position for anchor in self._squashed if anchor in squashed for position in wakes[anchor])
        return sorted(positions)
