"""User and item towers of the retrieval model, and the history encoders the user tower uses.

A history encoder turns a padded history of item embeddings ``[B, L, D]`` plus its boolean mask
``[B, L]`` into one vector ``[B, D]``. Three are available behind one interface
(``build_history_encoder``), ordered by cost:

- ``mean``: masked mean. Order-blind and cheap; a strong baseline.
- ``attention``: attention pooling, one query per user. The query is either a learned vector
  (the same for everyone) or derived from the user's own ID and categorical features. It never
  depends on the candidate item, unlike DIN-style target attention: a retrieval user vector must be
  computable once, before any candidate is known, so it can be looked up in an ANN index.
- ``transformer``: a small pre-LN transformer over the history with learned *recency* positional
  embeddings (position 0 = the most recent item), then masked-mean or last-token pooling. Recency
  positions keep a right-padded batch padding-invariant and give "the last click" the same
  embedding whatever the history length.

Every encoder maps an all-False mask row (a user with no history) to zeros, never NaN.

The item ID embedding table is owned by the item tower and *shared* with the user tower's history:
the history is a sequence of items, so embedding it with the same table halves the largest
parameter block and puts history and candidate items in one space, where a user's past clicks are
already near the items they resemble (good for cold-ish users and for the mean encoder).
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from feedrank.models.attention import AttentionImpl, MultiHeadAttention

EncoderKind = Literal["mean", "attention", "transformer"]
AttentionQuery = Literal["learned", "user"]
Pooling = Literal["mean", "last"]


# --------------------------------------------------------------------------------------------------
# input checks: shapes and dtypes only. Values (index ranges, NaN ages) are checked where a Batch is
# made (feedrank.data.collate): a value check here reads the device back to the host on every step
# and breaks the graph under torch.compile / torch.export.


def check_history(history: Tensor, mask: Tensor) -> None:
    """Raise if a history and its mask do not fit together; names both shapes."""
    if history.dim() != 2 or mask.shape != history.shape:
        raise ValueError(
            f"history {tuple(history.shape)} and history_mask {tuple(mask.shape)} must both be [B, L]"
        )
    if mask.dtype != torch.bool:
        raise ValueError(f"history_mask must be bool, got {mask.dtype}")


def check_columns(name: str, x: Tensor, batch: int, n_cols: int) -> None:
    if x.shape != (batch, n_cols):
        raise ValueError(f"{name} must be [{batch}, {n_cols}] (batch, columns), got {tuple(x.shape)}")


# --------------------------------------------------------------------------------------------------
# history encoders


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``x`` [B, L, D] over the True positions of ``mask`` [B, L]; zeros for empty rows."""
    weights = mask.to(x.dtype).unsqueeze(-1)
    return (x * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


def _last_real(x: Tensor, mask: Tensor) -> Tensor:
    """The element at the last True position of each row (histories are right-padded); zeros if none."""
    lengths = mask.sum(dim=1)
    idx = (lengths - 1).clamp_min(0)
    last = x[torch.arange(x.shape[0], device=x.device), idx]
    return last * (lengths > 0).to(x.dtype).unsqueeze(-1)


class HistoryEncoder(nn.Module):
    """Interface: ``forward(history_emb [B, L, D], mask [B, L], context [B, C] | None) -> [B, D]``.

    ``context`` is the user's non-history representation; only encoders that need it use it.
    """

    def forward(self, history_emb: Tensor, mask: Tensor, context: Tensor | None = None) -> Tensor:
        raise NotImplementedError


class MeanHistoryEncoder(HistoryEncoder):
    def forward(self, history_emb: Tensor, mask: Tensor, context: Tensor | None = None) -> Tensor:
        return masked_mean(history_emb, mask)


class AttentionPoolEncoder(HistoryEncoder):
    """Attention pooling: one query per user attends over the history.

    ``query="learned"`` uses one trained vector for everyone (which history items matter, in
    general); ``query="user"`` projects the user's context vector, so different users can weight
    the same history differently. Neither looks at the candidate item.
    """

    def __init__(
        self,
        dim: int,
        n_heads: int,
        query: AttentionQuery = "learned",
        context_dim: int = 0,
        impl: AttentionImpl = "sdpa",
        dropout: float = 0.0,
        grad_checkpointing: bool = False,
    ):
        super().__init__()
        if query == "user" and context_dim <= 0:
            raise ValueError("attention pooling with query='user' needs context_dim > 0")
        self.query_kind = query
        self.attn = MultiHeadAttention(dim, n_heads, impl, dropout)
        self.query = nn.Parameter(torch.randn(dim) * dim**-0.5) if query == "learned" else None
        self.query_proj = nn.Linear(context_dim, dim) if query == "user" else None
        self.grad_checkpointing = grad_checkpointing

    def _pool(self, history_emb: Tensor, mask: Tensor, query: Tensor) -> Tensor:
        return self.attn(query.unsqueeze(1), history_emb, mask).squeeze(1)

    def forward(self, history_emb: Tensor, mask: Tensor, context: Tensor | None = None) -> Tensor:
        if self.query_proj is not None:
            if context is None:
                raise ValueError("attention pooling with query='user' needs the user context vector")
            query = self.query_proj(context)
        else:
            query = self.query.expand(history_emb.shape[0], -1)
        if self.grad_checkpointing and torch.is_grad_enabled():
            pooled = checkpoint(self._pool, history_emb, mask, query, use_reentrant=False)
        else:
            pooled = self._pool(history_emb, mask, query)
        # out_proj has a bias, so an empty history would otherwise pool to that bias.
        return pooled * mask.any(dim=1, keepdim=True).to(pooled.dtype)


class TransformerBlock(nn.Module):
    """Pre-LN block: x + attn(LN(x)), then x + mlp(LN(x)). Pre-LN trains stably without warm-up tricks."""

    def __init__(self, dim: int, n_heads: int, impl: AttentionImpl, dropout: float, mlp_ratio: int = 4):
        super().__init__()
        self.ln_attn = nn.LayerNorm(dim)
        self.attn = MultiHeadAttention(dim, n_heads, impl, dropout)
        self.ln_mlp = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim), nn.Dropout(dropout)
        )
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        h = self.ln_attn(x)
        x = x + self.drop(self.attn(h, h, mask))
        return x + self.mlp(self.ln_mlp(x))


class TransformerHistoryEncoder(HistoryEncoder):
    """Pre-LN transformer over the history, then masked-mean or last-token (most recent) pooling.

    With ``grad_checkpointing`` each block's activations are dropped after the forward pass and
    recomputed during backward (``use_reentrant=False``, which also replays dropout's RNG), trading
    about one extra forward of the encoder for the memory of its intermediate activations.
    """

    def __init__(
        self,
        dim: int,
        n_heads: int,
        n_layers: int,
        max_len: int,
        pooling: Pooling = "mean",
        impl: AttentionImpl = "sdpa",
        dropout: float = 0.0,
        grad_checkpointing: bool = False,
    ):
        super().__init__()
        self.max_len, self.pooling, self.grad_checkpointing = max_len, pooling, grad_checkpointing
        self.position = nn.Embedding(max_len, dim)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(TransformerBlock(dim, n_heads, impl, dropout) for _ in range(n_layers))
        self.ln_out = nn.LayerNorm(dim)

    def forward(self, history_emb: Tensor, mask: Tensor, context: Tensor | None = None) -> Tensor:
        if history_emb.shape[1] > self.max_len:
            raise ValueError(
                f"history length {history_emb.shape[1]} exceeds the transformer's max_history_len "
                f"{self.max_len}; truncate histories in the feature pipeline or raise max_history_len"
            )
        lengths = mask.sum(dim=1, keepdim=True)
        steps = torch.arange(history_emb.shape[1], device=mask.device)
        recency = (lengths - 1 - steps).clamp_min(0)  # 0 = most recent; padded slots clamp to 0 (masked)
        x = self.drop(history_emb + self.position(recency))
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, mask, use_reentrant=False)
            else:
                x = block(x, mask)
        x = self.ln_out(x)
        if self.pooling == "last":
            return _last_real(x, mask)
        return masked_mean(x, mask)


def build_history_encoder(
    kind: EncoderKind,
    dim: int,
    *,
    n_heads: int = 2,
    n_layers: int = 1,
    max_len: int = 50,
    query: AttentionQuery = "learned",
    context_dim: int = 0,
    pooling: Pooling = "mean",
    impl: AttentionImpl = "sdpa",
    dropout: float = 0.0,
    grad_checkpointing: bool = False,
) -> HistoryEncoder:
    """The history encoder named by ``kind`` (see the module docstring for the choices)."""
    if kind == "mean":
        if grad_checkpointing:
            raise ValueError("grad_checkpointing has nothing to checkpoint in the 'mean' history encoder")
        return MeanHistoryEncoder()
    if kind == "attention":
        return AttentionPoolEncoder(dim, n_heads, query, context_dim, impl, dropout, grad_checkpointing)
    if kind == "transformer":
        return TransformerHistoryEncoder(dim, n_heads, n_layers, max_len, pooling, impl, dropout, grad_checkpointing)
    raise ValueError(f"unknown history encoder {kind!r}; choose 'mean', 'attention' or 'transformer'")


# --------------------------------------------------------------------------------------------------
# towers


def mlp(in_dim: int, hidden: Sequence[int], out_dim: int, dropout: float) -> nn.Sequential:
    """Linear -> LayerNorm -> GELU -> Dropout per hidden layer, then a final Linear.

    LayerNorm, not BatchNorm: tower outputs are compared across rows (in-batch negatives), and
    BatchNorm would leak batch statistics into each row and behave differently at serving time.
    """
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(in_dim, width), nn.LayerNorm(width), nn.GELU(), nn.Dropout(dropout)]
        in_dim = width
    layers.append(nn.Linear(in_dim, out_dim))
    return nn.Sequential(*layers)


class CategoricalEmbeddings(nn.Module):
    """One embedding table per categorical column; the column embeddings are concatenated."""

    def __init__(self, sizes: Sequence[int], dim: int):
        super().__init__()
        self.sizes = list(sizes)
        self.tables = nn.ModuleList(nn.Embedding(size, dim, padding_idx=0) for size in self.sizes)
        self.out_dim = dim * len(self.sizes)

    def forward(self, cats: Tensor) -> Tensor:
        """``cats`` [B, n_columns] (shape checked by the caller, which knows B) -> [B, out_dim]."""
        if not self.sizes:
            return cats.new_zeros((cats.shape[0], 0), dtype=torch.float32)
        return torch.cat([table(cats[:, j]) for j, table in enumerate(self.tables)], dim=-1)


def check_tokens(tokens: Tensor, batch: int) -> None:
    """Raise unless title tokens are ``[batch, T]`` int64 (values: ``feedrank.data.collate``)."""
    if tokens.dim() != 2 or tokens.shape[0] != batch or tokens.dtype != torch.long:
        raise ValueError(f"item_tokens must be [{batch}, T] int64 (batch, title words), got {tuple(tokens.shape)} {tokens.dtype}")


TITLE_INIT_STD = 0.01


class TitleBag(nn.Module):
    """Mean of a title's word embeddings (``nn.EmbeddingBag``, padding 0 left out): [N, T] -> [N, dim].

    A bag of words, not a sequence model: a news title's topic is carried by its words more than by
    their order, and a bag is one gather and a mean per item, cheap enough to re-embed a catalogue
    at every index rebuild. A title without words pools to zeros.
    """

    def __init__(self, n_tokens: int, dim: int):
        super().__init__()
        if n_tokens < 2:
            raise ValueError(f"a title bag needs a token vocabulary (size >= 2 with padding and OOV), got {n_tokens}")
        self.bag = nn.EmbeddingBag(n_tokens, dim, mode="mean", padding_idx=0)
        # Small init: an ID table may start random (a random vector tells items apart, which is all an
        # ID has to do), but a word's vector is only useful once words of one topic are near each
        # other, structure that training must build; at N(0, 1) the few hundred steps of a run move
        # a word about 0.2 and the bags stay random fingerprints that do not generalise to new items.
        nn.init.normal_(self.bag.weight, std=TITLE_INIT_STD)
        with torch.no_grad():
            self.bag.weight[0].zero_()

    def forward(self, tokens: Tensor) -> Tensor:
        return self.bag(tokens)

    @torch.no_grad()
    def start_from(self, vectors: Tensor) -> None:
        """Start training from these word vectors [n_tokens, dim] (``feedrank.features.text``)."""
        if vectors.shape != self.bag.weight.shape:
            raise ValueError(f"word vectors must be {tuple(self.bag.weight.shape)}, got {tuple(vectors.shape)}")
        self.bag.weight.copy_(vectors)


def item_title_table(tokens: Tensor, n_items: int, device: torch.device) -> Tensor:
    """``tokens`` checked as the [n_items, T] title table by item index, as long on ``device``
    (the one check behind every model's ``attach_titles``)."""
    if tokens.dim() != 2 or tokens.shape[0] != n_items:
        raise ValueError(f"item titles must be [n_items, T] = [{n_items}, T], got {tuple(tokens.shape)}")
    return tokens.to(device=device, dtype=torch.long)


def drop_ids(ids: Tensor, rate: float, training: bool) -> Tensor:
    """``ids`` with a share ``rate`` replaced by OOV (1), in training only.

    ID dropout: a new item has no trained ID row (it is OOV), so a tower that always sees a trained
    ID learns to lean on it and gives a new item the OOV row's vector whatever its content. Training
    some rows as OOV teaches the OOV row to mean "unknown item" and the content inputs to carry the
    item on their own.
    """
    if not training or rate == 0.0:
        return ids
    return torch.where(torch.rand(ids.shape, device=ids.device) < rate, torch.ones_like(ids), ids)


class ItemTower(nn.Module):
    """Item ID + categorical (publisher, type, category) embeddings + title words + freshness -> MLP -> unit vector.

    Freshness enters as ``log1p(age_hours)`` through a small MLP: news value decays roughly
    logarithmically (the first hours matter most), and log1p keeps week-old items from dominating.
    ``freshness_dim=0`` leaves it out, for catalogues where age is not a property of the item: with no
    creation time, "age" is the time since the item's first impression in the log, a clock; under
    in-batch softmax each negative carries the age of its own row's time, so the model can learn to
    tell positives by time, a shortcut serving (all candidates scored at one time) does not have.

    Content (``title_dim > 0``): the title's words through a ``TitleBag``, so an item the model never
    saw (OOV ID) still gets a vector from its publisher, category, type, age and words; ``id_dropout``
    trains for that case (``drop_ids``). ``id_embedding`` stays a plain ``nn.Embedding`` attribute
    (sharded-table backends replace it from outside).

    ``embed_history`` is what the user tower reads for a history: the ID rows, plus, with content,
    a projection of each history item's title bag (titles by item index: ``attach_titles``, from the
    bundle catalogue). Without it the user side would know items only by ID while a new candidate
    is known only by content, and the two would not meet.
    """

    def __init__(
        self,
        n_items: int,
        cat_sizes: Sequence[int],
        *,
        id_dim: int,
        cat_dim: int,
        freshness_dim: int,
        hidden: Sequence[int],
        out_dim: int,
        dropout: float,
        n_tokens: int = 0,
        title_dim: int = 0,
        id_dropout: float = 0.0,
    ):
        super().__init__()
        self.n_items, self.id_dropout = n_items, id_dropout
        self.id_embedding = nn.Embedding(n_items, id_dim, padding_idx=0)
        self.cats = CategoricalEmbeddings(cat_sizes, cat_dim)
        self.title = TitleBag(n_tokens, title_dim) if title_dim else None
        self.freshness = (
            nn.Sequential(nn.Linear(1, freshness_dim), nn.GELU(), nn.Linear(freshness_dim, freshness_dim))
            if freshness_dim
            else None
        )
        self.mlp = mlp(id_dim + self.cats.out_dim + title_dim + freshness_dim, hidden, out_dim, dropout)
        self.history_title = nn.Linear(title_dim, id_dim, bias=False) if title_dim else None
        # [n_items, T] title tokens by item index (attach_titles); not saved: the catalogue holds them
        self.register_buffer("item_titles", torch.zeros(0, 1, dtype=torch.long), persistent=False)

    @property
    def reads_titles(self) -> bool:
        return self.title is not None

    def attach_titles(self, tokens: Tensor) -> None:
        """The title tokens [n_items, T] of every item index (``feedrank.bundle.catalogue_item_tokens``)."""
        self.item_titles = item_title_table(tokens, self.n_items, self.item_titles.device)

    def embed_history(self, history: Tensor) -> Tensor:
        """[B, L] item indices -> [B, L, id_dim]: ID rows (+ projected title bags with content)."""
        emb = self.id_embedding(history)
        if self.title is None:
            return emb
        if self.item_titles.shape[0] != self.n_items:
            raise RuntimeError("this item tower reads titles: attach the catalogue's with attach_titles(tokens) first "
                               "(load_bundle and the training task do)")  # fmt: skip
        b, length = history.shape
        bags = self.title(self.item_titles[history.reshape(-1)]).view(b, length, self.title.bag.embedding_dim)
        return emb + self.history_title(bags).to(emb.dtype)

    def forward(self, item: Tensor, item_cats: Tensor, item_age_h: Tensor, item_tokens: Tensor | None = None) -> Tensor:
        """``item`` [N], ``item_cats`` [N, n_cats], ``item_age_h`` [N] hours >= 0, ``item_tokens``
        [N, T] title-token indices (required when the tower reads titles, else ignored) -> [N, out_dim], unit norm.

        Indices must be in their vocabularies and ages finite and >= 0: ``feedrank.data.collate``
        checks that; only shapes are checked here (see the input checks above).
        """
        if item.dim() != 1 or item_age_h.shape != item.shape:
            raise ValueError(f"item {tuple(item.shape)} and item_age_h {tuple(item_age_h.shape)} must both be [N]")
        check_columns("item_cats", item_cats, item.shape[0], len(self.cats.sizes))
        parts = [self.id_embedding(drop_ids(item, self.id_dropout, self.training)), self.cats(item_cats)]
        if self.title is not None:
            if item_tokens is None:
                raise ValueError("this item tower reads titles (two_tower.title_dim > 0): pass item_tokens "
                                 "(Batch.item_tokens, or feedrank.bundle.catalogue_item_tokens)")  # fmt: skip
            check_tokens(item_tokens, item.shape[0])
            parts.append(self.title(item_tokens).to(parts[0].dtype))
        if self.freshness is not None:
            parts.append(self.freshness(torch.log1p(item_age_h.float()).unsqueeze(-1)))
        x = torch.cat(parts, dim=-1)
        return F.normalize(self.mlp(x).float(), dim=-1)  # fp32 even under autocast: logits and the index need it


class UserTower(nn.Module):
    """User ID + categorical features + counters + encoded history -> MLP -> unit vector.

    ``id_dim=0`` drops the user-ID embedding (``collate`` still range-checks the ``user`` indices),
    for setups where the user should be represented by what they did rather than memorised.

    The history arrives already embedded (``history_emb``), with the item tower's table: see the
    module docstring for why the table is shared. The tower reads only the *first* ``n_counters``
    columns of ``counters``, which must be user-side (the user's impression and click counts):
    an item counter would make the user vector depend on the candidate, which retrieval cannot
    know when it computes the user vector.
    """

    def __init__(
        self,
        n_users: int,
        cat_sizes: Sequence[int],
        n_counters: int,
        history_encoder: HistoryEncoder,
        *,
        id_dim: int,
        cat_dim: int,
        history_dim: int,
        hidden: Sequence[int],
        out_dim: int,
        dropout: float,
    ):
        super().__init__()
        self.n_users, self.n_counters = n_users, n_counters
        self.id_embedding = nn.Embedding(n_users, id_dim, padding_idx=0) if id_dim else None
        self.cats = CategoricalEmbeddings(cat_sizes, cat_dim)
        self.history_encoder = history_encoder
        self.mlp = mlp(id_dim + self.cats.out_dim + n_counters + history_dim, hidden, out_dim, dropout)

    def forward(
        self, user: Tensor, user_cats: Tensor, counters: Tensor, history_emb: Tensor, history_mask: Tensor
    ) -> Tensor:
        """``user`` [B], ``user_cats`` [B, n_cats], ``counters`` [B, >= n_counters], ``history_emb`` [B, L, D]."""
        if user.dim() != 1:
            raise ValueError(f"user must be [B], got {tuple(user.shape)}")
        check_columns("user_cats", user_cats, user.shape[0], len(self.cats.sizes))
        if counters.dim() != 2 or counters.shape[0] != user.shape[0] or counters.shape[1] < self.n_counters:
            raise ValueError(
                f"counters must be [{user.shape[0]}, >= {self.n_counters}] (batch, columns), got {tuple(counters.shape)}"
            )
        if history_emb.shape[0] != user.shape[0]:
            raise ValueError(f"history has batch size {history_emb.shape[0]} but user has {user.shape[0]}")
        cats = self.cats(user_cats)
        context = cats if self.id_embedding is None else torch.cat([self.id_embedding(user), cats], dim=-1)
        pooled = self.history_encoder(history_emb, history_mask, context)
        user_counters = counters[:, : self.n_counters].to(context.dtype)
        x = torch.cat([context, user_counters, pooled.to(context.dtype)], dim=-1)
        return F.normalize(self.mlp(x).float(), dim=-1)  # fp32 even under autocast: logits and the index need it
