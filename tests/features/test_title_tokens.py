"""Titles as features: tokenising, the token vocabulary, the example column, the catalogue, collate."""

from __future__ import annotations

import dataclasses

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from feedrank.bundle import build_catalogue, build_two_tower, catalogue_item_tokens, load_bundle, save_bundle
from feedrank.data.batch import BatchLimits
from feedrank.data.collate import collate
from feedrank.data.log import read_events, write_log
from feedrank.features import FeatureConfig, Vocabularies, build_features
from feedrank.features.build import split_files
from feedrank.features.vocab import OOV, Vocab, title_tokens, token_indices

from .test_features_build import random_log


def test_title_tokens_lower_cases_splits_on_non_word_characters_and_truncates():
    got = title_tokens(["Storm hits, the COAST!", None, "", "Ünïcode — tést 42", "a b c d"], max_tokens=3).to_pylist()
    assert got == [["storm", "hits", "the"], [], [], ["ünïcode", "tést", "42"], ["a", "b", "c"]]


def test_token_indices_keep_each_titles_words_and_count_unknown_ones():
    vocab = Vocab.build(pa.array(["storm", "coast", "storm"]), "title_tokens")
    got = token_indices(vocab, title_tokens(["Storm hits coast", "", "coast"]))
    assert got.to_pylist() == [[2, OOV, 3], [], [3]]
    assert vocab.oov_hits == 1


def with_titles(table: pa.Table) -> pa.Table:
    items = table["item_id"].to_pylist()
    titles = [None if int(i[1:]) % 5 == 0 else f"Topic{int(i[1:]) % 3} word{int(i[1:])} News" for i in items]
    return table.append_column("title", pa.array(titles, pa.string()))


def test_the_build_writes_each_rows_title_tokens_and_a_per_item_word_vocabulary(tmp_path):
    log = with_titles(random_log(0))
    assert write_log(tmp_path / "log", log).ok
    result = build_features(tmp_path / "log", tmp_path / "out", FeatureConfig(title_len=2), progress=False)
    vocabs = Vocabularies.load(tmp_path / "out" / "vocab")
    assert vocabs.tokens is not None and "news" in vocabs.tokens.ids
    assert result.manifest["vocab_sizes"]["title_tokens"] == vocabs.n_tokens
    # "news" is in every titled item: counted once per item, it is the most frequent word
    assert vocabs.tokens.ids[0] == "news"
    rows = pa.concat_tables(pq.read_table(f) for f in split_files(tmp_path / "out"))
    for item, tokens in zip(rows["item_id"].to_pylist()[:50], rows["item_tokens"].to_pylist()[:50]):
        n = int(item[1:])
        want = [] if n % 5 == 0 else [vocabs.tokens.ids.index(f"topic{n % 3}") + 2, vocabs.tokens.ids.index(f"word{n}") + 2]
        assert tokens == want, item


def test_the_catalogue_holds_each_items_latest_title_and_a_loaded_bundle_reads_it(tmp_path):
    log = with_titles(random_log(1))
    assert write_log(tmp_path / "log", log).ok
    events = read_events(tmp_path / "log")
    vocabs = Vocabularies.build(events)
    catalogue = build_catalogue(events, vocabs, {"title": 4})
    tokens = catalogue_item_tokens(catalogue)
    assert tokens.shape == (vocabs.n_items, 3) and not tokens[:2].any()  # padding and OOV rows: no title
    row = vocabs.items.ids.index("i1") + 2
    assert tokens[row].tolist() == token_indices(vocabs.tokens, title_tokens(["Topic1 word1 News"])).to_pylist()[0]
    cfg = {"two_tower": {"dim": 8, "item_id_dim": 8, "hidden": [8], "title_dim": 4}}
    model = build_two_tower(cfg, vocabs)
    bundle = load_bundle(save_bundle(tmp_path / "b", kind="two_tower", model=model, config=cfg, vocabs=vocabs, catalogue=catalogue))
    assert bundle.vocabs.tokens == vocabs.tokens
    assert bundle.model.reads_titles and bundle.model.item_tower.item_titles.shape == tokens.shape
    # without titles in the events, every title is empty
    no_titles = build_catalogue(events.drop_columns(["title"]), vocabs)
    assert not catalogue_item_tokens(no_titles).any()


def test_collate_pads_title_tokens_and_checks_them_against_the_token_vocabulary():
    from tests.data.test_collate_checks import LIMITS, example_rows  # the shared valid rows

    batch = collate(example_rows(), limits=dataclasses.replace(LIMITS, n_tokens=5))
    assert batch.item_tokens.tolist() == [[2, 3], [0, 0], [4, 0], [3, 0]]
    with pytest.raises(ValueError, match=r"item_tokens has indices outside the vocabulary \[0, 4\)"):
        collate(example_rows(), limits=dataclasses.replace(LIMITS, n_tokens=4))
    rows = example_rows()
    i = rows.schema.get_field_index("item_tokens")
    bad = rows.set_column(i, "item_tokens", pa.array([[2], None, [], []], pa.list_(pa.int64())))
    with pytest.raises(ValueError, match="item_tokens: 1 null list"):
        collate(bad)


def test_title_len_is_validated():
    with pytest.raises(ValueError, match="title_len"):
        FeatureConfig(title_len=0).validate()


def test_no_title_column_means_no_token_vocabulary_and_unchecked_tokens():
    events = random_log(2)
    assert Vocabularies.build(events).tokens is None and Vocabularies.build(events).n_tokens == 0
    assert Vocabularies.build(with_titles(events)).tokens.ids[0] == "news"
    assert BatchLimits(1, 1, [], []).n_tokens is None
