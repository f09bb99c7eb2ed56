"""``benchmarks/serving_latency.py --vectors trained``: a trained two-tower scaled to more items
keeps every trained weight, and each scaled item's vector lies near its trained source's."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from feedrank.bundle import catalogue_vectors
from feedrank.features.build import ITEM_CAT_INDEX_COLUMNS
from feedrank.features.vocab import FIRST_ID

BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "serving_latency.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("serving_latency_bench", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _scaled(bench, source, noise: float, n_items: int = 600, n_users: int = 300):
    rng = np.random.default_rng(0)
    vocabs = bench.vocabularies(n_items, n_users, like=source.vocabs)
    items = bench.sampled_rows(vocabs.n_items, source.vocabs.n_items, rng)
    users = bench.sampled_rows(vocabs.n_users, source.vocabs.n_users, rng)
    cat = bench.catalogue(vocabs, rng, {c: source.catalogue[c].to_numpy()[items] for c in ITEM_CAT_INDEX_COLUMNS})
    return bench.scaled_two_tower(source, vocabs, items, users, noise, rng), cat, items, users


def test_scaling_keeps_the_trained_weights_and_samples_trained_id_rows(bench, serving_world):
    source = serving_world.two_tower
    model, _, items, users = _scaled(bench, source, noise=0.0)
    trained, scaled = source.model.state_dict(), model.state_dict()
    item_table = next(k for k, v in trained.items() if v.dim() == 2 and v.shape[0] == source.vocabs.n_items)
    user_table = next(k for k, v in trained.items() if v.dim() == 2 and v.shape[0] == source.vocabs.n_users)
    for name, value in trained.items():
        if name not in (item_table, user_table):
            assert torch.equal(scaled[name], value), name
    assert torch.equal(scaled[item_table], trained[item_table][torch.from_numpy(items)])
    assert torch.equal(scaled[user_table], trained[user_table][torch.from_numpy(users)])
    assert items[:FIRST_ID].tolist() == [0, 1] and items[FIRST_ID:].min() >= FIRST_ID


def test_with_noise_a_scaled_item_vector_is_nearest_its_source(bench, serving_world):
    source = serving_world.two_tower
    model, cat, items, _ = _scaled(bench, source, noise=0.5)
    at = serving_world.start
    rows = np.arange(FIRST_ID, cat.num_rows)
    got = catalogue_vectors(model, cat, at, rows)
    # the same items in the source's catalogue, with the scaled rows' creation times (the age is an input)
    want = catalogue_vectors(bench.scaled_two_tower(source, *_vocabs_like(bench, source, cat, items), noise=0.0,
                                                    rng=np.random.default_rng(0)), cat, at, rows)  # fmt: skip
    assert not torch.allclose(got, want)  # the noise moved them
    nearest = torch.cdist(got, want).argmin(dim=1)
    same_source = items[rows][nearest.numpy()] == items[rows]
    assert same_source.mean() > 0.9


def _vocabs_like(bench, source, cat, items):
    vocabs = bench.vocabularies(cat.num_rows - FIRST_ID, 300, like=source.vocabs)
    users = bench.sampled_rows(vocabs.n_users, source.vocabs.n_users, np.random.default_rng(1))
    return vocabs, items, users
