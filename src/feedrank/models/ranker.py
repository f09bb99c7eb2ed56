"""The multi-task ranker: scores a few hundred retrieved candidates for one request.

Architecture (one pass, shared bottom)::

    user fields: id, each user categorical, pooled history, history title bag, history categorical
                 bags, user counters, two-tower user vector
    item fields: id, each item categorical, freshness, title words, item counters, user x item
                 categorical counters, two-tower item vector
    match field: the history/candidate cosines -> dense MLP
        -> fields [B, F, dim] -> interaction (DCN-v2 cross network | DLRM dot products)
        -> shared MLP (Linear -> LayerNorm -> GELU) -> one small head per task:
           click logit, E[log1p(dwell_s) | click], share logit, hide logit
    position -> position tower (a learned bias per slot) -> added to the click logit in training only

Every feature is one *field* embedding of the same width ``dim`` so that both interaction types
(``feedrank.models.interactions``) apply. IDs and categoricals are embedding lookups (0 = padding,
1 = OOV, as everywhere); the history is pooled by a history encoder from
``feedrank.models.towers.build_history_encoder`` over the item ID table (shared with the candidate
item, as in the two-tower); freshness (``log1p(age_h)``) and the log1p-scaled point-in-time counters
go through small dense MLPs. The title (``cfg.title_tokens``) is one more field, the mean of its
word embeddings (``feedrank.models.towers.TitleBag``, the two-tower's mechanism), with its user-side
twin: the mean title bag of the history's items, by the same bag (titles by item index:
``attach_titles``), and a *match* field made from the two: their cosine through a small dense MLP.
The explicit match matters: on the synthetic world (``benchmarks/content_tower.py``) the cosine
alone ranks new items' clicks at AUC 0.57, and a ranker given only the two bags scored new items no
better than the ID-only one (0.55); with the match field, 0.59. ``cfg.history_match`` extends the
same idea to the categoricals: per item categorical column (publisher, type, category) one more user
field, the mean embedding of the history items' values (looked up in the candidate's own table, by
item index: ``attach_item_cats``), and the match field then reads every history/candidate cosine:
title bags, pooled history vs candidate ID, and each column's history bag vs the candidate's value.
What a user clicks is a mix of topics and a new article is known by its category and words, so
"how much of this user's reading shares this candidate's category / publisher / words" is the
user-topic x item-topic interaction the click depends on, handed to the network instead of left
for the cross layers to find (on the demo world: AUC on new items 0.621 -> 0.636,
docs/evaluation.md). And ``cfg.item_id_dropout`` trains the item side for items whose ID is
unknown (``drop_ids``): a new article is then scored from its publisher, category, age and words.
Unlike retrieval, the ranker sees the candidate when it scores, so item counters (impressions,
clicks, CTR) are fair features here, and so are the user's own counts on the candidate's category
(publisher, ...): ``cross_counters`` (the feature build's ``features.cross_counters``) adds one
more item-side field from them, the user's impressions and clicks on items with the candidate's
value of each column, over the whole log (``feedrank.features.counters.CrossCounters``).

**Two-tower vectors** (``cfg.two_tower_dim > 0``) are optional inputs: a field is
``Linear(vec) + missing * e_missing`` where an absent vector is zeros and ``e_missing`` a learned
embedding, so "no vector" is a defined input, not a NaN. During training a share
``two_tower_dropout`` of rows is marked missing on purpose, so ``e_missing`` is trained for the
serving cases without a vector (cold user, cache miss).

**Position bias** (YouTube 2019 "shallow tower", PAL): the training click logit is
``click + position_bias[min(position, max_positions - 1)]``. Position 0 (the top slot) is the
reference: its bias is fixed at 0, so the served click logit (``RankerOutput.click``, no position
term) is the model's click logit *as if shown in the top slot*, and it cannot depend on where the
logging policy happened to show the item. The position only explains away the examination bias in
the log; serving never reads it.

**Value formula** (``cfg.value``, all four weights required in YAML), per candidate::

    value = w_click * p_click
          + w_dwell * p_click * E[log1p(dwell_s) | click]    (expected log-dwell of an impression)
          + w_share * p_share
          + w_hide  * p_hide                                 (w_hide < 0: hides cost value)

with ``p_click = sigmoid(click logit + log(cfg.negative_rate))`` (top-slot click probability,
corrected for negative down-sampling, see ``feedrank.models.calibration``), ``p_share`` and
``p_hide`` the per-impression probabilities (not conditional on a click), and the dwell head's
output taken as is. Default weights ``{click: 1.0, dwell: 0.1, share: 5.0, hide: -3.0}``.

**Losses** (``ranker_loss``): weighted BCE for click (with the position term), share and hide;
Huber (or MSE) on ``log1p(dwell_s)`` over clicked rows only; every term weighted by
``batch.weight``, combined with ``cfg.loss_weights``. When training data kept only a share
``negative_rate`` of the non-clicked rows, the click head is corrected at serving by the logit shift
and the share and hide terms weight non-clicked rows by ``1 / negative_rate`` (inverse selection
probability), so all served probabilities estimate un-sampled traffic.

Example::

    >>> cfg = RankerConfig(interaction="dcn")
    >>> model = Ranker(cfg, n_users=1000, n_items=5000, user_cat_sizes=[8, 30], item_cat_sizes=[50, 4, 20],
    ...                n_user_counters=2, n_item_counters=3)
    >>> loss, logs = ranker_loss(model, batch)                       # training
    >>> model.eval(); scores = model.score_candidates(user, items)  # serving: dict of [N] tensors
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from feedrank.data.batch import Batch
from feedrank.models.attention import AttentionImpl
from feedrank.models.calibration import correct_logit
from feedrank.models.interactions import InteractionKind, build_interaction
from feedrank.models.losses import bce_loss, unwrap, weighted_mean
from feedrank.models.towers import (
    AttentionQuery,
    CategoricalEmbeddings,
    EncoderKind,
    Pooling,
    TitleBag,
    build_history_encoder,
    check_columns,
    check_history,
    check_tokens,
    drop_ids,
    item_title_table,
    masked_mean,
    mlp,
)

#: The ranker's tasks, in the order of ``HeadWeights`` and the prediction dict.
HEADS = ("click", "dwell", "share", "hide")


@dataclass
class HeadWeights:
    """One weight per head. No defaults on purpose: a YAML that sets only some of the value-formula
    weights would otherwise silently get 1.0 for the rest."""

    click: float
    dwell: float
    share: float
    hide: float

    def validate(self) -> None:
        for name in HEADS:
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} weight must be finite, got {getattr(self, name)}")


@dataclass
class RankerConfig:
    """Every setting of the ranker (YAML section ``ranker``)."""

    dim: int = 16  # width of every feature field (dot interactions need a single width)
    interaction: InteractionKind = "dcn"
    cross_layers: int = 2  # dcn
    cross_rank: int = 0  # dcn: 0 = full-rank W, r > 0 = low-rank U V^T
    hidden: list[int] = field(default_factory=lambda: [256, 128])  # shared-bottom MLP widths
    head_hidden: list[int] = field(default_factory=list)  # per-head MLP widths ([] = one Linear)
    dropout: float = 0.1
    history_encoder: EncoderKind = "mean"
    attention_query: AttentionQuery = "learned"
    pooling: Pooling = "mean"
    attention_impl: AttentionImpl = "sdpa"
    n_layers: int = 1
    n_heads: int = 2
    max_history_len: int = 50
    max_positions: int = 20  # positions >= this share the last position bias
    title_tokens: bool = False  # a title bag-of-words field on the item side (needs a token vocabulary)
    history_match: bool = False  # the history's categorical bags as user fields + every history/candidate cosine
    item_id_dropout: float = 0.0  # training rows whose item ID is read as OOV (new items: content only)
    two_tower_dim: int = 0  # 0 = no two-tower inputs; else the width of the two-tower vectors
    two_tower_dropout: float = 0.1  # training rows whose two-tower vectors are marked missing
    loss_weights: HeadWeights = field(default_factory=lambda: HeadWeights(click=1.0, dwell=0.2, share=1.0, hide=1.0))
    dwell_loss: Literal["huber", "mse"] = "huber"
    huber_delta: float = 1.0  # in log1p-seconds
    value: HeadWeights = field(default_factory=lambda: HeadWeights(click=1.0, dwell=0.1, share=5.0, hide=-3.0))
    negative_rate: float = 1.0  # share of non-clicked rows kept in the training data (1 = no down-sampling)

    def validate(self) -> None:
        for name in ("dim", "cross_layers", "n_layers", "n_heads", "max_history_len", "max_positions"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not self.hidden or any(width <= 0 for width in self.hidden):
            raise ValueError(f"hidden must be a non-empty list of widths > 0, got {self.hidden}")
        if any(width <= 0 for width in self.head_hidden):
            raise ValueError(f"head_hidden widths must be > 0, got {self.head_hidden}")
        if self.cross_rank < 0 or self.two_tower_dim < 0:
            raise ValueError("cross_rank and two_tower_dim must be >= 0")
        for name in ("dropout", "two_tower_dropout", "item_id_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.history_encoder != "mean" and self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} must be divisible by n_heads {self.n_heads}")
        if self.huber_delta <= 0:
            raise ValueError(f"huber_delta must be > 0, got {self.huber_delta}")
        if not 0.0 < self.negative_rate <= 1.0:
            raise ValueError(f"negative_rate must be in (0, 1], got {self.negative_rate}")
        self.loss_weights.validate()
        self.value.validate()


@dataclass
class RankerOutput:
    """Raw head outputs, each [B]. The training click logit is ``click + position``."""

    click: Tensor  # click logit without the position term (= at the top slot): what serving uses
    dwell: Tensor  # predicted E[log1p(dwell_s) | click]
    share: Tensor  # share logit (per impression)
    hide: Tensor  # hide logit (per impression)
    position: Tensor  # position-bias logit, training only


@dataclass
class UserInputs:
    """One user's request-time features: everything serving knows before any candidate."""

    user: Tensor  # [] int64 user index
    user_cats: Tensor  # [n_user_cats] int64
    history: Tensor  # [L] int64 item indices, oldest first (L may be 0)
    counters: Tensor  # [n_user_counters] float32, log1p-scaled like Batch.counters
    vector: Tensor | None = None  # [two_tower_dim] the two-tower user vector, if known
    history_mask: Tensor | None = None  # [L] bool; None = every element is real


@dataclass
class ItemInputs:
    """The N candidates of one request."""

    item: Tensor  # [N] int64 item index
    item_cats: Tensor  # [N, n_item_cats] int64
    item_age_h: Tensor  # [N] float32 hours
    counters: Tensor  # [N, n_item_counters] float32
    vectors: Tensor | None = None  # [N, two_tower_dim] two-tower item vectors, if known
    tokens: Tensor | None = None  # [N, T] title-token indices (required when the ranker reads titles)
    # [N, 2 * len(cross_counters)] the user's counters on each candidate's category (...), log1p-scaled
    # like Batch.cross_counters (required when the ranker reads them)
    cross_counters: Tensor | None = None


def dense_field(n_in: int, dim: int) -> nn.Sequential:
    """A small MLP that turns a few dense numbers into one field embedding (DLRM's bottom MLP)."""
    return nn.Sequential(nn.Linear(n_in, dim), nn.GELU(), nn.Linear(dim, dim))


class OptionalVector(nn.Module):
    """A vector input that may be absent: ``Linear(vec or 0) + (absent) * e_missing``."""

    def __init__(self, in_dim: int, dim: int, dropout: float):
        super().__init__()
        self.in_dim, self.dropout = in_dim, dropout
        self.project = nn.Linear(in_dim, dim)
        self.missing = nn.Parameter(torch.zeros(dim))

    def forward(self, vec: Tensor | None, batch: int, name: str) -> Tensor:
        device = self.missing.device
        if vec is None:
            vec = torch.zeros(batch, self.in_dim, device=device)
            present = torch.zeros(batch, 1, device=device)
        else:
            check_columns(name, vec, batch, self.in_dim)
            present = torch.ones(batch, 1, device=device)
            if self.training and self.dropout > 0:
                present = (torch.rand(batch, 1, device=device) >= self.dropout).to(present.dtype)
        return self.project(vec.to(self.missing.dtype) * present) + (1.0 - present) * self.missing


class Ranker(nn.Module):
    """Multi-task ranker over user, item, counter and (optional) two-tower features; see the module docstring.

    Sizes are vocabulary sizes including padding (0) and OOV (1). ``Batch.counters`` must hold
    ``n_user_counters`` user-side columns followed by ``n_item_counters`` item-side ones (with
    ``feedrank.features.COUNTER_COLUMNS``: 2 and 3).

    Only shapes are checked here. Values (indices in their vocabularies, finite ages >= 0 and
    counters, positions >= 0) are checked where a Batch is made (``feedrank.data.collate``), and
    serving builds them in range (vocabulary lookups, clamped ages): a value check in ``forward``
    would sync the device every step and break the graph under ``torch.compile``.
    """

    def __init__(
        self,
        cfg: RankerConfig,
        n_users: int,
        n_items: int,
        user_cat_sizes: Sequence[int],
        item_cat_sizes: Sequence[int],
        n_user_counters: int = 0,
        n_item_counters: int = 0,
        n_tokens: int = 0,
        cross_counters: Sequence[str] = (),
    ):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        d = cfg.dim
        self.n_users, self.n_items = n_users, n_items
        self.n_user_counters, self.n_item_counters = n_user_counters, n_item_counters
        # item categorical columns whose user x value counters (Batch.cross_counters) are a field
        self.cross_counters = tuple(cross_counters)
        self.user_id = nn.Embedding(n_users, d, padding_idx=0)
        self.item_id = nn.Embedding(n_items, d, padding_idx=0)  # also embeds the history
        self.user_cats = CategoricalEmbeddings(user_cat_sizes, d)
        self.item_cats = CategoricalEmbeddings(item_cat_sizes, d)
        self.history_encoder = build_history_encoder(
            cfg.history_encoder, d, n_heads=cfg.n_heads, n_layers=cfg.n_layers, max_len=cfg.max_history_len,
            query=cfg.attention_query, context_dim=d * (1 + len(user_cat_sizes)), pooling=cfg.pooling,
            impl=cfg.attention_impl, dropout=cfg.dropout,
        )
        self.user_counters = dense_field(n_user_counters, d) if n_user_counters else None
        self.item_counters = dense_field(n_item_counters, d) if n_item_counters else None
        self.freshness = dense_field(1, d)
        self.title = TitleBag(n_tokens, d) if cfg.title_tokens else None
        n_cats = len(item_cat_sizes)
        # (user field, item field) pairs whose cosines make the match field (heads_from_fields): the
        # history's title bag and the candidate's; with history_match also the pooled history and the
        # candidate's ID, and each categorical column's history bag and the candidate's value.
        n_user_fields = (2 + len(user_cat_sizes) + cfg.title_tokens + n_cats * cfg.history_match
                         + bool(n_user_counters) + bool(cfg.two_tower_dim))  # fmt: skip
        n_item_fields = (2 + n_cats + cfg.title_tokens + bool(n_item_counters) + bool(self.cross_counters)
                         + bool(cfg.two_tower_dim))  # fmt: skip
        history_field, item_cat_field = 1 + len(user_cat_sizes), n_user_fields + 1  # field order: user_fields, item_fields
        pairs = []
        if cfg.title_tokens:
            pairs.append((history_field + 1, n_user_fields + 2 + n_cats))
        if cfg.history_match:
            first_bag = history_field + 1 + cfg.title_tokens
            pairs += [(history_field, n_user_fields)] + [(first_bag + j, item_cat_field + j) for j in range(n_cats)]
        self.match = dense_field(len(pairs), d) if pairs else None
        # the pairs' field indices (not saved: derived from the config), on the model's device
        users, items = zip(*pairs) if pairs else ((), ())
        self.register_buffer("_match_users", torch.tensor(users, dtype=torch.long), persistent=False)
        self.register_buffer("_match_items", torch.tensor(items, dtype=torch.long), persistent=False)
        self._register_load_state_dict_pre_hook(_renamed_title_match)
        # [n_items, T] title tokens by item index (attach_titles); not saved: the catalogue holds them
        self.register_buffer("item_titles", torch.zeros(0, 1, dtype=torch.long), persistent=False)
        # [n_items, n_item_cats] categorical indices by item index (attach_item_cats), for history_match
        self.register_buffer("item_cat_table", torch.zeros(0, n_cats, dtype=torch.long), persistent=False)
        tt = cfg.two_tower_dim
        self.user_vector = OptionalVector(tt, d, cfg.two_tower_dropout) if tt else None
        self.item_vector = OptionalVector(tt, d, cfg.two_tower_dropout) if tt else None

        self.interaction = build_interaction(
            cfg.interaction, n_user_fields + n_item_fields + bool(pairs), d, cross_layers=cfg.cross_layers,
            cross_rank=cfg.cross_rank,
        )
        # mlp() ends in a bare Linear; the shared bottom keeps only its Linear-LayerNorm-GELU blocks.
        self.bottom = mlp(self.interaction.out_dim, cfg.hidden, 1, cfg.dropout)[:-1]
        self.heads = nn.ModuleDict({name: mlp(cfg.hidden[-1], cfg.head_hidden, 1, cfg.dropout) for name in HEADS})
        self.position_bias = nn.Embedding(cfg.max_positions, 1, padding_idx=0)  # row 0 stays 0: the reference slot
        nn.init.zeros_(self.position_bias.weight)
        # last, so that a ranker without it draws every other initial weight as before
        self.cross_field = dense_field(2 * len(self.cross_counters), d) if self.cross_counters else None

    # ---------------------------------------------------------------------------------- fields

    @property
    def reads_titles(self) -> bool:
        return self.title is not None

    def attach_titles(self, tokens: Tensor) -> None:
        """The title tokens [n_items, T] of every item index (``feedrank.bundle.catalogue_item_tokens``)."""
        self.item_titles = item_title_table(tokens, self.n_items, self.item_titles.device)

    @property
    def reads_history_cats(self) -> bool:
        return self.cfg.history_match

    def attach_item_cats(self, item_cats: Tensor) -> None:
        """The categorical indices [n_items, n_item_cats] of every item index (``feedrank.bundle.catalogue_item_cats``)."""
        if item_cats.dim() != 2 or item_cats.shape != (self.n_items, len(self.item_cats.sizes)):
            raise ValueError(f"item categoricals must be [n_items, n_item_cats] = [{self.n_items}, "
                             f"{len(self.item_cats.sizes)}], got {tuple(item_cats.shape)}")  # fmt: skip
        self.item_cat_table = item_cats.to(device=self.item_cat_table.device, dtype=torch.long)

    def _history_cats(self, history: Tensor, mask: Tensor) -> list[Tensor]:
        """Per item categorical column, the [B, dim] mean embedding of the history items' values (the
        candidate's table, so a history bag and a candidate's value live in one space)."""
        if self.item_cat_table.shape[0] != self.n_items:
            raise RuntimeError("this ranker matches history categoricals: attach the catalogue's with "
                               "attach_item_cats(cats) first (load_bundle and the training task do)")  # fmt: skip
        cats = self.item_cat_table[history]  # [B, L, n_item_cats]
        return [masked_mean(table(cats[..., j]), mask) for j, table in enumerate(self.item_cats.tables)]

    def _history_titles(self, history: Tensor, mask: Tensor) -> Tensor:
        """[B, dim] mean title bag of the history's items (zeros for an empty history)."""
        if self.item_titles.shape[0] != self.n_items:
            raise RuntimeError("this ranker reads titles: attach the catalogue's with attach_titles(tokens) first "
                               "(load_bundle and the training task do)")  # fmt: skip
        b, length = history.shape
        bags = self.title(self.item_titles[history.reshape(-1)]).view(b, length, self.title.bag.embedding_dim)
        return masked_mean(bags, mask)

    def user_fields(
        self, user: Tensor, user_cats: Tensor, history: Tensor, history_mask: Tensor, counters: Tensor,
        vector: Tensor | None = None,
    ) -> Tensor:  # fmt: skip
        """User-side fields [B, F_user, dim]; ``counters`` are the user-side columns only."""
        if user.dim() != 1:
            raise ValueError(f"user must be [B], got {tuple(user.shape)}")
        b = user.shape[0]
        check_columns("user_cats", user_cats, b, len(self.user_cats.sizes))
        check_history(history, history_mask)
        if history.shape[0] != b:
            raise ValueError(f"history has batch size {history.shape[0]} but user has {b}")
        check_columns("user counters", counters, b, self.n_user_counters)
        ident = self.user_id(user)
        cats = self.user_cats(user_cats)
        pooled = self.history_encoder(self.item_id(history), history_mask, torch.cat([ident, cats], dim=-1))
        fields = [ident, *cats.split(self.cfg.dim, dim=-1), pooled.to(ident.dtype)]
        if self.title is not None:
            fields.append(self._history_titles(history, history_mask).to(ident.dtype))
        if self.cfg.history_match:
            fields += [bag.to(ident.dtype) for bag in self._history_cats(history, history_mask)]
        if self.user_counters is not None:
            fields.append(self.user_counters(counters.float()))
        fields += self._vector_field(self.user_vector, vector, b, "user_vec")
        return torch.stack(fields, dim=1)

    def item_fields(
        self, item: Tensor, item_cats: Tensor, item_age_h: Tensor, counters: Tensor, vector: Tensor | None = None,
        tokens: Tensor | None = None, cross_counters: Tensor | None = None,
    ) -> Tensor:  # fmt: skip
        """Item-side fields [N, F_item, dim]; ``counters`` are the item-side columns only; ``tokens``
        [N, T] the titles (required when ``cfg.title_tokens``, else ignored); ``cross_counters``
        [N, 2 * len(self.cross_counters)] the user's counters on each item's values (required when
        the ranker reads them, refused otherwise)."""
        if item.dim() != 1 or item_age_h.shape != item.shape:
            raise ValueError(f"item {tuple(item.shape)} and item_age_h {tuple(item_age_h.shape)} must both be [N]")
        n = item.shape[0]
        check_columns("item_cats", item_cats, n, len(self.item_cats.sizes))
        check_columns("item counters", counters, n, self.n_item_counters)
        cats = self.item_cats(item_cats)
        ident = self.item_id(drop_ids(item, self.cfg.item_id_dropout, self.training))
        fields = [ident, *cats.split(self.cfg.dim, dim=-1), self.freshness(torch.log1p(item_age_h.float())[:, None])]
        if self.title is not None:
            if tokens is None:
                raise ValueError("this ranker reads titles (ranker.title_tokens): pass the item tokens "
                                 "(Batch.item_tokens, ItemInputs.tokens)")  # fmt: skip
            check_tokens(tokens, n)
            fields.append(self.title(tokens).to(ident.dtype))
        if self.item_counters is not None:
            fields.append(self.item_counters(counters.float()))
        if self.cross_field is not None:
            if cross_counters is None:
                raise ValueError(f"this ranker reads cross counters of {list(self.cross_counters)}: pass them "
                                 "(Batch.cross_counters, ItemInputs.cross_counters)")  # fmt: skip
            check_columns("cross_counters", cross_counters, n, 2 * len(self.cross_counters))
            fields.append(self.cross_field(cross_counters.float()))
        elif cross_counters is not None:
            raise ValueError("cross_counters were given but this ranker reads none (features.cross_counters is empty)")
        fields += self._vector_field(self.item_vector, vector, n, "item_vec")
        return torch.stack(fields, dim=1)

    def _vector_field(self, module: OptionalVector | None, vector: Tensor | None, batch: int, name: str) -> list[Tensor]:
        if module is None:
            if vector is not None:
                raise ValueError(f"{name} was given but this ranker has no two-tower inputs (cfg.two_tower_dim = 0)")
            return []
        return [module(vector, batch, name)]

    # ---------------------------------------------------------------------------------- scoring

    def heads_from_fields(self, fields: Tensor) -> dict[str, Tensor]:
        """Head outputs {click, dwell, share, hide} [B] of fields [B, F, dim]: interaction, bottom, heads
        (the match field is computed here, where both sides meet)."""
        if self.match is not None:
            match = self._match_field(fields[:, self._match_users], fields[:, self._match_items])
            fields = torch.cat([fields, match.to(fields.dtype)[:, None]], dim=1)
        return self._heads(self.interaction(fields))

    def _match_field(self, users: Tensor, items: Tensor) -> Tensor:
        """[B, dim] match field of the paired user and item fields ([B or 1, P, dim], [B, P, dim])."""
        return self.match(F.cosine_similarity(users.float(), items.float(), dim=-1, eps=1e-6))

    def _heads(self, interacted: Tensor) -> dict[str, Tensor]:
        """Head outputs {click, dwell, share, hide} [B] of the interaction's output [B, out_dim]."""
        shared = self.bottom(interacted)
        return {name: head(shared).squeeze(-1) for name, head in self.heads.items()}

    def position_logit(self, position: Tensor) -> Tensor:
        """[B] position bias of positions >= 0 (``collate`` checks); those beyond ``max_positions - 1``
        share the last slot's bias."""
        return self.position_bias(position.clamp_max(self.cfg.max_positions - 1)).squeeze(-1)

    def batch_heads(self, batch: Batch, user_vec: Tensor | None = None, item_vec: Tensor | None = None) -> dict[str, Tensor]:
        """Head outputs {click, dwell, share, hide} [B] of every row; ``batch.position`` is not read."""
        b = len(batch)
        n_counters = self.n_user_counters + self.n_item_counters
        if batch.counters.shape != (b, n_counters):
            raise ValueError(
                f"counters must be [{b}, {n_counters}] ({self.n_user_counters} user + {self.n_item_counters} item "
                f"columns), got {tuple(batch.counters.shape)}"
            )
        users = self.user_fields(
            batch.user, batch.user_cats, batch.history, batch.history_mask,
            batch.counters[:, : self.n_user_counters], user_vec,
        )  # fmt: skip
        items = self.item_fields(
            batch.item, batch.item_cats, batch.item_age_h, batch.counters[:, self.n_user_counters :], item_vec,
            batch.item_tokens, batch.cross_counters,
        )
        return self.heads_from_fields(torch.cat([users, items], dim=1))

    def forward(self, batch: Batch, user_vec: Tensor | None = None, item_vec: Tensor | None = None) -> RankerOutput:
        """Head outputs and position logit of every row; ``user_vec``/``item_vec`` [B, two_tower_dim] or None (missing)."""
        if batch.position.shape != (len(batch),):
            raise ValueError(f"position must be [{len(batch)}], got {tuple(batch.position.shape)}")
        heads = self.batch_heads(batch, user_vec, item_vec)
        return RankerOutput(**heads, position=self.position_logit(batch.position))

    def predictions(self, heads: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Serving predictions {click, dwell, share, hide, value} [B] from head outputs (no position term)."""
        preds = {
            "click": torch.sigmoid(correct_logit(heads["click"].float(), self.cfg.negative_rate)),
            "dwell": heads["dwell"].float(),
            "share": torch.sigmoid(heads["share"].float()),
            "hide": torch.sigmoid(heads["hide"].float()),
        }
        preds["value"] = value_score(preds, self.cfg.value)
        return preds

    @torch.no_grad()
    def predict(self, batch: Batch, user_vec: Tensor | None = None, item_vec: Tensor | None = None) -> dict[str, Tensor]:
        """Serving predictions for the rows of ``batch``; ``batch.position`` is never read. Call ``eval()`` first."""
        return self.predictions(self.batch_heads(batch, user_vec, item_vec))

    @torch.no_grad()
    def score_candidates(self, user: UserInputs, items: ItemInputs) -> dict[str, Tensor]:
        """Serving predictions for N candidates of ONE user, each [N]; the user side is computed once.

        The user's fields are computed for one row, and so is everything of the user alone that
        ``heads_from_fields`` would repeat per row: the user's share of the first cross layer's
        projection (``interaction.forward_one_user``) and the user side of the match cosines (the
        same values as ``predict`` on the expanded batch, up to float rounding). An empty
        candidate set (N = 0) returns empty tensors rather than raising:
        an ANN lookup that finds nothing is a normal serving outcome, and the caller decides what
        an empty feed means. Call ``eval()`` first.
        """
        if user.user.dim() != 0:
            raise ValueError(f"UserInputs.user must be a 0-d index (one user), got shape {tuple(user.user.shape)}")
        if user.history.dim() != 1:
            raise ValueError(f"UserInputs.history must be [L], got {tuple(user.history.shape)}")
        mask = torch.ones_like(user.history, dtype=torch.bool) if user.history_mask is None else user.history_mask
        vector = None if user.vector is None else user.vector[None]
        users = self.user_fields(user.user[None], user.user_cats[None], user.history[None], mask[None], user.counters[None], vector)
        item_rows = self.item_fields(items.item, items.item_cats, items.item_age_h, items.counters, items.vectors, items.tokens,
                                     items.cross_counters)  # fmt: skip
        users = users[0]
        if self.match is not None:  # the pairs' item fields follow the user fields (see __init__)
            match = self._match_field(users[self._match_users][None], item_rows[:, self._match_items - users.shape[0]])
            item_rows = torch.cat([item_rows, match.to(item_rows.dtype)[:, None]], dim=1)
        return self.predictions(self._heads(self.interaction.forward_one_user(users, item_rows)))


def _renamed_title_match(state: dict, prefix: str, *_args) -> None:
    """Bundles saved before the match field read more than titles call it ``title_match``: the same
    module with one input (the title cosine), so their weights load under the new name."""
    for key in [k for k in state if k.startswith(prefix + "title_match.")]:
        state[prefix + "match." + key[len(prefix + "title_match."):]] = state.pop(key)


def value_score(preds: Mapping[str, Tensor], weights: HeadWeights) -> Tensor:
    """The value formula (module docstring): ``w_c p_c + w_d p_c E[log1p dwell | click] + w_s p_s + w_h p_h``."""
    p_click = preds["click"]
    return (
        weights.click * p_click
        + weights.dwell * p_click * preds["dwell"]
        + weights.share * preds["share"]
        + weights.hide * preds["hide"]
    )


def dwell_loss(pred: Tensor, dwell_s: Tensor, weight: Tensor, kind: Literal["huber", "mse"], delta: float) -> Tensor:
    """Weighted Huber/MSE of ``pred`` against ``log1p(dwell_s)``; rows with weight 0 (non-clicks) count nothing.

    log1p because dwell is heavy-tailed (lognormal in the simulator): on raw seconds a few long
    reads would dominate the gradient. Huber further caps the pull of outliers in log space.
    """
    target = torch.log1p(dwell_s.float())
    if kind == "huber":
        per_row = F.huber_loss(pred.float(), target, reduction="none", delta=delta)
    else:
        per_row = F.mse_loss(pred.float(), target, reduction="none")
    return weighted_mean(per_row, weight)


def ranker_loss(model: Ranker | nn.Module, batch: Batch, two_tower: nn.Module | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Trainer adapter: ``(loss, logs)`` = weighted sum of the four task losses (module docstring).

    ``two_tower``: a trained ``TwoTower`` in eval mode whose vectors feed the ranker's two-tower
    inputs (frozen: computed without gradients); bind it with
    ``functools.partial(ranker_loss, two_tower=tt)``. ``logs`` holds detached 0-d tensors.
    """
    cfg = unwrap(model).cfg
    user_vec = item_vec = None
    if two_tower is not None:
        if two_tower.training:
            raise ValueError("the two-tower that feeds the ranker must be in eval mode: call two_tower.eval()")
        with torch.no_grad():
            user_vec = two_tower.user_vectors(batch)
            item_vec = two_tower.batch_item_vectors(batch)
    out = model(batch, user_vec, item_vec)
    weight = batch.weight
    # Non-clicked rows were kept with probability negative_rate: weight them back up for the heads
    # that, unlike click, have no closed-form correction.
    unsampled = weight if cfg.negative_rate == 1.0 else weight * torch.where(batch.clicked > 0, 1.0, 1.0 / cfg.negative_rate)
    losses = {
        "click": bce_loss(out.click + out.position, batch.clicked, weight),
        "dwell": dwell_loss(out.dwell, batch.dwell_s, weight * batch.clicked, cfg.dwell_loss, cfg.huber_delta),
        "share": bce_loss(out.share, batch.shared, unsampled),
        "hide": bce_loss(out.hide, batch.hidden, unsampled),
    }
    loss = sum(getattr(cfg.loss_weights, name) * value for name, value in losses.items())
    logs = {"loss": loss.detach(), **{f"loss_{name}": value.detach() for name, value in losses.items()}}
    return loss, logs
