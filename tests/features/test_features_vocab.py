import json

import numpy as np
import pyarrow as pa
import pytest

from feedrank.config import ConfigError, from_dict
from feedrank.features.vocab import OOV, Vocab, Vocabularies, VocabSpec, stable_hash


def test_stable_hash_matches_published_fnv1a_vectors():
    # FNV-1a 64-bit reference values (http://www.isthe.com/chongo/src/fnv/test_fnv.c)
    got = stable_hash(["", "a", "foobar", None])
    assert [int(x) for x in got] == [0xCBF29CE484222325, 0xAF63DC4C8601EC8C, 0x85944171F73967E8, 0xCBF29CE484222325]


def test_stable_hash_of_sliced_and_unicode_arrays():
    arr = pa.array(["x", "héllo", "a", "foobar"]).slice(2)
    assert [int(x) for x in stable_hash(arr)] == [0xAF63DC4C8601EC8C, 0x85944171F73967E8]
    assert stable_hash(["héllo"])[0] == stable_hash(pa.chunked_array([["héllo"]]))[0]


def test_build_orders_by_count_then_id_and_reserves_pad_and_oov():
    v = Vocab.build(pa.array(["b", "c", "a", "c", "b", None, "d", "c"]), "items")
    assert v.ids == ["c", "b", "a", "d"]  # c:3, b:2, then a and d (count 1) by id
    assert len(v) == 6
    assert v.lookup(["c", "b", "a", "d"]).tolist() == [2, 3, 4, 5]


def test_min_count_and_max_size():
    values = pa.array(["a"] * 5 + ["b"] * 3 + ["c"] * 2 + ["d"])
    assert Vocab.build(values, "x", VocabSpec(min_count=2)).ids == ["a", "b", "c"]
    assert Vocab.build(values, "x", VocabSpec(min_count=2, max_size=2)).ids == ["a", "b"]


def test_lookup_unknown_is_oov_and_counted_but_null_is_not_counted():
    v = Vocab.build(["a", "b"], "x")
    idx = v.lookup(pa.array(["b", "zz", None, "a", "yy"]))
    assert idx.dtype == np.int64
    assert idx.tolist() == [3, OOV, OOV, 2, OOV]
    assert v.oov_hits == 2
    v.lookup(["nope"])
    assert v.oov_hits == 3


def test_hash_buckets_are_stable_and_after_known_ids():
    v = Vocab.build(["a", "b", "a"], "x", VocabSpec(hash_buckets=8))
    assert len(v) == 2 + 2 + 8
    idx = v.lookup(["a", "new1", "new2", "new1", None])
    assert idx[0] == 2
    assert idx[4] == OOV
    assert idx[1] == idx[3]  # same unseen id, same bucket
    expected = 4 + (stable_hash(["new1", "new2"]) % np.uint64(8)).astype(np.int64)
    assert idx[1:3].tolist() == expected.tolist()
    assert v.oov_hits == 3


def test_vocab_roundtrip_and_bad_files(tmp_path):
    v = Vocab.build(["b", "a", "b"], "items", VocabSpec(hash_buckets=3))
    v.save(tmp_path / "v.json")
    w = Vocab.load(tmp_path / "v.json")
    assert w == v
    assert w.lookup(["b", "a", "q"]).tolist() == v.lookup(["b", "a", "q"]).tolist()
    (tmp_path / "bad.json").write_text(json.dumps({"format": 1, "name": "x"}))
    with pytest.raises(ValueError, match="bad.json: missing key 'ids'"):
        Vocab.load(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError, match="no vocabulary"):
        Vocab.load(tmp_path / "missing.json")


def test_spec_from_config_rejects_unknown_key_and_bad_values():
    assert from_dict(VocabSpec, {"min_count": 2}).min_count == 2
    with pytest.raises(ConfigError, match="unknown key.*'buckets'"):
        from_dict(VocabSpec, {"buckets": 3})
    with pytest.raises(ConfigError, match="min_count must be >= 1"):
        from_dict(VocabSpec, {"min_count": 0})


def test_vocabularies_sizes_and_roundtrip(tmp_path):
    events = pa.table(
        {
            "user_id": ["u1", "u2", "u1"],
            "item_id": ["i1", "i1", "i2"],
            "age_bucket": ["18-24", None, "18-24"],
            "country": ["DE", "FR", "DE"],
            "publisher": ["p", "p", "q"],
            "item_type": ["article", "article", "video"],
            "category": [None, None, None],
        }
    )
    vocabs = Vocabularies.build(events, items=VocabSpec(hash_buckets=4))
    assert vocabs.n_users == 4 and vocabs.n_items == 2 + 2 + 4
    assert vocabs.user_cat_sizes == [3, 4]  # age: 1 id, country: 2 ids
    assert vocabs.item_cat_sizes == [4, 4, 2]  # category is all null: only pad + OOV
    vocabs.save(tmp_path / "v")
    loaded = Vocabularies.load(tmp_path / "v")
    assert loaded == vocabs
    assert list(loaded.item_cats) == ["publisher", "item_type", "category"]
    with pytest.raises(FileNotFoundError, match="no vocabularies"):
        Vocabularies.load(tmp_path / "nothing")
