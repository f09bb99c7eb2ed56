"""The two-tower retrieval model: a user tower and an item tower whose unit vectors meet in a dot product.

Retrieval needs the two sides to be computable apart: item vectors for the whole catalogue go
into an ANN index offline (``item_vectors`` takes plain tensors, no ``Batch``), and a request only
computes one user vector (``user_vectors``). The score is ``u . v / T``: both vectors are
L2-normalised, so ``u . v`` is a cosine in [-1, 1] and the temperature ``T`` sets how peaked the
softmax over items is (small T = sharp). T is either fixed or learned within bounds.

Example::

    >>> cfg = TwoTowerConfig(dim=32, history_encoder="transformer")
    >>> model = TwoTower(cfg, n_users=1000, n_items=5000, user_cat_sizes=[8, 30], item_cat_sizes=[50, 4, 20])
    >>> loss, logs = two_tower_loss(model, batch)        # feedrank.models.losses
    >>> index_vectors = model.item_vectors(items, item_cats, item_age_h, item_tokens)   # [N, 32]

Content: with ``title_dim > 0`` the item tower also reads the title's words (``n_tokens`` = the
token vocabulary's size), and ``item_id_dropout`` trains it to embed items whose ID it never saw
(``feedrank.models.towers.ItemTower``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Sequence

import torch
from torch import Tensor, nn

from feedrank.data.batch import Batch
from feedrank.features.vocab import OOV
from feedrank.models.attention import AttentionImpl
from feedrank.models.losses import NegativeSampler, SamplerKind
from feedrank.models.towers import (
    AttentionQuery,
    EncoderKind,
    ItemTower,
    Pooling,
    UserTower,
    build_history_encoder,
    check_history,
)

#: ``mask_known_positives`` keeps a dense users x items bool grid up to this many cells (64 MB).
DENSE_KNOWN_MAX_CELLS = 1 << 26


@dataclass
class TwoTowerConfig:
    """Every setting of the retrieval model (YAML section ``two_tower``)."""

    dim: int = 64  # output vector size (what the ANN index stores)
    # 0 = no user-ID embedding: the user is only their categorical features and history. For
    # random-split benchmarks with a profile history (features.history_mode: other_engagements),
    # where an ID embedding memorises the user's items and, next to a history without the target,
    # tells the model which one is missing.
    user_id_dim: int = 32
    item_id_dim: int = 64  # also the width of the history encoder (the table is shared)
    cat_dim: int = 16  # per categorical column, users and items
    freshness_dim: int = 8  # 0 = no item-age input (see ItemTower: for logs without creation times)
    # Content: width of the title bag of words (0 = ID, categoricals and age only), and the share of
    # training rows whose item ID is replaced by OOV so that new (OOV) items are embedded by content.
    title_dim: int = 0
    item_id_dropout: float = 0.0
    # The user's point-in-time impression/click counts. Like item age they are a clock (they only
    # grow), which a split that is not by time does not reward: off for such benchmarks.
    user_counters: bool = True
    hidden: list[int] = field(default_factory=lambda: [256])  # tower MLP hidden widths
    dropout: float = 0.1
    history_encoder: EncoderKind = "mean"
    attention_query: AttentionQuery = "learned"  # attention encoder: one learned query, or from the user
    pooling: Pooling = "mean"  # transformer encoder: masked mean or the most recent item
    attention_impl: AttentionImpl = "sdpa"
    n_layers: int = 1
    n_heads: int = 2
    max_history_len: int = 50  # transformer positional table size
    grad_checkpointing: bool = False
    temperature: float = 0.05
    learn_temperature: bool = False
    temperature_min: float = 0.01  # bounds of a learned temperature
    temperature_max: float = 1.0
    loss: Literal["in_batch", "sampled", "bce"] = "in_batch"
    num_negatives: int = 256  # sampled softmax (ignored by the "all" sampler: the whole catalogue)
    negative_sampler: SamplerKind = "uniform"
    popularity_power: float = 0.75
    logq_correction: bool = True
    # Impressions: the weight of a click term on every shown row beside the softmax loss (0 = off;
    # ignored by loss "bce", which is that term alone). The softmax losses see clicked rows only,
    # each item at its own row's age, so they never compare a fresh item with a stale one shown
    # beside it: freshness, the world's largest click factor, stays unlearnt, and the dot product
    # ranks impressions below random (docs/evaluation.md). The term is a BCE of
    # ``ImpressionHead(u . v, position)`` (shown and not clicked = negative): one ranking for
    # both, the head's scale kept positive, its position bias in training only.
    impression_weight: float = 0.0
    impression_rate: float = 0.2  # share of the not-clicked rows it trains on (every click is kept)
    max_positions: int = 20  # impression term: positions >= this share the last position bias
    # in_batch and sampled: also mask negatives that are known positives of the row's user elsewhere
    # in the training data (attach_known_positives). Matters when users engage with a large share
    # of the catalogue (MovieLens): otherwise items the user liked are pushed away as negatives.
    mask_known_positives: bool = False
    # Under torchrun, "global": the loss of the union of every rank's micro-batch (in-batch
    # negatives all-gathered from every rank, every loss normalised by the global weight;
    # feedrank.models.losses.GlobalPool); "local": each rank's batch alone (no gather and no
    # B x B*world logits, but the in-batch pool shrinks to 1/world).
    data_parallel_loss: Literal["global", "local"] = "global"
    # With train.grad_accum_steps > 1, "cached": the step's loss is one batch of all its
    # micro-batches (losses.CachedStep: one extra forward without a graph per micro-batch);
    # "micro_batches": each micro-batch is its own softmax normalised by its own weight, so the
    # in-batch pool shrinks to 1/grad_accum_steps (a warning at start; docs/scaling.md measures it).
    accumulation: Literal["cached", "micro_batches"] = "cached"

    def validate(self) -> None:
        for name in ("dim", "item_id_dim", "cat_dim", "n_layers", "n_heads",
                     "max_history_len", "num_negatives"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.user_id_dim < 0:
            raise ValueError(f"user_id_dim must be >= 0 (0 = no user-ID embedding), got {self.user_id_dim}")
        if self.freshness_dim < 0:
            raise ValueError(f"freshness_dim must be >= 0 (0 = no item-age input), got {self.freshness_dim}")
        if self.title_dim < 0:
            raise ValueError(f"title_dim must be >= 0 (0 = no title input), got {self.title_dim}")
        if not 0.0 <= self.item_id_dropout < 1.0:
            raise ValueError(f"item_id_dropout must be in [0, 1), got {self.item_id_dropout}")
        if any(width <= 0 for width in self.hidden):
            raise ValueError(f"hidden widths must be > 0, got {self.hidden}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.history_encoder != "mean" and self.item_id_dim % self.n_heads:
            raise ValueError(f"item_id_dim {self.item_id_dim} must be divisible by n_heads {self.n_heads}")
        if self.grad_checkpointing and self.history_encoder == "mean":
            raise ValueError("grad_checkpointing needs history_encoder 'attention' or 'transformer'")
        if not 0.0 < self.temperature_min < self.temperature_max:
            raise ValueError(f"need 0 < temperature_min < temperature_max, got {self.temperature_min}, {self.temperature_max}")
        lo, hi = (self.temperature_min, self.temperature_max) if self.learn_temperature else (0.0, math.inf)
        if not lo < self.temperature < hi:
            raise ValueError(f"temperature {self.temperature} must be in ({lo}, {hi})")
        if self.popularity_power <= 0:
            raise ValueError(f"popularity_power must be > 0, got {self.popularity_power}")
        if not (self.impression_weight >= 0 and math.isfinite(self.impression_weight)):
            raise ValueError(f"impression_weight must be >= 0 (0 = no impression term), got {self.impression_weight}")
        if not 0.0 < self.impression_rate <= 1.0:
            raise ValueError(f"impression_rate must be in (0, 1], got {self.impression_rate}")
        if self.max_positions < 1:
            raise ValueError(f"max_positions must be >= 1, got {self.max_positions}")


class Temperature(nn.Module):
    """A fixed temperature, or a learned one kept strictly inside [t_min, t_max].

    The learned value is ``t_min + (t_max - t_min) * sigmoid(p)``: a smooth squashing keeps a
    gradient everywhere, where clamping would freeze T once it hit a bound.
    """

    def __init__(self, value: float, learn: bool, t_min: float, t_max: float):
        super().__init__()
        self.t_min, self.t_max, self.learn = t_min, t_max, learn
        if learn:
            frac = (value - t_min) / (t_max - t_min)
            self.raw = nn.Parameter(torch.tensor(math.log(frac / (1.0 - frac))))
        else:
            self.register_buffer("value", torch.tensor(float(value)))

    def forward(self) -> Tensor:
        if self.learn:
            return self.t_min + (self.t_max - self.t_min) * torch.sigmoid(self.raw)
        return self.value


@dataclass
class SampledNegatives:
    """Negatives drawn for one batch: ids [K], item vectors [K, D], sampler log q of them [K] and of the positives [B]."""

    ids: Tensor
    vectors: Tensor
    logq: Tensor
    pos_logq: Tensor


@dataclass
class TwoTowerOutput:
    user: Tensor  # [B, D] unit vectors
    item: Tensor  # [B, D] unit vectors
    temperature: Tensor  # 0-d
    negatives: SampledNegatives | None  # only when cfg.loss == "sampled"
    impression: Tensor | None = None  # [B] click logits of the impression term (cfg.impression_weight > 0)


class ImpressionHead(nn.Module):
    """Click logit of an impression from its cosine ``u . v``: ``exp(s) * cos + b + position_bias``.

    The scale is kept positive (``exp``), so a higher cosine always means a likelier click: the
    term trains the very score retrieval and serving rank by, not a second one. The position bias
    (row 0, the top slot, fixed at 0) explains away where the logging policy showed the item, as
    in the ranker; it is a training term only and never part of the score.
    """

    INIT_SCALE, INIT_BIAS = 5.0, -2.5  # cos in [-1, 1] -> click probabilities of a few percent

    def __init__(self, max_positions: int):
        super().__init__()
        self.max_positions = max_positions
        self.log_scale = nn.Parameter(torch.tensor(math.log(self.INIT_SCALE)))
        self.bias = nn.Parameter(torch.tensor(self.INIT_BIAS))
        self.position_bias = nn.Embedding(max_positions, 1, padding_idx=0)
        nn.init.zeros_(self.position_bias.weight)

    def forward(self, cosine: Tensor, position: Tensor) -> Tensor:
        """``cosine`` [B], ``position`` [B] int64 >= 0 (``collate`` checks) -> [B] click logits."""
        if position.shape != cosine.shape:
            raise ValueError(f"position must be [{cosine.shape[0]}], got {tuple(position.shape)}")
        pos = self.position_bias(position.clamp_max(self.max_positions - 1)).squeeze(-1)
        return self.log_scale.exp() * cosine.float() + self.bias + pos


def draw_rows(mask: Tensor, k: int) -> Tensor:
    """``k`` indices drawn uniformly with replacement from the True positions of ``mask`` [B].

    Fixed-shape and sync-free (no ``nonzero``, no count read back to the host): the j-th True
    position is where the running count first exceeds j. All False gives ``B - 1`` (B >= 1).

    >>> draw_rows(torch.tensor([False, True, False, True]), 5)   # values in {1, 3}
    """
    count = mask.cumsum(0)
    n_true = count[-1:]
    j = torch.minimum((torch.rand(k, device=mask.device) * n_true).long(), (n_true - 1).clamp_min(0))
    return torch.searchsorted(count, j, right=True).clamp_max(mask.shape[0] - 1)


class TwoTower(nn.Module):
    """User tower + item tower sharing the item ID embedding table (see feedrank.models.towers).

    Sizes are vocabulary sizes including padding (0) and OOV (1). ``user_cat_sizes`` and
    ``item_cat_sizes`` give one vocabulary size per categorical column of ``Batch.user_cats`` /
    ``Batch.item_cats``; the user tower reads the first ``n_counters`` columns of ``Batch.counters``,
    which must be user-side counters (with ``feedrank.features.COUNTER_COLUMNS``: 2, the user's
    impressions and clicks; the item counters after them would leak the candidate into the user vector).
    With ``cfg.user_counters`` False it reads none of them.
    """

    def __init__(
        self,
        cfg: TwoTowerConfig,
        n_users: int,
        n_items: int,
        user_cat_sizes: Sequence[int],
        item_cat_sizes: Sequence[int],
        n_counters: int = 0,
        n_tokens: int = 0,
    ):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        n_counters = n_counters if cfg.user_counters else 0
        self.n_users, self.n_items, self.n_counters = n_users, n_items, n_counters
        self.user_cat_sizes, self.item_cat_sizes = list(user_cat_sizes), list(item_cat_sizes)
        self.item_tower = ItemTower(
            n_items, item_cat_sizes, id_dim=cfg.item_id_dim, cat_dim=cfg.cat_dim, freshness_dim=cfg.freshness_dim,
            hidden=cfg.hidden, out_dim=cfg.dim, dropout=cfg.dropout, n_tokens=n_tokens, title_dim=cfg.title_dim,
            id_dropout=cfg.item_id_dropout,
        )
        encoder = build_history_encoder(
            cfg.history_encoder, cfg.item_id_dim, n_heads=cfg.n_heads, n_layers=cfg.n_layers,
            max_len=cfg.max_history_len, query=cfg.attention_query,
            context_dim=cfg.user_id_dim + cfg.cat_dim * len(user_cat_sizes), pooling=cfg.pooling,
            impl=cfg.attention_impl, dropout=cfg.dropout, grad_checkpointing=cfg.grad_checkpointing,
        )
        self.user_tower = UserTower(
            n_users, user_cat_sizes, n_counters, encoder, id_dim=cfg.user_id_dim, cat_dim=cfg.cat_dim,
            history_dim=cfg.item_id_dim, hidden=cfg.hidden, out_dim=cfg.dim, dropout=cfg.dropout,
        )
        self.temperature = Temperature(cfg.temperature, cfg.learn_temperature, cfg.temperature_min, cfg.temperature_max)
        self.impression_head = (ImpressionHead(cfg.max_positions)
                                if cfg.impression_weight > 0 and cfg.loss != "bce" else None)  # fmt: skip
        self.sampler: NegativeSampler | None = None
        self.register_buffer("known_pairs", torch.empty(0, dtype=torch.long), persistent=False)
        # [n_users, n_items] bool for small grids (attach_known_positives), else empty
        self.register_buffer("known_dense", torch.zeros(0, 0, dtype=torch.bool), persistent=False)

    def attach_catalogue(self, item_cats: Tensor, item_counts: Tensor | None = None, item_tokens: Tensor | None = None) -> None:
        """Give the model the item catalogue it draws sampled-softmax negatives from.

        ``item_cats`` [n_items, n_item_cats] holds each item index's categorical features;
        ``item_counts`` [n_items] impressions or clicks per item, needed by the popularity sampler;
        ``item_tokens`` [n_items, T] title tokens (``catalogue_item_tokens``), needed when the item
        tower reads titles (``ItemTower.attach_titles``).
        """
        if self.item_tower.reads_titles:
            if item_tokens is None:
                raise ValueError(f"this two-tower reads titles: attach_catalogue needs item_tokens [{self.n_items}, T]")
            self.item_tower.attach_titles(item_tokens)
        if item_cats.shape != (self.n_items, len(self.item_cat_sizes)):
            raise ValueError(
                f"item_cats must be [n_items, n_item_cats] = [{self.n_items}, {len(self.item_cat_sizes)}], "
                f"got {tuple(item_cats.shape)}"
            )
        device = self.item_tower.id_embedding.weight.device
        self.sampler = NegativeSampler(item_cats, self.cfg.negative_sampler, item_counts, self.cfg.popularity_power).to(device)

    def attach_known_positives(self, user_idx: Tensor, item_idx: Tensor) -> None:
        """Remember (user, item) training positives for ``known_positive_mask``.

        Pairs of the out-of-vocabulary user are dropped: that index stands for many users, whose
        positives are not each other's.
        """
        if user_idx.shape != item_idx.shape or user_idx.ndim != 1:
            raise ValueError(f"user_idx and item_idx must be 1-D of one length, got {tuple(user_idx.shape)} and {tuple(item_idx.shape)}")
        known = user_idx > OOV
        keys = user_idx[known].long() * self.n_items + item_idx[known].long()
        self.known_pairs = torch.unique(keys).to(self.known_pairs.device)  # sorted
        # A small users x items grid is kept dense: the mask is then two gathers, not a binary search
        # per (row, negative) pair (MovieLens: 1.6 MB, and the search was 40% of a training step).
        self.known_dense = torch.zeros(0, 0, dtype=torch.bool, device=self.known_pairs.device)
        if self.n_users * self.n_items <= DENSE_KNOWN_MAX_CELLS:
            dense = torch.zeros(self.n_users * self.n_items, dtype=torch.bool, device=self.known_pairs.device)
            dense[self.known_pairs] = True
            self.known_dense = dense.view(self.n_users, self.n_items)

    def known_positive_mask(self, users: Tensor, items: Tensor) -> Tensor | None:
        """[B, K] True where ``items[j]`` is a known positive of ``users[i]``; None when not configured."""
        if not self.cfg.mask_known_positives or self.known_pairs.numel() == 0:
            return None
        if self.known_dense.numel():
            return self.known_dense.index_select(0, users).index_select(1, items)
        keys = users[:, None].long() * self.n_items + items[None, :].long()
        pos = torch.searchsorted(self.known_pairs, keys).clamp_(max=self.known_pairs.numel() - 1)
        return self.known_pairs[pos] == keys

    def known_positive_rows(self, users: Tensor) -> Tensor | None:
        """[B, n_items] ``known_positive_mask`` of ``users`` against every item index; None when not configured.

        From the dense grid, a row gather with no per-cell lookup (the ``all`` sampler's mask is a
        column slice of it, a view)."""
        if not self.cfg.mask_known_positives or self.known_pairs.numel() == 0:
            return None
        if self.known_dense.numel():
            return self.known_dense.index_select(0, users)
        return self.known_positive_mask(users, torch.arange(self.n_items, device=users.device))

    def user_vectors(self, batch: Batch) -> Tensor:
        """[B, dim] unit user vectors; needs only the user-side fields of ``batch``."""
        check_history(batch.history, batch.history_mask)
        history_emb = self.item_tower.embed_history(batch.history)  # the shared table (and titles)
        return self.user_tower(batch.user, batch.user_cats, batch.counters, history_emb, batch.history_mask)

    @property
    def reads_titles(self) -> bool:
        """Whether ``item_vectors`` needs ``item_tokens`` (``cfg.title_dim > 0``)."""
        return self.item_tower.reads_titles

    def item_vectors(self, item_idx: Tensor, item_cats: Tensor, item_age_h: Tensor, item_tokens: Tensor | None = None) -> Tensor:
        """[N, dim] unit item vectors from plain tensors (whole-catalogue embedding for the index);
        ``item_tokens`` [N, T] is required when the item tower reads titles (``cfg.title_dim > 0``)."""
        return self.item_tower(item_idx, item_cats, item_age_h, item_tokens)

    def batch_item_vectors(self, batch: Batch) -> Tensor:
        """[B, dim] unit vectors of each row's item: ``item_vectors`` on the Batch's item fields."""
        return self.item_vectors(batch.item, batch.item_cats, batch.item_age_h, batch.item_tokens)

    def forward(self, batch: Batch) -> TwoTowerOutput:
        """User and item vectors of every row, plus sampled negatives when ``cfg.loss == 'sampled'``
        and the impression term's click logits when ``cfg.impression_weight > 0``."""
        out = TwoTowerOutput(
            user=self.user_vectors(batch),
            item=self.batch_item_vectors(batch),
            temperature=self.temperature(),
            negatives=None,
        )
        if self.impression_head is not None:
            out.impression = self.impression_head((out.user * out.item).sum(dim=-1), batch.position)
        if self.cfg.loss == "sampled":
            out.negatives = self._sample_negatives(batch)
        return out

    def _sample_negatives(self, batch: Batch) -> SampledNegatives:
        if self.sampler is None:
            raise RuntimeError("loss='sampled' needs the item catalogue: call model.attach_catalogue(item_cats, item_counts)")
        ids = self.sampler.sample(self.cfg.num_negatives)
        # Negatives take ages drawn from this batch's positives (its clicked rows), so freshness
        # carries no signal that would separate sampled negatives from positives by construction.
        if len(batch):
            ages = batch.item_age_h[draw_rows(batch.clicked > 0, ids.shape[0])]
        else:
            ages = torch.zeros(ids.shape[0], device=ids.device)
        tokens = self.item_tower.item_titles[ids] if self.item_tower.reads_titles else None
        vectors = self.item_vectors(ids, self.sampler.item_cats[ids], ages, tokens)
        return SampledNegatives(ids, vectors, self.sampler.log_q[ids], self.sampler.log_q[batch.item])

    def score(self, batch: Batch) -> Tensor:
        """[B] retrieval score of each row's (user, item) pair: ``u . v / T``."""
        item = self.batch_item_vectors(batch)
        return (self.user_vectors(batch) * item).sum(dim=-1) / self.temperature()
