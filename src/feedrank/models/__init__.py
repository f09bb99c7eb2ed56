"""Models: attention kernels, history encoders and towers, the two-tower retrieval model and its losses."""

from feedrank.models.attention import ATTENTION_IMPLS, MultiHeadAttention, attend
from feedrank.models.losses import (
    NegativeSampler,
    bce_loss,
    in_batch_softmax_loss,
    sampled_softmax_loss,
    two_tower_loss,
)
from feedrank.models.towers import ItemTower, UserTower, build_history_encoder
from feedrank.models.two_tower import TwoTower, TwoTowerConfig, TwoTowerOutput

__all__ = [
    "ATTENTION_IMPLS",
    "ItemTower",
    "MultiHeadAttention",
    "NegativeSampler",
    "TwoTower",
    "TwoTowerConfig",
    "TwoTowerOutput",
    "UserTower",
    "attend",
    "bce_loss",
    "build_history_encoder",
    "in_batch_softmax_loss",
    "sampled_softmax_loss",
    "two_tower_loss",
]
