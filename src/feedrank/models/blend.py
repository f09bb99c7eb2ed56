"""A blend of retrieval models: per-user normalised scores of each part, mixed with fixed weights.

Two retrieval models that are each good (a two-tower and EASE on MovieLens) make different errors:
the two-tower reads side features and a learned user vector, EASE the co-engagement structure of
the user's history. Their raw scores live on unrelated scales (a dot product at temperature 0.2 vs
a sum of item-item weights), so each part's scores are first standardised per user over the
catalogue (``normalise: zscore``, mean 0 and variance 1 across the ranked items) or turned into
per-user ranks scaled to [0, 1] (``normalise: rank``), then mixed::

    score(u, i) = sum_k weights[k] * normalised_k(u, i)

``BlendConfig`` is the run config's ``blend`` section: which retrieval kinds are the parts, and
either fixed ``weights`` or a grid (every weight vector on the simplex with step ``grid_step``) from
which the training path (``feedrank.train.retrieval``) picks the best on a validation holdout.
``BlendModel`` holds the fitted parts as submodules, so one bundle (kind ``blend``) saves them all.
How a part is scored against the catalogue (item vectors for the two-tower, the history for an
item-to-item model) is the evaluation's business (``feedrank.evaluate.retrieval.catalogue_scorer``);
this module only knows how scores are normalised and mixed.

Example::

    cfg = BlendConfig(parts=["two_tower", "ease"], weights=[0.6, 0.4])
    mixed = blend_scores([tower_scores, ease_scores], torch.tensor(cfg.weights), "zscore")
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

PART_KINDS = ("two_tower", "ease", "covisit")
Normalise = Literal["zscore", "rank"]


@dataclass
class BlendConfig:
    """The run config's ``blend`` section (used when ``retrieval.kind`` is ``blend``).

    ``parts`` are retrieval kinds, each trained with the run config's own section for it
    (``two_tower``, ``item2item``); a kind appears once. ``weights`` fixes the mix (one weight per
    part, summing to 1); when null, the training path chooses it on a validation holdout from
    ``grid()`` by ``select_by`` (a metric name of ``feedrank.evaluate.metrics``, ``mrr@10``:
    RecBole's default valid metric).
    """

    parts: list[str] = field(default_factory=lambda: ["two_tower", "ease"])
    weights: list[float] | None = None
    grid_step: float = 0.1
    normalise: Normalise = "zscore"
    select_by: str = "mrr@10"

    def validate(self) -> None:
        if len(self.parts) < 2:
            raise ValueError(f"a blend needs at least 2 parts, got {self.parts}")
        unknown = [p for p in self.parts if p not in PART_KINDS]
        if unknown:
            raise ValueError(f"unknown part kind(s) {unknown}; known: {list(PART_KINDS)}")
        if len(set(self.parts)) != len(self.parts):
            raise ValueError(f"each part kind may appear once, got {self.parts}")
        if self.weights is not None:
            if len(self.weights) != len(self.parts) or min(self.weights) < 0 or abs(sum(self.weights) - 1) > 1e-6:
                raise ValueError(f"weights must be {len(self.parts)} non-negative numbers summing to 1, got {self.weights}")
        steps = round(1 / self.grid_step) if self.grid_step > 0 else 0
        if steps < 1 or abs(steps * self.grid_step - 1) > 1e-9:
            raise ValueError(f"grid_step must divide 1 (0.1, 0.05, 0.25, ...), got {self.grid_step}")
        if self.normalise not in ("zscore", "rank"):
            raise ValueError(f"normalise must be 'zscore' or 'rank', got {self.normalise!r}")
        name, _, k = self.select_by.partition("@")
        if name not in ("recall", "ndcg", "mrr", "hit", "precision") or not k.isdigit() or int(k) < 1:
            raise ValueError(f"select_by must look like 'mrr@10' (recall, ndcg, mrr, hit, precision), got {self.select_by!r}")

    def grid(self) -> list[list[float]]:
        """Every weight vector of the parts with entries on multiples of ``grid_step`` summing to 1,
        in lexicographic order of the first part's weight descending (so ties keep the first part,
        the two-tower in the default, heaviest)."""
        steps = round(1 / self.grid_step)
        points = [c for c in itertools.product(range(steps, -1, -1), repeat=len(self.parts)) if sum(c) == steps]
        return [[round(c / steps, 10) for c in point] for point in points]


def normalised(scores: Tensor, how: Normalise) -> Tensor:
    """Per-row (per-user) normalisation of ``[B, n]`` finite scores: z-scores, or ranks in [0, 1]
    (1 = the user's best item; ties share their average rank)."""
    scores = scores.double()
    if how == "zscore":
        mean = scores.mean(dim=1, keepdim=True)
        std = scores.std(dim=1, keepdim=True, unbiased=False)
        return (scores - mean) / std.clamp_min(1e-12)
    n = scores.shape[1]
    ascending = torch.sort(scores, dim=1).values
    below = torch.searchsorted(ascending, scores.contiguous(), right=False)
    upto = torch.searchsorted(ascending, scores.contiguous(), right=True)
    return (below + upto - 1).double() / (2 * max(n - 1, 1))


def blend_scores(parts: list[Tensor], weights: Tensor, how: Normalise) -> Tensor:
    """``sum_k weights[k] * normalised(parts[k])``: the blend's ``[B, n]`` scores (float64)."""
    if len(parts) != len(weights):
        raise ValueError(f"{len(parts)} score matrices but {len(weights)} weights")
    return sum(float(w) * normalised(p, how) for w, p in zip(weights, parts))


class BlendModel(nn.Module):
    """The fitted parts of a blend (submodules, in ``BlendConfig.parts`` order) with their weights
    and the history length each part scores from (buffers, so the bundle saves them)."""

    def __init__(self, parts: dict[str, nn.Module], history_lens: list[int], normalise: Normalise,
                 weights: list[float] | None = None) -> None:  # fmt: skip
        super().__init__()
        if len(history_lens) != len(parts):
            raise ValueError(f"{len(parts)} parts but {len(history_lens)} history lengths")
        self.parts = nn.ModuleDict(parts)
        self.normalise: Normalise = normalise
        w = weights if weights is not None else [1.0 / len(parts)] * len(parts)
        self.register_buffer("weights", torch.tensor(w, dtype=torch.float64))
        self.register_buffer("history_lens", torch.tensor(history_lens, dtype=torch.int64))

    @property
    def names(self) -> list[str]:
        return list(self.parts.keys())

    def mix(self, part_scores: list[Tensor], weights: Tensor | None = None) -> Tensor:
        """The blend of each part's ``[B, n]`` scores, with the model's weights or ``weights``."""
        return blend_scores(part_scores, self.weights if weights is None else weights, self.normalise)
