"""Training: one loop for every feedrank model (``Trainer``), its checkpoints and distribution.

See ``feedrank.train.trainer`` for the loss/data contract and an example.
"""

from feedrank.train.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint
from feedrank.train.trainer import PREEMPTED_EXIT_CODE, FitResult, Trainer, TrainConfig, TrainState, lr_at

__all__ = [
    "PREEMPTED_EXIT_CODE",
    "CheckpointError",
    "FitResult",
    "TrainConfig",
    "TrainState",
    "Trainer",
    "latest_checkpoint",
    "load_checkpoint",
    "lr_at",
]
