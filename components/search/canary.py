"""Canary: a few of the gallery's own captions, stored with the index, that a new model must still find.

`zhclip index` picks up to `index.canary_size` distinct captions of the indexed images and records,
in index.json, how often the model that built the index finds an image with that caption among its
first 10 results (recall@10). Before `zhclip serve` swaps to a new model and index, it asks the same
captions again through its own serving path: a broken export, a wrong backend, an index that does not
belong to the model or a model much worse than the live one shows there, before any user sees it.

A caption "finds" an image when one of the top 10 carries exactly that caption: the demo's captions
describe classes ("手写数字七"), so many images are right answers, as in `zhclip evaluate`.
"""

from __future__ import annotations

import hashlib
import heapq
from collections.abc import Callable, Iterable
from typing import Protocol

import numpy as np

CANARY_K = 10


class CaptionSampler:
    """Up to `size` distinct non-empty captions of a stream, the same ones for the same gallery, in
    memory bounded by `size` (a heap of the smallest hashes), not by the gallery.

    Chosen by a hash of the text rather than at random, so a re-index of the same gallery picks the
    same canary and the choice spreads over the gallery whatever its order."""

    def __init__(self, size: int):
        self.size, self.heap, self.kept = size, [], set()  # heap of (-hash, caption): the largest on top

    def add(self, captions: Iterable[str]) -> None:
        for caption in captions:
            if not caption or not caption.strip() or caption in self.kept:
                continue
            key = hashlib.blake2b(caption.encode("utf-8"), digest_size=8).digest()
            if len(self.heap) < self.size:
                heapq.heappush(self.heap, (_negated(key), caption))
                self.kept.add(caption)
            elif self.heap and _negated(key) > self.heap[0][0]:
                self.kept.discard(heapq.heapreplace(self.heap, (_negated(key), caption))[1])
                self.kept.add(caption)

    def captions(self) -> list[str]:
        return [caption for _, caption in sorted(self.heap, reverse=True)]


def _negated(key: bytes) -> int:
    return -int.from_bytes(key, "big")


class Searchable(Protocol):
    def search(self, vectors: np.ndarray, k: int) -> list[list[tuple[int, float]]]: ...

    def captions(self, rows: list[int]) -> dict[int, str]: ...


def canary_recall(
    embed_texts: Callable[[list[str]], np.ndarray], index: Searchable, captions: list[str]
) -> float | None:
    """The share of `captions` with an image of exactly that caption in `index`'s top 10, searched
    with the vectors `embed_texts` gives; None when there is no caption to ask (a gallery of bare images)."""
    if not captions:
        return None
    hits = index.search(embed_texts(captions), CANARY_K)
    found_captions = index.captions(sorted({row for ranked in hits for row, _ in ranked}))
    found = sum(any(found_captions[row] == caption for row, _ in ranked) for caption, ranked in zip(captions, hits))
    return found / len(captions)
