"""Models: attention kernels, history encoders and towers, the two-tower retrieval model, the
multi-task ranker, their losses and the down-sampling calibration correction."""

from feedrank.models.attention import ATTENTION_IMPLS, MultiHeadAttention, attend
from feedrank.models.calibration import correct_logit, correct_probability, downsample_negatives
from feedrank.models.interactions import build_interaction
from feedrank.models.losses import (
    NegativeSampler,
    bce_loss,
    in_batch_softmax_loss,
    sampled_softmax_loss,
    two_tower_loss,
)
from feedrank.models.ranker import (
    HeadWeights,
    ItemInputs,
    Ranker,
    RankerConfig,
    RankerOutput,
    UserInputs,
    ranker_loss,
    value_score,
)
from feedrank.models.towers import ItemTower, UserTower, build_history_encoder
from feedrank.models.two_tower import TwoTower, TwoTowerConfig, TwoTowerOutput

__all__ = [
    "ATTENTION_IMPLS",
    "HeadWeights",
    "ItemInputs",
    "Ranker",
    "RankerConfig",
    "RankerOutput",
    "UserInputs",
    "build_interaction",
    "correct_logit",
    "correct_probability",
    "downsample_negatives",
    "ranker_loss",
    "value_score",
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
