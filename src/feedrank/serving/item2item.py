"""The ``item2item`` candidate source: a user's recent engagements -> their items' co-engaged neighbours.

An item-to-item bundle (``feedrank train retrieval`` with ``retrieval.kind: ease`` or ``covisit``)
may have been trained on another feature build than the two-tower bundle being served, so its item
indices are not assumed to be the two-tower's: both are mapped once, at startup, through the item
ids (an item the other vocabulary lacks is simply never proposed, nor used as a seed).

A request reads only the neighbour lists of the history's items (``Item2Item.recommend``), so the
cost is O(history x neighbours per item) whatever the catalogue size.

A **blend** bundle (``retrieval.kind: blend``, ``feedrank.models.blend``) serves as its parts:
``serving_parts`` splits it into its two-tower (the ANN source's model) and its item-to-item part
(this source), so ``feedrank serve --bundle RUN/bundle`` of a two-tower + EASE blend serves sources
``ann`` and ``item2item`` side by side. The blend's weights are not applied at serving: they mix
two full-catalogue rankings offline, while serving unions each source's candidates and the ranker
orders the union (``feedrank.serving.pipeline``); the weights say how much each part contributes
to retrieval quality, the union keeps every part's candidates for the ranker to weigh.

Example::

    source = Item2ItemSource(load_bundle("runs/ease/bundle"), two_tower_bundle)
    rows = source.candidates(view.history, 200)   # two-tower catalogue rows, best first
    tower, item2item = serving_parts(load_bundle("runs/blend/bundle"))
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa

from feedrank.bundle import Bundle
from feedrank.features.vocab import FIRST_ID, lookup_quiet


class Item2ItemSource:
    """Candidates from an ``item2item`` bundle, in the two-tower bundle's item indices."""

    def __init__(self, item2item: Bundle, two_tower: Bundle) -> None:
        if item2item.kind != "item2item":
            raise ValueError(f"{item2item.path}: expected an item2item bundle, got kind {item2item.kind!r}")
        self.bundle = item2item
        self.model = item2item.model.item2item
        ids = two_tower.vocabs.items.ids
        own = lookup_quiet(item2item.vocabs.items, pa.array(ids, pa.string()))
        known = (own >= FIRST_ID) & (own < FIRST_ID + len(item2item.vocabs.items.ids))
        self.to_own = np.full(two_tower.vocabs.n_items, -1, np.int64)  # two-tower index -> own (-1: unknown)
        self.to_own[FIRST_ID : FIRST_ID + len(ids)] = np.where(known, own, -1)
        self.from_own = np.full(item2item.vocabs.n_items, -1, np.int64)  # own index -> two-tower (-1: unknown)
        self.from_own[own[known]] = np.flatnonzero(known) + FIRST_ID

    def candidates(self, history: np.ndarray, n: int) -> np.ndarray:
        """Up to ``n`` two-tower item rows, best first, from ``history`` (two-tower item indices)."""
        if n < 1 or len(history) == 0:
            return np.zeros(0, np.int64)
        history = np.asarray(history, np.int64)
        seeds = self.to_own[history[history < len(self.to_own)]]  # items published since start have no neighbours
        items, _ = self.model.recommend(seeds[seeds >= 0], n)
        rows = self.from_own[items]
        return rows[rows >= 0]


def serving_parts(bundle: Bundle) -> tuple[Bundle, Bundle | None]:
    """(the two-tower bundle to serve, the item2item bundle beside it or None) of a served bundle:
    a two-tower bundle is itself with no item-to-item part; a blend is split into its parts, views
    of the one blend bundle (same path, version and catalogue) with the part's model and kind."""
    if bundle.kind != "blend":
        return bundle, None
    parts = dict(bundle.model.parts.items())
    if "two_tower" not in parts:
        raise ValueError(f"{bundle.path}: a blend of {list(parts)} has no two_tower part to serve the ANN source from")
    view = lambda kind, model: dataclasses.replace(bundle, kind=kind, model=model)  # noqa: E731
    item2item = next((view("item2item", m) for name, m in parts.items() if name != "two_tower"), None)
    return view("two_tower", parts["two_tower"]), item2item
