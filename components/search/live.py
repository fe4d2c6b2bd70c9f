"""The model and indexes a search server answers with, and how a new pair replaces them.

With `zhclip serve --follow models:/<name>@champion` the server asks the registry every
`serve.follow_seconds` which version the alias names. When it moved, the new version and the index
its weights built (found in each index catalog by weights, see `search.index_store`) load in the
background while the old pair keeps answering; the canary captions stored with each index are asked
through the new pair (`search.canary`); then both are swapped in one assignment, so every request is
answered by one whole pair, old or new. `POST /admin/reload` runs the same check at once.

A candidate is refused, and the old pair keeps serving, when its canary recall@10 falls more than
`serve.canary_margin` below what its index recorded at build time (the serving path does not
reproduce the build: broken export, wrong backend) or below the live pair's on the same gallery (a
worse or broken model was promoted). A refused version is not tried again until the alias moves or an
operator forces a reload; a version whose index does not exist yet is tried again at each check.
"""

from __future__ import annotations

import sys
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pandas as pd

from zhclip.components.core.errors import ZhclipError
from zhclip.components.search.canary import canary_recall
from zhclip.components.search.index_store import IndexNotFound, SearchIndex, describe_model, find_index
from zhclip.components.search.observability import ServiceMetrics

Embed = Callable[[Any, pd.DataFrame], np.ndarray]  # (embedder, frame) -> vectors, one model call at a time


@dataclass
class LivePair:
    """One model and the indexes its weights built, with the canary recall measured through them here."""

    identity: dict[str, Any]
    embedder: Any
    indexes: dict[str, SearchIndex]
    canary: dict[str, float | None]
    loaded_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    def describe(self) -> str:
        return describe_model(self.identity)


def load_pair(
    identity: dict[str, Any], index_uris: dict[str, str], tracking_uri: str | None, backend: str, embed: Embed
) -> LivePair:
    """Load the model `identity` names (a registered version by its number, never by an alias that may
    move meanwhile) and its index under each of `index_uris`, and ask each index's canary."""
    from zhclip.components.registry.embed import load_embedder

    indexes = {name: SearchIndex(find_index(uri, identity)) for name, uri in index_uris.items()}
    for index in indexes.values():
        index.check_model(identity)
    pinned = f"models:/{identity['name']}/{identity['version']}" if identity.get("version") else identity["uri"]
    embedder = load_embedder(pinned, tracking_uri, backend)
    embed(embedder, pd.DataFrame({"text": ["预热"]}))  # the first call pays for lazy initialisation, not a user

    def embed_texts(texts: list[str]) -> np.ndarray:
        return embed(embedder, pd.DataFrame({"text": texts}))

    canary = {
        name: canary_recall(embed_texts, index, index.canary.get("captions", [])) for name, index in indexes.items()
    }
    return LivePair(identity, embedder, indexes, canary)


def canary_refusal(candidate: LivePair, live: LivePair | None, margin: float) -> str | None:
    """Why `candidate` must not replace `live`, or None when its canary holds on every index."""
    for name, index in candidate.indexes.items():
        measured, recorded = candidate.canary[name], index.canary.get("recall_at_10")
        if measured is None:
            continue
        if recorded is not None and measured < recorded - margin:
            return (
                f"index {name}: canary recall@10 {measured:.3f} through this server, {recorded:.3f} when the "
                f"index was built (margin {margin}): serving does not reproduce the build"
            )
        live_measured = None if live is None or name not in live.indexes else live.canary.get(name)
        if live is None or live_measured is None:
            continue
        same_gallery = live.indexes[name].meta.get("gallery") == index.meta.get("gallery")
        if same_gallery and measured < live_measured - margin:
            return (
                f"index {name}: canary recall@10 {measured:.3f} for {candidate.describe()}, "
                f"{live_measured:.3f} for the live {live.describe()} (margin {margin})"
            )
    return None


def log(message: str) -> None:
    print(f"zhclip serve: {message}", file=sys.stderr, flush=True)


class LiveModel:
    """Holds the pair answering now and replaces it when the model's URI resolves to other weights."""

    def __init__(
        self,
        model: str,
        index_uris: dict[str, str],
        backend: str,
        margin: float,
        tracking_uri: str | None,
        metrics: ServiceMetrics,
        embed: Embed,
    ):
        self.model, self.index_uris, self.backend, self.margin = model, index_uris, backend, margin
        self.tracking_uri, self.metrics, self.embed = tracking_uri, metrics, embed
        self.pair: LivePair | None = None  # replaced whole, never changed in place: a request reads it once
        self.refused: dict[str, str] = {}  # weights hash -> why its pair was refused
        self.last: dict[str, Any] = {}  # the last check: time, outcome, detail
        self._checking = threading.Lock()
        self._waiting_for: str | None = None

    def check(self, force: bool = False) -> dict[str, Any]:
        """Resolve the model now and swap to it if it changed and its pair passes the canary.

        Outcome: loaded (the first pair), swapped, unchanged, waiting (no index for it yet), refused
        (load failed or canary fell; `force` tries a refused version again) or error (the registry
        did not answer; the live pair keeps serving)."""
        with self._checking:
            outcome, detail = self._check(force)
        self.last = {"time": datetime.now(UTC).isoformat(timespec="seconds"), "outcome": outcome, "detail": detail}
        self.metrics.checks.labels(outcome).inc()
        return dict(self.last)

    def _check(self, force: bool) -> tuple[str, str]:
        from zhclip.components.registry.embed import model_identity

        try:
            identity = model_identity(self.model, self.tracking_uri)
        except ZhclipError as err:
            return "error", str(err)
        weights = identity["weights_hash"]
        if self.pair and self.pair.identity["weights_hash"] == weights:
            return "unchanged", f"serving {self.pair.describe()}"
        if weights in self.refused and not force:
            return "refused", self.refused[weights]
        try:
            candidate = load_pair(identity, self.index_uris, self.tracking_uri, self.backend, self.embed)
        except IndexNotFound as err:
            if self._waiting_for != weights:  # said once per version, not at every check
                log(f"{err}; {'keeping ' + self.pair.describe() if self.pair else 'nothing served'} until it exists")
                self._waiting_for = weights
            return "waiting", str(err)
        except Exception as err:  # any failure to load is a refusal the operator reads, never a dead server
            if not isinstance(err, ZhclipError):
                traceback.print_exc()  # unexpected: the stack is for whoever debugs it
            why = str(err) if isinstance(err, ZhclipError) else f"{type(err).__name__}: {err}"
            return "refused", self._refuse(weights, "load", f"cannot load {describe_model(identity)}: {why}")
        reason = canary_refusal(candidate, self.pair, self.margin)
        self.metrics.canary.labels("candidate").set(_mean_recall(candidate))
        if reason:
            return "refused", self._refuse(weights, "canary", f"refused {candidate.describe()}: {reason}")
        previous, self.pair = self.pair, candidate
        self.metrics.live(candidate.identity, self.backend, self.index_uris)
        self.metrics.canary.labels("live").set(_mean_recall(candidate))
        canary = ", ".join(f"{name} {_shown(recall)}" for name, recall in candidate.canary.items())
        if previous is None:
            log(f"serving {candidate.describe()} (canary recall@10: {canary})")
            return "loaded", f"serving {candidate.describe()}"
        self.metrics.swaps.inc()
        log(f"swapped {previous.describe()} for {candidate.describe()} (canary recall@10: {canary})")
        return "swapped", f"serving {candidate.describe()}, was {previous.describe()}"

    def _refuse(self, weights: str, kind: str, reason: str) -> str:
        self.refused[weights] = reason
        self.metrics.refusals.labels(kind).inc()
        log(f"{reason}; {'keeping ' + self.pair.describe() if self.pair else 'nothing served'}")
        return reason

    def follow(self, every_s: float, stop: threading.Event) -> None:
        """Check every `every_s` seconds until `stop` is set (the server's background thread)."""
        while not stop.wait(every_s):
            self.check()


def _mean_recall(pair: LivePair) -> float:
    measured = [recall for recall in pair.canary.values() if recall is not None]
    return float(np.mean(measured)) if measured else float("nan")


def _shown(recall: float | None) -> str:
    return "no canary" if recall is None else f"{recall:.3f}"
