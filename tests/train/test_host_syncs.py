"""The training step reads nothing back from the device: zero host syncs on every step that does
not write a metrics record, counted (``feedrank.train.syncs.SyncCounter``) over real ``Trainer``
steps of the two-tower (each loss) and the ranker (alone and fed by a frozen two-tower).

A value check in a forward (``int(ids.min())``), a boolean-mask selection in a loss or a
``.item()`` in the loop makes this fail, naming the op.
"""

import functools

import pytest
import torch

from feedrank.config import from_dict
from feedrank.data.batch import Batch
from feedrank.models.losses import two_tower_loss
from feedrank.models.ranker import Ranker, RankerConfig, ranker_loss
from feedrank.models.two_tower import TwoTower, TwoTowerConfig
from feedrank.train import Trainer, TrainConfig
from feedrank.train.syncs import SyncCounter

N_USERS, N_ITEMS, USER_CATS, ITEM_CATS = 20, 40, [4, 5], [6, 3, 7]
STEPS, LOG_EVERY = 6, 3


def random_batch(g: torch.Generator, b: int = 16, length: int = 5) -> Batch:
    lengths = torch.randint(0, length + 1, (b,), generator=g)
    mask = torch.arange(length)[None, :] < lengths[:, None]
    f = lambda: torch.rand(b, generator=g)  # noqa: E731
    return Batch(
        user=torch.randint(2, N_USERS, (b,), generator=g),
        user_cats=torch.stack([torch.randint(0, s, (b,), generator=g) for s in USER_CATS], dim=1),
        history=torch.randint(2, N_ITEMS, (b, length), generator=g) * mask, history_mask=mask,
        item=torch.randint(2, N_ITEMS, (b,), generator=g),
        item_cats=torch.stack([torch.randint(0, s, (b,), generator=g) for s in ITEM_CATS], dim=1),
        item_age_h=f() * 48, counters=torch.rand(b, 2, generator=g), position=torch.randint(0, 30, (b,), generator=g),
        clicked=(f() < 0.4).float(), dwell_s=f() * 60, shared=(f() < 0.1).float(), hidden=(f() < 0.1).float(),
        weight=f() + 0.5, item_logq=-3.0 - f(), request=torch.arange(b) // 4,
    )  # fmt: skip


def two_tower(**overrides) -> TwoTower:
    cfg = TwoTowerConfig(**{"dim": 8, "item_id_dim": 8, "user_id_dim": 4, "cat_dim": 2, "hidden": [16],
                            "dropout": 0.1, "n_heads": 2, **overrides})
    model = TwoTower(cfg, N_USERS, N_ITEMS, USER_CATS, ITEM_CATS, n_counters=2)
    model.attach_catalogue(torch.randint(0, 3, (N_ITEMS, 3)), item_counts=torch.arange(N_ITEMS))
    model.attach_known_positives(torch.tensor([2, 3, 4]), torch.tensor([5, 6, 7]))
    return model


def ranker(**overrides) -> Ranker:
    cfg = RankerConfig(**{"dim": 8, "hidden": [16, 8], "negative_rate": 0.5, **overrides})
    return Ranker(cfg, N_USERS, N_ITEMS, USER_CATS, ITEM_CATS, n_user_counters=1, n_item_counters=1)


CASES = {
    "two_tower/in_batch": lambda: (two_tower(history_encoder="transformer", mask_known_positives=True), two_tower_loss),
    "two_tower/sampled": lambda: (two_tower(loss="sampled", num_negatives=8, negative_sampler="popularity",
                                            history_encoder="attention", attention_query="user"), two_tower_loss),
    "two_tower/sampled_all": lambda: (two_tower(loss="sampled", negative_sampler="all", learn_temperature=True,
                                                temperature=0.1), two_tower_loss),
    "two_tower/bce": lambda: (two_tower(loss="bce"), two_tower_loss),
    "ranker": lambda: (ranker(history_encoder="attention", attention_query="user"), ranker_loss),
    "ranker/two_tower": lambda: (ranker(two_tower_dim=8, interaction="dot"),
                                 functools.partial(ranker_loss, two_tower=two_tower().eval())),
}


def syncs_per_step(tmp_path, case: str, **train) -> tuple[list[int], SyncCounter]:
    """Syncs in each of steps 1..STEPS-1 (a step runs from one batch request to the next)."""
    model, loss_fn = CASES[case]()
    g = torch.Generator().manual_seed(1)
    batches = [random_batch(g) for _ in range(STEPS)]
    counter, marks = SyncCounter(), []

    def data(epoch):
        for batch in batches:
            marks.append(counter.total)
            yield batch

    cfg = from_dict(TrainConfig, {"steps": STEPS, "log_every": LOG_EVERY, "device": "cpu", "progress": False,
                                  "out_dir": str(tmp_path), "warmup_steps": 2, **train})
    with Trainer(model, loss_fn, cfg) as trainer, counter:
        result = trainer.fit(data)
    assert result.status == "completed" and len(marks) == STEPS
    return [b - a for a, b in zip(marks, marks[1:])], counter


@pytest.mark.parametrize("case", list(CASES))
def test_training_steps_do_not_sync(tmp_path, case):
    per_step, counter = syncs_per_step(tmp_path, case)
    quiet = [n for step, n in enumerate(per_step, start=1) if step % LOG_EVERY]
    assert quiet == [0] * len(quiet), f"host syncs in non-logging steps {per_step}: {dict(counter.by_op)}"


@pytest.mark.parametrize("case", ["two_tower/in_batch", "ranker/two_tower"])
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_steps_do_not_sync(tmp_path, case, precision):
    """fp16 included: the GradScaler's skipped-step count stays on the device until a record."""
    per_step, counter = syncs_per_step(tmp_path, case, precision=precision)
    quiet = [n for step, n in enumerate(per_step, start=1) if step % LOG_EVERY]
    assert quiet == [0] * len(quiet), f"host syncs in non-logging steps {per_step}: {dict(counter.by_op)}"


def test_a_logging_step_syncs_a_bounded_number_of_times(tmp_path):
    """The record itself reads values back (that is its job), a fixed few times, not once per key."""
    per_step, _ = syncs_per_step(tmp_path, "ranker", clip_grad_norm=1.0)
    assert 0 < per_step[LOG_EVERY - 1] <= 3


def test_the_counter_sees_the_syncs_this_test_guards_against():
    x = torch.arange(6)
    with SyncCounter() as counter:
        int(x.min())  # a value check
        x[x > 2]  # a boolean-mask selection
        bool((x >= 0).all())
        x[torch.tensor([0, 2])]  # index selection: no sync
    assert dict(counter.by_op) == {"_local_scalar_dense": 2, "index": 1}
