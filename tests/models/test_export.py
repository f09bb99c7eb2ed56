"""The towers and the ranker capture as whole graphs: zero graph breaks under ``torch.compile``
(dynamo's ``explain``), no recompile for a new batch of the same shape, and ``torch.export``
succeeds on both towers with the same outputs as eager.

A value check in ``forward`` (``int(ids.min())``, ``bool(t.all())``) breaks each of these.
Dynamo only (``backend="eager"``, no code generation), so they take seconds.
"""

import pytest
import torch
import torch._dynamo

from feedrank.models.losses import two_tower_loss

ENCODERS = [
    {"history_encoder": "mean"},
    {"history_encoder": "attention", "attention_query": "user"},
    {"history_encoder": "transformer", "n_layers": 2, "pooling": "last"},
]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def user_args(model, batch):
    history_emb = model.item_tower.id_embedding(batch.history).detach()
    return batch.user, batch.user_cats, batch.counters, history_emb, batch.history_mask


def item_args(batch):
    return batch.item, batch.item_cats, batch.item_age_h


def graph_breaks(fn, *args) -> tuple[int, list[str]]:
    explained = torch._dynamo.explain(fn)(*args)
    return explained.graph_break_count, [str(b.reason).splitlines()[0] for b in explained.break_reasons]


@pytest.mark.parametrize("overrides", ENCODERS, ids=lambda o: o["history_encoder"])
def test_towers_have_no_graph_breaks(make_model, batch, overrides):
    model = make_model(**overrides)
    assert graph_breaks(model.user_tower, *user_args(model, batch)) == (0, [])
    assert graph_breaks(model.item_tower, *item_args(batch)) == (0, [])


@pytest.mark.parametrize("loss", ["in_batch", "sampled", "bce"])
def test_two_tower_forward_has_no_graph_breaks(make_model, batch, loss):
    model = make_model(loss=loss, num_negatives=5, negative_sampler="popularity")
    model.attach_catalogue(torch.zeros(40, 3, dtype=torch.long), item_counts=torch.arange(40))
    assert graph_breaks(model, batch) == (0, [])


@pytest.mark.slow  # ~20 s on a loaded 2-core machine: dynamo traces the ranker twice
def test_ranker_forward_has_no_graph_breaks(make_ranker, batch):
    model = make_ranker(two_tower_dim=8, two_tower_dropout=0.1, history_encoder="attention")
    assert graph_breaks(model, batch, torch.randn(len(batch), 8), torch.randn(len(batch), 8)) == (0, [])
    dot = make_ranker(interaction="dot")
    assert graph_breaks(dot, batch, None, None) == (0, [])


def test_new_values_of_the_same_shape_do_not_recompile(make_model, make_batch):
    """Before, ``check_ids`` read ids back (a guard per value) and the clicked-row selection
    changed the batch size every step: both recompiled."""
    model = make_model(history_encoder="transformer")
    compiled = torch.compile(model, backend="eager")
    loss, _ = two_tower_loss(compiled, make_batch(seed=1))
    loss.backward()
    with torch.compiler.set_stance("fail_on_recompile"):
        for seed in (2, 3):
            batch = make_batch(seed=seed)
            batch.clicked.copy_((torch.arange(len(batch)) % 3 == 0).float())  # another number of positives
            loss, _ = two_tower_loss(compiled, batch)
            loss.backward()


@pytest.mark.parametrize("overrides", ENCODERS, ids=lambda o: o["history_encoder"])
def test_torch_export_of_both_towers_matches_eager(make_model, batch, make_batch, overrides):
    model = make_model(**overrides).eval()
    other = make_batch(seed=5)  # same shapes, other values: the program must not have baked them in
    for tower, args, other_args in ((model.user_tower, user_args(model, batch), user_args(model, other)),
                                    (model.item_tower, item_args(batch), item_args(other))):  # fmt: skip
        program = torch.export.export(tower, args)
        for a in (args, other_args):
            with torch.no_grad():
                torch.testing.assert_close(program.module()(*a), tower(*a))
