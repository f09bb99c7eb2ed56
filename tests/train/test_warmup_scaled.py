"""A warmup longer than the run is scaled to a tenth of it (else the run trains at a fraction of lr)."""
import pytest

from feedrank.train.trainer import TrainConfig, effective_warmup, lr_at


def test_warmup_longer_than_run_is_scaled():
    cfg = TrainConfig(steps=36, lr=1.0, warmup_steps=100, min_lr_ratio=0.0)
    assert effective_warmup(cfg, 36) == 3
    assert lr_at(2, cfg, 36) == pytest.approx(1.0)  # peak reached by step 3, not 0.03
    assert max(lr_at(s, cfg, 36) for s in range(36)) == pytest.approx(1.0)


def test_warmup_shorter_than_run_is_kept():
    cfg = TrainConfig(steps=200, lr=1.0, warmup_steps=100)
    assert effective_warmup(cfg, 200) == 100
    assert lr_at(49, cfg, 200) == pytest.approx(0.5)
    assert effective_warmup(TrainConfig(steps=5, warmup_steps=0), 5) == 0
