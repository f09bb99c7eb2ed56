"""Content fields: with ``features.content_fields: [title, abstract]`` the token vocabulary, every
example's ``item_tokens`` and the bundle catalogue hold title words then abstract words; the default
(titles only) ignores abstracts; a log without the column builds; bad settings are refused."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from feedrank.bundle import build_two_tower, catalogue_item_tokens, load_bundle, save_bundle
from feedrank.data.log import EVENTS_DIR, write_log
from feedrank.features import FeatureConfig, Vocabularies, build_features
from feedrank.features.build import split_files
from feedrank.features.text import content_tokens
from feedrank.features.vocab import OOV, Vocab
from feedrank.train.task import training_catalogue

from .test_features_build import random_log

BOTH = ["title", "abstract"]


def with_text(table: pa.Table) -> pa.Table:
    """Item ``iN``: title ``"TopicN%3 wordN"``; abstract ``"Lead N%3 more words deepN"`` (none when N % 4 == 0)."""
    n = [int(i[1:]) for i in table["item_id"].to_pylist()]
    titles = [f"Topic{k % 3} word{k}" for k in n]
    abstracts = [None if k % 4 == 0 else f"Lead{k % 3} more words deep{k}" for k in n]
    return table.append_column("title", pa.array(titles)).append_column("abstract", pa.array(abstracts))


def _word(vocabs: Vocabularies, word: str) -> int:
    return vocabs.tokens.ids.index(word) + 2


def test_content_tokens_concatenate_each_fields_first_words_in_field_order():
    vocab = Vocab.build(pa.array(["storm", "coast", "hits", "rain"]), "title_tokens")
    rows = pa.table({"abstract": ["Rain rain coast", None, "hits"], "title": ["Storm hits", "Storm", None]})
    got = content_tokens(vocab, rows, {"title": 1, "abstract": 2}).to_pylist()
    s, c, h, r = (vocab.lookup([w])[0] for w in ("storm", "coast", "hits", "rain"))
    assert got == [[s, r, r], [s], [h]]
    assert content_tokens(vocab, rows.drop_columns(["abstract"]), {"title": 5, "abstract": 5}).to_pylist() == [[s, h], [s], []]
    assert content_tokens(None, rows, {"title": 5}).to_pylist() == [[], [], []]
    assert vocab.oov_hits == 0  # building content is not an evaluation


@pytest.fixture(scope="module")
def log(tmp_path_factory):
    root = tmp_path_factory.mktemp("content") / "log"
    assert write_log(root, with_text(random_log(3))).ok
    return root


def test_the_build_reads_abstract_words_only_when_content_fields_has_abstract(log, tmp_path):
    build_features(log, tmp_path / "both", FeatureConfig(content_fields=BOTH, abstract_len=2), progress=False)
    build_features(log, tmp_path / "title", FeatureConfig(), progress=False)
    both, title = (Vocabularies.load(tmp_path / name / "vocab") for name in ("both", "title"))
    assert "lead1" in both.tokens.ids and "lead1" not in title.tokens.ids
    rows = pa.concat_tables(pq.read_table(f) for f in split_files(tmp_path / "both"))
    for item, tokens in zip(rows["item_id"].to_pylist()[:60], rows["item_tokens"].to_pylist()[:60]):
        k = int(item[1:])
        want = [_word(both, f"topic{k % 3}"), _word(both, f"word{k}")]
        want += [] if k % 4 == 0 else [_word(both, f"lead{k % 3}"), _word(both, "more")]  # abstract_len = 2
        assert tokens == want, item
    rows = pa.concat_tables(pq.read_table(f) for f in split_files(tmp_path / "title"))
    assert max(len(t) for t in rows["item_tokens"].to_pylist()) == 2  # titles only, as before abstracts


def test_the_catalogue_and_a_loaded_bundle_carry_abstract_tokens(log, tmp_path):
    cfg = FeatureConfig(content_fields=BOTH)
    build_features(log, tmp_path / "f", cfg, progress=False)
    vocabs = Vocabularies.load(tmp_path / "f" / "vocab")
    catalogue = training_catalogue(log, vocabs, cfg)
    row = vocabs.items.ids.index("i5") + 2
    words = ["topic2", "word5", "lead2", "more", "words", "deep5"]
    assert catalogue["title_tokens"][row].as_py() == [_word(vocabs, w) for w in words]
    title_only = training_catalogue(log, vocabs, FeatureConfig())
    assert title_only["title_tokens"][row].as_py() == [_word(vocabs, w) for w in words[:2]]
    config = {"two_tower": {"dim": 8, "item_id_dim": 8, "hidden": [8], "title_dim": 4}, "features": {"content_fields": BOTH}}
    bundle = load_bundle(save_bundle(tmp_path / "b", kind="two_tower", model=build_two_tower(config, vocabs), config=config,
                                     vocabs=vocabs, catalogue=catalogue))  # fmt: skip
    assert bundle.model.item_tower.item_titles[row, :6].tolist() == [_word(vocabs, w) for w in words]
    assert catalogue_item_tokens(bundle.catalogue).tolist() == catalogue_item_tokens(catalogue).tolist()


def test_a_log_without_the_abstract_column_builds_with_titles_only(tmp_path):
    assert write_log(tmp_path / "log", with_text(random_log(4))).ok
    for part in (tmp_path / "log" / EVENTS_DIR).rglob("*.parquet"):  # as a log written before abstracts
        pq.write_table(pq.read_table(part).drop_columns(["abstract"]), part)
    cfg = FeatureConfig(content_fields=BOTH)
    build_features(tmp_path / "log", tmp_path / "f", cfg, progress=False)
    vocabs = Vocabularies.load(tmp_path / "f" / "vocab")
    assert not any(w.startswith("lead") for w in vocabs.tokens.ids)
    catalogue = training_catalogue(tmp_path / "log", vocabs, cfg)
    assert max(len(t) for t in catalogue["title_tokens"].to_pylist()) == 2
    assert OOV not in sum(catalogue["title_tokens"].to_pylist(), [])


@pytest.mark.parametrize("cfg, match", [
    (FeatureConfig(content_fields=["title", "body"]), "content_fields"),
    (FeatureConfig(content_fields=[]), "content_fields"),
    (FeatureConfig(content_fields=["title", "title"]), "content_fields"),
    (FeatureConfig(abstract_len=0), "abstract_len"),
])  # fmt: skip
def test_bad_content_settings_are_refused_naming_them(cfg, match):
    with pytest.raises(ValueError, match=match):
        cfg.validate()
